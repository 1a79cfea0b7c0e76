package integration

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/cbtfs/cbtfs/internal/testutil"
	"github.com/cbtfs/cbtfs/internal/units"
)

// This file holds the acceptance tests of issue 5 for MNT/control and
// mkdir/rmdir of MNT/bitmaps: every command is run through the mount and
// the same sequence through qemu-img bitmap (and qemu-io for the writes)
// on a copy; after each "check" both images must show the same bitmaps to
// qemu-img info and the same extents to nbdinfo through qemu-nbd -B. The
// failure paths must fail the write with the right errno, say why in
// MNT/control and leave the image untouched. Identifiers start with "cc"
// (control commands).

// ccSize is the virtual size of the sequence images: 12 MiB and three
// sectors, a multiple of no granularity above 512, so that the bitmaps'
// tails are exercised.
const ccSize = 12<<20 + 1536

// ccSequence is run step by step on a cbtfs image and on a qemu copy.
// A step is a control command, "write OFF LEN PATTERN" (through MNT/disk
// for cbtfs, qemu-io for the copy) or "check" (compare the two).
var ccSequence = []string{
	"write 0 64K 0x11", // before any bitmap: marks nothing
	"bitmap add g512 granularity=512",
	"bitmap add g4k granularity=4K",
	"bitmap add def",
	"write 123457 1000 0x41",
	"bitmap add g2m granularity=2M disabled",
	"bitmap add g1g granularity=1G",
	"write 5M 70000 0x42",
	"check",
	"bitmap enable g2m",
	"bitmap disable g512",
	"write 3000000 5000 0x43",
	"write 12583000 1448 0x44", // the last bytes of the disk
	"check",
	"bitmap clear g4k",
	"write 9000000 4097 0x45",
	"bitmap clear g1g",
	"bitmap merge g4k def", // 4K into 64K
	"bitmap merge def g4k", // 64K into 4K
	"bitmap merge g512 g2m",
	"bitmap merge g2m g512", // 2M into a disabled 512
	"bitmap disable def",
	"check",
	"checkpoint cp1",
	"write 100 10 0x46",
	"bitmap remove g1g",
	"bitmap enable def",
	"write 11M 1 0x47",
	"check",
	"bitmap remove g512",
	"bitmap remove g4k",
	"bitmap remove def",
	"bitmap remove g2m",
	"bitmap remove cp1", // the last one: the extension goes
	"write 4M 64K 0x48",
	"check",
	"bitmap add again granularity=64K",
	"write 7000000 1 0x49",
	"check",
}

// ccClusterSizes are the cluster sizes the sequences run with.
var ccClusterSizes = []uint64{512, 64 << 10, 2 << 20}

// ccNewImage creates a qcow2 image of ccSize bytes with qemu-img.
func ccNewImage(t *testing.T, path string, clusterSize uint64, size uint64) {
	t.Helper()
	testutil.Create(t, path, strconv.FormatUint(size, 10), "-o", "cluster_size="+strconv.FormatUint(clusterSize, 10))
}

// ccSize parses a size of a step.
func ccParse(t *testing.T, s string) int64 {
	t.Helper()
	v, err := units.ParseSize(s)
	if err != nil {
		t.Fatalf("bad size %q in a step: %v", s, err)
	}
	return int64(v)
}

// ccWriteArgs parses "write OFF LEN PATTERN".
func ccWriteArgs(t *testing.T, step string) (off, n int64, pat byte) {
	t.Helper()
	f := strings.Fields(step)
	if len(f) != 4 {
		t.Fatalf("bad step %q", step)
	}
	p, err := strconv.ParseUint(f[3], 0, 8)
	if err != nil {
		t.Fatalf("bad pattern in %q: %v", step, err)
	}
	return ccParse(t, f[1]), ccParse(t, f[2]), byte(p)
}

// ccQemuIOWrite is a write step as a qemu-io command.
func ccQemuIOWrite(t *testing.T, step string) string {
	t.Helper()
	off, n, pat := ccWriteArgs(t, step)
	return fmt.Sprintf("write -P %#x %d %d", pat, off, n)
}

// ccQemuBitmapArgs translates a control command into the arguments of
// qemu-img bitmap on img.
func ccQemuBitmapArgs(t *testing.T, img, cmd string) []string {
	t.Helper()
	f := strings.Fields(cmd)
	switch {
	case len(f) == 2 && f[0] == "checkpoint":
		return []string{"bitmap", "--add", img, f[1]}
	case len(f) >= 3 && f[0] == "bitmap" && f[1] == "add":
		args := []string{"bitmap", "--add"}
		for _, o := range f[3:] {
			if g, ok := strings.CutPrefix(o, "granularity="); ok {
				args = append(args, "-g", g)
			} else if o == "disabled" {
				args = append(args, "--disable")
			} else {
				t.Fatalf("ccQemuBitmapArgs: %q", cmd)
			}
		}
		return append(args, img, f[2])
	case len(f) == 3 && f[0] == "bitmap":
		return []string{"bitmap", "--" + f[1], img, f[2]}
	case len(f) == 4 && f[0] == "bitmap" && f[1] == "merge":
		return []string{"bitmap", "--merge", f[2], img, f[3]}
	}
	t.Fatalf("ccQemuBitmapArgs: %q", cmd)
	return nil
}

