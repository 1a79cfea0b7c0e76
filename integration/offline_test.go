package integration

import (
	"bytes"
	"cmp"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cbtfs/cbtfs/internal/testutil"
)

// This file holds the acceptance tests of issue 5 for the offline CLI:
// `cbtfs bitmap` must leave an image in the state `qemu-img bitmap` leaves
// a copy in after the same sequence, fail like it with a one-line error,
// and `cbtfs create` must make the images `qemu-img create` makes.
// Identifiers start with "oc" (offline commands).

// ocBitmapArgs translates a control command into `cbtfs bitmap` arguments.
func ocBitmapArgs(t *testing.T, img, cmd string) []string {
	t.Helper()
	f := strings.Fields(cmd)
	switch {
	case len(f) == 2 && f[0] == "checkpoint":
		return []string{"bitmap", img, "add", f[1]}
	case len(f) >= 3 && f[0] == "bitmap" && f[1] == "add":
		args := []string{"bitmap", img, "add", f[2]}
		for _, o := range f[3:] {
			if g, ok := strings.CutPrefix(o, "granularity="); ok {
				args = append(args, "--granularity", g)
			} else if o == "disabled" {
				args = append(args, "--disabled")
			} else {
				t.Fatalf("ocBitmapArgs: %q", cmd)
			}
		}
		return args
	case len(f) >= 3 && f[0] == "bitmap":
		return append([]string{"bitmap", img}, f[1:]...)
	}
	t.Fatalf("ocBitmapArgs: %q", cmd)
	return nil
}

// ocCompare requires img and the qemu copy ref to hold the same bitmaps,
// with the same extents, and both to pass qemu-img check.
func ocCompare(t *testing.T, at, img, ref string) {
	t.Helper()
	// In order: both keep the directory's order and append new bitmaps.
	want := testutil.QemuBitmapsInOrder(t, ref, false)
	ccRequireSameBitmaps(t, at+": cbtfs bitmap vs qemu-img bitmap", testutil.QemuBitmapsInOrder(t, img, false), want)
	names := ccNames(want)
	ccRequireSameMaps(t, at+": cbtfs bitmap vs qemu-img bitmap", testutil.BitmapMaps(t, img, false, names...), testutil.BitmapMaps(t, ref, false, names...))
	ccCheck(t, img, false)
	ccRequireHeader(t, img, len(want) > 0)
}

// TestOfflineSequence runs ccSequence with `cbtfs bitmap` on one copy and
// `qemu-img bitmap` on another (qemu-io writes to both).
func TestOfflineSequence(t *testing.T) {
	t.Parallel()
	testutil.RequireTool(t, "qemu-nbd")
	testutil.RequireTool(t, "nbdinfo")
	for _, cs := range ccClusterSizes {
		t.Run(fmt.Sprintf("cluster%d", cs), func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			img, ref := filepath.Join(dir, "cbtfs.qcow2"), filepath.Join(dir, "qemu.qcow2")
			ccNewImage(t, img, cs, ccSize)
			testutil.CopyFile(t, img, ref)
			for i, step := range ccSequence {
				ccQemuStep(t, ref, step)
				switch f := strings.Fields(step); f[0] {
				case "write":
					testutil.IO(t, img, ccQemuIOWrite(t, step))
				case "check":
					ocCompare(t, fmt.Sprintf("check at step %d", i), img, ref)
				default:
					out, stderr, err := testutil.RunCbtfs(t, cbtfs, ocBitmapArgs(t, img, step)...)
					if err != nil || out != "" || stderr != "" {
						t.Fatalf("cbtfs %q: %v; stdout %q", ocBitmapArgs(t, img, step), err, out)
					}
				}
			}
			ocCompare(t, "the end", img, ref)
			if !testutil.Compare(t, img, ref) {
				t.Fatal("the disks differ")
			}
		})
	}
}

