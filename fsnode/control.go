package fsnode

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"syscall"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"

	"github.com/cbtfs/cbtfs/internal/units"
	"github.com/cbtfs/cbtfs/qcow"
)

// controlUsage is shown by cat MNT/control.
const controlUsage = `usage: echo 'COMMAND' > control   (one command per line)
  bitmap add NAME [granularity=SIZE] [disabled]
  bitmap remove NAME
  bitmap clear NAME
  bitmap enable NAME
  bitmap disable NAME
  bitmap merge SRC DST
  checkpoint NAME
  snapshot FILE
  commit
  flush
`

// controlNode is MNT/control: writing a command runs it; reading tells
// the outcome of the last command and the usage.
type controlNode struct {
	fs.Inode
	root *Root

	cmdMu  sync.Mutex // serializes commands
	mu     sync.Mutex // guards status, which a running command updates
	status string
}

// setStatus replaces the text shown before the usage.
func (c *controlNode) setStatus(s string) {
	c.mu.Lock()
	c.status = s
	c.mu.Unlock()
}

var (
	_ fs.NodeGetattrer = (*controlNode)(nil)
	_ fs.NodeSetattrer = (*controlNode)(nil)
	_ fs.NodeOpener    = (*controlNode)(nil)
	_ fs.NodeReader    = (*controlNode)(nil)
	_ fs.NodeWriter    = (*controlNode)(nil)
)

func (c *controlNode) text() []byte {
	c.mu.Lock()
	defer c.mu.Unlock()
	s := c.status
	switch {
	case !c.root.img.Writable():
		// The kernel refuses to open control for writing on a read-only
		// mount, so no command ever reaches us to report on.
		s = "read-only mount: every command is refused (EROFS)\n"
	case s == "":
		s = "no command run yet\n"
	}
	return []byte(s + "\n" + controlUsage)
}

func (c *controlNode) Getattr(ctx context.Context, fh fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	out.Mode = syscall.S_IFREG | 0o644
	stamp(out)
	out.Size = uint64(len(c.text()))
	out.SetTimeout(0)
	return 0
}

// Setattr accepts the truncation of "echo CMD > control" and ignores it.
func (c *controlNode) Setattr(ctx context.Context, fh fs.FileHandle, in *fuse.SetAttrIn, out *fuse.AttrOut) syscall.Errno {
	return c.Getattr(ctx, fh, out)
}

func (c *controlNode) Open(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	return &genHandle{data: c.text()}, fuse.FOPEN_DIRECT_IO, 0
}

func (c *controlNode) Read(ctx context.Context, fh fs.FileHandle, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	data := c.text()
	if h, ok := fh.(*genHandle); ok {
		data = h.data
	}
	b, ok := readSnapshot(data, dest, off)
	if !ok {
		return nil, syscall.EINVAL
	}
	return readData(b), 0
}

// Write runs the commands in data, one per line, in order, stopping at
// the first failure, which fails the write (EINVAL, or ENOENT/EEXIST/EROFS
// where they fit).
func (c *controlNode) Write(ctx context.Context, fh fs.FileHandle, data []byte, off int64) (uint32, syscall.Errno) {
	c.cmdMu.Lock()
	defer c.cmdMu.Unlock()
	var done []string
	for _, line := range strings.Split(string(data), "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		progress := func(p string) { c.setStatus(doneLines(done) + "running: " + line + "\n" + p + "\n") }
		progress("")
		msg, err := c.root.runCommand(ctx, line, progress)
		if err != nil {
			errno := commandErrno(c.root, err)
			c.setStatus(fmt.Sprintf("%sfailed: %s\nerror: %s (%s)\n", doneLines(done), line, err, errnoName(errno)))
			return 0, errno
		}
		done = append(done, "ok: "+line+msg)
	}
	c.setStatus(doneLines(done))
	return uint32(len(data)), 0
}

func doneLines(done []string) string {
	if len(done) == 0 {
		return ""
	}
	return strings.Join(done, "\n") + "\n"
}

// commandErrno maps a command's failure to the errno of the write.
func commandErrno(r *Root, err error) syscall.Errno {
	switch {
	case errors.Is(err, qcow.ErrExist):
		return syscall.EEXIST
	case errors.Is(err, qcow.ErrNoBitmap):
		return syscall.ENOENT
	case errors.Is(err, qcow.ErrReadOnly):
		return syscall.EROFS
	case errors.Is(err, qcow.ErrInvalid), errors.Is(err, qcow.ErrInconsistent),
		errors.Is(err, errUsage), errors.Is(err, units.ErrSize):
		return syscall.EINVAL
	}
	return errnoOf(r.log, "control", err)
}

func errnoName(e syscall.Errno) string {
	switch e {
	case syscall.EINVAL:
		return "EINVAL"
	case syscall.ENOENT:
		return "ENOENT"
	case syscall.EEXIST:
		return "EEXIST"
	case syscall.EROFS:
		return "EROFS"
	case syscall.ENOSPC:
		return "ENOSPC"
	}
	return e.Error()
}

// errUsage marks a malformed command.
var errUsage = errors.New("bad command")

// runCommand runs one control command. It returns a note to show after
// "ok: COMMAND".
func (r *Root) runCommand(ctx context.Context, line string, progress func(string)) (string, error) {
	f := strings.Fields(line)
	usage := func() (string, error) { return "", fmt.Errorf("%w: %q (see the usage below)", errUsage, line) }
	if !r.img.Writable() {
		return "", fmt.Errorf("%w: the mount is read-only", qcow.ErrReadOnly)
	}
	defer r.syncBitmaps(ctx, true)
	switch {
	case len(f) >= 3 && f[0] == "bitmap" && f[1] == "add":
		var gran uint64
		disabled := false
		for _, opt := range f[3:] {
			switch {
			case opt == "disabled":
				disabled = true
			case strings.HasPrefix(opt, "granularity="):
				g, err := units.ParseSize(strings.TrimPrefix(opt, "granularity="))
				if err != nil {
					return "", err
				}
				if g == 0 {
					return "", fmt.Errorf("%w: granularity 0", qcow.ErrInvalid)
				}
				gran = g
			default:
				return usage()
			}
		}
		return "", r.img.AddBitmap(f[2], gran, disabled)
	case len(f) == 3 && f[0] == "bitmap" && f[1] == "remove":
		return "", r.img.RemoveBitmap(f[2])
	case len(f) == 3 && f[0] == "bitmap" && f[1] == "clear":
		return "", r.img.ClearBitmap(f[2])
	case len(f) == 3 && f[0] == "bitmap" && f[1] == "enable":
		return "", r.img.EnableBitmap(f[2], true)
	case len(f) == 3 && f[0] == "bitmap" && f[1] == "disable":
		return "", r.img.EnableBitmap(f[2], false)
	case len(f) == 4 && f[0] == "bitmap" && f[1] == "merge":
		return "", r.img.MergeBitmap(f[2], f[3])
	case len(f) == 2 && f[0] == "checkpoint":
		return "", r.img.AddBitmap(f[1], 0, false)
	case len(f) == 2 && f[0] == "snapshot":
		file, err := r.img.Snapshot(f[1])
		if err != nil {
			return "", err
		}
		return " (new top: " + file + ")", nil
	case len(f) == 1 && f[0] == "commit":
		return "", r.img.Commit(func(done, total uint64) {
			progress(fmt.Sprintf("commit: %d of %d bytes copied", done, total))
		})
	case len(f) == 1 && f[0] == "flush":
		if err := r.img.StoreBitmaps(); err != nil {
			return "", err
		}
		return "", r.img.Flush()
	}
	return usage()
}
