package testutil

import (
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// MountRW mounts image read-write at mnt with `cbtfs mount
// [o.Args...] image mnt` (no --read-only), run in the foreground as a
// child of the test in o.Dir, and waits until the mount is ready, as
// [Mount] does. o.Daemon is not supported. The mount is ended by the same
// cleanup as a read-only one: fusermount3 -u, then exit status 0 and the
// mount gone (unless the test killed it with [Mounted.Kill]).
func MountRW(tb testing.TB, cbtfs, image, mnt string, o MountOptions) *Mounted {
	tb.Helper()
	RequireFUSE(tb)
	if o.Daemon {
		tb.Fatal("testutil.MountRW: Daemon is not supported")
	}
	args := append([]string{"mount"}, o.Args...)
	args = append(args, image, mnt)
	m := &Mounted{Dir: mnt, Disk: filepath.Join(mnt, "disk"), Image: image}
	name := cbtfs
	if raceEnabled {
		// A binary built with -race sleeps a second before it exits
		// (GORACE atexit_sleep_ms, default 1000); env(1) sets it to 0
		// (keeping other GORACE options) and execs cbtfs in its own
		// place, so the pid is cbtfs's.
		name = "env"
		gorace := strings.TrimSpace(os.Getenv("GORACE") + " atexit_sleep_ms=0")
		args = append([]string{"GORACE=" + gorace, cbtfs}, args...)
	}
	p := Start(tb, o.Dir, name, args...)
	m.pid, m.done, m.stderr = p.Pid(), p.Done(), p.Stderr
	m.status = func() syscall.WaitStatus { return waitStatus(p) }
	tb.Cleanup(func() { m.cleanup(tb) })
	m.Entry = m.waitReady(tb)
	m.isReady = true
	return m
}

// Detach lazily unmounts mnt (fusermount3 -u -z), e.g. to clear the stale
// mount a killed cbtfs left behind.
func Detach(tb testing.TB, mnt string) error {
	tb.Helper()
	return detach(tb, mnt)
}

// IsStale reports whether the mount at dir has lost its server: a lookup
// of a new name fails with ENOTCONN.
func IsStale(dir string) bool { return isStale(dir) }

// Tmpfs mounts a tmpfs of size (mount(8) syntax, e.g. "6M") on dir, which
// must exist, and registers a cleanup that unmounts it (lazily if it is
// still busy). It needs root; without it the test is skipped (or fails
// when CBTFS_REQUIRE_TOOLS is set).
func Tmpfs(tb testing.TB, dir, size string) {
	tb.Helper()
	RequireTool(tb, "mount")
	RequireTool(tb, "umount")
	if _, _, err := RunErr(tb, "mount", "-t", "tmpfs", "-o", "size="+size+",mode=0755", "tmpfs", dir); err != nil {
		missing(tb, "cannot mount a tmpfs: %v", err)
	}
	tb.Cleanup(func() {
		if _, _, err := RunErr(tb, "umount", dir); err != nil {
			tb.Logf("umount %s: %v; unmounting lazily", dir, err)
			if _, _, err := RunErr(tb, "umount", "-l", dir); err != nil {
				tb.Error(err)
			}
		}
	})
}

// Stop stops qemu-nbd (SIGTERM, then SIGKILL) and waits for it, so that
// the image is free again before the test ends; the cleanup of
// [QemuNBD] then has nothing to do.
func (n *NBD) Stop(tb testing.TB) {
	tb.Helper()
	p := n.proc
	if p.Exited() {
		return
	}
	_ = p.Signal(syscall.SIGTERM)
	if _, ok := p.Wait(WaitDelay); !ok {
		_ = p.Cmd.Process.Kill()
		p.Wait(WaitDelay)
	}
}

// AllowAnyExit lets the cbtfs process of m end with any exit status, for
// a test that expects the end of the mount itself to fail (a full host
// disk): the cleanup then only clears a stale mount, and the test must
// see to it that the process has exited.
func (m *Mounted) AllowAnyExit() {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.killed = true
}