// ocFailCase is a `cbtfs bitmap` invocation that must fail.
type ocFailCase struct {
	args []string // after "bitmap IMAGE"
	msg  string   // in the error line
	// qemu are the arguments of the same operation for qemu-img bitmap
	// (IMAGE is appended where "IMG" stands), which must fail as well;
	// nil when qemu-img has no such invocation.
	qemu []string
	// namesFile: the error is about the image, so it names it.
	namesFile bool
}

func ocFailCases() []ocFailCase {
	long := strings.Repeat("n", 1024)
	return []ocFailCase{
		{args: []string{"frob", "a"}, msg: "must be one of"},
		{args: []string{"add"}, msg: "expected"},
		{args: []string{}, msg: "expected"},
		{args: []string{"merge", "a"}, msg: "2 name"},
		{args: []string{"remove", "a", "b"}, msg: "1 name"},
		{args: []string{"clear", "a", "--granularity", "4K"}, msg: "add only"},
		{args: []string{"enable", "a", "--disabled"}, msg: "add only"},

		{args: []string{"remove", "nope"}, msg: "nope", qemu: []string{"--remove", "IMG", "nope"}, namesFile: true},
		{args: []string{"clear", "nope"}, msg: "nope", qemu: []string{"--clear", "IMG", "nope"}, namesFile: true},
		{args: []string{"enable", "nope"}, msg: "nope", qemu: []string{"--enable", "IMG", "nope"}, namesFile: true},
		{args: []string{"disable", "nope"}, msg: "nope", qemu: []string{"--disable", "IMG", "nope"}, namesFile: true},
		{args: []string{"merge", "nope", "a"}, msg: "nope", qemu: []string{"--merge", "nope", "IMG", "a"}, namesFile: true},
		{args: []string{"merge", "a", "nope"}, msg: "nope", qemu: []string{"--merge", "a", "IMG", "nope"}, namesFile: true},

		{args: []string{"add", "a"}, msg: "exists", qemu: []string{"--add", "IMG", "a"}, namesFile: true},
		{args: []string{"add", "b", "--granularity", "4K"}, msg: "exists", qemu: []string{"--add", "-g", "4K", "IMG", "b"}, namesFile: true},

		{args: []string{"add", "x", "--granularity", "3K"}, msg: "granularity", qemu: []string{"--add", "-g", "3K", "IMG", "x"}},
		{args: []string{"add", "x", "--granularity", "1536"}, msg: "granularity", qemu: []string{"--add", "-g", "1536", "IMG", "x"}},
		{args: []string{"add", "x", "--granularity", "256"}, msg: "granularity", qemu: []string{"--add", "-g", "256", "IMG", "x"}},
		// qemu-img bitmap reads -g 0 as "the default"; cbtfs refuses it.
		{args: []string{"add", "x", "--granularity", "0"}, msg: "granularity"},
		{args: []string{"add", "x", "--granularity", "4G"}, msg: "granularity", qemu: []string{"--add", "-g", "4G", "IMG", "x"}},
		{args: []string{"add", "x", "--granularity="}, msg: "granularity", qemu: []string{"--add", "-g", "", "IMG", "x"}},
		{args: []string{"add", "x", "--granularity", "abc"}, msg: "granularity", qemu: []string{"--add", "-g", "abc", "IMG", "x"}},

		{args: []string{"add", long}, msg: "name", qemu: []string{"--add", "IMG", long}, namesFile: true},
		{args: []string{"add", ""}, msg: "name", qemu: []string{"--add", "IMG", ""}, namesFile: true},

		{args: []string{"add", "stale"}, msg: "exists", qemu: []string{"--add", "IMG", "stale"}, namesFile: true},
		{args: []string{"clear", "stale"}, msg: "inconsistent", qemu: []string{"--clear", "IMG", "stale"}, namesFile: true},
		{args: []string{"enable", "stale"}, msg: "inconsistent", qemu: []string{"--enable", "IMG", "stale"}, namesFile: true},
		{args: []string{"disable", "stale"}, msg: "inconsistent", qemu: []string{"--disable", "IMG", "stale"}, namesFile: true},
		{args: []string{"merge", "stale", "a"}, msg: "inconsistent", qemu: []string{"--merge", "stale", "IMG", "a"}, namesFile: true},
		{args: []string{"merge", "a", "stale"}, msg: "inconsistent", qemu: []string{"--merge", "a", "IMG", "stale"}, namesFile: true},
	}
}

