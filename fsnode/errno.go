package fsnode

import (
	"errors"
	"log/slog"
	"syscall"

	"github.com/cbtfs/cbtfs/qcow"
)

// errnoOf converts an engine error to the errno a FUSE reply carries. It
// is the only place where errors change form in this package: it unwraps
// (go-fuse's ToErrno does not, and would answer ENOSYS), maps the engine's
// sentinels, and logs the cause of every EIO so that it is not lost.
func errnoOf(log *slog.Logger, op string, err error) syscall.Errno {
	if err == nil {
		return 0
	}
	if errno, ok := errors.AsType[syscall.Errno](err); ok {
		return errno
	}
	switch {
	case errors.Is(err, qcow.ErrReadOnly):
		return syscall.EROFS
	case errors.Is(err, qcow.ErrOutOfRange):
		return syscall.EINVAL
	case errors.Is(err, qcow.ErrNoSpace):
		return syscall.ENOSPC
	case errors.Is(err, qcow.ErrNoBitmap):
		return syscall.ENOENT
	}
	log.Error("I/O error", "op", op, "err", err)
	return syscall.EIO
}
