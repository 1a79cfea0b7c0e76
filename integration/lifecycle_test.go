package integration

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cbtfs/cbtfs/internal/testutil"
)

// smallChain makes a two-layer chain in dir and returns the top image and
// its content as `qemu-img convert -O raw` gives it.
func smallChain(t *testing.T, dir string) (img string, want []byte) {
	t.Helper()
	b := &builder{t: t, dir: dir}
	base := b.qcow2("base.qcow2", "4M")
	b.io(base, "write -P 0x81 0 3M")
	img = b.overlay("top.qcow2", "base.qcow2", "qcow2", "")
	b.io(img, "write -P 0x82 100001 7777", "write -z 1M 64k")
	ref := filepath.Join(dir, "ref.raw")
	testutil.ConvertRaw(t, img, ref)
	want, err := os.ReadFile(ref)
	if err != nil {
		t.Fatal(err)
	}
	return img, want
}

// mkdir creates the directory name in dir and returns its path.
func mkdir(t *testing.T, dir, name string) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.Mkdir(p, 0o755); err != nil {
		t.Fatal(err)
	}
	return p
}

// requireDisk checks that MNT/disk reads as want.
func requireDisk(t *testing.T, m *testutil.Mounted, want []byte) {
	t.Helper()
	got, err := os.ReadFile(m.Disk)
	if err != nil {
		t.Fatalf("read MNT/disk: %v", err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("MNT/disk: %d bytes that differ from qemu-img convert -O raw (%d bytes)", len(got), len(want))
	}
}

// TestMountDaemon checks `cbtfs mount --daemon`: it returns exit status 0
// only once MNT/disk is readable (checked the moment it returns, without
// polling), and the daemon exits with status 0 after fusermount3 -u.
func TestMountDaemon(t *testing.T) {
	testutil.RequireFUSE(t)
	dir := t.TempDir()
	img, want := smallChain(t, dir)
	mnt := mkdir(t, dir, "mnt")
	m := testutil.MountWith(t, cbtfs, img, mnt, testutil.MountOptions{Daemon: true})
	// MountWith has already stat'ed MNT/disk right after the command
	// returned; read it too, still without waiting.
	f, err := os.Open(m.Disk)
	if err != nil {
		t.Fatalf("open MNT/disk right after --daemon returned: %v", err)
	}
	head := make([]byte, 256<<10)
	_, err = f.ReadAt(head, 0)
	f.Close()
	if err != nil {
		t.Fatalf("read MNT/disk right after --daemon returned: %v", err)
	}
	if !bytes.Equal(head, want[:len(head)]) {
		t.Errorf("MNT/disk right after --daemon returned: wrong content")
	}
	requireDisk(t, m, want)
	if m.Pid() == os.Getpid() {
		t.Fatal("the daemon is the test process")
	}
	m.Unmount(t)
	testutil.RequireNoMount(t, mnt)
}

// TestMountEnds checks that SIGINT, SIGTERM and fusermount3 -u each end a
// mount, foreground or daemon, with exit status 0 and the mount gone.
func TestMountEnds(t *testing.T) {
	testutil.RequireFUSE(t)
	dir := t.TempDir()
	img, want := smallChain(t, dir)
	for _, tc := range []struct {
		name   string
		daemon bool
		sig    syscall.Signal // 0: fusermount3 -u
	}{
		{"SIGINT", false, syscall.SIGINT},
		{"SIGTERM", false, syscall.SIGTERM},
		{"fusermount3", false, 0},
		{"daemon-SIGINT", true, syscall.SIGINT},
		{"daemon-SIGTERM", true, syscall.SIGTERM},
		{"daemon-fusermount3", true, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			mnt := mkdir(t, t.TempDir(), "mnt")
			m := testutil.MountWith(t, cbtfs, img, mnt, testutil.MountOptions{Daemon: tc.daemon})
			requireDisk(t, m, want)
			if tc.sig == 0 {
				testutil.Run(t, "fusermount3", "-u", mnt)
			} else if err := m.Signal(tc.sig); err != nil {
				t.Fatal(err)
			}
			m.RequireExit(t, 0)
			testutil.RequireNoMount(t, mnt)
		})
	}
}