// ocRequireOneLineError requires a failed command with exactly one line
// on stderr holding msg (case-insensitive).
func ocRequireOneLineError(t *testing.T, what string, err error, stderr, msg string) {
	t.Helper()
	if err == nil {
		t.Errorf("%s: succeeded", what)
		return
	}
	if testutil.ExitCode(err) <= 0 {
		t.Errorf("%s: %v, want a non-zero exit status", what, err)
	}
	line, ok := strings.CutSuffix(stderr, "\n")
	if !ok || line == "" || strings.Contains(line, "\n") {
		t.Errorf("%s: stderr is not one line: %q", what, stderr)
	}
	if !strings.Contains(strings.ToLower(line), strings.ToLower(msg)) {
		t.Errorf("%s: error %q does not say %q", what, line, msg)
	}
}

// TestOfflineFailures runs every failing `cbtfs bitmap` invocation: one
// line on stderr, a non-zero exit, qemu-img bitmap fails too, and the
// bitmaps stay as they were.
func TestOfflineFailures(t *testing.T) {
	t.Parallel()
	testutil.RequireTool(t, "qemu-nbd")
	testutil.RequireTool(t, "nbdinfo")
	dir := t.TempDir()
	img, ref := filepath.Join(dir, "f.qcow2"), filepath.Join(dir, "ref.qcow2")
	ccFailImage(t, img)
	testutil.CopyFile(t, img, ref)
	before := testutil.QemuBitmaps(t, img, false)
	beforeMaps := testutil.BitmapMaps(t, img, false, "a", "b")

	for _, c := range ocFailCases() {
		what := fmt.Sprintf("cbtfs bitmap IMG %.60q", c.args)
		_, stderr, err := testutil.RunCbtfs(t, cbtfs, append([]string{"bitmap", img}, c.args...)...)
		ocRequireOneLineError(t, what, err, stderr, c.msg)
		if c.namesFile && !strings.Contains(stderr, filepath.Base(img)) {
			t.Errorf("%s: error %q does not name the image", what, stderr)
		}
		if c.qemu != nil {
			args := []string{"bitmap"}
			for _, a := range c.qemu {
				if a == "IMG" {
					a = ref
				}
				args = append(args, a)
			}
			if _, _, err := testutil.RunErr(t, "qemu-img", args...); err == nil {
				t.Errorf("%s: qemu-img %.60q succeeded: cbtfs does not follow qemu", what, args)
			}
		}
		if got := testutil.QemuBitmaps(t, img, false); fmt.Sprint(got) != fmt.Sprint(before) {
			t.Fatalf("%s: bitmaps now %v, were %v", what, got, before)
		}
	}
	ccRequireSameMaps(t, "after the failures", testutil.BitmapMaps(t, img, false, "a", "b"), beforeMaps)
	ccCheck(t, img, false)

	// A missing image.
	missing := filepath.Join(dir, "missing.qcow2")
	_, stderr, err := testutil.RunCbtfs(t, cbtfs, "bitmap", missing, "add", "x")
	ocRequireOneLineError(t, "cbtfs bitmap MISSING add x", err, stderr, "missing.qcow2")
	if _, err := os.Stat(missing); err == nil {
		t.Error("cbtfs bitmap created a missing image")
	}

	// What an in-use bitmap allows: remove, as qemu-img.
	ocRun(t, "bitmap", img, "remove", "stale")
	testutil.Img(t, "bitmap", "--remove", ref, "stale")
	ocCompare(t, "remove of the in-use bitmap", img, ref)

	// The longest name qemu allows (qemu-nbd cannot export it: compare
	// qemu-img info only).
	longest := strings.Repeat("L", 1023)
	ocRun(t, "bitmap", img, "add", longest)
	testutil.Img(t, "bitmap", "--add", ref, longest)
	ccRequireSameBitmaps(t, "add of a 1023-byte name", testutil.QemuBitmapsInOrder(t, img, false), testutil.QemuBitmapsInOrder(t, ref, false))
	ocRun(t, "bitmap", img, "remove", longest)
	testutil.Img(t, "bitmap", "--remove", ref, longest)
	ocCompare(t, "remove of a 1023-byte name", img, ref)
}

