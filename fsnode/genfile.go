package fsnode

import (
	"context"
	"log/slog"
	"syscall"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
)

// genFile is a read-only file whose content is generated from the engine:
// a listing or a summary. Each open file handle holds one snapshot of the
// content, so a reader sees one consistent state; stat reports the exact
// size of what a read would return now.
type genFile struct {
	fs.Inode
	log *slog.Logger
	gen func() ([]byte, error)
	// version returns a counter that changes whenever the content may
	// change; the last generated content is reused while it stays the same.
	version func() uint64
	cache   byVersion[[]byte]
}

var (
	_ fs.NodeGetattrer = (*genFile)(nil)
	_ fs.NodeOpener    = (*genFile)(nil)
	_ fs.NodeReader    = (*genFile)(nil)
)

// genHandle is an open generated file: its snapshot.
type genHandle struct {
	data []byte
}

// content returns the current content, generating it if needed.
func (f *genFile) content() ([]byte, syscall.Errno) {
	b, err := f.cache.get(f.version(), f.gen)
	if err != nil {
		return nil, errnoOf(f.log, "generate", err)
	}
	return b, 0
}

func (f *genFile) Getattr(ctx context.Context, fh fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	var data []byte
	if h, ok := fh.(*genHandle); ok {
		data = h.data
	} else {
		var errno syscall.Errno
		if data, errno = f.content(); errno != 0 {
			return errno
		}
	}
	out.Mode = syscall.S_IFREG | 0o444
	stamp(out)
	out.Size = uint64(len(data))
	out.Blksize = 4096
	out.Blocks = (out.Size + 511) / 512
	out.SetTimeout(0)
	return 0
}

func (f *genFile) Open(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	if flags&(syscall.O_WRONLY|syscall.O_RDWR|syscall.O_TRUNC) != 0 {
		return nil, 0, syscall.EACCES
	}
	data, errno := f.content()
	if errno != 0 {
		return nil, 0, errno
	}
	// Direct I/O: the page cache must not serve an older snapshot.
	return &genHandle{data: data}, fuse.FOPEN_DIRECT_IO, 0
}

func (f *genFile) Read(ctx context.Context, fh fs.FileHandle, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	h, ok := fh.(*genHandle)
	if !ok {
		return nil, syscall.EBADF
	}
	b, ok := readSnapshot(h.data, dest, off)
	if !ok {
		return nil, syscall.EINVAL
	}
	return readData(b), 0
}
