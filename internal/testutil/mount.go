package testutil

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

const (
	// MountTimeout bounds the wait for a mount to become ready.
	MountTimeout = 30 * time.Second

	// ExitTimeout bounds the wait for a cbtfs process to exit once its
	// mount has ended.
	ExitTimeout = 30 * time.Second

	// FSType is the file system type of a cbtfs mount in mountinfo.
	FSType = "fuse.cbtfs"
)

// MountOptions configure [MountWith].
type MountOptions struct {
	// Args are extra arguments after "mount --read-only", e.g. "--debug".
	Args []string
	// Dir is cbtfs's working directory; "" is the test's.
	Dir string
	// Daemon runs `cbtfs mount --daemon`: the command must return with
	// status 0 only once the mount is ready, and the daemon it leaves
	// behind is then adopted (see [Mounted]).
	Daemon bool
}

// Mounted is a cbtfs mount served by a separate cbtfs process. A cleanup
// registered by [Mount] ends it, unless the test already has: fusermount3
// -u with bounded retries, then a lazy unmount, then it requires the cbtfs
// process to exit with status 0 and the mount to be gone.
type Mounted struct {
	Dir   string     // the mountpoint
	Disk  string     // Dir/disk
	Image string     // the image as given to cbtfs
	Entry MountEntry // the mount as first seen in mountinfo

	pid    int
	done   <-chan struct{}           // closed when the process has been waited for
	status func() syscall.WaitStatus // valid once done is closed
	stderr func() string             // what it wrote to stderr; "" for a daemon

	isReady bool // the mount became ready

	mu     sync.Mutex
	killed bool // the test killed it on purpose: any exit status goes
}

// Mount mounts image read-only at mnt with `cbtfs mount --read-only
// [extraArgs...] image mnt`, run in the foreground as a child of the test,
// and waits until the mount is ready: a fuse.cbtfs entry at mnt in
// /proc/self/mountinfo, MNT/disk stat-able, and the mount alive (a stale
// mount left by a killed cbtfs does not count). It fails the test if the
// process exits first or the mount is not ready within [MountTimeout].
func Mount(tb testing.TB, cbtfs, image, mnt string, extraArgs ...string) *Mounted {
	tb.Helper()
	return MountWith(tb, cbtfs, image, mnt, MountOptions{Args: extraArgs})
}

// MountWith is [Mount] with options; with o.Daemon it runs `cbtfs mount
// --daemon`, requires exit status 0 and checks, without polling, that the
// mount is ready the moment the command has returned. The daemon is then
// found (the test process is made a child subreaper, so the orphaned
// daemon becomes its child) and waited for like a foreground mount.
func MountWith(tb testing.TB, cbtfs, image, mnt string, o MountOptions) *Mounted {
	tb.Helper()
	RequireFUSE(tb)
	args := append([]string{"mount", "--read-only"}, o.Args...)
	m := &Mounted{Dir: mnt, Disk: filepath.Join(mnt, "disk"), Image: image}
	if !o.Daemon {
		p := Start(tb, o.Dir, cbtfs, append(args, image, mnt)...)
		m.pid, m.done, m.stderr = p.Pid(), p.Done(), p.Stderr
		m.status = func() syscall.WaitStatus { return waitStatus(p) }
		tb.Cleanup(func() { m.cleanup(tb) })
		m.Entry = m.waitReady(tb)
		m.isReady = true
		return m
	}

	becomeSubreaper(tb)
	cmd := Cmd(tb, cbtfs, append(args, "--daemon", image, mnt)...)
	cmd.Dir = o.Dir
	_, stderr, err := RunCmd(tb, cmd)
	if err != nil {
		// Nothing may be left behind by a failed daemon mount.
		tb.Fatalf("cbtfs mount --daemon: %v", err)
	}
	if stderr != "" {
		tb.Errorf("cbtfs mount --daemon succeeded but wrote to stderr: %q", stderr)
	}
	// The contract: once --daemon has returned 0, the mount is ready.
	// Check at once, no polling.
	e, err := m.ready(tb)
	if err != nil {
		// Whatever is there is not ours to keep.
		tb.Cleanup(func() {
			if es := MountsAt(tb, mnt); len(es) > 0 && es[len(es)-1].FSType == FSType {
				_ = detach(tb, mnt)
			}
		})
		tb.Fatalf("cbtfs mount --daemon returned 0 but the mount is not ready: %v", err)
	}
	m.Entry, m.isReady = e, true
	m.pid = findDaemon(tb, mnt)
	done := make(chan struct{})
	var ws syscall.WaitStatus
	go func() {
		defer close(done)
		for {
			_, err := syscall.Wait4(m.pid, &ws, 0, nil)
			if !errors.Is(err, syscall.EINTR) {
				return
			}
		}
	}()
	m.done = done
	m.status = func() syscall.WaitStatus { return ws }
	m.stderr = func() string { return "" }
	tb.Cleanup(func() { m.cleanup(tb) })
	return m
}

