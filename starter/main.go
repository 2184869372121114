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
	root.AddCommand(newCopyCommand(), newVerifyCommand(), newBackupCommand(), newScheduleCommand(), newVersionCommand())
	return root
}
