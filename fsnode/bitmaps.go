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

	"github.com/cbtfs/cbtfs/dirtymap"
	"github.com/cbtfs/cbtfs/internal/report"
	"github.com/cbtfs/cbtfs/qcow"
)

// dirtyNode is MNT/bitmaps/NAME/dirty: the disk's size, the disk's bytes
// inside dirty extents, holes elsewhere.
type dirtyNode struct {
	fs.Inode
	name string // the bitmap
	img  *qcow.Image
	log  *slog.Logger
}

var (
	_ fs.NodeGetattrer = (*dirtyNode)(nil)
	_ fs.NodeOpener    = (*dirtyNode)(nil)
	_ fs.NodeReader    = (*dirtyNode)(nil)
	_ fs.NodeLseeker   = (*dirtyNode)(nil)
)

// dirtyHandle is an open dirty view: the bitmap it was opened on, so that
// reads and seeks of one open file agree with each other, and how far its
// dirty extents have been read ahead.
type dirtyHandle struct {
	bits *dirtymap.Map

	mu      sync.Mutex // guards ahead and trigger
	ahead   uint64     // the dirty extents before this offset have been hinted
	trigger uint64     // a read ending at or past this offset hints the next batch

	// hints counts the goroutines passing hints to the engine; Release
	// waits for them.
	hints sync.WaitGroup
}

var _ fs.FileReleaser = (*dirtyHandle)(nil)

// Release waits for the read-ahead hints still being given.
func (h *dirtyHandle) Release(ctx context.Context) syscall.Errno {
	h.hints.Wait()
	return 0
}

// dirtyReadAhead is how many dirty bytes past a read of the dirty view are
// hinted to the engine ([qcow.Image.WillNeed]). A backup tool reads the
// dirty extents one by one, in order, and each is a random read of the
// disk: with the next ones already on their way, the disk serves many at a
// time (from a cold cache, cp --sparse=always of 1% scattered 64 KiB
// clusters of a 16 GiB disk takes 2-3x less time).
const dirtyReadAhead = 8 << 20

// readAhead hints the next dirty extents once a read of h has reached
// h.trigger: dirtyReadAhead dirty bytes from where the last batch ended
// (or from end, if reads went past it), the next batch due halfway
// through this one. The hints are given by a goroutine of their own:
// each starts disk I/O and costs tens of microseconds, which the read that
// triggered the batch must not wait for.
func (d *dirtyNode) readAhead(h *dirtyHandle, end uint64) {
	h.mu.Lock()
	defer h.mu.Unlock()
	size := h.bits.Size()
	if end < h.trigger || end >= size {
		return
	}
	from := max(h.ahead, end)
	next, trigger := size, size
	var hinted uint64
	var batch []extent
	h.bits.Extents(from, size-from, func(eo, en uint64, dirty bool) bool {
		if !dirty {
			return true
		}
		k := min(en, dirtyReadAhead-hinted)
		batch = append(batch, extent{eo, k})
		if hinted < dirtyReadAhead/2 && hinted+k >= dirtyReadAhead/2 {
			trigger = eo + (dirtyReadAhead/2 - hinted)
		}
		hinted += k
		if hinted >= dirtyReadAhead {
			next = eo + k
			return false
		}
		return true
	})
	h.ahead, h.trigger = next, trigger
	if len(batch) > 0 {
		h.hints.Go(func() {
			for _, e := range batch {
				d.img.WillNeed(e.off, e.n)
			}
		})
	}
}

// extent is a byte range of the disk.
type extent struct{ off, n uint64 }

func (d *dirtyNode) bitsFor(fh fs.FileHandle) (*dirtymap.Map, syscall.Errno) {
	if h, ok := fh.(*dirtyHandle); ok {
		return h.bits, 0
	}
	m, err := d.img.Bitmap(d.name)
	if err != nil {
		return nil, errnoOf(d.log, "bitmap", err)
	}
	return m, 0
}

func (d *dirtyNode) Getattr(ctx context.Context, fh fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	m, errno := d.bitsFor(fh)
	if errno != 0 {
		return errno
	}
	out.Mode = syscall.S_IFREG | 0o444
	stamp(out)
	out.Size = d.img.Size()
	// du and cp's sparse detection read st_blocks: the dirty bytes. go-fuse
	// recomputes Blocks from Size unless Blksize is set.
	out.Blksize = 1 << 16
	out.Blocks = (m.DirtyBytes() + 511) / 512
	return 0
}

