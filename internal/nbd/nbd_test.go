package nbd_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/diskferry/diskferry/internal/nbd"
	"github.com/diskferry/diskferry/internal/testenv"
)

const mib = 1 << 20

func connect(t *testing.T, uri string, opts nbd.Options) *nbd.Handle {
	t.Helper()
	h, err := nbd.Connect(context.Background(), uri, opts)
	require.NoError(t, err)
	t.Cleanup(func() { h.Close() })
	return h
}

func buffer(t *testing.T, size int) *nbd.Buffer {
	t.Helper()
	b, err := nbd.NewBuffer(size)
	require.NoError(t, err)
	t.Cleanup(b.Free)
	return b
}

func rawFile(t *testing.T, size int64) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "disk.raw")
	f, err := os.Create(path)
	require.NoError(t, err)
	require.NoError(t, f.Truncate(size))
	require.NoError(t, f.Close())
	return path
}

// servers returns one qemu-nbd (qcow2) and one nbdkit (raw file) export of size bytes.
func servers(t *testing.T, size int64) map[string]string {
	t.Helper()
	q := testenv.StartQemuNBD(t, testenv.CreateQcow2(t, size), testenv.QemuNBDOptions{})
	k := testenv.StartNbdkitFile(t, rawFile(t, size), testenv.NbdkitOptions{})
	return map[string]string{"qemu-nbd": q.URI, "nbdkit": k.URI}
}

func TestWriteReadZeroRoundTrip(t *testing.T) {
	for name, uri := range servers(t, 16*mib) {
		t.Run(name, func(t *testing.T) {
			ctx := context.Background()
			h := connect(t, uri, nbd.Options{CommandTimeout: 10 * time.Second})
			size, err := h.Size()
			require.NoError(t, err)
			assert.Equal(t, int64(16*mib), size)
			for _, c := range []func() (bool, error){h.CanZero, h.CanFlush, h.CanTrim} {
				ok, err := c()
				require.NoError(t, err)
				assert.True(t, ok)
			}

			w := buffer(t, mib)
			_, err = rand.Read(w.Bytes())
			require.NoError(t, err)
			require.NoError(t, h.Pwrite(ctx, w, 0, mib, 3*mib, 0))
			require.NoError(t, h.Flush(ctx))

			r := buffer(t, mib)
			require.NoError(t, h.Pread(ctx, r, 0, mib, 3*mib))
			assert.True(t, bytes.Equal(w.Bytes(), r.Bytes()), "read back differs from written")

			require.NoError(t, h.Pread(ctx, r, 0, 4096, 3*mib+4096))
			assert.Equal(t, w.Bytes()[4096:8192], r.Bytes()[:4096], "partial read at an offset")

			require.NoError(t, h.Zero(ctx, 512*1024, 3*mib+256*1024, 0))
			require.NoError(t, h.Pread(ctx, r, 0, mib, 3*mib))
			assert.Equal(t, w.Bytes()[:256*1024], r.Bytes()[:256*1024], "bytes before the zeroed range kept")
			assert.Equal(t, make([]byte, 512*1024), r.Bytes()[256*1024:768*1024], "zeroed range reads zeros")
			assert.Equal(t, w.Bytes()[768*1024:], r.Bytes()[768*1024:], "bytes after the zeroed range kept")

			require.Error(t, h.Pread(ctx, r, 0, 2*mib, 0), "length beyond the buffer is refused")
		})
	}
}

type nbdinfoExtent struct {
	Offset int64  `json:"offset"`
	Length int64  `json:"length"`
	Type   uint32 `json:"type"`
}

