package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// runCLI runs the command line in-process and returns status and output.
func runCLI(t *testing.T, args ...string) (int, string, string) {
	t.Helper()
	var out, errb bytes.Buffer
	code := run(t.Context(), args, &out, &errb)
	return code, out.String(), errb.String()
}

func TestHelp(t *testing.T) {
	for _, args := range [][]string{
		{"--help"}, {"mount", "--help"}, {"serve", "--help"}, {"info", "--help"},
		{"map", "--help"}, {"create", "--help"}, {"bitmap", "--help"},
	} {
		code, out, _ := runCLI(t, args...)
		if code != 0 || !strings.Contains(out, "Usage:") {
			t.Errorf("%v: exit %d, output %q", args, code, out)
		}
	}
}

func TestUsageErrors(t *testing.T) {
	for _, args := range [][]string{
		{},
		{"frobnicate"},
		{"mount", "only-one-arg"},
		{"serve", "img.qcow2"}, // --listen is required
		{"map", "--bitmap", "b", "--depth", "img.qcow2"},
		{"bitmap", "img.qcow2", "explode", "b"},
		{"create", "--backing-format", "vmdk", "x.qcow2", "1G"},
	} {
		code, _, stderr := runCLI(t, args...)
		if code != 2 {
			t.Errorf("%v: exit %d, want 2 (usage error); stderr %q", args, code, stderr)
		}
	}
}

// TestErrorsAreOneLine: a failing command prints one line naming the
// file and the cause, with exit status 1.
func TestErrorsAreOneLine(t *testing.T) {
	dir := t.TempDir()
	missing := filepath.Join(dir, "missing.qcow2")
	notQcow := filepath.Join(dir, "text.qcow2")
	if err := os.WriteFile(notQcow, []byte("hello"), 0o644); err != nil {
		t.Fatal(err)
	}
	img := filepath.Join(dir, "img.qcow2")
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"info", missing}, "missing.qcow2"},
		{[]string{"info", notQcow}, "not a qcow2 image"},
		{[]string{"map", "--depth", notQcow}, "not a qcow2 image"},
		{[]string{"create", "--cluster-size", "3K", img, "1M"}, "cluster size"},
		{[]string{"create", img}, "a size is needed"},
		{[]string{"create", img, "12Q"}, "invalid size"},
		{[]string{"create", "--backing", missing, img}, "missing.qcow2"},
		{[]string{"bitmap", missing, "add", "b0"}, "missing.qcow2"},
		{[]string{"bitmap", notQcow, "merge", "a"}, "needs 2 name"},
		{[]string{"bitmap", notQcow, "remove", "a", "--granularity", "4K"}, "apply to add only"},
	} {
		code, _, stderr := runCLI(t, tc.args...)
		if code != 1 {
			t.Errorf("%v: exit %d, want 1; stderr %q", tc.args, code, stderr)
		}
		if strings.Count(stderr, "\n") != 1 || !strings.HasPrefix(stderr, "cbtfs: ") || !strings.Contains(stderr, tc.want) {
			t.Errorf("%v: stderr %q, want one line mentioning %q", tc.args, stderr, tc.want)
		}
	}
}

// TestCreateAndInfo runs create, bitmap and info in-process on a fresh
// image.
func TestCreateAndInfo(t *testing.T) {
	img := filepath.Join(t.TempDir(), "a.qcow2")
	if code, _, stderr := runCLI(t, "create", "--cluster-size", "4K", img, "1G"); code != 0 {
		t.Fatalf("create: %d %s", code, stderr)
	}
	if code, _, stderr := runCLI(t, "create", img, "1G"); code != 1 || !strings.Contains(stderr, "exists") {
		t.Errorf("create over an existing file: %d %q", code, stderr)
	}
	if code, _, stderr := runCLI(t, "bitmap", img, "add", "b0", "--granularity", "64K"); code != 0 {
		t.Fatalf("bitmap add: %d %s", code, stderr)
	}
	code, out, stderr := runCLI(t, "info", "--json", img)
	if code != 0 {
		t.Fatalf("info: %d %s", code, stderr)
	}
	for _, want := range []string{`"virtual-size": 1073741824`, `"cluster-size": 4096`, `"name": "b0"`, `"granularity": 65536`} {
		if !strings.Contains(out, want) {
			t.Errorf("info --json lacks %s:\n%s", want, out)
		}
	}
	code, out, _ = runCLI(t, "map", "--bitmap", "b0", img)
	if code != 0 || out != "         0  1073741824    0  clean\n" {
		t.Errorf("map --bitmap: %d %q", code, out)
	}
}
