package main

import (
	"bytes"
	"io"
	"log"
	"sync"
)

// fuseLogger returns the log sink for go-fuse's own diagnostics. With
// --debug (request tracing) everything goes to stderr. Otherwise the
// lines go-fuse prints when a read reply does not fit its splice pipe
// ("trySplice: splice: want N bytes, max pipe size M": every 1 MiB read,
// since MaxWrite lets the kernel ask for 1 MiB) are dropped: go-fuse then
// falls back to a plain write, so they are no error of the mount, and
// they would bury cbtfs's one-line messages. Other lines go to stderr.
func fuseLogger(debug bool, stderr io.Writer) *log.Logger {
	if debug {
		return log.New(stderr, "", log.LstdFlags)
	}
	return log.New(&spliceFilter{w: stderr}, "", log.LstdFlags)
}

// spliceFilter drops log lines about recovered splice failures. The log
// package writes each line with one Write call.
type spliceFilter struct {
	mu sync.Mutex
	w  io.Writer
}

func (f *spliceFilter) Write(p []byte) (int, error) {
	if bytes.Contains(p, []byte(" trySplice: ")) {
		return len(p), nil
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.w.Write(p)
}