// waitStatus returns how p ended.
func waitStatus(p *Proc) syscall.WaitStatus {
	if st := p.Cmd.ProcessState; st != nil {
		if ws, ok := st.Sys().(syscall.WaitStatus); ok {
			return ws
		}
	}
	// Wait failed without a status: report "killed".
	return syscall.WaitStatus(syscall.SIGKILL)
}

// ready reports whether a live cbtfs mount is at m.Dir with disk in it,
// and returns its entry. Mount IDs are reused as soon as a mount is gone,
// so a new mount in place of a stale one cannot be told apart by its
// entry; it is told apart by being alive: a lookup of a name that was never
// looked up must reach a server and come back ENOENT, where a dead
// server's mount answers ENOTCONN.
func (m *Mounted) ready(tb testing.TB) (MountEntry, error) {
	tb.Helper()
	es := MountsAt(tb, m.Dir)
	if len(es) == 0 || es[len(es)-1].FSType != FSType {
		return MountEntry{}, fmt.Errorf("no %s mount at %s: %+v", FSType, m.Dir, es)
	}
	if _, err := os.Stat(m.Disk); err != nil {
		return MountEntry{}, err
	}
	if err := probe(m.Dir); !errors.Is(err, os.ErrNotExist) {
		return MountEntry{}, fmt.Errorf("mount at %s not alive: lookup of a new name: %v", m.Dir, err)
	}
	return es[len(es)-1], nil
}

// probe looks up a name never looked up before in dir, which a FUSE mount
// must send to its server: a live cbtfs answers ENOENT, the mount of a
// dead one ENOTCONN.
func probe(dir string) error {
	_, err := os.Lstat(filepath.Join(dir, fmt.Sprintf(".cbtfs-test-probe-%d-%d", os.Getpid(), time.Now().UnixNano())))
	return err
}

// isStale reports whether the mount at dir has lost its server.
func isStale(dir string) bool { return errors.Is(probe(dir), syscall.ENOTCONN) }

// waitReady polls until the mount is ready, the process has exited, or
// MountTimeout has passed.
func (m *Mounted) waitReady(tb testing.TB) MountEntry {
	tb.Helper()
	deadline := time.Now().Add(MountTimeout)
	delay := time.Millisecond
	for {
		e, err := m.ready(tb)
		if err == nil {
			return e
		}
		select {
		case <-m.done:
			tb.Fatalf("cbtfs mount %s exited before the mount was ready: %s; stderr: %q", m.Image, describe(m.status()), m.stderr())
		default:
		}
		if time.Now().After(deadline) {
			tb.Fatalf("cbtfs mount %s: not ready after %v: %v; stderr: %q", m.Image, MountTimeout, err, m.stderr())
		}
		time.Sleep(delay)
		delay = min(2*delay, 50*time.Millisecond)
	}
}

// Pid returns the process id of the cbtfs process serving the mount.
func (m *Mounted) Pid() int { return m.pid }

// Stderr returns what the cbtfs process wrote to stderr ("" for a daemon,
// whose stderr is /dev/null).
func (m *Mounted) Stderr() string { return m.stderr() }

