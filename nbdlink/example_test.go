package nbdlink_test

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"sync"

	"github.com/cbtfs/cbtfs/nbdlink"
)

// ramDisk is the smallest useful Export: a byte slice. It offers no meta
// contexts, so the server answers base:allocation as all data.
type ramDisk struct {
	mu   sync.RWMutex
	data []byte
}

func (d *ramDisk) Size() uint64 { return uint64(len(d.data)) }

func (d *ramDisk) ReadAt(p []byte, off int64) (int, error) {
	d.mu.RLock()
	defer d.mu.RUnlock()
	return copy(p, d.data[off:]), nil // the server has checked the range
}

func (d *ramDisk) WriteAt(p []byte, off int64) (int, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	return copy(d.data[off:], p), nil
}

func (d *ramDisk) Flush() error             { return nil }
func (d *ramDisk) Trim(off, n uint64) error { return nil }

func (d *ramDisk) WriteZeroes(off, n uint64, mayUnmap bool) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	clear(d.data[off : off+n])
	return nil
}

func (d *ramDisk) MetaContexts() []string { return nil }

func (d *ramDisk) BlockStatus(ctx string, off, n uint64, fn func(uint64, uint32) bool) error {
	return fmt.Errorf("ramdisk: no context %q", ctx)
}

// Serve a 64 MiB RAM disk on a unix socket until interrupted; try it with
// `nbdinfo nbd+unix:///?socket=/tmp/ram.sock`.
func ExampleServer_Serve() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	srv, err := nbdlink.NewServer([]nbdlink.ExportConfig{{
		Description: "RAM disk",
		Export:      &ramDisk{data: make([]byte, 64<<20)},
	}}, &nbdlink.Options{Logger: slog.Default()})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return
	}
	l, err := nbdlink.Listen(ctx, "unix:/tmp/ram.sock")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return
	}
	if err := srv.Serve(ctx, l); err != nil {
		fmt.Fprintln(os.Stderr, err)
	}
}