// ocCreateCase is a cbtfs create compared with a qemu-img create.
type ocCreateCase struct {
	name  string
	cbtfs []string // arguments of cbtfs create before IMAGE [SIZE]
	qemu  []string // arguments of qemu-img create -f qcow2 before IMAGE [SIZE]
	size  string   // "" to take the backing file's
	qsize string   // qemu-img's spelling of size, when it differs
}

func ocCreateCases() []ocCreateCase {
	var cs []ocCreateCase
	for _, size := range []string{"0", "1", "513", "1000000", "64K", "1.5M", "1G", "2T", "3t"} {
		cs = append(cs, ocCreateCase{name: "size " + size, size: size})
	}
	// design.md: KiB, MiB, GiB, TiB too; qemu-img knows only K, M, G, T.
	for _, s := range []string{"64KiB", "1GiB", "1TiB"} {
		cs = append(cs, ocCreateCase{name: "size " + s, size: s, qsize: strings.TrimSuffix(s, "iB")})
	}
	for _, c := range []struct{ cbtfs, qemu, size string }{
		{"512", "512", "1G"}, {"1K", "1024", "1G"}, {"4K", "4096", "1G"}, {"8192", "8192", "1G"},
		{"64K", "65536", "1G"}, {"256K", "262144", "1G"}, {"1M", "1048576", "1G"}, {"2M", "2097152", "1G"},
		{"512", "512", "12583935"}, {"64K", "65536", "12583935"}, {"2M", "2097152", "12583935"},
	} {
		cs = append(cs, ocCreateCase{
			name:  "cluster " + c.cbtfs + " size " + c.size,
			cbtfs: []string{"--cluster-size", c.cbtfs},
			qemu:  []string{"-o", "cluster_size=" + c.qemu},
			size:  c.size,
		})
	}
	// Backing files: "ABS/" stands for the directory's absolute path;
	// probed cases give qemu-img the format, which qemu-img 7.2 requires.
	for _, b := range []struct {
		file, format string
		probe        bool
		size         string
	}{
		{"base.qcow2", "qcow2", false, ""},
		{"ABS/base.qcow2", "qcow2", false, ""},
		{"base.qcow2", "qcow2", true, ""},
		{"ABS/base.qcow2", "qcow2", true, "20M"},
		{"base.raw", "raw", false, "20M"},
		{"ABS/base.raw", "raw", true, ""},
		{"odd.raw", "raw", true, ""}, // 1000001 bytes
		{"ABS/odd.raw", "raw", false, "20M"},
		{"base.qcow2", "raw", false, ""}, // a qcow2 file read as raw, when asked for
	} {
		c := ocCreateCase{
			name:  fmt.Sprintf("backing %s -F %s probed %v size %q", b.file, b.format, b.probe, b.size),
			cbtfs: []string{"--backing", b.file},
			qemu:  []string{"-b", b.file, "-F", b.format},
			size:  b.size,
		}
		if !b.probe {
			c.cbtfs = append(c.cbtfs, "--backing-format", b.format)
		}
		cs = append(cs, c)
	}
	return cs
}

// ocInfo returns qemu-img info of img without the fields that name the
// file or depend on its layout on the host.
func ocInfo(t *testing.T, img string) map[string]any {
	t.Helper()
	info := testutil.Info(t, img)
	delete(info, "filename")
	delete(info, "actual-size")
	return info
}

