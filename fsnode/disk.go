package fsnode

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"syscall"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"

	"github.com/cbtfs/cbtfs/qcow"
)

// diskNode is MNT/disk: the guest-visible bytes of the whole chain,
// writable unless the image was opened read-only.
type diskNode struct {
	fs.Inode
	img *qcow.Image
	log *slog.Logger

	alloc byVersion[uint64] // the allocated bytes, for st_blocks
}

var (
	_ fs.NodeGetattrer = (*diskNode)(nil)
	_ fs.NodeSetattrer = (*diskNode)(nil)
	_ fs.NodeOpener    = (*diskNode)(nil)
	_ fs.NodeReader    = (*diskNode)(nil)
	_ fs.NodeWriter    = (*diskNode)(nil)
	_ fs.NodeFsyncer   = (*diskNode)(nil)
	_ fs.NodeAllocater = (*diskNode)(nil)
	_ fs.NodeLseeker   = (*diskNode)(nil)
)

// allocated returns the bytes that hold data in some layer, so that du
// shows the allocated bytes of the disk. It is recomputed only after the
// disk changed.
func (d *diskNode) allocated() uint64 {
	n, err := d.alloc.get(d.img.Version(), func() (uint64, error) {
		n := uint64(0)
		err := d.img.Extents(0, d.img.Size(), func(e qcow.Extent) bool {
			if !e.Zero {
				n += e.Len
			}
			return true
		})
		return n, err
	})
	if err != nil {
		d.log.Error("count allocated bytes", "err", err)
	}
	return n
}

func (d *diskNode) mode() uint32 {
	if d.img.Writable() {
		return syscall.S_IFREG | 0o644
	}
	return syscall.S_IFREG | 0o444
}

func (d *diskNode) Getattr(ctx context.Context, fh fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	out.Mode = d.mode()
	stamp(out)
	out.Size = d.img.Size()
	out.Blksize = 1 << 16
	out.Blocks = (d.allocated() + 511) / 512
	return 0
}

// Setattr refuses to change the size: the virtual disk has a fixed size.
// Other attribute changes (times, mode) are accepted and ignored.
func (d *diskNode) Setattr(ctx context.Context, fh fs.FileHandle, in *fuse.SetAttrIn, out *fuse.AttrOut) syscall.Errno {
	if sz, ok := in.GetSize(); ok && sz != d.img.Size() {
		return syscall.EPERM
	}
	return d.Getattr(ctx, fh, out)
}

func (d *diskNode) Open(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	writing := flags&(syscall.O_WRONLY|syscall.O_RDWR) != 0
	// Root ignores mode bits, so a read-only disk must refuse writers here.
	if writing && !d.img.Writable() {
		return nil, 0, syscall.EROFS
	}
	if flags&syscall.O_TRUNC != 0 {
		return nil, 0, syscall.EPERM
	}
	if !d.img.Writable() {
		// The content of a read-only chain never changes: let the kernel
		// keep its page cache across opens.
		return nil, fuse.FOPEN_KEEP_CACHE, 0
	}
	// A writable disk can also change through NBD: no page cache, every
	// read comes here.
	return nil, fuse.FOPEN_DIRECT_IO, 0
}

func (d *diskNode) Read(ctx context.Context, fh fs.FileHandle, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	if off < 0 {
		return nil, syscall.EINVAL
	}
	if uint64(off) >= d.img.Size() {
		return fuse.ReadResultData(nil), 0
	}
	// A read-only chain whose range is one run of data in one file is
	// spliced from that file to the kernel without a copy.
	want := min(uint64(len(dest)), d.img.Size()-uint64(off))
	if f, host, ok := d.img.HostRange(uint64(off), want); ok {
		return fuse.ReadResultFd(f.Fd(), int64(host), int(want)), 0
	}
	n, err := d.img.ReadAt(dest, off)
	if err != nil && !errors.Is(err, io.EOF) {
		return nil, errnoOf(d.log, "read disk", err)
	}
	return readData(dest[:n]), 0
}

// Write stores data at off. A write that runs past the end of the disk
// fails with EFBIG and changes nothing.
func (d *diskNode) Write(ctx context.Context, fh fs.FileHandle, data []byte, off int64) (uint32, syscall.Errno) {
	if off < 0 || uint64(off) > d.img.Size() || uint64(len(data)) > d.img.Size()-uint64(off) {
		return 0, syscall.EFBIG
	}
	if _, err := d.img.WriteAt(data, off); err != nil {
		return 0, errnoOf(d.log, "write disk", err)
	}
	return uint32(len(data)), 0
}

// Fsync makes every completed write durable (fsync and fdatasync alike).
func (d *diskNode) Fsync(ctx context.Context, fh fs.FileHandle, flags uint32) syscall.Errno {
	return errnoOf(d.log, "fsync disk", d.img.Flush())
}

// Linux fallocate(2) modes.
const (
	fallocKeepSize  = 0x01
	fallocPunchHole = 0x02
	fallocZeroRange = 0x10
)

// Allocate implements fallocate: PUNCH_HOLE (with KEEP_SIZE) releases the
// range, ZERO_RANGE zeroes it keeping the clusters; plain allocation
// inside the disk has nothing to do. Growing the disk is refused.
func (d *diskNode) Allocate(ctx context.Context, fh fs.FileHandle, off, size uint64, mode uint32) syscall.Errno {
	if !d.img.Writable() {
		return syscall.EROFS
	}
	if size > d.img.Size() || off > d.img.Size()-size {
		if mode&(fallocKeepSize|fallocPunchHole) == 0 {
			return syscall.EFBIG
		}
		if off >= d.img.Size() {
			return 0
		}
		size = d.img.Size() - off
	}
	var err error
	switch mode &^ fallocKeepSize {
	case 0:
		return 0
	case fallocPunchHole:
		if mode&fallocKeepSize == 0 {
			return syscall.EOPNOTSUPP
		}
		err = d.img.WriteZeroes(off, size, true)
	case fallocZeroRange:
		err = d.img.WriteZeroes(off, size, false)
	default:
		return syscall.EOPNOTSUPP
	}
	return errnoOf(d.log, "fallocate disk", err)
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