func (d *dirtyNode) Open(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	if flags&(syscall.O_WRONLY|syscall.O_RDWR|syscall.O_TRUNC) != 0 {
		return nil, 0, syscall.EACCES
	}
	m, errno := d.bitsFor(nil)
	if errno != 0 {
		return nil, 0, errno
	}
	// Direct I/O: the disk can change under a writable view, and for a
	// read-only one the kernel's readahead would pull a megabyte of holes
	// through FUSE for every small dirty extent that cp reads.
	return &dirtyHandle{bits: m}, fuse.FOPEN_DIRECT_IO, 0
}

// Read returns the disk's bytes in dirty extents and zeros elsewhere,
// without reading the image for the clean ranges.
func (d *dirtyNode) Read(ctx context.Context, fh fs.FileHandle, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	m, errno := d.bitsFor(fh)
	if errno != 0 {
		return nil, errno
	}
	size := d.img.Size()
	if off < 0 {
		return nil, syscall.EINVAL
	}
	if uint64(off) >= size {
		return fuse.ReadResultData(nil), 0
	}
	n := min(uint64(len(dest)), size-uint64(off))
	buf := dest[:n]
	var rerr error
	m.Extents(uint64(off), n, func(eo, en uint64, dirty bool) bool {
		part := buf[eo-uint64(off) : eo-uint64(off)+en]
		if !dirty {
			clear(part)
			return true
		}
		if _, err := d.img.ReadAt(part, int64(eo)); err != nil && !errors.Is(err, io.EOF) {
			rerr = err
			return false
		}
		return true
	})
	if rerr != nil {
		return nil, errnoOf(d.log, "read dirty view", rerr)
	}
	if h, ok := fh.(*dirtyHandle); ok {
		d.readAhead(h, uint64(off)+n)
	}
	return readData(buf), 0
}

// Lseek reports exactly the dirty extents as data.
func (d *dirtyNode) Lseek(ctx context.Context, fh fs.FileHandle, off uint64, whence uint32) (uint64, syscall.Errno) {
	m, errno := d.bitsFor(fh)
	if errno != 0 {
		return 0, errno
	}
	walk := func(from uint64, fn func(off, n uint64, data bool) bool) error {
		m.Extents(from, m.Size()-from, fn)
		return nil
	}
	pos, err := seekDataHole(off, d.img.Size(), whence, walk)
	if err != nil {
		return 0, errnoOf(d.log, "lseek dirty view", err)
	}
	return pos, 0
}

// bitmapsDir is MNT/bitmaps: one directory per bitmap name of the chain.
// mkdir adds a bitmap (enabled, default granularity), rmdir removes it.
type bitmapsDir struct {
	fs.Inode
	root *Root
}

var (
	_ fs.NodeMkdirer = (*bitmapsDir)(nil)
	_ fs.NodeRmdirer = (*bitmapsDir)(nil)
)

// Mkdir adds bitmap name to the top image, as "bitmap add NAME" does.
func (d *bitmapsDir) Mkdir(ctx context.Context, name string, mode uint32, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	if !d.root.img.Writable() {
		return nil, syscall.EROFS
	}
	if err := d.root.img.AddBitmap(name, 0, false); err != nil {
		return nil, commandErrno(d.root, err)
	}
	d.root.syncBitmaps(ctx, false)
	ch := d.GetChild(name)
	if ch == nil {
		return nil, syscall.EIO
	}
	out.Mode = syscall.S_IFDIR | 0o755
	return ch, 0
}

// Rmdir removes bitmap name from every layer that holds it.
func (d *bitmapsDir) Rmdir(ctx context.Context, name string) syscall.Errno {
	if !d.root.img.Writable() {
		return syscall.EROFS
	}
	err := d.root.img.RemoveBitmap(name)
	d.root.syncBitmaps(ctx, false)
	if err != nil {
		return commandErrno(d.root, err)
	}
	return 0
}

// syncBitmaps makes MNT/bitmaps show the chain's bitmaps as they are now:
// directories for new names, none for removed ones, and a rebuilt one for
// a bitmap whose consistency changed. With notify, cached kernel entries
// are invalidated so that the change shows at once; it must be off inside
// a mkdir or rmdir of MNT/bitmaps, where the kernel holds the directory
// lock that an invalidation needs (and updates its cache itself).
func (r *Root) syncBitmaps(ctx context.Context, notify bool) {
	r.bmu.Lock()
	defer r.bmu.Unlock()
	dir := r.bitmaps
	want := map[string]qcow.BitmapInfo{}
	for _, b := range r.img.Bitmaps() {
		want[b.Name] = b
	}
	for name := range dir.Children() {
		b, ok := want[name]
		if ok && r.bitmapInconsistent[name] == b.InUse {
			delete(want, name)
			continue
		}
		dir.RmChild(name)
		delete(r.bitmapInconsistent, name)
		if notify {
			_ = dir.NotifyEntry(name)
		}
	}
	for _, b := range want {
		r.addBitmapDir(ctx, &dir.Inode, b)
		if notify {
			_ = dir.NotifyEntry(b.Name)
		}
	}
}

