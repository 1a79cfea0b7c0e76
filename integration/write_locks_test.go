package integration

import (
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cbtfs/cbtfs/internal/testutil"
)

// This file checks that cbtfs and qemu keep out of each other's way
// through qemu's image locks (OFD locks on the image file).

// wLockMsg is how qemu says it could not lock an image, e.g.
// `Failed to get "write" lock` / `Failed to get shared "write" lock`,
// followed by "Is another process using the image [IMG]?".
var wLockMsg = regexp.MustCompile(`Failed to get (shared )?"[a-z ]+" lock`)

// wQemuNBDRW serves img read-write with `qemu-nbd -t -f qcow2
// -k SOCK img` and returns once the socket accepts connections; a
// cleanup stops it. (testutil.QemuNBD serves read-only.)
func wQemuNBDRW(t *testing.T, img string) *testutil.Proc {
	t.Helper()
	dir, err := os.MkdirTemp("", "cbtfs-nbd-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, "s")
	p := testutil.Start(t, "", "qemu-nbd", "-t", "-f", "qcow2", "-k", sock, img)
	t.Cleanup(func() {
		if !p.Exited() {
			_ = p.Signal(syscall.SIGTERM)
			if _, ok := p.Wait(testutil.WaitDelay); !ok {
				_ = p.Cmd.Process.Kill()
				p.Wait(testutil.WaitDelay)
			}
		}
	})
	deadline := time.Now().Add(testutil.NBDTimeout)
	for {
		c, err := net.Dial("unix", sock)
		if err == nil {
			c.Close()
			return p
		}
		if p.Exited() {
			t.Fatalf("qemu-nbd %s exited before serving: %v; stderr %q", img, p.Err(), p.Stderr())
		}
		if time.Now().After(deadline) {
			t.Fatalf("qemu-nbd %s: socket not accepting after %v: %v", img, testutil.NBDTimeout, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestWriteLocks checks the image locks both ways:
//   - while cbtfs has the image mounted read-write, qemu-io and qemu-img
//     bitmap fail to get their lock (qemu's own message), qemu-img info
//     -U works and shows the bitmaps in use, and a second cbtfs mount,
//     read-write or read-only, is refused;
//   - while qemu-nbd serves the image read-write, cbtfs mount (read-write
//     and read-only) refuses it with one line naming the image and the
//     lock, and leaves no mount behind;
//   - a read-only cbtfs mount and qemu-nbd -r share an image, whichever
//     comes first.
func TestWriteLocks(t *testing.T) {
	testutil.RequireFUSE(t)
	testutil.RequireTool(t, "nbdinfo")
	dir := t.TempDir()
	img, want := smallChain(t, dir)
	testutil.Img(t, "bitmap", "--add", img, "b0")
	notLocked := regexp.MustCompile(`(?i)lock|in use|another process`)

	t.Run("cbtfs-read-write", func(t *testing.T) {
		mnt := mkdir(t, t.TempDir(), "mnt")
		m := testutil.MountRW(t, cbtfs, img, mnt, testutil.MountOptions{})
		for _, args := range [][]string{
			{"qemu-io", "-f", "qcow2", "-c", "write 0 4k", img},
			{"qemu-io", "-r", "-f", "qcow2", "-c", "read 0 4k", img},
			{"qemu-img", "bitmap", "--add", img, "x"},
			{"qemu-img", "bitmap", "--clear", img, "b0"},
			{"qemu-img", "info", img},
		} {
			_, stderr, err := testutil.RunErr(t, args[0], args[1:]...)
			if err == nil {
				t.Errorf("%v while cbtfs has the image mounted read-write: succeeded", args)
			} else if !wLockMsg.MatchString(stderr) || !strings.Contains(stderr, "Is another process using the image") {
				t.Errorf("%v while cbtfs has the image mounted read-write: %v; stderr %q, want qemu's lock failure", args, err, stderr)
			}
		}
		bms := wImgInfo(t, img).FormatSpecific.Data.Bitmaps // qemu-img info -U
		if len(bms) != 1 || bms[0].Name != "b0" || !bms[0].inUse() {
			t.Errorf("qemu-img info -U during a read-write mount: bitmaps %+v, want b0 in use", bms)
		}
		for _, ro := range []bool{false, true} {
			args := []string{"mount"}
			if ro {
				args = append(args, "--read-only")
			}
			mnt2 := mkdir(t, t.TempDir(), "mnt")
			p := testutil.Start(t, "", cbtfs, append(args, img, mnt2)...)
			if _, ok := p.Wait(wBound); !ok {
				detachIfMounted(t, mnt2)
				p.Wait(testutil.ExitTimeout)
				t.Fatalf("a second cbtfs %v on a mounted image: still running after %v", args, wBound)
			}
			checkRefusal(t, "a second cbtfs "+strings.Join(args, " "), p.Err(), p.Stderr(), dir, filepath.Base(img), notLocked)
			testutil.RequireNoMount(t, mnt2)
		}
		requireDisk(t, m, want)
		m.Unmount(t)
	})

	t.Run("qemu-nbd-read-write", func(t *testing.T) {
		q := wQemuNBDRW(t, img)
		for _, ro := range []bool{false, true} {
			args := []string{"mount"}
			if ro {
				args = append(args, "--read-only")
			}
			mnt := mkdir(t, t.TempDir(), "mnt")
			p := testutil.Start(t, "", cbtfs, append(args, img, mnt)...)
			if _, ok := p.Wait(wBound); !ok {
				detachIfMounted(t, mnt)
				p.Wait(testutil.ExitTimeout)
				t.Fatalf("cbtfs %v while qemu-nbd serves the image read-write: still running after %v", args, wBound)
			}
			checkRefusal(t, "cbtfs "+strings.Join(args, " ")+" while qemu-nbd serves the image read-write", p.Err(), p.Stderr(), dir, filepath.Base(img), notLocked)
			testutil.RequireNoMount(t, mnt)
		}
		if q.Exited() {
			t.Errorf("qemu-nbd exited: %v; stderr %q", q.Err(), q.Stderr())
		}
	})

	t.Run("read-only-shared", func(t *testing.T) {
		// cbtfs first, then qemu-nbd -r.
		mnt := mkdir(t, t.TempDir(), "mnt")
		m := testutil.Mount(t, cbtfs, img, mnt)
		n := testutil.QemuNBD(t, img, testutil.NBDOptions{Bitmaps: []string{"b0"}})
		if got := strings.TrimSpace(testutil.Run(t, "nbdinfo", "--size", n.URI)); got != "4194304" {
			t.Errorf("nbdinfo --size against qemu-nbd -r beside a read-only mount: %s", got)
		}
		requireDisk(t, m, want)
		n.Stop(t)
		m.Unmount(t)

		// qemu-nbd -r first, then cbtfs --read-only.
		n = testutil.QemuNBD(t, img, testutil.NBDOptions{})
		m = testutil.Mount(t, cbtfs, img, mnt)
		requireDisk(t, m, want)
		m.Unmount(t)
		n.Stop(t)
	})
	wRequireClean(t, img)
}