// ccQemuStep runs a step on the reference image with qemu-img and qemu-io.
func ccQemuStep(t *testing.T, img, step string) {
	t.Helper()
	switch f := strings.Fields(step); f[0] {
	case "write":
		testutil.IO(t, img, ccQemuIOWrite(t, step))
	case "check", "flush":
	default:
		testutil.Img(t, ccQemuBitmapArgs(t, img, step)...)
	}
}

// ccNames returns the names of bms.
func ccNames(bms []testutil.QemuBitmap) []string {
	var n []string
	for _, b := range bms {
		n = append(n, b.Name)
	}
	slices.Sort(n)
	return n
}

// ccTry writes data to MNT/control in one write(2), as echo does, and
// returns the errno of the write (0 when it succeeded) and what
// MNT/control says afterwards.
func ccTry(t *testing.T, mnt, data string) (syscall.Errno, string) {
	t.Helper()
	ctl := filepath.Join(mnt, "control")
	f, err := os.OpenFile(ctl, os.O_WRONLY|os.O_TRUNC, 0)
	if err != nil {
		t.Fatal(err)
	}
	_, werr := f.Write([]byte(data))
	cerr := f.Close()
	var errno syscall.Errno
	if werr != nil && !errors.As(werr, &errno) {
		t.Fatalf("write %q to %s: %v", data, ctl, werr)
	}
	if werr == nil && cerr != nil {
		t.Fatalf("close %s: %v", ctl, cerr)
	}
	st, err := os.ReadFile(ctl)
	if err != nil {
		t.Fatal(err)
	}
	return errno, string(st)
}

// ccCtl runs control commands in one write and fails the test if the
// write fails.
func ccCtl(t *testing.T, mnt string, cmds ...string) {
	t.Helper()
	data := strings.Join(cmds, "\n") + "\n"
	if errno, st := ccTry(t, mnt, data); errno != 0 {
		t.Fatalf("control %q: %v\n%s", cmds, errno, st)
	}
}

// ccListing returns the names in MNT/bitmaps, sorted.
func ccListing(t *testing.T, mnt string) []string {
	t.Helper()
	ents, err := os.ReadDir(filepath.Join(mnt, "bitmaps"))
	if err != nil {
		t.Fatal(err)
	}
	var n []string
	for _, e := range ents {
		n = append(n, e.Name())
	}
	slices.Sort(n)
	return n
}

// ccRequireListing requires MNT/bitmaps to list exactly want, right now.
func ccRequireListing(t *testing.T, mnt string, want []string, after string) {
	t.Helper()
	if got := ccListing(t, mnt); !slices.Equal(got, want) {
		t.Fatalf("after %q: MNT/bitmaps lists %q, want %q", after, got, want)
	}
}

// ccPwrite writes n bytes of pat at off of the file at path.
func ccPwrite(t *testing.T, path string, off, n int64, pat byte) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(bytes.Repeat([]byte{pat}, int(n)), off); err != nil {
		t.Fatalf("write %d bytes at %d of %s: %v", n, off, path, err)
	}
}

// ccCheck runs qemu-img check [-U] and requires exit status 0: no
// errors, no leaks.
func ccCheck(t *testing.T, img string, shared bool) {
	t.Helper()
	args := []string{"check", "--output=json"}
	if shared {
		args = append(args, "-U")
	}
	if out, _, err := testutil.RunErr(t, "qemu-img", append(args, img)...); err != nil {
		t.Fatalf("qemu-img check %s: %v\n%s", filepath.Base(img), err, out)
	}
}

// ccRequireHeader requires the bitmaps extension and autoclear bit 0 to
// be both present (the image has bitmaps) or both absent.
func ccRequireHeader(t *testing.T, img string, hasBitmaps bool) {
	t.Helper()
	h := testutil.ReadQcow2Header(t, img)
	if h.BitmapsExtension() != hasBitmaps || h.BitmapsAutoclear() != hasBitmaps {
		t.Fatalf("%s: bitmaps extension %v, autoclear bit 0 %v; want both %v (extensions %#x)",
			filepath.Base(img), h.BitmapsExtension(), h.BitmapsAutoclear(), hasBitmaps, h.Extensions)
	}
}

// ccRequireSameBitmaps compares two lists of bitmaps as sets.
func ccRequireSameBitmaps(t *testing.T, what string, got, want []testutil.QemuBitmap) {
	t.Helper()
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("%s: bitmaps\n got  %v\n want %v", what, got, want)
	}
}

// ccRequireSameMaps compares nbdinfo maps per bitmap.
func ccRequireSameMaps(t *testing.T, what string, got, want map[string]string) {
	t.Helper()
	for name, w := range want {
		if got[name] != w {
			t.Fatalf("%s: qemu:dirty-bitmap:%s\n got:\n%s want:\n%s", what, name, got[name], w)
		}
	}
	if len(got) != len(want) {
		t.Fatalf("%s: maps of %d bitmaps, want %d", what, len(got), len(want))
	}
}