// addBitmapDir adds MNT/bitmaps/NAME for one chain bitmap.
func (r *Root) addBitmapDir(ctx context.Context, parent *fs.Inode, b qcow.BitmapInfo) {
	dir := parent.NewPersistentInode(ctx, &dirNode{}, fs.StableAttr{Mode: syscall.S_IFDIR, Ino: r.nextIno()})
	parent.AddChild(b.Name, dir, true)
	name := b.Name
	info := func() ([]byte, error) {
		for _, bi := range r.img.Bitmaps() {
			if bi.Name == name {
				layers, err := r.img.Layers()
				if err != nil {
					return nil, err
				}
				return report.BitmapText(bi, layers), nil
			}
		}
		return nil, qcow.ErrNoBitmap
	}
	addFile := func(fname string, node fs.InodeEmbedder) {
		dir.AddChild(fname, dir.NewPersistentInode(ctx, node, fs.StableAttr{Mode: syscall.S_IFREG, Ino: r.nextIno()}), true)
	}
	addFile("info", &genFile{log: r.log, version: r.img.Version, gen: info})
	r.bitmapInconsistent[name] = b.InUse
	if b.InUse {
		// An inconsistent bitmap shows only its info: its bits are stale
		// and must never be used for a backup.
		return
	}
	l := &sharedListing{img: r.img, mk: func(img *qcow.Image) (*report.Listing, error) {
		m, err := img.Bitmap(name)
		if err != nil {
			return nil, err
		}
		return report.Bitmap(name, m), nil
	}}
	addFile("extents", &genFile{log: r.log, version: r.img.Version, gen: l.text})
	addFile("extents.json", &genFile{log: r.log, version: r.img.Version, gen: l.json})
	addFile("dirty", &dirtyNode{name: name, img: r.img, log: r.log})
	addFile("incremental.qcow2", &incNode{name: name, img: r.img, log: r.log})
}

// incNode is MNT/bitmaps/NAME/incremental.qcow2: a qcow2 image holding
// exactly the bitmap's dirty clusters, generated when opened.
type incNode struct {
	fs.Inode
	name string // the bitmap
	img  *qcow.Image
	log  *slog.Logger
	inc  byVersion[*qcow.Incremental]
}

var (
	_ fs.NodeGetattrer = (*incNode)(nil)
	_ fs.NodeOpener    = (*incNode)(nil)
	_ fs.NodeReader    = (*incNode)(nil)
)

// current returns the incremental image for the bitmap as it is now,
// regenerated only after the image changed.
func (n *incNode) current() (*qcow.Incremental, syscall.Errno) {
	inc, err := n.inc.get(n.img.Version(), func() (*qcow.Incremental, error) {
		m, err := n.img.Bitmap(n.name)
		if err != nil {
			return nil, err
		}
		return qcow.NewIncremental(n.img, m)
	})
	if err != nil {
		return nil, errnoOf(n.log, "incremental image", err)
	}
	return inc, 0
}

func (n *incNode) Getattr(ctx context.Context, fh fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	inc, ok := fh.(*qcow.Incremental)
	if !ok {
		var errno syscall.Errno
		if inc, errno = n.current(); errno != 0 {
			return errno
		}
	}
	out.Mode = syscall.S_IFREG | 0o444
	stamp(out)
	out.Size = inc.Size()
	out.Blksize = 1 << 16
	out.Blocks = (out.Size + 511) / 512
	out.SetTimeout(0)
	return 0
}

func (n *incNode) Open(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	if flags&(syscall.O_WRONLY|syscall.O_RDWR|syscall.O_TRUNC) != 0 {
		return nil, 0, syscall.EACCES
	}
	inc, errno := n.current()
	if errno != 0 {
		return nil, 0, errno
	}
	return inc, fuse.FOPEN_DIRECT_IO, 0
}

func (n *incNode) Read(ctx context.Context, fh fs.FileHandle, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	inc, ok := fh.(*qcow.Incremental)
	if !ok {
		return nil, syscall.EBADF
	}
	if off < 0 {
		return nil, syscall.EINVAL
	}
	k, err := inc.ReadAt(dest, off)
	if err != nil && !errors.Is(err, io.EOF) {
		return nil, errnoOf(n.log, "read incremental image", err)
	}
	return readData(dest[:k]), 0
}
