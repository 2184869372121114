package blockcopy

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"

	"github.com/diskferry/diskferry/internal/nbd"
)

// connections are the open handles of one copy.
type connections struct {
	src         []*nbd.Handle
	dst         []*nbd.Handle // empty when only computing the digest
	meta        *nbd.Handle   // block status; its own connection when the source has multi-conn
	size        int64
	blockStatus bool
	targetZero  bool     // target supports zero requests
	cleanups    []func() // run after the handles are closed (buffers a broken handle may still use)
}

func (c *connections) afterClose(f func()) { c.cleanups = append(c.cleanups, f) }

// connect opens the first connection of each side, learns whether multi-conn is offered,
// then opens the rest in parallel (a TCP handshake to qemu-nbd can take ~85 ms each).
func connect(ctx context.Context, src, dst string, opts Options) (*connections, error) {
	nopts := nbd.Options{ConnectTimeout: opts.ConnectTimeout, CommandTimeout: opts.CommandTimeout}
	c := &connections{}
	var firstSrc, firstDst *nbd.Handle
	var srcErr, dstErr error
	var wg sync.WaitGroup
	wg.Go(func() { firstSrc, srcErr = nbd.Connect(ctx, src, nopts) })
	if dst != "" {
		wg.Go(func() { firstDst, dstErr = nbd.Connect(ctx, dst, nopts) })
	}
	wg.Wait()
	if firstSrc != nil {
		c.src = append(c.src, firstSrc)
	}
	if firstDst != nil {
		c.dst = append(c.dst, firstDst)
	}
	if err := errors.Join(wrap("connect source", srcErr), wrap("connect target", dstErr)); err != nil {
		c.close()
		return nil, err
	}
	if err := c.inspect(firstSrc, firstDst); err != nil {
		c.close()
		return nil, err
	}

	srcN, dstN := 1, 1
	if multi, _ := firstSrc.CanMultiConn(); multi {
		srcN = opts.Connections + 1 // one more for block status
	}
	if firstDst != nil {
		if multi, _ := firstDst.CanMultiConn(); multi {
			dstN = opts.Connections
		}
	}
	extra := make([]*nbd.Handle, srcN-1+dstN-1)
	errs := make([]error, len(extra))
	for i := range extra {
		uri, what := src, "connect source"
		if i >= srcN-1 {
			uri, what = dst, "connect target"
		}
		wg.Go(func() {
			h, err := nbd.Connect(ctx, uri, nopts)
			extra[i], errs[i] = h, wrap(what, err)
		})
	}
	wg.Wait()
	for i, h := range extra {
		if h == nil {
			continue
		}
		if i < srcN-1 {
			c.src = append(c.src, h)
		} else {
			c.dst = append(c.dst, h)
		}
	}
	if err := errors.Join(errs...); err != nil {
		c.close()
		return nil, err
	}
	c.meta = c.src[0]
	if len(c.src) > 1 {
		c.meta, c.src = c.src[len(c.src)-1], c.src[:len(c.src)-1]
	}
	return c, nil
}

func (c *connections) inspect(src, dst *nbd.Handle) error {
	size, err := src.Size()
	if err != nil {
		return fmt.Errorf("source size: %w", err)
	}
	c.size = size
	if c.blockStatus, err = src.CanBlockStatus(); err != nil {
		return fmt.Errorf("source block status: %w", err)
	}
	if dst == nil {
		return nil
	}
	dsize, err := dst.Size()
	if err != nil {
		return fmt.Errorf("target size: %w", err)
	}
	if dsize < size {
		return fmt.Errorf("target (%d bytes) is smaller than the source (%d bytes)", dsize, size)
	}
	ro, err := dst.ReadOnly()
	if err != nil {
		return fmt.Errorf("target read-only flag: %w", err)
	}
	if ro {
		return errors.New("target export is read-only")
	}
	if c.targetZero, err = dst.CanZero(); err != nil {
		return fmt.Errorf("target zero support: %w", err)
	}
	return nil
}

func (c *connections) close() {
	for _, h := range c.src {
		h.Close()
	}
	for _, h := range c.dst {
		h.Close()
	}
	if c.meta != nil && !slices.Contains(c.src, c.meta) {
		c.meta.Close()
	}
	for _, f := range c.cleanups {
		f()
	}
}

func wrap(what string, err error) error {
	if err == nil {
		return nil
	}
	return fmt.Errorf("%s: %w", what, err)
}
