package integration

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cbtfs/cbtfs/internal/testutil"
)

// This file holds the hostile cases of issue 4 for a read-write mount:
// the host disk filling up under a write, writes past the end,
// truncation, writes to a read-only mount, and unmounts that cannot
// succeed.

// wBound is how long a command that must fail may take; longer
// is a hang.
const wBound = 20 * time.Second

// wRunBounded runs name with args and waits at most wBound for it,
// failing the test if it is still running then. It returns the stderr
// and the error of the finished command.
func wRunBounded(t *testing.T, name string, args ...string) (stderr string, err error) {
	t.Helper()
	p := testutil.Start(t, "", name, args...)
	if _, ok := p.Wait(wBound); !ok {
		_ = p.Signal(syscall.SIGKILL)
		p.Wait(testutil.WaitDelay)
		t.Fatalf("%s %v: still running after %v", name, args, wBound)
	}
	return p.Stderr(), p.Err()
}

// wRandom returns n random bytes.
func wRandom(rng *rand.Rand, n int) []byte {
	b := make([]byte, n)
	for i := 0; i < n; i += 8 {
		v := rng.Uint64()
		for j := 0; j < 8 && i+j < n; j++ {
			b[i+j] = byte(v >> (8 * j))
		}
	}
	return b
}

// TestWriteDiskFull fills the host file system under a read-write mount:
// the image and the mountpoint live on a 6 MiB tmpfs, and 1 MiB writes
// of random data go through MNT/disk until one fails. It must fail with
// ENOSPC (and dd must say "No space left on device"); the mount stays
// usable: what was written reads back, can be overwritten in place and
// fsync'ed. Then either space is freed (a ballast file removed) and the
// unmount stores everything (exit 0, bitmap not in use and marking every
// write), or the disk stays full and the unmount may fail, with one line
// saying so, leaving the bitmap in use. Either way qemu-img check finds
// no corruption (leaks are allowed) and every completed write reads back.
func TestWriteDiskFull(t *testing.T) {
	testutil.RequireFUSE(t)
	testutil.RequireTool(t, "nbdinfo")
	for _, free := range []bool{true, false} {
		name := "disk-stays-full"
		if free {
			name = "space-freed-before-unmount"
		}
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			wDiskFull(t, free)
		})
	}
}

