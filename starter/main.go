// Command diskferry is the operator's CLI: one subcommand per file.
package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := newRootCommand().ExecuteContext(ctx)
	stop()
	if err != nil {
		os.Exit(1)
	}
}

func newRootCommand() *cobra.Command {
	root := &cobra.Command{
		Use:           "diskferry",
		Short:         "Back up VMware virtual machines into QCOW2 restore points",
		SilenceUsage:  true,
		SilenceErrors: false,
	}
	// Subcommands inherit the template: every --help lists the environment.
	root.SetUsageTemplate(root.UsageTemplate() + "\n" + environmentHelp + "\n")
	root.AddCommand(newCopyCommand(), newVerifyCommand(), newBackupCommand(), newScheduleCommand(), newAdminCommand(), newPointsCommand(), newRestoreCommand(), newMountCommand(), newUnmountCommand(), newRetentionCommand(), newVMCommand(), newHubsCommand(), newVersionCommand())
	return root
}

// environmentHelp is in every command's help: the settings come from the environment only.
const environmentHelp = `Environment (every command that talks to Temporal):
  DISKFERRY_TEMPORAL_ADDRESS     Temporal frontend host:port (default 127.0.0.1:7233)
  DISKFERRY_TEMPORAL_NAMESPACE   namespace (default "default")
  DISKFERRY_TEMPORAL_TLS_CERT, DISKFERRY_TEMPORAL_TLS_KEY, DISKFERRY_TEMPORAL_TLS_CA,
  DISKFERRY_TEMPORAL_TLS_SERVER_NAME
                                 mTLS client certificate, key, CA and server name
  DISKFERRY_LOG_LEVEL            debug, info, warn (default) or error
Environment (points, retention, vm forget, and schedule create with a retention policy):
  DISKFERRY_DB_DSN, DISKFERRY_DB_DSN_FILE
                                 the hub's catalog DSN, or a file holding it`