// ocBackingFiles makes the backing files of the create cases in dir.
func ocBackingFiles(t *testing.T, dir string) {
	t.Helper()
	testutil.Create(t, filepath.Join(dir, "base.qcow2"), "10M")
	for name, size := range map[string]int64{"base.raw": 3 << 20, "odd.raw": 1000001} {
		if err := os.WriteFile(filepath.Join(dir, name), bytes.Repeat([]byte{7}, int(size)), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

// TestCreate compares cbtfs create with qemu-img create of the same
// parameters: qemu-img check clean, qemu-img info equal.
func TestCreate(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	ocBackingFiles(t, dir)
	for i, c := range ocCreateCases() {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			img, ref := filepath.Join(dir, fmt.Sprintf("c%d.qcow2", i)), filepath.Join(dir, fmt.Sprintf("q%d.qcow2", i))
			fix := func(args []string) []string {
				var out []string
				for _, a := range args {
					out = append(out, strings.Replace(a, "ABS", dir, 1))
				}
				return out
			}
			cargs := append(append([]string{"create"}, fix(c.cbtfs)...), img)
			qargs := append(append([]string{"create", "-q", "-f", "qcow2"}, fix(c.qemu)...), ref)
			if c.size != "" {
				cargs = append(cargs, c.size)
				qargs = append(qargs, cmp.Or(c.qsize, c.size))
			}
			if out, stderr, err := testutil.RunCbtfs(t, cbtfs, cargs...); err != nil || out != "" || stderr != "" {
				t.Fatalf("cbtfs %q: %v; stdout %q", cargs, err, out)
			}
			testutil.Img(t, qargs...)
			ccCheck(t, img, false)
			got, want := ocInfo(t, img), ocInfo(t, ref)
			if d := testutil.JSONDiff(got, want, true); len(d) != 0 {
				t.Fatalf("qemu-img info of cbtfs create %q vs qemu-img create %q:\n%s", cargs[1:], qargs[4:], strings.Join(d, "\n"))
			}
			if d := testutil.JSONDiff(want, got, true); len(d) != 0 {
				t.Fatalf("qemu-img info of qemu-img create %q vs cbtfs create %q:\n%s", qargs[4:], cargs[1:], strings.Join(d, "\n"))
			}
			if got["virtual-size"] == json.Number("0") {
				// No bitmap fits an empty disk: qemu-img bitmap fails to
				// store one, cbtfs refuses it.
				_, stderr, err := testutil.RunCbtfs(t, cbtfs, "bitmap", img, "add", "b0")
				ocRequireOneLineError(t, "cbtfs bitmap add on an empty disk", err, stderr, "empty disk")
				ccCheck(t, img, false)
				return
			}
			// The image takes bitmaps and writes, in qemu and in cbtfs.
			testutil.Img(t, "bitmap", "--add", img, "b0")
			ocRun(t, "bitmap", img, "add", "b1", "--granularity", "4K")
			testutil.IO(t, img, "write -P 5 0 512")
			ccCheck(t, img, false)
			if got := fmt.Sprint(testutil.QemuBitmaps(t, img, false)); !strings.HasPrefix(got, "[b0(g=") || !strings.Contains(got, "b1(g=4096 auto)") {
				t.Fatalf("bitmaps of the new image: %s", got)
			}
		})
	}
}

// TestCreateRefused: cbtfs create refuses with one line on stderr and
// leaves nothing behind (an existing file untouched).
func TestCreateRefused(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	ocBackingFiles(t, dir)
	existing := filepath.Join(dir, "existing.qcow2")
	testutil.Create(t, existing, "1M")
	old, err := os.ReadFile(existing)
	if err != nil {
		t.Fatal(err)
	}
	for i, c := range []struct {
		args []string // "NEW" stands for a new image's path
		msg  string
	}{
		{[]string{existing, "1M"}, "exists"},
		{[]string{"--backing", "base.qcow2", existing}, "exists"},
		{[]string{"--backing", "missing.qcow2", "NEW", "1M"}, "missing.qcow2"},
		{[]string{"--backing", "missing.qcow2", "NEW"}, "missing.qcow2"},
		{[]string{"--backing", filepath.Join(dir, "missing.raw"), "--backing-format", "raw", "NEW"}, "missing.raw"},
		{[]string{"--backing", "base.raw", "--backing-format", "qcow2", "NEW"}, "base.raw"},
		{[]string{"--backing", "base.qcow2", "--backing-format", "vmdk", "NEW"}, "backing-format"},
		{[]string{"--backing-format", "raw", "NEW", "1M"}, "backing"},
		{[]string{"NEW"}, "size"},
		{[]string{"NEW", "abc"}, "size"},
		{[]string{"NEW", "-1"}, "-1"},
		{[]string{"NEW", "1X"}, "size"},
		{[]string{"NEW", ""}, "size"},
		{[]string{"NEW", "99999999999999999999"}, "size"},
		{[]string{"NEW", "64E"}, "size"},
		{[]string{"--cluster-size", "256", "NEW", "1M"}, "cluster size"},
		{[]string{"--cluster-size", "3K", "NEW", "1M"}, "cluster size"},
		{[]string{"--cluster-size", "4M", "NEW", "1M"}, "cluster size"},
		{[]string{"--cluster-size", "0", "NEW", "1M"}, "cluster size"},
		{[]string{"--cluster-size", "1.5K", "NEW", "1M"}, "cluster size"},
		{[]string{"--cluster-size", "abc", "NEW", "1M"}, "cluster-size"},
		{[]string{"--cluster-size", "", "NEW", "1M"}, "cluster-size"},
		{[]string{"--cluster-size", "512", "NEW", "2T"}, "NEW"}, // the L1 table would pass qemu's limit
		{[]string{"NEW", "1M", "extra"}, "unexpected"},
	} {
		newImg := filepath.Join(dir, fmt.Sprintf("new%d.qcow2", i))
		var args []string
		for _, a := range c.args {
			args = append(args, strings.Replace(a, "NEW", newImg, 1))
		}
		msg := strings.Replace(c.msg, "NEW", filepath.Base(newImg), 1)
		cmd := testutil.CbtfsCmd(t, cbtfs, append([]string{"create"}, args...)...)
		cmd.Dir = dir
		_, stderr, err := testutil.RunCmd(t, cmd)
		ocRequireOneLineError(t, fmt.Sprintf("cbtfs create %q", c.args), err, stderr, msg)
		if _, err := os.Stat(newImg); err == nil {
			t.Errorf("cbtfs create %q failed but left %s behind", c.args, filepath.Base(newImg))
		}
	}
	if now, err := os.ReadFile(existing); err != nil || !bytes.Equal(now, old) {
		t.Errorf("cbtfs create changed an existing file (%v)", err)
	}
	// qemu-img refuses the same backing mistakes.
	for _, a := range [][]string{
		{"-b", "missing.qcow2", "-F", "qcow2", filepath.Join(dir, "q1.qcow2")},
		{"-b", "base.raw", "-F", "qcow2", filepath.Join(dir, "q2.qcow2")},
		{"-o", "cluster_size=3072", filepath.Join(dir, "q3.qcow2"), "1M"},
		{"-o", "cluster_size=512", filepath.Join(dir, "q4.qcow2"), "2T"},
	} {
		if _, _, err := testutil.RunErr(t, "qemu-img", append([]string{"create", "-q", "-f", "qcow2"}, a...)...); err == nil {
			t.Errorf("qemu-img create %q succeeded", a)
		}
	}
}

// ocRun runs cbtfs with args and fails the test if it fails.
func ocRun(t *testing.T, args ...string) {
	t.Helper()
	if _, _, err := testutil.RunCbtfs(t, cbtfs, args...); err != nil {
		t.Fatal(err)
	}
}
