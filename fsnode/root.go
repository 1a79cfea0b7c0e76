package fsnode

import (
	"context"
	"log/slog"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"

	"github.com/hanwen/go-fuse/v2/fs"

	"github.com/cbtfs/cbtfs/internal/report"
	"github.com/cbtfs/cbtfs/qcow"
)

// Options configure the mount's file tree.
type Options struct {
	// Logger receives the causes of I/O errors answered as EIO. Nil
	// discards them.
	Logger *slog.Logger
}

// Root is the root directory of a cbtfs mount.
type Root struct {
	fs.Inode
	img *qcow.Image
	log *slog.Logger

	ino atomic.Uint64 // the last inode number handed out

	bitmaps *bitmapsDir
	// bmu serializes changes to the bitmaps directory tree and guards
	// bitmapInconsistent: the consistency each bitmap directory was built
	// for.
	bmu                sync.Mutex
	bitmapInconsistent map[string]bool
}

var _ fs.NodeOnAdder = (*Root)(nil)

// NewRoot returns the root of the file tree presenting img. The image
// stays owned by the caller, who closes it after the mount has ended.
func NewRoot(img *qcow.Image, opts *Options) *Root {
	var o Options
	if opts != nil {
		o = *opts
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	return &Root{img: img, log: o.Logger, bitmapInconsistent: map[string]bool{}}
}

// nextIno returns a new inode number. Every node gets a stable number for
// the life of the mount: cp refuses files whose inode changes while it
// copies them ("replaced while being copied").
func (r *Root) nextIno() uint64 { return r.ino.Add(1) }

// OnAdd builds the tree.
func (r *Root) OnAdd(ctx context.Context) {
	r.ino.Store(1) // the root
	add := func(name string, node fs.InodeEmbedder) {
		ch := r.NewPersistentInode(ctx, node, fs.StableAttr{Mode: syscall.S_IFREG, Ino: r.nextIno()})
		r.AddChild(name, ch, true)
	}
	add("disk", &diskNode{img: r.img, log: r.log})
	add("info", &genFile{log: r.log, version: r.img.Version, gen: r.infoText})
	add("info.json", &genFile{log: r.log, version: r.img.Version, gen: r.infoJSON})
	for _, l := range []struct {
		name string
		mk   func(*qcow.Image) (*report.Listing, error)
	}{{"allocation", report.Allocation}, {"depth", report.Depth}} {
		sl := &sharedListing{img: r.img, mk: l.mk}
		add(l.name, &genFile{log: r.log, version: r.img.Version, gen: sl.text})
		add(l.name+".json", &genFile{log: r.log, version: r.img.Version, gen: sl.json})
	}

	r.bitmaps = &bitmapsDir{root: r}
	r.AddChild("bitmaps", r.NewPersistentInode(ctx, r.bitmaps, fs.StableAttr{Mode: syscall.S_IFDIR, Ino: r.nextIno()}), true)
	ctl := &controlNode{root: r}
	r.AddChild("control", r.NewPersistentInode(ctx, ctl, fs.StableAttr{Mode: syscall.S_IFREG, Ino: r.nextIno()}), true)
	r.syncBitmaps(ctx, false)
}

// sharedListing is one context's listing, computed once per image
// version for both its text file and its JSON file.
type sharedListing struct {
	img   *qcow.Image
	mk    func(*qcow.Image) (*report.Listing, error)
	cache byVersion[*report.Listing]
}

func (s *sharedListing) listing() (*report.Listing, error) {
	return s.cache.get(s.img.Version(), func() (*report.Listing, error) { return s.mk(s.img) })
}

func (s *sharedListing) text() ([]byte, error) {
	l, err := s.listing()
	if err != nil {
		return nil, err
	}
	return l.Text(), nil
}

func (s *sharedListing) json() ([]byte, error) {
	l, err := s.listing()
	if err != nil {
		return nil, err
	}
	return l.JSON(), nil
}

func (r *Root) infoText() ([]byte, error) {
	layers, err := r.img.Layers()
	if err != nil {
		return nil, err
	}
	return report.InfoText(layers, r.img.Bitmaps()), nil
}

func (r *Root) infoJSON() ([]byte, error) {
	layers, err := r.img.Layers()
	if err != nil {
		return nil, err
	}
	return report.JSON(report.Info(layers, r.img.Bitmaps())), nil
}

// xattrPID names the extended attribute of the mount's root that holds the
// process ID of the cbtfs serving it, so that `cbtfs unmount` can wait for
// that process to finish storing the image after the unmount.
const xattrPID = "user.cbtfs.pid"

var (
	_ fs.NodeGetxattrer  = (*Root)(nil)
	_ fs.NodeListxattrer = (*Root)(nil)
)

// Getxattr answers user.cbtfs.pid.
func (r *Root) Getxattr(ctx context.Context, attr string, dest []byte) (uint32, syscall.Errno) {
	if attr != xattrPID {
		return 0, syscall.ENODATA
	}
	v := strconv.Itoa(os.Getpid())
	if len(dest) < len(v) {
		return uint32(len(v)), syscall.ERANGE
	}
	return uint32(copy(dest, v)), 0
}

// Listxattr lists user.cbtfs.pid.
func (r *Root) Listxattr(ctx context.Context, dest []byte) (uint32, syscall.Errno) {
	v := xattrPID + "\x00"
	if len(dest) < len(v) {
		return uint32(len(v)), syscall.ERANGE
	}
	return uint32(copy(dest, v)), 0
}