// Signal sends sig to the cbtfs process.
func (m *Mounted) Signal(sig syscall.Signal) error { return syscall.Kill(m.pid, sig) }

// Wait waits at most timeout for the cbtfs process to exit; ok is false if
// it is still running.
func (m *Mounted) Wait(timeout time.Duration) (ws syscall.WaitStatus, ok bool) {
	select {
	case <-m.done:
		return m.status(), true
	case <-time.After(timeout):
		return 0, false
	}
}

// Exited reports whether the cbtfs process has exited.
func (m *Mounted) Exited() bool {
	select {
	case <-m.done:
		return true
	default:
		return false
	}
}

// IsMounted reports whether this mount is still in mountinfo. Mount IDs
// are reused once a mount is gone, so after this mount has ended another
// mount at the same place may pass for it.
func (m *Mounted) IsMounted(tb testing.TB) bool {
	tb.Helper()
	for _, e := range MountsAt(tb, m.Dir) {
		if e.ID == m.Entry.ID && e.Source == m.Entry.Source {
			return true
		}
	}
	return false
}

// Kill kills the cbtfs process with SIGKILL and waits for it, leaving the
// mount stale ("Transport endpoint is not connected"). The cleanup then
// only detaches the stale mount if it is still there.
func (m *Mounted) Kill(tb testing.TB) {
	tb.Helper()
	m.mu.Lock()
	m.killed = true
	m.mu.Unlock()
	if err := m.Signal(syscall.SIGKILL); err != nil {
		tb.Fatal(err)
	}
	if _, ok := m.Wait(ExitTimeout); !ok {
		tb.Fatalf("cbtfs (pid %d) still running %v after SIGKILL", m.pid, ExitTimeout)
	}
}

// Unmount ends the mount with `fusermount3 -u` (retried while busy, then
// lazy), and requires the cbtfs process to exit with status 0 within
// [ExitTimeout] and the mount to be gone.
func (m *Mounted) Unmount(tb testing.TB) {
	tb.Helper()
	if m.IsMounted(tb) {
		if err := unmount(tb, m.Dir); err != nil {
			tb.Error(err)
		}
	}
	m.RequireExit(tb, 0)
	if m.IsMounted(tb) {
		tb.Errorf("%s: still mounted after cbtfs exited", m.Dir)
	}
}

// RequireExit waits at most [ExitTimeout] for the cbtfs process and
// requires it to exit with status code. A process still running is sent
// SIGQUIT (a Go program prints its goroutines to its stderr) and then
// killed.
func (m *Mounted) RequireExit(tb testing.TB, code int) {
	tb.Helper()
	ws, ok := m.Wait(ExitTimeout)
	if !ok {
		_ = m.Signal(syscall.SIGQUIT)
		if _, ok = m.Wait(WaitDelay); !ok {
			_ = m.Signal(syscall.SIGKILL)
			m.Wait(WaitDelay)
		}
		tb.Errorf("cbtfs (pid %d, %s) did not exit within %v after its mount ended; stderr: %s", m.pid, m.Image, ExitTimeout, m.stderr())
		return
	}
	if !ws.Exited() || ws.ExitStatus() != code {
		tb.Errorf("cbtfs (pid %d, %s) ended with %s, want exit status %d; stderr: %q", m.pid, m.Image, describe(ws), code, m.stderr())
	}
}

