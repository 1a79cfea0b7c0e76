package integration

import (
	"bytes"
	"crypto/sha256"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cbtfs/cbtfs/internal/testutil"
)

// TestReadMatrix mounts every image of the matrix read-only and checks
// that MNT/disk is byte for byte what `qemu-img convert -O raw` produces
// (compared by cmp(1) in a separate process), that `cbtfs info --json`
// agrees with `qemu-img info --output=json` (and its "chain" with
// `qemu-img info --backing-chain`), that MNT/info.json is `cbtfs info
// --json` (and MNT/info `cbtfs info`), and that the mount wrote nothing to
// the image.
func TestReadMatrix(t *testing.T) {
	testutil.RequireFUSE(t)
	for _, c := range imageCases() {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			checkImage(t, c)
		})
	}
}

// checkImage builds one image of the matrix and runs every check on it.
func checkImage(t *testing.T, c imageCase) {
	dir := t.TempDir()
	b := &builder{t: t, dir: filepath.Join(dir, "img")}
	img, cwd := c.build(b)
	abs := img
	if !filepath.IsAbs(img) {
		abs = filepath.Join(cwd, img)
	}

	ref := filepath.Join(dir, "ref.raw")
	testutil.ConvertRaw(t, abs, ref)
	before := fileSum(t, abs)

	infoOut := checkInfo(t, img, cwd)

	mnt := filepath.Join(dir, "mnt")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	m := testutil.MountWith(t, cbtfs, img, mnt, testutil.MountOptions{Dir: cwd})

	fi, err := os.Stat(ref)
	if err != nil {
		t.Fatal(err)
	}
	if di, err := os.Stat(m.Disk); err != nil {
		t.Error(err)
	} else if di.Size() != fi.Size() {
		t.Errorf("MNT/disk size: got %d, want %d (the virtual size)", di.Size(), fi.Size())
	}
	if out, _, err := testutil.RunErr(t, "cmp", m.Disk, ref); err != nil {
		t.Errorf("MNT/disk differs from qemu-img convert -O raw: %s %v", out, err)
	}

	got, err := os.ReadFile(filepath.Join(mnt, "info.json"))
	if err != nil {
		t.Error(err)
	} else if !bytes.Equal(got, []byte(infoOut)) {
		t.Errorf("MNT/info.json differs from cbtfs info --json:\n--- MNT/info.json\n%s\n--- cbtfs info --json\n%s", got, infoOut)
	}

	text := runIn(t, cwd, cbtfs, "info", img)
	if got, err := os.ReadFile(filepath.Join(mnt, "info")); err != nil {
		t.Error(err)
	} else if string(got) != text {
		t.Errorf("MNT/info differs from cbtfs info:\n--- MNT/info\n%s\n--- cbtfs info\n%s", got, text)
	}

	m.Unmount(t)
	if after := fileSum(t, abs); after != before {
		t.Errorf("%s changed during a read-only mount", abs)
	}
}

// fileSum returns the SHA-256 of the file at path.
func fileSum(t *testing.T, path string) [sha256.Size]byte {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		t.Fatal(err)
	}
	return [sha256.Size]byte(h.Sum(nil))
}

// runIn runs name with args in directory dir ("" for the test's own) and
// returns its stdout, failing the test if it fails.
func runIn(t *testing.T, dir, name string, args ...string) string {
	t.Helper()
	cmd := testutil.Cmd(t, name, args...)
	cmd.Dir = dir
	out, _, err := testutil.RunCmd(t, cmd)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// checkInfo compares `cbtfs info --json img` with qemu-img's view of the
// same image, both run in cwd: the top-level object with `qemu-img info
// --output=json`, and "chain" with `qemu-img info --backing-chain
// --output=json`, element by element. Every field qemu-img prints must be
// there with the same value (README: "prints the top image exactly as
// qemu-img info --output=json does"). It returns cbtfs's output.
func checkInfo(t *testing.T, img, cwd string) string {
	t.Helper()
	out := runIn(t, cwd, cbtfs, "info", "--json", img)
	got, ok := testutil.DecodeJSON(t, "cbtfs info --json", []byte(out)).(map[string]any)
	if !ok {
		t.Fatalf("cbtfs info --json: not an object:\n%s", out)
	}
	want := testutil.DecodeJSON(t, "qemu-img info", []byte(runIn(t, cwd, "qemu-img", "info", "--output=json", img)))
	wantChain := testutil.DecodeJSON(t, "qemu-img info --backing-chain", []byte(runIn(t, cwd, "qemu-img", "info", "--backing-chain", "--output=json", img)))

	chain, ok := got["chain"]
	if !ok {
		t.Errorf("cbtfs info --json: no \"chain\"")
	}
	top := make(map[string]any, len(got))
	for k, v := range got {
		if k != "chain" {
			top[k] = v
		}
	}
	if d := testutil.JSONDiff(top, want, true); len(d) > 0 {
		t.Errorf("cbtfs info --json %s differs from qemu-img info --output=json:\n%s\ncbtfs:\n%s", img, strings.Join(d, "\n"), out)
	}
	if d := testutil.JSONDiff(chain, wantChain, true); len(d) > 0 {
		t.Errorf("cbtfs info --json %s: \"chain\" differs from qemu-img info --backing-chain --output=json:\n%s", img, strings.Join(d, "\n"))
	}
	return out
}
