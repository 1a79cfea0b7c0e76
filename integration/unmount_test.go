package integration

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cbtfs/cbtfs/internal/testutil"
)

// TestUnmountWaits: `cbtfs unmount` returns only once the mount process
// has stored the image and released its locks, so qemu-img can open the
// image right away, with its bitmaps stored and not in use.
func TestUnmountWaits(t *testing.T) {
	testutil.RequireFUSE(t)
	testutil.RequireTool(t, "qemu-img")
	dir := t.TempDir()
	img := filepath.Join(dir, "u.qcow2")
	testutil.Run(t, cbtfs, "create", img, "256M")
	testutil.Run(t, cbtfs, "bitmap", img, "add", "b0")
	mnt := filepath.Join(dir, "mnt")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	for round := range 3 {
		m := testutil.MountRW(t, cbtfs, img, mnt, testutil.MountOptions{})
		// Enough dirty metadata and bitmap data that storing takes a
		// moment after the unmount.
		testutil.Run(t, "dd", "if=/dev/urandom", "of="+m.Disk, "bs=64k", "count=1000", "conv=notrunc", "status=none")
		testutil.Run(t, cbtfs, "unmount", mnt)
		if !m.Exited() {
			if _, ok := m.Wait(0); !ok {
				t.Fatalf("round %d: cbtfs unmount returned before the mount process exited", round)
			}
		}
		// No -U: the locks must be free, the image clean.
		requireClean(t, img)
		info := testutil.Info(t, img)
		bms := info["format-specific"].(map[string]any)["data"].(map[string]any)["bitmaps"].([]any)
		flags := bms[0].(map[string]any)["flags"].([]any)
		if len(flags) != 1 || flags[0] != "auto" {
			t.Fatalf("round %d: bitmap flags after unmount %v, want [auto]", round, flags)
		}
		m.RequireExit(t, 0)
	}

	// Not a cbtfs mount: one line, non-zero exit.
	_, stderr, err := testutil.RunErr(t, cbtfs, "unmount", dir)
	if testutil.ExitCode(err) != 1 || !strings.Contains(stderr, "not a cbtfs mount") {
		t.Errorf("unmount of a plain directory: exit %d, stderr %q", testutil.ExitCode(err), stderr)
	}
}