// ccMountedSide runs the steps through a read-write mount of img.
type ccMountedSide struct {
	t   *testing.T
	img string // the image mounted
	ref string // the qemu copy, one step ahead
	m   *testutil.Mounted
}

func (s *ccMountedSide) step(at, step string) {
	t := s.t
	t.Helper()
	switch f := strings.Fields(step); f[0] {
	case "write":
		off, n, pat := ccWriteArgs(t, step)
		ccPwrite(t, s.m.Disk, off, n, pat)
	case "check":
		s.check(at)
	default:
		ccCtl(t, s.m.Dir, step)
		// The listing follows the command at once.
		ccRequireListing(t, s.m.Dir, ccNames(testutil.QemuBitmaps(t, s.ref, false)), step)
	}
}

// check flushes the mount, then requires qemu to see on disk exactly the
// bitmaps the mount shows and the qemu copy holds.
func (s *ccMountedSide) check(at string) {
	t := s.t
	t.Helper()
	ccCtl(t, s.m.Dir, "flush")
	// In order: qemu-img bitmap keeps the directory's order and appends
	// a new bitmap, and so does cbtfs.
	want := testutil.QemuBitmapsInOrder(t, s.ref, false)
	got := testutil.QemuBitmapsInOrder(t, s.img, true)
	ccRequireSameBitmaps(t, at+": qemu-img info -U of the mounted image vs the qemu copy", got, want)
	for _, b := range got {
		if b.InUse() {
			t.Fatalf("%s: bitmap %v in use after flush", at, b)
		}
	}
	view, err := os.ReadFile(filepath.Join(s.m.Dir, "info.json"))
	if err != nil {
		t.Fatal(err)
	}
	ccRequireSameBitmaps(t, at+": MNT/info.json vs qemu-img info -U", testutil.BitmapsOfInfo(t, "MNT/info.json", view), got)
	names := ccNames(want)
	wantMaps := testutil.BitmapMaps(t, s.ref, false, names...)
	ccRequireSameMaps(t, at+": qemu-nbd of the mounted image vs the qemu copy", testutil.BitmapMaps(t, s.img, true, names...), wantMaps)
	for _, name := range names {
		ext, err := os.ReadFile(filepath.Join(s.m.Dir, "bitmaps", name, "extents"))
		if err != nil {
			t.Fatal(err)
		}
		if string(ext) != wantMaps[name] {
			t.Fatalf("%s: MNT/bitmaps/%s/extents:\n%s want (qemu copy):\n%s", at, name, ext, wantMaps[name])
		}
	}
	ccCheck(t, s.img, true)
	ccRequireHeader(t, s.img, len(want) > 0)
}

// TestControlSequence runs ccSequence through MNT/control and MNT/disk
// and through qemu-img bitmap and qemu-io on a copy, for several cluster
// sizes, and compares after every "check".
func TestControlSequence(t *testing.T) {
	t.Parallel()
	testutil.RequireTool(t, "qemu-nbd")
	testutil.RequireTool(t, "nbdinfo")
	for _, cs := range ccClusterSizes {
		t.Run(fmt.Sprintf("cluster%d", cs), func(t *testing.T) {
			t.Parallel()
			testutil.RequireFUSE(t)
			dir := t.TempDir()
			img, ref := filepath.Join(dir, "cbtfs.qcow2"), filepath.Join(dir, "qemu.qcow2")
			ccNewImage(t, img, cs, ccSize)
			testutil.CopyFile(t, img, ref)
			mnt := filepath.Join(dir, "mnt")
			if err := os.Mkdir(mnt, 0o755); err != nil {
				t.Fatal(err)
			}
			s := &ccMountedSide{t: t, img: img, ref: ref, m: testutil.MountRW(t, cbtfs, img, mnt, testutil.MountOptions{})}
			for i, step := range ccSequence {
				ccQemuStep(t, ref, step)
				s.step(fmt.Sprintf("step %d", i), step)
			}
			s.m.Unmount(t)
			ccCheck(t, img, false)
			want := testutil.QemuBitmaps(t, ref, false)
			ccRequireSameBitmaps(t, "after unmount", testutil.QemuBitmaps(t, img, false), want)
			names := ccNames(want)
			ccRequireSameMaps(t, "after unmount", testutil.BitmapMaps(t, img, false, names...), testutil.BitmapMaps(t, ref, false, names...))
			if !testutil.Compare(t, img, ref) {
				t.Fatal("the disks differ")
			}
		})
	}
}

