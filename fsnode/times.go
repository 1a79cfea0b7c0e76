package fsnode

import (
	"context"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
)

// started is when the mount's file tree was built: every node shows it as
// its access, change and modification time (rather than 1970).
var started = time.Now()

// stamp sets the times and the link count of out, whose Mode is set.
func stamp(out *fuse.AttrOut) {
	out.SetTimes(&started, &started, &started)
	out.Nlink = 1
	if out.Mode&syscall.S_IFDIR != 0 {
		out.Nlink = 2
	}
}

// dirNode is a plain directory of the tree (a bitmap's directory).
type dirNode struct {
	fs.Inode
}

var _ fs.NodeGetattrer = (*dirNode)(nil)

func (d *dirNode) Getattr(ctx context.Context, fh fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	out.Mode = syscall.S_IFDIR | 0o755
	stamp(out)
	return 0
}

var (
	_ fs.NodeGetattrer = (*Root)(nil)
	_ fs.NodeGetattrer = (*bitmapsDir)(nil)
)

func (r *Root) Getattr(ctx context.Context, fh fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	out.Mode = syscall.S_IFDIR | 0o755
	stamp(out)
	return 0
}

func (d *bitmapsDir) Getattr(ctx context.Context, fh fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	out.Mode = syscall.S_IFDIR | 0o755
	stamp(out)
	return 0
}
