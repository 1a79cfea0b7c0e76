package qcow

import (
	"errors"
	"fmt"
	"os"
	"syscall"

	"golang.org/x/sys/unix"
)

// qemu's image locking (block/file-posix.c): open file description locks
// on single bytes. Byte 100+i is held (shared) by every user holding
// permission i; byte 200+i by every user that does not let others have
// permission i. A user wanting permission i checks that nobody holds
// 200+i; a user refusing to share i checks that nobody holds 100+i.
const (
	lockPermBase   = 100
	lockSharedBase = 200

	permConsistentRead = 0 // BLK_PERM_CONSISTENT_READ
	permWrite          = 1 // BLK_PERM_WRITE
	permResize         = 3 // BLK_PERM_RESIZE
)

// lockSet is what one open of an image claims, as qemu-nbd does: a
// read-only open takes consistent-read and refuses to share write and
// resize (bytes 100, 201, 203); a read-write open also takes write and
// resize (100, 101, 103, 201, 203).
type lockSet struct {
	perms    []int
	unshared []int
}

var (
	readLocks  = lockSet{perms: []int{permConsistentRead}, unshared: []int{permWrite, permResize}}
	writeLocks = lockSet{perms: []int{permConsistentRead, permWrite, permResize}, unshared: []int{permWrite, permResize}}
)

var permNames = map[int]string{permConsistentRead: "consistent read", permWrite: "write", permResize: "resize"}

// ErrLocked is returned when another process (qemu, or another cbtfs)
// holds the image in a way that conflicts with this open.
var ErrLocked = errors.New("qcow: image is locked by another process")

// lockFile checks for conflicts and takes the locks of ls on f. Files
// that are not *os.File (tests) are not locked.
func lockFile(name string, f File, ls lockSet) error {
	osf, ok := f.(*os.File)
	if !ok {
		return nil
	}
	fd := int(osf.Fd())
	test := func(b int64) (bool, error) {
		lk := unix.Flock_t{Type: unix.F_WRLCK, Whence: 0, Start: b, Len: 1}
		if err := unix.FcntlFlock(uintptr(fd), unix.F_OFD_GETLK, &lk); err != nil {
			return false, err
		}
		return lk.Type != unix.F_UNLCK, nil
	}
	for _, p := range ls.perms {
		busy, err := test(lockSharedBase + int64(p))
		if errors.Is(err, syscall.EINVAL) || errors.Is(err, syscall.ENOSYS) {
			return nil // no OFD locks here: run unlocked, as qemu does
		}
		if err != nil {
			return fmt.Errorf("qcow: %s: test lock: %w", name, err)
		}
		if busy {
			return fmt.Errorf("%w: %s: failed to get %q lock (is another process using the image?)", ErrLocked, name, permNames[p])
		}
	}
	for _, p := range ls.unshared {
		busy, err := test(lockPermBase + int64(p))
		if err != nil {
			return fmt.Errorf("qcow: %s: test lock: %w", name, err)
		}
		if busy {
			return fmt.Errorf("%w: %s: failed to get shared %q lock (is another process using the image?)", ErrLocked, name, permNames[p])
		}
	}
	take := func(b int64) error {
		lk := unix.Flock_t{Type: unix.F_RDLCK, Whence: 0, Start: b, Len: 1}
		return unix.FcntlFlock(uintptr(fd), unix.F_OFD_SETLK, &lk)
	}
	for _, p := range ls.perms {
		if err := take(lockPermBase + int64(p)); err != nil {
			return fmt.Errorf("%w: %s: %v", ErrLocked, name, err)
		}
	}
	for _, p := range ls.unshared {
		if err := take(lockSharedBase + int64(p)); err != nil {
			return fmt.Errorf("%w: %s: %v", ErrLocked, name, err)
		}
	}
	return nil
}