// TestControlMultiLine runs several commands in one write: they run in
// order, and the first failure stops the rest.
func TestControlMultiLine(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	img := filepath.Join(dir, "d.qcow2")
	ccNewImage(t, img, 64<<10, ccSize)
	mnt := filepath.Join(dir, "mnt")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	m := testutil.MountRW(t, cbtfs, img, mnt, testutil.MountOptions{})

	// All succeed, in order: the merge needs the adds before it.
	ccCtl(t, mnt, "bitmap add m1", "bitmap add m2 granularity=4K disabled", "bitmap merge m1 m2", "checkpoint m3", "flush")
	ccRequireListing(t, mnt, []string{"m1", "m2", "m3"}, "three adds")
	got := testutil.QemuBitmaps(t, img, true)
	want := []testutil.QemuBitmap{{Name: "m1", Granularity: 64 << 10, Flags: []string{"auto"}}, {Name: "m2", Granularity: 4 << 10, Flags: []string{}}, {Name: "m3", Granularity: 64 << 10, Flags: []string{"auto"}}}
	ccRequireSameBitmaps(t, "after the multi-line add", got, want)

	// The second line fails: the first ran, the third did not.
	errno, st := ccTry(t, mnt, "bitmap add m4\nbitmap add m1\nbitmap add m5\n")
	if errno != syscall.EEXIST {
		t.Fatalf("write of three commands, the second a duplicate: errno %v, want EEXIST\n%s", errno, st)
	}
	for _, s := range []string{"ok: bitmap add m4", "failed: bitmap add m1"} {
		if !strings.Contains(st, s) {
			t.Errorf("MNT/control does not say %q:\n%s", s, st)
		}
	}
	if strings.Contains(st, "m5") {
		t.Errorf("MNT/control mentions the command after the failure:\n%s", st)
	}
	ccRequireListing(t, mnt, []string{"m1", "m2", "m3", "m4"}, "the failed multi-line write")

	// A bad line after a good one, with blank lines around.
	errno, st = ccTry(t, mnt, "\nbitmap remove m4\n\nbitmap frobnicate m1\nbitmap remove m3\n")
	if errno != syscall.EINVAL {
		t.Fatalf("bad second command: errno %v, want EINVAL\n%s", errno, st)
	}
	ccRequireListing(t, mnt, []string{"m1", "m2", "m3"}, "remove then a bad command")
	ccCtl(t, mnt, "flush")
	ccRequireSameBitmaps(t, "after the failed writes", testutil.QemuBitmaps(t, img, true), want)
	m.Unmount(t)
	ccCheck(t, img, false)
	ccRequireSameBitmaps(t, "after unmount", testutil.QemuBitmaps(t, img, false), want)
}

// TestControlMkdir adds bitmaps with mkdir and removes them with rmdir:
// the default granularity is the cluster size clamped to 4K..64K, as
// qemu-img bitmap --add gives.
func TestControlMkdir(t *testing.T) {
	t.Parallel()
	for _, cs := range []uint64{512, 4 << 10, 64 << 10, 2 << 20} {
		t.Run(fmt.Sprintf("cluster%d", cs), func(t *testing.T) {
			t.Parallel()
			testutil.RequireFUSE(t)
			dir := t.TempDir()
			img, ref := filepath.Join(dir, "d.qcow2"), filepath.Join(dir, "ref.qcow2")
			ccNewImage(t, img, cs, 8<<20)
			testutil.CopyFile(t, img, ref)
			testutil.Img(t, "bitmap", "--add", ref, "made")
			wantGran := min(max(cs, 4<<10), 64<<10)
			if g := testutil.QemuBitmaps(t, ref, false)[0].Granularity; g != wantGran {
				t.Fatalf("qemu-img bitmap --add on %d-byte clusters: granularity %d, want %d", cs, g, wantGran)
			}
			mnt := filepath.Join(dir, "mnt")
			if err := os.Mkdir(mnt, 0o755); err != nil {
				t.Fatal(err)
			}
			m := testutil.MountRW(t, cbtfs, img, mnt, testutil.MountOptions{})
			bm := filepath.Join(mnt, "bitmaps")
			if err := os.Mkdir(filepath.Join(bm, "made"), 0o755); err != nil {
				t.Fatal(err)
			}
			ccRequireListing(t, mnt, []string{"made"}, "mkdir")
			info, err := os.ReadFile(filepath.Join(bm, "made", "info"))
			if err != nil {
				t.Fatal(err)
			}
			if !strings.Contains(string(info), fmt.Sprintf("granularity: %d\n", wantGran)) {
				t.Errorf("MNT/bitmaps/made/info after mkdir, want granularity %d:\n%s", wantGran, info)
			}
			// The listing shows every file of a consistent bitmap at once.
			ents, err := os.ReadDir(filepath.Join(bm, "made"))
			if err != nil {
				t.Fatal(err)
			}
			if len(ents) < 5 {
				t.Errorf("MNT/bitmaps/made holds %d entries right after mkdir", len(ents))
			}
			if err := os.Mkdir(filepath.Join(bm, "made"), 0o755); !errors.Is(err, syscall.EEXIST) {
				t.Errorf("mkdir of an existing bitmap: %v, want EEXIST", err)
			}
			ccCtl(t, mnt, "flush")
			ccRequireSameBitmaps(t, "after mkdir and flush", testutil.QemuBitmaps(t, img, true), testutil.QemuBitmaps(t, ref, false))

			// rmdir, and the same through mkdir/rmdir of a second name.
			if err := os.Mkdir(filepath.Join(bm, "second"), 0o755); err != nil {
				t.Fatal(err)
			}
			ccRequireListing(t, mnt, []string{"made", "second"}, "mkdir second")
			if err := os.Remove(filepath.Join(bm, "second")); err != nil {
				t.Fatal(err)
			}
			ccRequireListing(t, mnt, []string{"made"}, "rmdir second")
			if err := os.Remove(filepath.Join(bm, "second")); !errors.Is(err, syscall.ENOENT) {
				t.Errorf("rmdir of a removed bitmap: %v, want ENOENT", err)
			}
			if err := os.Remove(filepath.Join(bm, "made")); err != nil {
				t.Fatal(err)
			}
			ccRequireListing(t, mnt, nil, "rmdir made")
			ccCtl(t, mnt, "flush")
			if bms := testutil.QemuBitmaps(t, img, true); len(bms) != 0 {
				t.Fatalf("after rmdir and flush qemu-img info -U shows %v", bms)
			}
			ccRequireHeader(t, img, false)
			m.Unmount(t)
			ccCheck(t, img, false)
			ccRequireHeader(t, img, false)
		})
	}
}

