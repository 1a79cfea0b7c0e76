package integration

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cbtfs/cbtfs/internal/testutil"
)

// TestReadmeBackups runs the commands of the README's "Backups with cbtfs"
// section exactly as written, in order, in an empty directory: every
// `qemu-img compare`, `cmp` and `qemu-img check` in them must succeed.
func TestReadmeBackups(t *testing.T) {
	testutil.RequireFUSE(t)
	for _, tool := range []string{"qemu-img", "qemu-io", "nbdinfo", "nbdcopy", "fallocate"} {
		testutil.RequireTool(t, tool)
	}
	readme, err := os.ReadFile("../README.md")
	if err != nil {
		t.Fatal(err)
	}
	script := readmeBlocks(t, string(readme), "<!-- backups:begin -->", "<!-- backups:end -->")
	if !strings.Contains(script, "cbtfs mount") || !strings.Contains(script, "qemu-img compare") {
		t.Fatalf("the backups section lost its commands:\n%s", script)
	}
	dir := t.TempDir()
	t.Cleanup(func() {
		// A failed script may leave the mount behind.
		if len(testutil.MountsAt(t, filepath.Join(dir, "mnt"))) > 0 {
			_ = testutil.Detach(t, filepath.Join(dir, "mnt"))
		}
	})
	cmd := testutil.Cmd(t, "bash", "-euo", "pipefail", "-c", script)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "PATH="+filepath.Dir(cbtfs)+":"+os.Getenv("PATH"))
	out, stderr, err := testutil.RunCmd(t, cmd)
	if err != nil {
		t.Fatalf("README backup commands failed: %v\nstdout:\n%s\nstderr:\n%s", err, out, stderr)
	}
	// The walkthrough's own checks ran; spot-check what it printed.
	for _, want := range []string{"No errors were found on the image.", "overlay.qcow2", "196608      196608    1  dirty"} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
}

// readmeBlocks returns the ```sh code blocks between the markers, joined.
func readmeBlocks(t *testing.T, doc, begin, end string) string {
	t.Helper()
	i, j := strings.Index(doc, begin), strings.Index(doc, end)
	if i < 0 || j < i {
		t.Fatalf("README markers %q .. %q not found", begin, end)
	}
	var b strings.Builder
	in := false
	for _, line := range strings.Split(doc[i:j], "\n") {
		switch {
		case !in && strings.TrimSpace(line) == "```sh":
			in = true
		case in && strings.TrimSpace(line) == "```":
			in = false
			b.WriteString("\n")
		case in:
			b.WriteString(line + "\n")
		}
	}
	return b.String()
}
