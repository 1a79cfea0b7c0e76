package fsnode

import (
	"context"
	"log/slog"
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
	return &Root{img: img, log: o.Logger}
}

// Inode numbers of the fixed files, stable for the life of the mount.
const (
	inoDisk = 2 + iota
	inoInfo
	inoInfoJSON
)

// OnAdd builds the static part of the tree.
func (r *Root) OnAdd(ctx context.Context) {
	add := func(name string, ino uint64, node fs.InodeEmbedder) {
		ch := r.NewPersistentInode(ctx, node, fs.StableAttr{Mode: syscall.S_IFREG, Ino: ino})
		r.AddChild(name, ch, true)
	}
	add("disk", inoDisk, &diskNode{img: r.img, log: r.log})
	add("info", inoInfo, &genFile{log: r.log, gen: r.infoText})
	add("info.json", inoInfoJSON, &genFile{log: r.log, gen: r.infoJSON})
}

func (r *Root) infoText() ([]byte, error) {
	layers, err := r.img.Layers()
	if err != nil {
		return nil, err
	}
	return report.InfoText(layers), nil
}

func (r *Root) infoJSON() ([]byte, error) {
	layers, err := r.img.Layers()
	if err != nil {
		return nil, err
	}
	return report.JSON(report.Info(layers)), nil
}