// TestControlChainLayers works on a bitmap name held by two layers, and on
// names only the base holds.
func TestControlChainLayers(t *testing.T) {
	t.Parallel()
	testutil.RequireTool(t, "qemu-nbd")
	testutil.RequireTool(t, "nbdinfo")
	dir := t.TempDir()
	base, top := filepath.Join(dir, "base.qcow2"), filepath.Join(dir, "top.qcow2")
	ccNewImage(t, base, 64<<10, 4<<20)
	testutil.Img(t, "bitmap", "--add", base, "x")
	testutil.Img(t, "bitmap", "--add", "-g", "4K", base, "y")
	testutil.Img(t, "bitmap", "--add", base, "w")
	testutil.IO(t, base, "write -P 1 0 64k", "write -P 2 1M 4k")
	testutil.Create(t, top, "", "-b", base, "-F", "qcow2")
	testutil.Img(t, "bitmap", "--add", "-g", "4K", top, "x")
	testutil.Img(t, "bitmap", "--add", top, "w")
	testutil.Img(t, "bitmap", "--add", "-g", "4K", top, "z")
	testutil.IO(t, top, "write -P 3 2M 4k")
	baseY := testutil.BitmapMaps(t, base, false, "y")["y"]

	mnt := filepath.Join(dir, "mnt")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	m := testutil.MountRW(t, cbtfs, top, mnt, testutil.MountOptions{})
	ccRequireListing(t, mnt, []string{"w", "x", "y", "z"}, "mount")

	// DST must be in the top: y is only in the base.
	errno, st := ccTry(t, mnt, "bitmap merge z y\n")
	if errno != syscall.ENOENT || !strings.Contains(st, "backing") {
		t.Fatalf("merge into a bitmap only the base holds: errno %v, want ENOENT and a word about the backing layer:\n%s", errno, st)
	}
	// SRC may be anywhere in the chain.
	ccCtl(t, mnt, "bitmap merge y z")

	// clear acts on both layers that hold x; the base is stored at once.
	ccCtl(t, mnt, "bitmap clear x")
	bx := testutil.QemuBitmaps(t, base, true)
	if fmt.Sprint(ccNames(bx)) != "[w x y]" {
		t.Fatalf("base after clear x: %v", bx)
	}
	for _, b := range bx {
		if b.InUse() {
			t.Fatalf("base bitmap %v in use after clear x", b)
		}
	}
	if got := testutil.BitmapMaps(t, base, true, "x")["x"]; strings.Contains(got, "dirty") {
		t.Fatalf("base's x after clear x:\n%s", got)
	}
	ext, err := os.ReadFile(filepath.Join(mnt, "bitmaps", "x", "extents"))
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(ext), "dirty") {
		t.Fatalf("MNT/bitmaps/x/extents after clear x:\n%s", ext)
	}

	// remove acts on both layers that hold w.
	ccCtl(t, mnt, "bitmap remove w")
	ccRequireListing(t, mnt, []string{"x", "y", "z"}, "bitmap remove w")
	if got := ccNames(testutil.QemuBitmaps(t, base, true)); fmt.Sprint(got) != "[x y]" {
		t.Fatalf("base after remove w: %v", got)
	}
	ccCtl(t, mnt, "flush")
	if got := ccNames(testutil.QemuBitmaps(t, top, true)); fmt.Sprint(got) != "[x z]" {
		t.Fatalf("top after remove w and flush: %v", got)
	}
	ccCheck(t, base, true)
	ccCheck(t, top, true)
	m.Unmount(t)

	ccCheck(t, base, false)
	ccCheck(t, top, false)
	// z in the top = its own write at 2M, and y of the base merged in.
	z := testutil.BitmapMaps(t, top, false, "z")["z"]
	for _, want := range []string{"         0       65536    1  dirty", "   1048576        4096    1  dirty", "   2097152        4096    1  dirty"} {
		if !strings.Contains(z, want) {
			t.Errorf("top's z lacks %q:\n%s", want, z)
		}
	}
	if got := testutil.BitmapMaps(t, base, false, "y")["y"]; got != baseY {
		t.Errorf("base's y changed:\n%s want\n%s", got, baseY)
	}
	for _, img := range []string{base, top} {
		if got := testutil.BitmapMaps(t, img, false, "x")["x"]; strings.Contains(got, "dirty") {
			t.Errorf("%s: x after clear x and unmount:\n%s", filepath.Base(img), got)
		}
	}
}