func wDiskFull(t *testing.T, free bool) {
	dir := t.TempDir()
	fsDir := mkdir(t, dir, "fs")
	testutil.Tmpfs(t, fsDir, "6M")
	img := filepath.Join(fsDir, "a.qcow2")
	const size = 64 << 20
	testutil.Create(t, img, strconv.Itoa(size))
	testutil.Img(t, "bitmap", "--add", img, "b0")
	ballast := filepath.Join(fsDir, "ballast")
	if err := os.WriteFile(ballast, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	mnt := mkdir(t, fsDir, "mnt")
	m := testutil.MountRW(t, cbtfs, img, mnt, testutil.MountOptions{})

	rng := rand.New(rand.NewPCG(4, 4))
	model := make([]byte, size)
	f, err := os.OpenFile(m.Disk, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	const chunk = 1 << 20
	var written int64 // [0, written) holds completed writes
	var werr error
	for off := int64(0); off < size; off += chunk {
		b := wRandom(rng, chunk)
		if _, werr = f.WriteAt(b, off); werr != nil {
			break
		}
		copy(model[off:], b)
		written = off + chunk
	}
	t.Logf("%d bytes written before the write that failed: %v", written, werr)
	if !errors.Is(werr, syscall.ENOSPC) {
		t.Fatalf("writing until the host disk is full: %v, want ENOSPC", werr)
	}
	if written == 0 {
		t.Fatal("not even the first 1 MiB write fit")
	}
	// The bytes of the failed write are undefined; the image past it
	// still reads as zeros.
	failed := [2]int64{written, min(written+chunk, size)}

	// dd says so too, on a range never written.
	if stderr, err := wRunBounded(t, "dd", "if=/dev/urandom", "of="+m.Disk, "bs=1M", "count=2", "seek=40", "conv=notrunc", "status=none"); err == nil {
		t.Errorf("dd onto a full disk succeeded")
	} else if !strings.Contains(stderr, "No space left on device") {
		t.Errorf("dd onto a full disk: %v; stderr %q, want \"No space left on device\"", err, stderr)
	}
	failed[1] = size // dd's range is undefined too: leave it out of the checks below

	// The mount stays usable.
	got := make([]byte, written)
	if _, err := f.ReadAt(got, 0); err != nil {
		t.Fatalf("read back after ENOSPC: %v", err)
	}
	if !bytes.Equal(got, model[:written]) {
		t.Fatalf("read back after ENOSPC: differs from what was written at %d", firstDiff(got, model[:written]))
	}
	b := wRandom(rng, 100000)
	if _, err := f.WriteAt(b, 12345); err != nil {
		t.Fatalf("overwrite in place after ENOSPC: %v", err)
	}
	copy(model[12345:], b)
	if err := f.Sync(); err != nil {
		t.Fatalf("fsync after ENOSPC: %v", err)
	}

	if free {
		if err := os.Remove(ballast); err != nil {
			t.Fatal(err)
		}
		b := wRandom(rng, 4096)
		if _, err := f.WriteAt(b, failed[0]); err != nil {
			t.Fatalf("write after space was freed: %v", err)
		}
		copy(model[failed[0]:], b)
		if err := f.Sync(); err != nil {
			t.Fatalf("fsync after space was freed: %v", err)
		}
		if err := f.Close(); err != nil {
			t.Fatal(err)
		}
		m.Unmount(t)
	} else {
		if err := f.Close(); err != nil {
			t.Fatal(err)
		}
		m.AllowAnyExit()
		if stderr, err := wRunBounded(t, "fusermount3", "-u", mnt); err != nil {
			t.Fatalf("fusermount3 -u on a full disk: %v; stderr %q", err, stderr)
		}
		ws, ok := m.Wait(testutil.ExitTimeout)
		if !ok {
			t.Fatalf("cbtfs still running %v after its unmount", testutil.ExitTimeout)
		}
		t.Logf("cbtfs ended with %v; stderr %q", ws, m.Stderr())
		if !ws.Exited() {
			t.Errorf("cbtfs ended with %v, want an exit", ws)
		} else if ws.ExitStatus() != 0 {
			msg := strings.TrimSuffix(m.Stderr(), "\n")
			if strings.Contains(msg, "\n") || !strings.Contains(strings.ToLower(msg), "no space") {
				t.Errorf("cbtfs failed (exit %d) with stderr %q, want one line saying there is no space", ws.ExitStatus(), m.Stderr())
			}
		}
		testutil.RequireNoMount(t, mnt)
	}

	if r, code := testutil.Check(t, img); code != 0 && code != 3 || r.Corruptions != 0 || r.CheckErrors != 0 {
		out, _, _ := testutil.RunErr(t, "qemu-img", "check", img)
		t.Fatalf("qemu-img check: exit %d, %+v:\n%s", code, r, out)
	}
	// The raw copy goes to the big disk, not the full tmpfs.
	ref := filepath.Join(dir, "ref.raw")
	testutil.ConvertRaw(t, img, ref)
	after, err := os.ReadFile(ref)
	if err != nil {
		t.Fatal(err)
	}
	end := failed[0]
	if free {
		end += 4096
	}
	if !bytes.Equal(after[:end], model[:end]) {
		t.Errorf("the image after unmount: completed writes do not read back (first difference at %d)", firstDiff(after[:end], model[:end]))
	}

	bms := wImgInfo(t, img).FormatSpecific.Data.Bitmaps
	if len(bms) != 1 {
		t.Fatalf("bitmaps after unmount: %+v, want b0", bms)
	}
	if bms[0].inUse() {
		if free {
			t.Errorf("bitmap b0 still in use after an unmount with free space: %+v", bms[0])
		}
		return
	}
	g := wGranules(t, "b0", wBitmapMaps(t, img, []string{"b0"})["b0"], size, bms[0].Granularity)
	want := slices.Clone(g)
	wMark(want, []wOp{{kind: wWrite, off: 0, n: end}}, bms[0].Granularity)
	if !slices.Equal(g, want) {
		t.Errorf("bitmap b0 after unmount does not mark every completed write: %s", wGranuleDiff(g, want, bms[0].Granularity, size))
	}
}

// TestWriteErrors checks the writes a read-write MNT/disk must refuse,
// each without changing the disk: past the end (EFBIG, dd "File too
// large"), truncation to any other size (EPERM, also through O_TRUNC and
// truncate(1)); and that a read-only mount refuses opening for writing
// (EROFS). After the unmount the image is clean and as it was.
func TestWriteErrors(t *testing.T) {
	testutil.RequireFUSE(t)
	dir := t.TempDir()
	img, want := smallChain(t, dir)
	size := int64(len(want))
	ref := filepath.Join(dir, "ref.raw")

	t.Run("read-only", func(t *testing.T) {
		mnt := mkdir(t, t.TempDir(), "mnt")
		m := testutil.Mount(t, cbtfs, img, mnt)
		for _, flag := range []int{os.O_WRONLY, os.O_RDWR, os.O_WRONLY | os.O_TRUNC} {
			f, err := os.OpenFile(m.Disk, flag, 0)
			if err == nil {
				f.Close()
			}
			if !errors.Is(err, syscall.EROFS) {
				t.Errorf("open MNT/disk of a read-only mount with flags %#x: %v, want EROFS", flag, err)
			}
		}
		if stderr, err := wRunBounded(t, "dd", "if=/dev/zero", "of="+m.Disk, "bs=4k", "count=1", "conv=notrunc", "status=none"); err == nil || !strings.Contains(stderr, "Read-only file system") {
			t.Errorf("dd onto a read-only MNT/disk: %v; stderr %q, want \"Read-only file system\"", err, stderr)
		}
		requireDisk(t, m, want)
		m.Unmount(t)
	})

	t.Run("read-write", func(t *testing.T) {
		mnt := mkdir(t, t.TempDir(), "mnt")
		m := testutil.MountRW(t, cbtfs, img, mnt, testutil.MountOptions{})
		f, err := os.OpenFile(m.Disk, os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		for _, c := range []struct{ off, n int64 }{{size, 1}, {size - 1, 2}, {size - 4096, 8192}, {size + 1<<20, 512}} {
			if _, err := f.WriteAt(make([]byte, c.n), c.off); !errors.Is(err, syscall.EFBIG) {
				t.Errorf("write of %d bytes at %d (disk size %d): %v, want EFBIG", c.n, c.off, size, err)
			}
		}
		if stderr, err := wRunBounded(t, "dd", "if=/dev/zero", "of="+m.Disk, "bs=512", "count=1", "seek="+strconv.FormatInt(size/512, 10), "conv=notrunc", "status=none"); err == nil || !strings.Contains(stderr, "File too large") {
			t.Errorf("dd past the end of MNT/disk: %v; stderr %q, want \"File too large\"", err, stderr)
		}
		for _, n := range []int64{0, size / 2, size - 1, size + 1, 2 * size} {
			if err := os.Truncate(m.Disk, n); !errors.Is(err, syscall.EPERM) {
				t.Errorf("truncate MNT/disk to %d (size %d): %v, want EPERM", n, size, err)
			}
			if err := f.Truncate(n); !errors.Is(err, syscall.EPERM) {
				t.Errorf("ftruncate MNT/disk to %d (size %d): %v, want EPERM", n, size, err)
			}
		}
		if g, err := os.OpenFile(m.Disk, os.O_WRONLY|os.O_TRUNC, 0); !errors.Is(err, syscall.EPERM) {
			if err == nil {
				g.Close()
			}
			t.Errorf("open MNT/disk with O_TRUNC: %v, want EPERM", err)
		}
		if stderr, err := wRunBounded(t, "truncate", "-s", "1M", m.Disk); err == nil || !strings.Contains(stderr, "Operation not permitted") {
			t.Errorf("truncate -s 1M MNT/disk: %v; stderr %q, want \"Operation not permitted\"", err, stderr)
		}
		// Truncation to the same size changes nothing and may succeed.
		_ = os.Truncate(m.Disk, size)
		if fi, err := os.Stat(m.Disk); err != nil || fi.Size() != size {
			t.Errorf("MNT/disk after the refused changes: %v, size %d, want %d", err, fi.Size(), size)
		}
		requireDisk(t, m, want)
		if err := f.Close(); err != nil {
			t.Fatal(err)
		}
		m.Unmount(t)
		wRequireClean(t, img)
		if err := os.WriteFile(ref, want, 0o644); err != nil {
			t.Fatal(err)
		}
		if !testutil.Compare(t, img, ref, "-f", "qcow2", "-F", "raw") {
			t.Errorf("the image changed through refused operations")
		}
	})
}

// TestUnmountErrors checks that unmounts that cannot succeed are
// reported, never hang: fusermount3 -u of a busy mount (a file held
// open) fails saying so, SIGTERM then leaves the mount serving, and once
// the file is closed fusermount3 -u ends it with exit status 0; a second
// fusermount3 -u then fails with a message.
func TestUnmountErrors(t *testing.T) {
	testutil.RequireFUSE(t)
	dir := t.TempDir()
	img, want := smallChain(t, dir)
	mnt := mkdir(t, dir, "mnt")
	m := testutil.MountRW(t, cbtfs, img, mnt, testutil.MountOptions{})
	f, err := os.OpenFile(m.Disk, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()

	stderr, err := wRunBounded(t, "fusermount3", "-u", mnt)
	if err == nil {
		t.Fatal("fusermount3 -u of a busy mount succeeded")
	}
	if !strings.Contains(strings.ToLower(stderr), "busy") {
		t.Errorf("fusermount3 -u of a busy mount: %v; stderr %q, want it to say busy", err, stderr)
	}
	requireDisk(t, m, want)

	// SIGTERM cannot unmount either: cbtfs says so and keeps serving.
	if err := m.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(wBound)
	for !strings.Contains(m.Stderr(), "unmount") && time.Now().Before(deadline) && !m.Exited() {
		time.Sleep(20 * time.Millisecond)
	}
	if m.Exited() {
		t.Fatalf("cbtfs exited on SIGTERM with a busy mount; stderr %q", m.Stderr())
	}
	if !strings.Contains(m.Stderr(), "unmount") {
		t.Errorf("cbtfs stderr after SIGTERM with a busy mount: %q, want a warning that the unmount failed", m.Stderr())
	}
	if _, err := f.WriteAt([]byte("still here"), 4096); err != nil {
		t.Errorf("write through the held file after SIGTERM: %v", err)
	}
	copy(want[4096:], "still here")
	requireDisk(t, m, want)

	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	if stderr, err := wRunBounded(t, "fusermount3", "-u", mnt); err != nil {
		t.Fatalf("fusermount3 -u once the file is closed: %v; stderr %q", err, stderr)
	}
	m.RequireExit(t, 0)
	testutil.RequireNoMount(t, mnt)

	stderr, err = wRunBounded(t, "fusermount3", "-u", mnt)
	if err == nil {
		t.Errorf("a second fusermount3 -u succeeded")
	} else if strings.TrimSpace(stderr) == "" {
		t.Errorf("a second fusermount3 -u: %v with nothing on stderr", err)
	}
	t.Logf("second fusermount3 -u: %v; %q", err, stderr)
	wRequireClean(t, img)
	ref := filepath.Join(dir, "want.raw")
	if err := os.WriteFile(ref, want, 0o644); err != nil {
		t.Fatal(err)
	}
	if !testutil.Compare(t, img, ref, "-f", "qcow2", "-F", "raw") {
		t.Error("the image after the unmount differs from what was written")
	}
}