// TestMountOpenFailure checks that a mount that cannot start fails with a
// non-zero exit and one clear line on stderr, foreground and daemon, and
// leaves no mount behind.
func TestMountOpenFailure(t *testing.T) {
	testutil.RequireFUSE(t)
	dir := t.TempDir()
	img, _ := smallChain(t, dir)
	notDir := filepath.Join(dir, "file")
	if err := os.WriteFile(notDir, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name, img, mnt string
		names          string // the message must contain this
		reason         string // and match this, case-insensitively
	}{
		{"missing-image", filepath.Join(dir, "nosuch.qcow2"), mkdir(t, dir, "mnt1"), "nosuch.qcow2", `no such file|not exist|not found`},
		{"missing-mountpoint", img, filepath.Join(dir, "nosuchdir"), "nosuchdir", `no such file|not exist|not found`},
		{"mountpoint-not-a-directory", img, notDir, "file", `not a directory`},
	} {
		for _, daemon := range []bool{false, true} {
			name := tc.name
			if daemon {
				name += "-daemon"
			}
			t.Run(name, func(t *testing.T) {
				args := []string{"mount", "--read-only"}
				if daemon {
					args = append(args, "--daemon")
				}
				args = append(args, tc.img, tc.mnt)
				p := testutil.Start(t, "", cbtfs, args...)
				if _, ok := p.Wait(20 * time.Second); !ok {
					t.Errorf("cbtfs %v still running after 20s", args)
					detachIfMounted(t, tc.mnt)
					p.Wait(testutil.ExitTimeout)
					return
				}
				checkRefusal(t, "cbtfs mount", p.Err(), p.Stderr(), dir, tc.names, regexp.MustCompile(`(?i)`+tc.reason))
				if _, err := os.Stat(tc.mnt); err == nil {
					testutil.RequireNoMount(t, tc.mnt)
				}
			})
		}
	}
}

// TestStaleMountpoint kills a cbtfs mount with SIGKILL, which leaves the
// mountpoint stale ("Transport endpoint is not connected"), and checks
// that the next cbtfs mount on it clears it and succeeds, foreground and
// daemon: once stat reports ENOTCONN (what a user sees), and also at once
// after the kill, while the kernel may still answer stat from its
// attribute cache (what a script doing `kill -9; cbtfs mount` meets).
func TestStaleMountpoint(t *testing.T) {
	testutil.RequireFUSE(t)
	dir := t.TempDir()
	img, want := smallChain(t, dir)
	for _, daemon := range []bool{false, true} {
		for _, wait := range []bool{true, false} {
			name := "foreground"
			if daemon {
				name = "daemon"
			}
			if wait {
				name += "-after-ENOTCONN"
			} else {
				name += "-immediately"
			}
			t.Run(name, func(t *testing.T) {
				mnt := mkdir(t, t.TempDir(), "mnt")
				stale := testutil.Mount(t, cbtfs, img, mnt)
				requireDisk(t, stale, want)
				stale.Kill(t)
				if wait {
					waitENOTCONN(t, mnt)
				}
				m := testutil.MountWith(t, cbtfs, img, mnt, testutil.MountOptions{Daemon: daemon})
				requireDisk(t, m, want)
				// The stale mount must be gone, not buried under the new one.
				if es := testutil.MountsAt(t, mnt); len(es) != 1 {
					t.Errorf("mounts at %s: %+v, want exactly the new one", mnt, es)
				}
				m.Unmount(t)
				testutil.RequireNoMount(t, mnt)
			})
		}
	}
}

// waitENOTCONN polls until stat of mnt fails with ENOTCONN: after its
// server died, the kernel answers from its attribute cache until the
// cached attributes expire.
func waitENOTCONN(t *testing.T, mnt string) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		_, err := os.Stat(mnt)
		if errors.Is(err, syscall.ENOTCONN) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("stat of the mountpoint after kill -9: %v, want ENOTCONN (a stale mount) within 30s", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestMountOnLiveMount checks that mounting on a live cbtfs mount is
// refused, foreground and daemon, with one line on stderr, and leaves the
// live mount alone.
func TestMountOnLiveMount(t *testing.T) {
	testutil.RequireFUSE(t)
	dir := t.TempDir()
	img, want := smallChain(t, dir)
	mnt := mkdir(t, dir, "mnt")
	m := testutil.Mount(t, cbtfs, img, mnt)
	for _, daemon := range []bool{false, true} {
		args := []string{"mount", "--read-only"}
		if daemon {
			args = append(args, "--daemon")
		}
		args = append(args, img, mnt)
		p := testutil.Start(t, "", cbtfs, args...)
		if _, ok := p.Wait(20 * time.Second); !ok {
			t.Errorf("cbtfs %v on a live mount still running after 20s", args)
			_ = p.Signal(syscall.SIGKILL)
			p.Wait(testutil.ExitTimeout)
			continue
		}
		checkRefusal(t, strings.Join(args, " "), p.Err(), p.Stderr(), dir, "mnt", regexp.MustCompile(`(?i)already mounted|mounted|busy`))
		if es := testutil.MountsAt(t, mnt); len(es) != 1 || es[0].ID != m.Entry.ID {
			t.Errorf("mounts at %s after the refused mount: %+v, want only the live one (id %d)", mnt, es, m.Entry.ID)
		}
		requireDisk(t, m, want)
	}
	m.Unmount(t)
}