// ccImageState is what must not change when a command fails.
type ccImageState struct {
	bitmaps []testutil.QemuBitmap
	sum     [32]byte          // the image file's bytes
	listing []string          // MNT/bitmaps
	extents map[string]string // MNT/bitmaps/NAME/extents of consistent bitmaps
}

func ccState(t *testing.T, img, mnt string) ccImageState {
	t.Helper()
	s := ccImageState{bitmaps: testutil.QemuBitmaps(t, img, true), extents: map[string]string{}}
	f, err := os.Open(img)
	if err != nil {
		t.Fatal(err)
	}
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		t.Fatal(err)
	}
	f.Close()
	copy(s.sum[:], h.Sum(nil))
	if mnt != "" {
		s.listing = ccListing(t, mnt)
		for _, n := range s.listing {
			b, err := os.ReadFile(filepath.Join(mnt, "bitmaps", n, "extents"))
			if errors.Is(err, os.ErrNotExist) {
				continue // inconsistent: no extents
			}
			if err != nil {
				t.Fatal(err)
			}
			s.extents[n] = string(b)
		}
	}
	return s
}

func (s ccImageState) diff(o ccImageState) string {
	switch {
	case fmt.Sprint(s.bitmaps) != fmt.Sprint(o.bitmaps):
		return fmt.Sprintf("qemu-img info -U bitmaps %v, were %v", o.bitmaps, s.bitmaps)
	case !slices.Equal(s.listing, o.listing):
		return fmt.Sprintf("MNT/bitmaps lists %q, listed %q", o.listing, s.listing)
	case fmt.Sprint(s.extents) != fmt.Sprint(o.extents):
		return fmt.Sprintf("extents %v, were %v", o.extents, s.extents)
	case s.sum != o.sum:
		return "the image file's bytes changed"
	}
	return ""
}

// ccFailCase is a control command that must fail.
type ccFailCase struct {
	cmd   string
	errno syscall.Errno
	msg   string // in MNT/control after "error:"
}

// ccFailCases fail on the image of TestControlFailures: bitmaps a (64K,
// enabled), b (4K, disabled), both with content, and stale, found in use.
func ccFailCases() []ccFailCase {
	long := strings.Repeat("n", 1024)
	return []ccFailCase{
		{"frobnicate", syscall.EINVAL, "bad command"},
		{"bitmap", syscall.EINVAL, "bad command"},
		{"bitmap frob a", syscall.EINVAL, "bad command"},
		{"bitmap add", syscall.EINVAL, "bad command"},
		{"bitmap remove", syscall.EINVAL, "bad command"},
		{"bitmap clear", syscall.EINVAL, "bad command"},
		{"bitmap enable", syscall.EINVAL, "bad command"},
		{"bitmap disable", syscall.EINVAL, "bad command"},
		{"bitmap merge a", syscall.EINVAL, "bad command"},
		{"bitmap merge", syscall.EINVAL, "bad command"},
		{"bitmap remove a b", syscall.EINVAL, "bad command"},
		{"bitmap add x bogus", syscall.EINVAL, "bad command"},
		{"bitmap add x granularity", syscall.EINVAL, "bad command"},
		{"checkpoint", syscall.EINVAL, "bad command"},
		{"checkpoint x y", syscall.EINVAL, "bad command"},
		{"flush now", syscall.EINVAL, "bad command"},
		{"BITMAP add x", syscall.EINVAL, "bad command"},

		{"bitmap remove nope", syscall.ENOENT, "nope"},
		{"bitmap clear nope", syscall.ENOENT, "nope"},
		{"bitmap enable nope", syscall.ENOENT, "nope"},
		{"bitmap disable nope", syscall.ENOENT, "nope"},
		{"bitmap merge nope a", syscall.ENOENT, "nope"},
		{"bitmap merge a nope", syscall.ENOENT, "nope"},

		{"bitmap add a", syscall.EEXIST, "exists"},
		{"bitmap add b granularity=64K", syscall.EEXIST, "exists"},
		{"checkpoint a", syscall.EEXIST, "exists"},

		{"bitmap add x granularity=3K", syscall.EINVAL, "granularity"},
		{"bitmap add x granularity=1536", syscall.EINVAL, "granularity"},
		{"bitmap add x granularity=256", syscall.EINVAL, "granularity"},
		{"bitmap add x granularity=1", syscall.EINVAL, "granularity"},
		{"bitmap add x granularity=0", syscall.EINVAL, "granularity"},
		{"bitmap add x granularity=4G", syscall.EINVAL, "granularity"},
		{"bitmap add x granularity=", syscall.EINVAL, "size"},
		{"bitmap add x granularity=abc", syscall.EINVAL, "size"},
		{"bitmap add x granularity=-4K", syscall.EINVAL, "size"},
		{"bitmap add x granularity=4X", syscall.EINVAL, "size"},
		{"bitmap add x granularity=99999999999999999999", syscall.EINVAL, "size"},

		{"bitmap add " + long, syscall.EINVAL, "name"},
		{"checkpoint " + long, syscall.EINVAL, "name"},

		// The in-use bitmap can only be removed.
		{"bitmap add stale", syscall.EEXIST, "exists"},
		{"checkpoint stale", syscall.EEXIST, "exists"},
		{"bitmap clear stale", syscall.EINVAL, "inconsistent"},
		{"bitmap enable stale", syscall.EINVAL, "inconsistent"},
		{"bitmap disable stale", syscall.EINVAL, "inconsistent"},
		{"bitmap merge stale a", syscall.EINVAL, "inconsistent"},
		{"bitmap merge a stale", syscall.EINVAL, "inconsistent"},
	}
}

