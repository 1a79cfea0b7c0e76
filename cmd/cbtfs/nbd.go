package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"strings"

	"github.com/cbtfs/cbtfs/internal/report"
	"github.com/cbtfs/cbtfs/nbdlink"
	"github.com/cbtfs/cbtfs/qcow"
)

// nbdExport adapts a qcow.Image to nbdlink.Export: the NBD server and the
// FUSE mount share the one engine, so each sees the other's writes at
// once and both mark the same bitmaps.
type nbdExport struct {
	img *qcow.Image
}

var _ nbdlink.FastZeroer = (*nbdExport)(nil)

func (e *nbdExport) Size() uint64 { return e.img.Size() }

func (e *nbdExport) ReadAt(p []byte, off int64) (int, error) {
	n, err := e.img.ReadAt(p, off)
	return n, nbdErr(err)
}

func (e *nbdExport) WriteAt(p []byte, off int64) (int, error) {
	n, err := e.img.WriteAt(p, off)
	return n, nbdErr(err)
}

func (e *nbdExport) Flush() error { return nbdErr(e.img.Flush()) }

func (e *nbdExport) Trim(off, n uint64) error { return nbdErr(e.img.Discard(off, n)) }

func (e *nbdExport) WriteZeroes(off, n uint64, mayUnmap bool) error {
	return nbdErr(e.img.WriteZeroes(off, n, mayUnmap))
}

// WriteZeroesFast zeroes whole clusters, which only changes metadata; a
// range with a partial cluster would need a data write and is refused
// (NBD_CMD_FLAG_FAST_ZERO).
func (e *nbdExport) WriteZeroesFast(off, n uint64, mayUnmap bool) error {
	cs := e.img.ClusterSize()
	end := off + n
	if off%cs != 0 || (end%cs != 0 && end != e.img.Size()) {
		return errors.ErrUnsupported
	}
	return e.WriteZeroes(off, n, mayUnmap)
}

// MetaContexts lists base:allocation, qemu:allocation-depth and a
// qemu:dirty-bitmap context for every consistent bitmap of the chain.
func (e *nbdExport) MetaContexts() []string {
	out := []string{report.ContextAllocation, report.ContextDepth}
	for _, b := range e.img.Bitmaps() {
		if !b.InUse {
			out = append(out, report.ContextBitmapPrefix+b.Name)
		}
	}
	return out
}

func (e *nbdExport) BlockStatus(context string, off, n uint64, fn func(length uint64, flags uint32) bool) error {
	switch {
	case context == report.ContextAllocation:
		return nbdErr(e.img.Extents(off, n, func(x qcow.Extent) bool {
			if x.Zero {
				return fn(x.Len, 3) // NBD_STATE_HOLE|NBD_STATE_ZERO
			}
			return fn(x.Len, 0)
		}))
	case context == report.ContextDepth:
		return nbdErr(e.img.Extents(off, n, func(x qcow.Extent) bool {
			return fn(x.Len, uint32(x.Depth))
		}))
	case strings.HasPrefix(context, report.ContextBitmapPrefix):
		// The engine keeps the union until the image changes: a client
		// walking a large disk in many requests does not recompute it.
		m, err := e.img.Bitmap(strings.TrimPrefix(context, report.ContextBitmapPrefix))
		if err != nil {
			return nbdErr(err)
		}
		m.Extents(off, n, func(_, l uint64, dirty bool) bool {
			if dirty {
				return fn(l, 1) // NBD_STATE_DIRTY
			}
			return fn(l, 0)
		})
		return nil
	}
	return fmt.Errorf("%w: unknown meta context %q", nbdlink.ErrOutOfRange, context)
}

// nbdErr maps engine errors to the NBD errors nbdlink understands.
func nbdErr(err error) error {
	switch {
	case err == nil:
		return nil
	case errors.Is(err, qcow.ErrReadOnly):
		return fmt.Errorf("%w: %w", nbdlink.ErrReadOnly, err)
	case errors.Is(err, qcow.ErrNoSpace):
		return fmt.Errorf("%w: %w", nbdlink.ErrNoSpace, err)
	case errors.Is(err, qcow.ErrOutOfRange):
		return fmt.Errorf("%w: %w", nbdlink.ErrOutOfRange, err)
	}
	return err
}

// nbdServer runs an NBD listener for img until ctx ends, then waits for
// the connections to finish.
type nbdServer struct {
	done chan struct{}
	err  error
}

// startNBD listens on addr and serves img there in the background.
func startNBD(ctx context.Context, img *qcow.Image, addr, exportName string, log *slog.Logger) (*nbdServer, error) {
	srv, err := nbdlink.NewServer([]nbdlink.ExportConfig{{
		Name:     exportName,
		ReadOnly: !img.Writable(),
		// One engine serves every connection and Flush flushes it.
		MultiConn: true,
		Export:    &nbdExport{img: img},
	}}, &nbdlink.Options{Logger: log})
	if err != nil {
		return nil, err
	}
	if path, ok := strings.CutPrefix(addr, "unix:"); ok {
		// A socket left behind by a killed server would refuse the bind.
		if fi, err := os.Lstat(path); err == nil && fi.Mode()&os.ModeSocket != 0 {
			if c, err := net.Dial("unix", path); err == nil {
				c.Close()
				return nil, fmt.Errorf("listen %s: a server is already listening there", addr)
			}
			os.Remove(path)
		}
	}
	l, err := nbdlink.Listen(ctx, addr)
	if err != nil {
		return nil, fmt.Errorf("listen %s: %w", addr, err)
	}
	s := &nbdServer{done: make(chan struct{})}
	go func() {
		defer close(s.done)
		s.err = srv.Serve(ctx, l)
		if path, ok := strings.CutPrefix(addr, "unix:"); ok {
			os.Remove(path)
		}
	}()
	return s, nil
}

// wait returns once the server has stopped (after its ctx ended).
func (s *nbdServer) wait() error {
	<-s.done
	return s.err
}

type serveCmd struct {
	ReadOnly   bool   `short:"r" help:"Serve read-only: no writes, no bitmap changes, shared locks."`
	ExportName string `help:"The export's name (default \"\", as qemu-nbd)." default:""`
	Listen     string `required:"" help:"Where to listen: unix:PATH or HOST:PORT." placeholder:"ADDR"`
	Image      string `arg:"" help:"The top qcow2 image of the chain."`
}

// Run serves the chain over NBD until SIGINT or SIGTERM, then finishes
// the requests in flight, closes every connection, stores the bitmaps
// and closes the image.
func (c *serveCmd) Run(ctx context.Context, g *Globals) error {
	log := g.logger()
	img, err := qcow.Open(c.Image, &qcow.Options{Logger: log, Writable: !c.ReadOnly})
	if err != nil {
		return err
	}
	defer img.Close()
	// ctx ends on SIGINT or SIGTERM (main).
	s, err := startNBD(ctx, img, c.Listen, c.ExportName, log)
	if err != nil {
		return err
	}
	serr := s.wait()
	return errors.Join(serr, img.Close())
}
