package lab_test

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	enumspb "go.temporal.io/api/enums/v1"
	"go.temporal.io/api/operatorservice/v1"
	"gopkg.in/yaml.v3"

	"github.com/diskferry/diskferry/internal/lab"
	"github.com/diskferry/diskferry/internal/testenv"
	"github.com/diskferry/diskferry/workflows"
)

// composeService is the part of a docker-compose.yml service the init step needs.
type composeService struct {
	Entrypoint  []string          `yaml:"entrypoint"`
	Command     []string          `yaml:"command"`
	Environment map[string]string `yaml:"environment"`
}

// TestComposeInitRegistersSearchAttributes starts a deployment's Temporal server without
// diskferry's search attributes: a backup's first workflow task fails there. Then it runs
// docker-compose.yml's temporal-init step exactly as compose does (the same binary built
// from ./starter, its entrypoint, command and environment; only the address points at the
// lab's server) and a backup completes; a second run of the step changes nothing.
func TestComposeInitRegistersSearchAttributes(t *testing.T) {
	l := startLab(t, lab.Options{Disks: 1, DiskSize: 16 << 20, WithoutSearchAttributes: true})
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	c := l.Temporal.Client

	// Without the init step the run never gets past its first workflow task.
	in := workflows.BackupInput{VM: l.VC.VMName, Site: l.Site}
	stuck, err := c.ExecuteWorkflow(ctx, workflows.StartBackupOptions(in), workflows.BackupWorkflowName, in)
	require.NoError(t, err)
	var cause string
	require.Eventually(t, func() bool {
		it := c.GetWorkflowHistory(ctx, stuck.GetID(), stuck.GetRunID(), false, enumspb.HISTORY_EVENT_FILTER_TYPE_ALL_EVENT)
		for it.HasNext() {
			ev, err := it.Next()
			if err != nil {
				return false
			}
			if a := ev.GetWorkflowTaskFailedEventAttributes(); a != nil {
				cause = a.GetCause().String() + ": " + a.GetFailure().GetMessage()
				return true
			}
		}
		return false
	}, time.Minute, 100*time.Millisecond, "the first workflow task did not fail without the search attributes")
	require.Contains(t, cause, "no mapping defined for search attribute", cause)
	require.NoError(t, c.TerminateWorkflow(ctx, stuck.GetID(), stuck.GetRunID(), "search attributes missing"))

	cli := lab.Build(t, t.TempDir(), "./starter", "diskferry")
	init := composeInitCommand(ctx, t, cli, l.Temporal.HostPort)
	out, err := init().CombinedOutput()
	require.NoError(t, err, "%s", out)
	require.Contains(t, string(out), "added: BackupMode, BackupStatus, Site, VMName")

	resp, err := c.OperatorService().ListSearchAttributes(ctx, &operatorservice.ListSearchAttributesRequest{Namespace: l.Temporal.Namespace})
	require.NoError(t, err)
	for _, key := range workflows.SearchAttributeKeys() {
		require.Equal(t, enumspb.INDEXED_VALUE_TYPE_KEYWORD, resp.GetCustomAttributes()[key.GetName()], key.GetName())
	}

	out, err = init().CombinedOutput()
	require.NoError(t, err, "a second run is fine: %s", out)
	require.Contains(t, string(out), "added: none")

	res := runBackup(ctx, t, l, in)
	requireComplete(ctx, t, l, res.PointID)
}

// composeInitCommand returns a maker of the temporal-init service's command of
// docker-compose.yml, run from bin (the image's /usr/local/bin/diskferry is built from
// ./starter) with the service's environment and nothing else, the address set to addr.
func composeInitCommand(ctx context.Context, t *testing.T, bin, addr string) func() *exec.Cmd {
	t.Helper()
	raw, err := os.ReadFile(filepath.Join(testenv.RepoRoot(t), "docker-compose.yml"))
	require.NoError(t, err)
	var file struct {
		Services map[string]composeService `yaml:"services"`
	}
	require.NoError(t, yaml.Unmarshal(raw, &file))
	svc, ok := file.Services["temporal-init"]
	require.True(t, ok, "docker-compose.yml has no temporal-init service")
	require.NotEmpty(t, svc.Entrypoint)
	require.Equal(t, "diskferry", filepath.Base(svc.Entrypoint[0]), "the init step runs the diskferry CLI")
	_, ok = svc.Environment["DISKFERRY_TEMPORAL_ADDRESS"]
	require.True(t, ok, "the init step names the Temporal address")
	env := []string{"PATH=" + os.Getenv("PATH")}
	for k, v := range svc.Environment {
		if k == "DISKFERRY_TEMPORAL_ADDRESS" {
			v = addr
		}
		env = append(env, k+"="+v)
	}
	args := append(append([]string(nil), svc.Entrypoint[1:]...), svc.Command...)
	t.Logf("init step: diskferry %s", strings.Join(args, " "))
	return func() *exec.Cmd {
		cmd := exec.CommandContext(ctx, bin, args...)
		cmd.Env = env
		return cmd
	}
}