// ccFailImage makes the image of the failure tests: stale (in use, made
// by a qemu-io that aborted), then a (64K, enabled) and b (4K, disabled),
// each with content.
func ccFailImage(t *testing.T, img string) {
	t.Helper()
	ccNewImage(t, img, 64<<10, ccSize)
	testutil.Img(t, "bitmap", "--add", img, "stale")
	testutil.IO(t, img, "write -P 1 1M 4k")
	// qemu-io aborts with the bitmap in use; its exit status says so.
	if _, _, err := testutil.RunErr(t, "qemu-io", "-f", "qcow2", "-c", "write 0 64k", "-c", "abort", img); err == nil {
		t.Fatal("qemu-io -c abort exited 0")
	}
	testutil.Img(t, "bitmap", "--add", img, "a")
	testutil.Img(t, "bitmap", "--add", "-g", "4K", img, "b")
	testutil.IO(t, img, "write -P 2 2M 100k", "write -P 3 12000000 5")
	testutil.Img(t, "bitmap", "--disable", img, "b")
	testutil.IO(t, img, "write -P 4 3M 64k")
	got := testutil.QemuBitmaps(t, img, false)
	if fmt.Sprint(got) != "[a(g=65536 auto) b(g=4096 ) stale(g=65536 auto,in-use)]" {
		t.Fatalf("failure image: qemu-img info shows %v", got)
	}
}

// TestControlFailures runs every failing command through echo, as a user
// would: the write fails with the right errno, MNT/control says why, and
// nothing changes.
func TestControlFailures(t *testing.T) {
	t.Parallel()
	testutil.RequireTool(t, "bash")
	testutil.RequireTool(t, "qemu-nbd")
	testutil.RequireTool(t, "nbdinfo")
	dir := t.TempDir()
	img := filepath.Join(dir, "f.qcow2")
	ccFailImage(t, img)
	beforeMaps := testutil.BitmapMaps(t, img, false, "a", "b")
	mnt := filepath.Join(dir, "mnt")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	m := testutil.MountRW(t, cbtfs, img, mnt, testutil.MountOptions{})
	ccRequireListing(t, mnt, []string{"a", "b", "stale"}, "mount")
	if _, err := os.Stat(filepath.Join(mnt, "bitmaps", "stale", "extents")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("an in-use bitmap shows extents: %v", err)
	}
	ccCtl(t, mnt, "flush")

	for _, c := range ccFailCases() {
		name := c.cmd
		if len(name) > 40 {
			name = name[:40] + "..."
		}
		before := ccState(t, img, mnt)
		// echo, as the user types it; bash names the error.
		_, stderr, err := testutil.RunErr(t, "bash", "-c", `echo "$1" > "$2"`, "bash", c.cmd, filepath.Join(mnt, "control"))
		if err == nil {
			t.Errorf("%s: echo succeeded", name)
			continue
		}
		if !strings.Contains(strings.ToLower(stderr), c.errno.Error()) {
			t.Errorf("%s: echo says %q, want %q", name, stderr, c.errno.Error())
		}
		st, err := os.ReadFile(filepath.Join(mnt, "control"))
		if err != nil {
			t.Fatal(err)
		}
		status, _, _ := strings.Cut(string(st), "usage:")
		wantName := map[syscall.Errno]string{syscall.EINVAL: "EINVAL", syscall.ENOENT: "ENOENT", syscall.EEXIST: "EEXIST"}[c.errno]
		if !strings.Contains(status, "failed: "+c.cmd) || !strings.Contains(status, c.msg) || !strings.Contains(status, wantName) {
			t.Errorf("%s: MNT/control says\n%s\nwant \"failed: %s\", %q and %s", name, status, name, c.msg, wantName)
		}
		if !strings.Contains(string(st), "usage:") {
			t.Errorf("%s: MNT/control shows no usage:\n%s", name, st)
		}
		if d := before.diff(ccState(t, img, mnt)); d != "" {
			t.Errorf("%s: the image changed: %s", name, d)
		}
	}
	// The longest name qemu allows is fine, and shows in the listing.
	longest := strings.Repeat("L", 1023)
	ccCtl(t, mnt, "bitmap add "+longest)
	ccRequireListing(t, mnt, []string{longest, "a", "b", "stale"}, "bitmap add of a 1023-byte name")
	ccCtl(t, mnt, "bitmap remove "+longest)

	// A failure leaves the mount working: remove is what an in-use
	// bitmap allows.
	ccCtl(t, mnt, "bitmap remove stale")
	ccRequireListing(t, mnt, []string{"a", "b"}, "bitmap remove stale")
	ccCtl(t, mnt, "flush")
	ccCheck(t, img, true)
	m.Unmount(t)
	ccCheck(t, img, false)
	got := testutil.QemuBitmaps(t, img, false)
	if fmt.Sprint(got) != "[a(g=65536 auto) b(g=4096 )]" {
		t.Fatalf("after unmount: %v", got)
	}
	ccRequireSameMaps(t, "after the failures and unmount", testutil.BitmapMaps(t, img, false, "a", "b"), beforeMaps)
}

