package fsnode

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"sync"
	"syscall"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"

	"github.com/cbtfs/cbtfs/qcow"
)

// diskNode is MNT/disk: the guest-visible bytes of the whole chain.
type diskNode struct {
	fs.Inode
	img *qcow.Image
	log *slog.Logger

	allocOnce  sync.Once // the allocated byte count, for st_blocks
	allocBytes uint64
}

var (
	_ fs.NodeGetattrer = (*diskNode)(nil)
	_ fs.NodeOpener    = (*diskNode)(nil)
	_ fs.NodeReader    = (*diskNode)(nil)
	_ fs.NodeLseeker   = (*diskNode)(nil)
)

// allocated returns the bytes that hold data in some layer, so that du
// shows the allocated bytes of the disk.
func (d *diskNode) allocated() uint64 {
	d.allocOnce.Do(func() {
		err := d.img.Extents(0, d.img.Size(), func(e qcow.Extent) bool {
			if !e.Zero {
				d.allocBytes += e.Len
			}
			return true
		})
		if err != nil {
			d.log.Error("count allocated bytes", "err", err)
		}
	})
	return d.allocBytes
}

func (d *diskNode) Getattr(ctx context.Context, fh fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	out.Mode = syscall.S_IFREG | 0o444
	out.Size = d.img.Size()
	out.Blksize = 1 << 16
	out.Blocks = (d.allocated() + 511) / 512
	return 0
}

func (d *diskNode) Open(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	// Root ignores mode bits, so a read-only disk must refuse writers here.
	if flags&(syscall.O_WRONLY|syscall.O_RDWR|syscall.O_TRUNC) != 0 {
		return nil, 0, syscall.EROFS
	}
	// The content of a read-only chain never changes: let the kernel keep
	// its page cache across opens.
	return nil, fuse.FOPEN_KEEP_CACHE, 0
}

func (d *diskNode) Read(ctx context.Context, fh fs.FileHandle, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	if off < 0 {
		return nil, syscall.EINVAL
	}
	if uint64(off) >= d.img.Size() {
		return fuse.ReadResultData(nil), 0
	}
	n, err := d.img.ReadAt(dest, off)
	if err != nil && !errors.Is(err, io.EOF) {
		return nil, errnoOf(d.log, "read disk", err)
	}
	return fuse.ReadResultData(dest[:n]), 0
}

// Lseek answers SEEK_DATA and SEEK_HOLE from the chain's extents: ranges
// that read as zeros without being data are holes.
func (d *diskNode) Lseek(ctx context.Context, fh fs.FileHandle, off uint64, whence uint32) (uint64, syscall.Errno) {
	walk := func(from uint64, fn func(off, n uint64, data bool) bool) error {
		return d.img.Extents(from, d.img.Size()-from, func(e qcow.Extent) bool {
			return fn(e.Off, e.Len, !e.Zero)
		})
	}
	pos, err := seekDataHole(off, d.img.Size(), whence, walk)
	if err != nil {
		return 0, errnoOf(d.log, "lseek disk", err)
	}
	return pos, 0
}

// errENXIO is returned by seekDataHole as an error so that the caller's
// single conversion point maps it.
var errENXIO = syscall.ENXIO

// seekDataHole implements SEEK_DATA/SEEK_HOLE over a file of size bytes
// whose data ranges walk reports in order from a given offset. As lseek(2)
// says: SEEK_DATA at or past EOF, or with no data after off, is ENXIO;
// SEEK_HOLE finds the next hole, and EOF counts as one.
func seekDataHole(off, size uint64, whence uint32, walk func(from uint64, fn func(off, n uint64, data bool) bool) error) (uint64, error) {
	const seekData, seekHole = 3, 4
	if off >= size {
		return 0, errENXIO
	}
	want := whence == seekData
	if whence != seekData && whence != seekHole {
		return 0, syscall.EINVAL
	}
	found, pos := false, uint64(0)
	err := walk(off, func(eo, n uint64, data bool) bool {
		if data == want {
			found, pos = true, max(eo, off)
			return false
		}
		return true
	})
	if err != nil {
		return 0, err
	}
	switch {
	case found:
		return pos, nil
	case want:
		return 0, errENXIO
	}
	return size, nil
}
