// Package nbd binds the parts of libnbd's C API (libnbd 1.14) that diskferry uses: connect
// by URI, size and capabilities, pread, pwrite, zero, trim, flush and base:allocation block
// status.
//
// Every command is issued asynchronously and polled in short slices, so a context cancel, a
// command timeout or a concurrent Close ends the wait promptly even when the server stops
// answering. A Handle is used by one goroutine at a time (concurrent calls are serialised);
// open one per goroutine for parallel I/O.
package nbd
