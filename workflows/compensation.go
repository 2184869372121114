package workflows

import (
	"fmt"
	"slices"

	"go.temporal.io/sdk/temporal"
	"go.temporal.io/sdk/workflow"
)

// undoFunc reverses one step; cause is the error that made the run fail.
type undoFunc func(ctx workflow.Context, cause error) error

type compensation struct {
	key  string
	undo undoFunc
}

// compensations is the saga's undo list, in the order the steps succeeded. Every entry runs at
// most once for real: the success path runs some entries as normal steps (runNow), and a
// committed point forgets the entries that would destroy it.
type compensations struct {
	list []compensation
}

func (c *compensations) add(key string, undo undoFunc) {
	c.list = append(c.list, compensation{key: key, undo: undo})
}

func (c *compensations) find(key string) (undoFunc, bool) {
	for _, e := range c.list {
		if e.key == key {
			return e.undo, true
		}
	}
	return nil, false
}

// forget drops an undo that must no longer run.
func (c *compensations) forget(key string) {
	c.list = slices.DeleteFunc(c.list, func(e compensation) bool { return e.key == key })
}

// runNow runs a registered undo as a normal step of the success path. Once it ran it is
// forgotten, even when it failed: it has used its retry policy, and compensation must not
// repeat it. Only a cancel, which may stop it before it ran at all, leaves it registered so
// the compensation that follows still runs it.
func (c *compensations) runNow(ctx workflow.Context, key string) error {
	undo, ok := c.find(key)
	if !ok {
		return fmt.Errorf("no pending step %q to run", key)
	}
	err := undo(ctx, nil)
	if err == nil || !temporal.IsCanceledError(err) {
		c.forget(key)
	}
	return err
}

// runAll runs every registered undo in reverse order and keeps going past failures, so one
// stuck cleanup cannot leak everything registered before it. It returns the failures.
func (c *compensations) runAll(ctx workflow.Context, cause error) []error {
	var failed []error
	for i := len(c.list) - 1; i >= 0; i-- {
		e := c.list[i]
		if err := e.undo(ctx, cause); err != nil {
			failed = append(failed, fmt.Errorf("undo %s: %w", e.key, err))
		}
	}
	c.list = nil
	return failed
}