// TestControlReadOnly: a read-only mount refuses every command and
// mkdir/rmdir with EROFS and leaves the image, in-use flags included,
// as it was.
func TestControlReadOnly(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	img := filepath.Join(dir, "r.qcow2")
	ccFailImage(t, img)
	before := ccState(t, img, "")
	mnt := filepath.Join(dir, "mnt")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	m := testutil.Mount(t, cbtfs, img, mnt)
	cmds := []string{
		"bitmap add x", "bitmap add y granularity=4K disabled", "bitmap remove a", "bitmap remove stale",
		"bitmap clear a", "bitmap enable b", "bitmap disable a", "bitmap merge a b", "checkpoint c",
		"flush", "frobnicate", "bitmap add a", "bitmap remove nope",
	}
	testutil.RequireTool(t, "bash")
	for _, c := range cmds {
		// The kernel refuses to open MNT/control for writing on a
		// read-only mount: echo says so, and MNT/control says why.
		_, stderr, err := testutil.RunErr(t, "bash", "-c", `echo "$1" > "$2"`, "bash", c, filepath.Join(mnt, "control"))
		if err == nil || !strings.Contains(strings.ToLower(stderr), syscall.EROFS.Error()) {
			t.Errorf("%q on a read-only mount: %v, stderr %q; want %q", c, err, stderr, syscall.EROFS.Error())
		}
	}
	st, err := os.ReadFile(filepath.Join(mnt, "control"))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(st), "read-only") {
		t.Errorf("MNT/control of a read-only mount does not say that commands are refused:\n%s", st)
	}
	if err := os.Mkdir(filepath.Join(mnt, "bitmaps", "x"), 0o755); !errors.Is(err, syscall.EROFS) {
		t.Errorf("mkdir on a read-only mount: %v, want EROFS", err)
	}
	if err := os.Remove(filepath.Join(mnt, "bitmaps", "a")); !errors.Is(err, syscall.EROFS) {
		t.Errorf("rmdir on a read-only mount: %v, want EROFS", err)
	}
	ccRequireListing(t, mnt, []string{"a", "b", "stale"}, "the refused commands")
	if d := before.diff(ccState(t, img, "")); d != "" {
		t.Errorf("while mounted read-only: %s", d)
	}
	m.Unmount(t)
	if d := before.diff(ccState(t, img, "")); d != "" {
		t.Errorf("after a read-only mount: %s", d)
	}
	ccCheck(t, img, false)
}

// TestControlV2 refuses bitmaps on a qcow2 v2 image, as qemu does
// ("Cannot store dirty bitmaps in qcow2 v2 files"): through the control
// file, mkdir and the offline CLI, with the image left as it was.
func TestControlV2(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	img := filepath.Join(dir, "v2.qcow2")
	testutil.Create(t, img, "4M", "-o", "compat=0.10")
	if _, _, err := testutil.RunErr(t, "qemu-img", "bitmap", "--add", img, "x"); err == nil {
		t.Fatal("qemu-img bitmap --add on a v2 image succeeded")
	}
	_, stderr, err := testutil.RunCbtfs(t, cbtfs, "bitmap", img, "add", "x")
	ocRequireOneLineError(t, "cbtfs bitmap add on a v2 image", err, stderr, "v2")
	mnt := filepath.Join(dir, "mnt")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	before := ccState(t, img, "")
	m := testutil.MountRW(t, cbtfs, img, mnt, testutil.MountOptions{})
	for _, c := range []string{"bitmap add x", "checkpoint x"} {
		if errno, st := ccTry(t, mnt, c+"\n"); errno != syscall.EINVAL || !strings.Contains(st, "v2") {
			t.Errorf("%q on a v2 image: errno %v, want EINVAL and a word about v2:\n%s", c, errno, st)
		}
	}
	if err := os.Mkdir(filepath.Join(mnt, "bitmaps", "x"), 0o755); !errors.Is(err, syscall.EINVAL) {
		t.Errorf("mkdir on a v2 image: %v, want EINVAL", err)
	}
	ccRequireListing(t, mnt, nil, "the refused adds")
	m.Unmount(t)
	ccCheck(t, img, false)
	if d := before.diff(ccState(t, img, "")); d != "" {
		t.Errorf("after the refused adds: %s", d)
	}
}