func TestBlockStatusMatchesNbdinfo(t *testing.T) {
	nbdinfo := testenv.RequireCommand(t, "nbdinfo")
	path := rawFile(t, 64*mib)
	data := make([]byte, mib)
	_, err := rand.Read(data)
	require.NoError(t, err)
	testenv.WriteFileAt(t, path, 2*mib, data)
	testenv.WriteFileAt(t, path, 3*mib, data)
	testenv.WriteFileAt(t, path, 40*mib, data[:4096])
	testenv.WriteFileAt(t, path, 63*mib, data)
	srv := testenv.StartNbdkitFile(t, path, testenv.NbdkitOptions{})

	out, err := exec.Command(nbdinfo, "--map", "--json", srv.URI).Output()
	require.NoError(t, err)
	var want []nbdinfoExtent
	require.NoError(t, json.Unmarshal(out, &want))
	require.Greater(t, len(want), 3, "fixture has holes and data")

	h := connect(t, srv.URI, nbd.Options{})
	ok, err := h.CanBlockStatus()
	require.NoError(t, err)
	require.True(t, ok)
	got, err := h.BlockStatus(context.Background(), 0, 64*mib)
	require.NoError(t, err)
	var gotList []nbdinfoExtent
	for _, e := range got {
		gotList = append(gotList, nbdinfoExtent{Offset: e.Offset, Length: e.Length, Type: e.Flags})
	}
	assert.Equal(t, want, gotList)
	assert.True(t, got[0].Hole() && got[0].Zero(), "leading hole is hole,zero")

	sub, err := h.BlockStatus(context.Background(), 2*mib+512*1024, mib)
	require.NoError(t, err)
	require.Len(t, sub, 1)
	assert.Equal(t, nbd.Extent{Offset: 2*mib + 512*1024, Length: mib}, sub[0], "range clipped to the request")
}

func TestRefusedConnectionIsClear(t *testing.T) {
	testenv.Integration(t)
	port := testenv.FreePort(t)
	_, err := nbd.Connect(context.Background(), fmt.Sprintf("nbd://127.0.0.1:%d/x?tls-psk-file=/secret", port), nbd.Options{})
	require.Error(t, err)
	var nerr *nbd.Error
	require.True(t, errors.As(err, &nerr), "typed error: %v", err)
	assert.ErrorIs(t, err, syscall.ECONNREFUSED)
	assert.Equal(t, "connect", nerr.Op)
	assert.Contains(t, err.Error(), "refused")
	assert.Contains(t, err.Error(), fmt.Sprintf("127.0.0.1:%d", port))
	assert.NotContains(t, err.Error(), "/secret", "query left out of messages")
}

func TestSharedOneServerTimesOutSecondClient(t *testing.T) {
	srv := testenv.StartQemuNBD(t, testenv.CreateQcow2(t, mib), testenv.QemuNBDOptions{Shared: 1})
	connect(t, srv.URI, nbd.Options{})
	// Without the timeout the second client would wait for the slot forever.
	err := returnsWithin(t, time.Minute, "Connect to a server whose one slot is taken", func() error {
		_, err := nbd.Connect(context.Background(), srv.URI, nbd.Options{ConnectTimeout: 500 * time.Millisecond})
		return err
	})
	require.Error(t, err)
	assert.ErrorIs(t, err, syscall.ETIMEDOUT)
}

// returnsWithin runs call and fails the test if it has not returned after bound, a limit
// far beyond the time it should take, so that a hang fails instead of blocking the suite.
func returnsWithin(t *testing.T, bound time.Duration, what string, call func() error) error {
	t.Helper()
	done := make(chan error, 1)
	go func() { done <- call() }()
	select {
	case err := <-done:
		return err
	case <-time.After(bound):
		t.Fatalf("%s did not return within %s", what, bound)
		return nil
	}
}

func TestTLSPSK(t *testing.T) {
	dir := testenv.ShortTempDir(t)
	key := make([]byte, 32)
	_, err := rand.Read(key)
	require.NoError(t, err)
	keys := filepath.Join(dir, "keys.psk")
	require.NoError(t, os.WriteFile(keys, []byte("ferry:"+hex.EncodeToString(key)+"\n"), 0o600))
	srv := testenv.StartQemuNBD(t, testenv.CreateQcow2(t, 2*mib), testenv.QemuNBDOptions{Args: []string{
		"--object", "tls-creds-psk,id=tls0,endpoint=server,dir=" + dir, "--tls-creds", "tls0"}})
	uri := fmt.Sprintf("nbds://ferry@127.0.0.1:%d/?tls-psk-file=%s", srv.Port, keys)
	h := connect(t, uri, nbd.Options{})
	size, err := h.Size()
	require.NoError(t, err)
	assert.Equal(t, int64(2*mib), size)

	_, err = nbd.Connect(context.Background(), fmt.Sprintf("nbd://127.0.0.1:%d/", srv.Port), nbd.Options{ConnectTimeout: 5 * time.Second})
	assert.Error(t, err, "plain connection to a TLS export is refused")
}

