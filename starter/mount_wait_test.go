package main

import (
	"context"
	"errors"
	"fmt"
	"testing"

	"github.com/stretchr/testify/assert"
	"go.temporal.io/api/serviceerror"
)

// A wait counts as expired when the server answers DeadlineExceeded a moment before the
// bounding context's own timer fires (it failed TestMountCommandsOnServer once as "mount
// failed: context deadline exceeded"), and not for any other error of a live context.
func TestWaitExpired(t *testing.T) {
	live := context.Background()
	expired, cancel := context.WithTimeout(live, 0)
	defer cancel()
	<-expired.Done()
	for _, c := range []struct {
		name string
		ctx  context.Context
		err  error
		want bool
	}{
		{"server deadline, context live", live, serviceerror.NewDeadlineExceeded("context deadline exceeded"), true},
		{"wrapped context deadline", live, fmt.Errorf("get: %w", context.DeadlineExceeded), true},
		{"context expired", expired, nil, true},
		{"run failed", live, errors.New("workflow execution error"), false},
		{"no error", live, nil, false},
	} {
		assert.Equal(t, c.want, waitExpired(c.ctx, c.err), c.name)
	}
}
