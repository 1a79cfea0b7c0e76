package main

import (
	"context"
	"errors"
	"fmt"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

type unmountCmd struct {
	Timeout    time.Duration `help:"How long to wait for the mount process to store the image." default:"10m"`
	Mountpoint string        `arg:"" type:"path" help:"The mountpoint of a cbtfs mount."`
}

// Run unmounts a cbtfs mount and waits until its process has flushed and
// stored the image and released its locks, so that qemu-img can use the
// image as soon as it returns. (fusermount3 -u returns as soon as the
// mount is gone, while the process may still be writing.)
func (c *unmountCmd) Run(ctx context.Context, g *Globals) error {
	pid, err := mountPID(c.Mountpoint)
	if err != nil {
		return err
	}
	// The pidfd is taken before the unmount, so that the wait cannot
	// mistake a later process with the same pid for ours.
	pidfd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return fmt.Errorf("%s: mount process %d: %w", c.Mountpoint, pid, err)
	}
	defer unix.Close(pidfd)
	if err := syscall.Unmount(c.Mountpoint, 0); err != nil {
		if errors.Is(err, syscall.EBUSY) {
			return fmt.Errorf("%s: mount is busy (a file in it is open or a process works in it)", c.Mountpoint)
		}
		out, ferr := exec.Command("fusermount3", "-u", c.Mountpoint).CombinedOutput()
		if ferr != nil {
			return fmt.Errorf("%s: unmount: %v; fusermount3: %s", c.Mountpoint, err, strings.TrimSpace(string(out)))
		}
	}
	deadline := time.Now().Add(c.Timeout)
	for {
		left := time.Until(deadline)
		if left <= 0 {
			return fmt.Errorf("%s: unmounted, but process %d is still storing the image after %v", c.Mountpoint, pid, c.Timeout)
		}
		fds := []unix.PollFd{{Fd: int32(pidfd), Events: unix.POLLIN}}
		n, err := unix.Poll(fds, int(min(left, time.Minute).Milliseconds()))
		if errors.Is(err, syscall.EINTR) {
			continue
		}
		if err != nil {
			return fmt.Errorf("wait for process %d: %w", pid, err)
		}
		if n > 0 {
			return nil
		}
	}
}

// mountPID reads the pid of the cbtfs process serving mnt.
func mountPID(mnt string) (int, error) {
	buf := make([]byte, 32)
	n, err := unix.Getxattr(mnt, "user.cbtfs.pid", buf)
	if err != nil {
		return 0, fmt.Errorf("%s: not a cbtfs mount (no user.cbtfs.pid attribute: %v)", mnt, err)
	}
	pid, err := strconv.Atoi(string(buf[:n]))
	if err != nil || pid <= 0 {
		return 0, fmt.Errorf("%s: bad user.cbtfs.pid attribute %q", mnt, buf[:n])
	}
	return pid, nil
}