func TestHungServerTimesOutAndCloseInterrupts(t *testing.T) {
	srv := testenv.StartNbdkitFile(t, rawFile(t, 4*mib), testenv.NbdkitOptions{})
	ctx := context.Background()
	h := connect(t, srv.URI, nbd.Options{CommandTimeout: 300 * time.Millisecond})
	h2 := connect(t, srv.URI, nbd.Options{})
	b := buffer(t, mib)
	srv.Stop()

	err := h.Pread(ctx, b, 0, mib, 0)
	assert.ErrorIs(t, err, syscall.ETIMEDOUT)
	assert.Error(t, h.Pread(ctx, b, 0, mib, 0), "handle is unusable after an abandoned command")

	done := make(chan error, 1)
	go func() { done <- h2.Pread(ctx, b, 0, mib, 0) }()
	// The frozen server never answers: once the read holds the handle it stays running.
	deadline := time.Now().Add(time.Minute)
	for !nbd.Busy(h2) {
		select {
		case err := <-done:
			t.Fatalf("read on a frozen server returned: %v", err)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatal("read did not start within a minute")
		}
		runtime.Gosched()
	}
	require.NoError(t, h2.Close())
	select {
	case err := <-done:
		assert.ErrorIs(t, err, nbd.ErrClosed)
	case <-time.After(time.Minute):
		t.Fatal("Close did not interrupt a running command")
	}
	require.NoError(t, h2.Close(), "Close is idempotent")

	h3, err := nbd.Connect(ctx, srv.URI, nbd.Options{ConnectTimeout: 200 * time.Millisecond})
	if err == nil {
		h3.Close()
	}
	assert.ErrorIs(t, err, syscall.ETIMEDOUT, "connect to a frozen server times out")
}

func TestParallelHandlesOnePerGoroutine(t *testing.T) {
	for name, uri := range servers(t, 32*mib) {
		t.Run(name, func(t *testing.T) {
			var wg sync.WaitGroup
			errs := make(chan error, 4)
			for i := range 4 {
				wg.Add(1)
				go func() {
					defer wg.Done()
					errs <- writeReadRegion(uri, int64(i)*8*mib)
				}()
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				assert.NoError(t, err)
			}
		})
	}
}

func writeReadRegion(uri string, base int64) error {
	ctx := context.Background()
	h, err := nbd.Connect(ctx, uri, nbd.Options{})
	if err != nil {
		return err
	}
	defer h.Close()
	w, err := nbd.NewBuffer(mib)
	if err != nil {
		return err
	}
	defer w.Free()
	r, err := nbd.NewBuffer(mib)
	if err != nil {
		return err
	}
	defer r.Free()
	for i := range int64(8) {
		if _, err := rand.Read(w.Bytes()); err != nil {
			return err
		}
		if err := h.Pwrite(ctx, w, 0, mib, base+i*mib, 0); err != nil {
			return err
		}
		if err := h.Pread(ctx, r, 0, mib, base+i*mib); err != nil {
			return err
		}
		if !bytes.Equal(w.Bytes(), r.Bytes()) {
			return fmt.Errorf("region %d block %d differs", base, i)
		}
	}
	return h.Flush(ctx)
}

func TestCancelStopsWait(t *testing.T) {
	srv := testenv.StartNbdkitFile(t, rawFile(t, 4*mib), testenv.NbdkitOptions{})
	h := connect(t, srv.URI, nbd.Options{})
	b := buffer(t, mib)
	srv.Stop()
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	// The handle has no command timeout: only the context can end the wait.
	err := returnsWithin(t, time.Minute, "read on a frozen server with a 200ms context", func() error {
		return h.Pread(ctx, b, 0, mib, 0)
	})
	assert.ErrorIs(t, err, context.DeadlineExceeded)
}

// A new buffer reads as zeros even where the C heap reuses memory a freed buffer filled:
// the copy engine writes a fresh buffer as zeros to targets without zero requests.
func TestNewBufferIsZeroed(t *testing.T) {
	runtime.LockOSThread() // one malloc arena for the frees and the allocations
	defer runtime.UnlockOSThread()
	const size = 64 << 10 // below glibc's mmap threshold, so served from the heap
	for range 4 {
		var bufs []*nbd.Buffer
		for range 8 {
			b, err := nbd.NewBuffer(size)
			require.NoError(t, err)
			require.Equal(t, make([]byte, size), b.Bytes(), "new buffer holds old bytes")
			copy(b.Bytes(), bytes.Repeat([]byte{0xa5}, size))
			bufs = append(bufs, b)
		}
		for _, b := range bufs {
			b.Free()
		}
	}
}
