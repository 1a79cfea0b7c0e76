package integration

import (
	"bytes"
	"crypto/rand"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"

	"github.com/cbtfs/cbtfs/internal/testutil"
)

// commitSetup makes base.qcow2 in baseDir (64 MiB) and an overlay over it
// in dir, mounts the overlay read-write and fills n MiB of it with random
// data through the mount. It returns the mount and the data written.
func commitSetup(t *testing.T, dir, baseDir string, n int) (*testutil.Mounted, []byte) {
	t.Helper()
	testutil.RequireFUSE(t)
	testutil.RequireTool(t, "qemu-img")
	base := filepath.Join(baseDir, "base.qcow2")
	top := filepath.Join(dir, "top.qcow2")
	testutil.Run(t, cbtfs, "create", base, "64M")
	testutil.Run(t, cbtfs, "bitmap", base, "add", "b0")
	testutil.Run(t, cbtfs, "create", "--backing", base, top)
	mnt := filepath.Join(dir, "mnt")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	m := testutil.MountRW(t, cbtfs, top, mnt, testutil.MountOptions{})
	data := make([]byte, n<<20)
	if _, err := rand.Read(data); err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(m.Disk, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(data, 0); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	return m, data
}

// TestCommitProgress: while a commit runs, cat control shows how many
// bytes were copied of how many to copy; afterwards the chain is the base
// alone and reads the same.
func TestCommitProgress(t *testing.T) {
	dir := t.TempDir()
	m, data := commitSetup(t, dir, dir, 48)
	ctl := filepath.Join(m.Dir, "control")

	var wg sync.WaitGroup
	var seen []string
	done := make(chan struct{})
	wg.Go(func() {
		for {
			select {
			case <-done:
				return
			default:
			}
			b, err := os.ReadFile(ctl)
			if err != nil {
				t.Error(err)
				return
			}
			for _, line := range strings.Split(string(b), "\n") {
				if strings.HasPrefix(line, "commit: ") && (len(seen) == 0 || seen[len(seen)-1] != line) {
					seen = append(seen, line)
				}
			}
		}
	})
	err := os.WriteFile(ctl, []byte("commit\n"), 0)
	close(done)
	wg.Wait()
	if err != nil {
		t.Fatalf("commit: %v", err)
	}
	if len(seen) == 0 {
		t.Fatal("cat control never showed the commit's progress while it ran")
	}
	last := seen[len(seen)-1]
	if !strings.Contains(last, " of ") || !strings.HasSuffix(last, "bytes copied") {
		t.Errorf("progress line %q, want 'commit: N of M bytes copied'", last)
	}
	t.Logf("progress seen: %d lines, last %q", len(seen), last)
	got, err := os.ReadFile(m.Disk)
	if err != nil || !bytes.Equal(got[:len(data)], data) {
		t.Fatalf("disk after commit differs from what was written (err %v)", err)
	}
	info, err := os.ReadFile(filepath.Join(m.Dir, "info"))
	if err != nil || !strings.Contains(string(info), "1: ") || strings.Contains(string(info), "2: ") {
		t.Fatalf("chain after commit:\n%s", info)
	}
	st, _ := os.ReadFile(ctl)
	if !strings.Contains(string(st), "ok: commit") {
		t.Errorf("control after commit:\n%s", st)
	}
	testutil.Run(t, cbtfs, "unmount", m.Dir)
	requireClean(t, filepath.Join(dir, "base.qcow2"))
	requireClean(t, filepath.Join(dir, "top.qcow2"))
}

// TestCommitNoSpace: a commit that runs out of space in the backing
// file's file system fails with ENOSPC and leaves the old chain in place,
// reading the same data; both images stay consistent for qemu-img check
// (leaks allowed); with room again, the commit succeeds.
func TestCommitNoSpace(t *testing.T) {
	dir := t.TempDir()
	small := filepath.Join(dir, "small")
	if err := os.Mkdir(small, 0o755); err != nil {
		t.Fatal(err)
	}
	testutil.Tmpfs(t, small, "12M")
	m, data := commitSetup(t, dir, small, 32)
	ctl := filepath.Join(m.Dir, "control")

	err := os.WriteFile(ctl, []byte("commit\n"), 0)
	if !errors.Is(err, syscall.ENOSPC) {
		st, _ := os.ReadFile(ctl)
		t.Fatalf("commit into a full file system: %v, want ENOSPC\n%s", err, st)
	}
	st, _ := os.ReadFile(ctl)
	if !strings.Contains(string(st), "failed: commit") {
		t.Errorf("control after the failed commit:\n%s", st)
	}
	info, _ := os.ReadFile(filepath.Join(m.Dir, "info"))
	if !strings.Contains(string(info), "2: ") {
		t.Fatalf("the chain lost its top after a failed commit:\n%s", info)
	}
	got, err := os.ReadFile(m.Disk)
	if err != nil || !bytes.Equal(got[:len(data)], data) {
		t.Fatalf("disk after the failed commit differs (err %v)", err)
	}
	// With room again, the same commit succeeds.
	testutil.Run(t, "mount", "-o", "remount,size=200M", small)
	if err := os.WriteFile(ctl, []byte("commit\n"), 0); err != nil {
		st, _ := os.ReadFile(ctl)
		t.Fatalf("commit with room: %v\n%s", err, st)
	}
	if info, _ := os.ReadFile(filepath.Join(m.Dir, "info")); strings.Contains(string(info), "2: ") {
		t.Fatalf("the chain kept its top after the commit:\n%s", info)
	}
	testutil.Run(t, cbtfs, "unmount", m.Dir)
	requireClean(t, filepath.Join(small, "base.qcow2"))
	rawBase := filepath.Join(dir, "base.raw")
	testutil.ConvertRaw(t, filepath.Join(small, "base.qcow2"), rawBase)
	if b, err := os.ReadFile(rawBase); err != nil || !bytes.Equal(b[:len(data)], data) {
		t.Fatalf("the base does not hold the committed data (err %v)", err)
	}
	for _, img := range []string{filepath.Join(small, "base.qcow2"), filepath.Join(dir, "top.qcow2")} {
		if res, code := testutil.Check(t, img); code != 0 && code != 3 {
			t.Fatalf("qemu-img check %s: exit %d %+v", img, code, res)
		}
	}
	raw := filepath.Join(dir, "after.raw")
	testutil.ConvertRaw(t, filepath.Join(dir, "top.qcow2"), raw)
	after, err := os.ReadFile(raw)
	if err != nil || !bytes.Equal(after[:len(data)], data) {
		t.Fatalf("the chain reads differently after the failed commit (err %v)", err)
	}
}
