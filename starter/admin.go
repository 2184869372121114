package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
	"time"

	"github.com/spf13/cobra"
	enumspb "go.temporal.io/api/enums/v1"
	"go.temporal.io/api/operatorservice/v1"
	"go.temporal.io/api/serviceerror"

	"github.com/diskferry/diskferry/internal/config"
	"github.com/diskferry/diskferry/workflows"
)

func newAdminCommand() *cobra.Command {
	cmd := &cobra.Command{Use: "admin", Short: "Prepare a Temporal namespace for diskferry"}
	cmd.AddCommand(newRegisterSearchAttributesCommand())
	return cmd
}

// errWrongType is a search attribute registered under our name with another type: no retry
// fixes that, and the backups' upserts would fail on it.
var errWrongType = errors.New("search attribute registered with another type")

func newRegisterSearchAttributesCommand() *cobra.Command {
	var wait time.Duration
	cmd := &cobra.Command{
		Use:   "register-search-attributes",
		Short: "Register diskferry's search attributes (VMName, Site, BackupMode, BackupStatus) in the namespace",
		Long: `Register diskferry's search attributes (all Keyword) in the namespace. Every backup sets
them from its first workflow task on, and the server fails that task while one is missing, so
a namespace must have them before the first backup. Already registered is fine; one registered
with another type is an error to fix by hand. With --wait it retries until Temporal answers
(a deployment's init step starting next to the server).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := config.LoadCLI()
			if err != nil {
				return err
			}
			ctx := cmd.Context()
			if wait > 0 {
				var cancel context.CancelFunc
				ctx, cancel = context.WithTimeout(ctx, wait)
				defer cancel()
			}
			return registerUntilDone(ctx, cfg.Namespace, cmd.OutOrStdout(), cmd.ErrOrStderr(), wait > 0)
		},
	}
	cmd.Flags().DurationVar(&wait, "wait", 0, "keep retrying this long while Temporal is unreachable or not set up yet (0: try once)")
	return cmd
}

// registerUntilDone registers the attributes, retrying every 2 s while retry is set and ctx
// lasts; a wrong type ends it at once.
func registerUntilDone(ctx context.Context, namespace string, out, errOut io.Writer, retry bool) error {
	want := map[string]enumspb.IndexedValueType{}
	for _, key := range workflows.SearchAttributeKeys() {
		want[key.GetName()] = key.GetValueType()
	}
	for {
		added, err := registerOnce(ctx, namespace, want)
		if err == nil {
			fmt.Fprintf(out, "search attributes of namespace %s ready: %s (added: %s)\n",
				namespace, strings.Join(sortedNames(want), ", "), orNone(added))
			return nil
		}
		if !retry || errors.Is(err, errWrongType) {
			return err
		}
		fmt.Fprintf(errOut, "not yet: %v\n", err)
		select {
		case <-ctx.Done():
			return fmt.Errorf("register search attributes: gave up waiting: %w", err)
		case <-time.After(2 * time.Second):
		}
	}
}

// registerOnce dials, adds the missing attributes and checks that all are there.
func registerOnce(ctx context.Context, namespace string, want map[string]enumspb.IndexedValueType) ([]string, error) {
	attemptCtx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	c, err := dialTemporal(attemptCtx)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	return ensureSearchAttributes(attemptCtx, c.OperatorService(), namespace, want)
}

// ensureSearchAttributes makes the namespace hold want: missing names are added, present ones
// must have the wanted type. It returns the names it added.
func ensureSearchAttributes(ctx context.Context, ops operatorservice.OperatorServiceClient, namespace string,
	want map[string]enumspb.IndexedValueType) ([]string, error) {
	missing, err := missingSearchAttributes(ctx, ops, namespace, want)
	if err != nil || len(missing) == 0 {
		return nil, err
	}
	_, err = ops.AddSearchAttributes(ctx, &operatorservice.AddSearchAttributesRequest{SearchAttributes: missing, Namespace: namespace})
	var exists *serviceerror.AlreadyExists
	if err != nil && !errors.As(err, &exists) { // AlreadyExists: another init step was quicker
		return nil, fmt.Errorf("add search attributes %s to namespace %s: %w", strings.Join(sortedNames(missing), ", "), namespace, err)
	}
	still, err := missingSearchAttributes(ctx, ops, namespace, want)
	if err != nil {
		return nil, err
	}
	if len(still) > 0 {
		return nil, fmt.Errorf("search attributes %s of namespace %s not listed yet after adding them", strings.Join(sortedNames(still), ", "), namespace)
	}
	return sortedNames(missing), nil
}

func missingSearchAttributes(ctx context.Context, ops operatorservice.OperatorServiceClient, namespace string,
	want map[string]enumspb.IndexedValueType) (map[string]enumspb.IndexedValueType, error) {
	resp, err := ops.ListSearchAttributes(ctx, &operatorservice.ListSearchAttributesRequest{Namespace: namespace})
	if err != nil {
		return nil, fmt.Errorf("list search attributes of namespace %s: %w", namespace, err)
	}
	missing := map[string]enumspb.IndexedValueType{}
	var wrong []string
	for _, name := range sortedNames(want) {
		have, ok := resp.GetCustomAttributes()[name]
		if !ok {
			have, ok = resp.GetSystemAttributes()[name]
		}
		switch {
		case !ok:
			missing[name] = want[name]
		case have != want[name]:
			wrong = append(wrong, fmt.Sprintf("%s is %s, diskferry needs %s", name, have, want[name]))
		}
	}
	if len(wrong) > 0 {
		return nil, fmt.Errorf("namespace %s: %w: %s; remove it (temporal operator search-attribute remove) and run this again",
			namespace, errWrongType, strings.Join(wrong, "; "))
	}
	return missing, nil
}

func sortedNames(m map[string]enumspb.IndexedValueType) []string {
	names := make([]string, 0, len(m))
	for n := range m {
		names = append(names, n)
	}
	slices.Sort(names)
	return names
}

func orNone(names []string) string {
	if len(names) == 0 {
		return "none, all were there"
	}
	return strings.Join(names, ", ")
}