// cleanup ends the mount at the end of the test, unless the test did.
func (m *Mounted) cleanup(tb testing.TB) {
	m.mu.Lock()
	killed := m.killed
	m.mu.Unlock()
	if killed {
		// A stale mount the test made on purpose and did not clear. Mount
		// IDs are reused, so look for a dead mount, not for its ID.
		if es := MountsAt(tb, m.Dir); len(es) > 0 && es[len(es)-1].FSType == FSType && isStale(m.Dir) {
			if err := detach(tb, m.Dir); err != nil {
				tb.Error(err)
			}
		}
		return
	}
	if !m.isReady && !m.Exited() {
		// The mount never became ready (the test has failed already):
		// stop the process and clear whatever it left.
		_ = m.Signal(syscall.SIGTERM)
		if _, ok := m.Wait(ExitTimeout); !ok {
			_ = m.Signal(syscall.SIGKILL)
			m.Wait(WaitDelay)
		}
		if es := MountsAt(tb, m.Dir); len(es) > 0 && es[len(es)-1].FSType == FSType {
			_ = detach(tb, m.Dir)
		}
		return
	}
	if m.Exited() {
		// The test ended it (a signal, fusermount3); it must have ended
		// well and left nothing behind.
		m.RequireExit(tb, 0)
		if m.IsMounted(tb) {
			tb.Errorf("%s: still mounted after cbtfs exited", m.Dir)
			_ = detach(tb, m.Dir)
		}
		return
	}
	m.Unmount(tb)
}

// describe renders a wait status.
func describe(ws syscall.WaitStatus) string {
	switch {
	case ws.Exited():
		return "exit status " + strconv.Itoa(ws.ExitStatus())
	case ws.Signaled():
		return "signal " + ws.Signal().String()
	}
	return fmt.Sprintf("wait status %#x", uint32(ws))
}

// unmount runs `fusermount3 -u mnt`, retrying while the mount is busy
// (something may still hold a file open for a moment), and falls back to
// a lazy unmount.
func unmount(tb testing.TB, mnt string) error {
	tb.Helper()
	var last error
	delay := 10 * time.Millisecond
	for range 20 {
		_, _, err := RunErr(tb, "fusermount3", "-u", mnt)
		if err == nil {
			return nil
		}
		last = err
		time.Sleep(delay)
		delay = min(2*delay, 200*time.Millisecond)
	}
	tb.Logf("%s: fusermount3 -u kept failing (%v); unmounting lazily", mnt, last)
	return detach(tb, mnt)
}

// detach lazily unmounts mnt (fusermount3 -u -z).
func detach(tb testing.TB, mnt string) error {
	tb.Helper()
	_, _, err := RunErr(tb, "fusermount3", "-u", "-z", mnt)
	return err
}

// subreaper makes this process a child subreaper, once.
var subreaper = sync.OnceValue(func() error {
	return unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
})

// becomeSubreaper makes the test process a child subreaper, so that a
// daemon which outlives the cbtfs process that started it becomes a child
// of the test process, which can then wait for it and see its exit
// status. This is a property of the whole test process; other orphans it
// adopts stay zombies until it exits.
func becomeSubreaper(tb testing.TB) {
	tb.Helper()
	if err := subreaper(); err != nil {
		tb.Fatalf("prctl(PR_SET_CHILD_SUBREAPER): %v", err)
	}
}

// findDaemon returns the pid of the cbtfs daemon serving mnt: a child of
// the test process (adopted, see becomeSubreaper) whose command line is a
// cbtfs mount naming mnt.
func findDaemon(tb testing.TB, mnt string) int {
	tb.Helper()
	self := os.Getpid()
	ents, err := os.ReadDir("/proc")
	if err != nil {
		tb.Fatal(err)
	}
	var found []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if ppid(pid) != self {
			continue
		}
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		if err != nil {
			continue
		}
		args := strings.Split(strings.TrimRight(string(b), "\x00"), "\x00")
		if len(args) > 2 && filepath.Base(args[0]) == "cbtfs" && args[1] == "mount" && args[len(args)-1] == mnt {
			found = append(found, pid)
		}
	}
	if len(found) != 1 {
		tb.Fatalf("cbtfs daemon for %s: found pids %v among the test's children, want exactly one", mnt, found)
	}
	return found[0]
}

// ppid returns the parent pid of pid, or -1.
func ppid(pid int) int {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return -1
	}
	// pid (comm) state ppid ...; comm may hold spaces and parentheses.
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return -1
	}
	f := strings.Fields(s[i+1:])
	if len(f) < 2 {
		return -1
	}
	p, err := strconv.Atoi(f[1])
	if err != nil {
		return -1
	}
	return p
}
