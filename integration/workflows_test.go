package integration

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/cbtfs/cbtfs/internal/testutil"
)

// The workflows of the seed talk ("Bitmaps and NBD: Building Blocks of
// Change Block Tracking"), on an 8-cluster disk. A cluster is shown by a
// letter: A, B, C, D are four fill patterns, '-' unallocated (reads as
// zeros), '0' a zero cluster, and in bitmaps 'X' dirty, '-' clean. Every
// intermediate state the slides show is asserted, and the backups are
// checked with qemu-img, not only with cbtfs.

const nClusters = 8

// geometry is a disk's cluster size and its bitmaps' granularity.
type geometry struct {
	name        string
	clusterSize uint64
	granularity string // as given to "bitmap add ... granularity="
}

var (
	geo64K = geometry{"64k", 64 << 10, "64K"}
	// 2 MiB clusters with 4 KiB bitmaps: each guest cluster is 512 granules.
	geo2M = geometry{"2m-gran4k", 2 << 20, "4K"}
)

// talkDisk is a mounted disk of the talk's workflows.
type talkDisk struct {
	t   *testing.T
	g   geometry
	dir string
	m   *testutil.Mounted
}

// newTalkDisk creates an 8-cluster disk in a fresh directory and mounts it
// read-write (with extra mount arguments, e.g. --nbd).
func newTalkDisk(t *testing.T, g geometry, mountArgs ...string) *talkDisk {
	t.Helper()
	testutil.RequireFUSE(t)
	testutil.RequireTool(t, "qemu-img")
	dir := t.TempDir()
	img := filepath.Join(dir, "disk.qcow2")
	testutil.Run(t, cbtfs, "create", "--cluster-size", strconv.FormatUint(g.clusterSize, 10), img, strconv.FormatUint(nClusters*g.clusterSize, 10))
	mnt := filepath.Join(dir, "mnt")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	m := testutil.MountRW(t, cbtfs, img, mnt, testutil.MountOptions{Args: mountArgs})
	return &talkDisk{t: t, g: g, dir: dir, m: m}
}

func (d *talkDisk) path(name string) string { return filepath.Join(d.dir, name) }

// put fills the given clusters of the disk with pattern p, through the
// mount, and syncs.
func (d *talkDisk) put(p byte, clusters ...int) {
	d.t.Helper()
	f, err := os.OpenFile(d.m.Disk, os.O_WRONLY, 0)
	if err != nil {
		d.t.Fatal(err)
	}
	defer f.Close()
	buf := bytes.Repeat([]byte{p}, int(d.g.clusterSize))
	for _, c := range clusters {
		if _, err := f.WriteAt(buf, int64(c)*int64(d.g.clusterSize)); err != nil {
			d.t.Fatalf("write cluster %d: %v", c, err)
		}
	}
	if err := f.Sync(); err != nil {
		d.t.Fatal(err)
	}
}

// ctl runs control commands (one write) and fails the test if they fail.
func (d *talkDisk) ctl(cmds ...string) {
	d.t.Helper()
	err := os.WriteFile(filepath.Join(d.m.Dir, "control"), []byte(strings.Join(cmds, "\n")+"\n"), 0)
	if err != nil {
		st, _ := os.ReadFile(filepath.Join(d.m.Dir, "control"))
		d.t.Fatalf("control %q: %v\n%s", cmds, err, st)
	}
}

// clusterLetter describes one cluster's bytes: its fill letter, '-' for
// zeros, '?' for anything else.
func clusterLetter(b []byte) byte {
	if len(b) == 0 {
		return '?'
	}
	first := b[0]
	for _, c := range b {
		if c != first {
			return '?'
		}
	}
	if first == 0 {
		return '-'
	}
	return first
}

// content returns the disk's clusters as letters, read through the mount.
func (d *talkDisk) content() string {
	d.t.Helper()
	data, err := os.ReadFile(d.m.Disk)
	if err != nil {
		d.t.Fatal(err)
	}
	return lettersOf(data, d.g.clusterSize)
}

func lettersOf(data []byte, cs uint64) string {
	var s strings.Builder
	for c := range uint64(nClusters) {
		s.WriteByte(clusterLetter(data[c*cs : (c+1)*cs]))
	}
	return s.String()
}

// requireContent checks the disk through the mount and, for the
// allocation, through MNT/depth: a cluster that reads as zeros is '-'
// when no layer allocates it and '0' when one does (a zero cluster).
func (d *talkDisk) requireContent(want string) {
	d.t.Helper()
	got := []byte(d.content())
	alloc := d.allocated("depth")
	for c := range got {
		if got[c] == '-' && alloc[c] {
			got[c] = '0'
		}
		if got[c] != '-' && got[c] != '0' && !alloc[c] {
			d.t.Fatalf("cluster %d reads %c but is not allocated", c, got[c])
		}
	}
	if string(got) != want {
		d.t.Fatalf("disk %s, want %s", got, want)
	}
}

// allocated reports per cluster whether a listing file of the mount (in
// nbdinfo's format) marks any of it with a non-zero type (depth: allocated
// somewhere; bitmap: dirty).
func (d *talkDisk) allocated(rel string) []bool {
	d.t.Helper()
	data, err := os.ReadFile(filepath.Join(d.m.Dir, rel))
	if err != nil {
		d.t.Fatal(err)
	}
	return clustersOfType(parseNbdinfoMap(d.t, string(data)), d.g.clusterSize)
}

// clustersOfType reports per cluster whether an extent of non-zero type
// touches it.
func clustersOfType(es []mapExtent, cs uint64) []bool {
	out := make([]bool, nClusters)
	for _, e := range es {
		if e.Type == 0 {
			continue
		}
		for c := uint64(e.Off) / cs; c < nClusters && int64(c*cs) < e.Off+e.Len; c++ {
			out[c] = true
		}
	}
	return out
}

// bitmap returns the dirty clusters of bitmap name as 'X' and '-'.
func (d *talkDisk) bitmap(name string) string {
	d.t.Helper()
	return xLetters(d.allocated("bitmaps/" + name + "/extents"))
}

func (d *talkDisk) requireBitmap(name, want string) {
	d.t.Helper()
	if got := d.bitmap(name); got != want {
		d.t.Fatalf("bitmap %s = %s, want %s", name, got, want)
	}
}

// copyIncremental copies MNT/bitmaps/NAME/incremental.qcow2 to file and
// checks it with qemu-img.
func (d *talkDisk) copyIncremental(name, file string) string {
	d.t.Helper()
	dst := d.path(file)
	testutil.CopyFile(d.t, filepath.Join(d.m.Dir, "bitmaps", name, "incremental.qcow2"), dst)
	requireClean(d.t, dst)
	return dst
}

// requireClean asserts qemu-img check finds no errors and no leaks.
func requireClean(t *testing.T, img string) {
	t.Helper()
	res, code := testutil.Check(t, img)
	if code != 0 {
		t.Fatalf("qemu-img check %s: exit %d: %+v", filepath.Base(img), code, res)
	}
}

// backupLetters describes a standalone qcow2 backup (its backing, if any,
// ignored) per guest cluster of g: the fill letter where it holds data,
// '0' where it holds zero clusters, '-' where it allocates nothing, '?'
// for a mix. Allocation comes from qemu-img map, content from qemu-img
// convert of the file alone.
func backupLetters(t *testing.T, img string, cs uint64) string {
	t.Helper()
	// The file alone: json: options with "backing": null.
	alone := fmt.Sprintf(`json:{"driver":"qcow2","backing":null,"file":{"driver":"file","filename":%q}}`, img)
	out := testutil.Img(t, "map", "--output=json", alone)
	var ents []struct {
		Start, Length uint64
		Depth         int
		Present, Zero bool
		Data          bool
	}
	if err := json.Unmarshal([]byte(out), &ents); err != nil {
		t.Fatalf("qemu-img map: %v\n%s", err, out)
	}
	raw := filepath.Join(t.TempDir(), "b.raw")
	testutil.Run(t, "qemu-img", "convert", "-O", "raw", alone, raw)
	data, err := os.ReadFile(raw)
	if err != nil {
		t.Fatal(err)
	}
	var s strings.Builder
	for c := range uint64(nClusters) {
		lo, hi := c*cs, (c+1)*cs
		kinds := map[byte]bool{}
		for _, e := range ents {
			if e.Start+e.Length <= lo || e.Start >= hi {
				continue
			}
			switch {
			case !e.Present || e.Depth != 0:
				kinds['-'] = true
			case e.Data:
				kinds['d'] = true
			default:
				kinds['0'] = true
			}
		}
		switch {
		case len(kinds) != 1:
			s.WriteByte('?')
		case kinds['d']:
			s.WriteByte(clusterLetter(data[lo:hi]))
		default:
			for k := range kinds {
				s.WriteByte(k)
			}
		}
	}
	return s.String()
}

func requireBackup(t *testing.T, img string, cs uint64, want string) {
	t.Helper()
	if got := backupLetters(t, img, cs); got != want {
		t.Fatalf("%s holds %s, want %s", filepath.Base(img), got, want)
	}
}

// fullBackup adds bitmap name (created with the backup, as a backup
// application does) and copies the disk into full.qcow2.
func (d *talkDisk) fullBackup(name string) string {
	d.t.Helper()
	d.ctl("bitmap add " + name + " granularity=" + d.g.granularity)
	full := d.path("full.qcow2")
	testutil.Run(d.t, "qemu-img", "convert", "-f", "raw", "-O", "qcow2", d.m.Disk, full)
	return full
}

// requireRestores checks that the chain ending in top reads exactly as
// the disk does now.
func (d *talkDisk) requireRestores(top string) {
	d.t.Helper()
	if !testutil.Compare(d.t, top, d.m.Disk, "-F", "raw") {
		d.t.Fatalf("%s does not restore the disk", filepath.Base(top))
	}
}

func rebase(t *testing.T, img, backing string) {
	t.Helper()
	testutil.Img(t, "rebase", "-u", "-b", filepath.Base(backing), "-F", "qcow2", img)
}

// TestWorkflowPushIncremental: full backup + bitmap; A-AA-A-- becomes
// A-ABBB--; the first incremental holds only ---BBB--; then A-CCBB-- and
// the second incremental --CC----; full + incrementals restore the image.
func TestWorkflowPushIncremental(t *testing.T) {
	for _, g := range []geometry{geo64K, geo2M} {
		t.Run(g.name, func(t *testing.T) {
			d := newTalkDisk(t, g)
			d.put('A', 0, 2, 3, 5)
			d.requireContent("A-AA-A--")
			full := d.fullBackup("b0")
			d.requireBitmap("b0", "--------")

			d.put('B', 3, 4, 5)
			d.requireContent("A-ABBB--")
			d.requireBitmap("b0", "---XXX--")
			inc1 := d.copyIncremental("b0", "inc1.qcow2")
			d.ctl("bitmap clear b0")
			requireBackup(t, inc1, g.clusterSize, "---BBB--")

			d.put('C', 2, 3)
			d.requireContent("A-CCBB--")
			d.requireBitmap("b0", "--XX----")
			inc2 := d.copyIncremental("b0", "inc2.qcow2")
			d.ctl("bitmap clear b0")
			requireBackup(t, inc2, g.clusterSize, "--CC----")

			rebase(t, inc1, full)
			rebase(t, inc2, inc1)
			d.requireRestores(inc2)
			for _, f := range []string{full, inc1, inc2} {
				requireClean(t, f)
			}
		})
	}
}

// TestWorkflowPullDifferential: b0 at the full backup; at the first
// incremental b1 is created and b0 disabled; the differential made from
// the merge of b0 and b1 holds --CCBB--.
func TestWorkflowPullDifferential(t *testing.T) {
	d := newTalkDisk(t, geo64K)
	d.put('A', 0, 2, 3, 5)
	full := d.fullBackup("b0")
	d.put('B', 3, 4, 5)
	d.requireContent("A-ABBB--")

	// The first incremental: a new bitmap starts, the old one is frozen.
	d.ctl("bitmap add b1 granularity="+d.g.granularity, "bitmap disable b0")
	inc1 := d.copyIncremental("b0", "inc1.qcow2")
	requireBackup(t, inc1, d.g.clusterSize, "---BBB--")

	d.put('C', 2, 3)
	d.requireContent("A-CCBB--")
	d.requireBitmap("b0", "---XXX--")
	d.requireBitmap("b1", "--XX----")

	// The differential since the full backup: b0 | b1 in a scratch bitmap.
	d.ctl("bitmap add diff disabled", "bitmap merge b0 diff", "bitmap merge b1 diff")
	d.requireBitmap("diff", "--XXXX--")
	diff := d.copyIncremental("diff", "diff.qcow2")
	requireBackup(t, diff, d.g.clusterSize, "--CCBB--")
	rebase(t, diff, full)
	d.requireRestores(diff)
	d.ctl("bitmap remove diff")
	if _, err := os.Stat(filepath.Join(d.m.Dir, "bitmaps", "diff")); !os.IsNotExist(err) {
		t.Fatalf("bitmaps/diff after remove: %v", err)
	}
}

// TestWorkflowExternalSnapshot: bitmap b0 in the base; a snapshot to an
// overlay re-creates b0 empty there; writes --CC----; the incremental from
// the union of b0 in both layers holds --CCBB--; b1 is added; D is written
// to cluster 6; commit leaves the base A-CCBBD- with b0 = --XXXXX- and
// b1 = ------X-.
func TestWorkflowExternalSnapshot(t *testing.T) {
	for _, g := range []geometry{geo64K, geo2M} {
		t.Run(g.name, func(t *testing.T) {
			d := newTalkDisk(t, g)
			d.put('A', 0, 2, 3, 5)
			full := d.fullBackup("b0")
			d.put('B', 3, 4, 5)
			d.requireBitmap("b0", "---XXX--")

			d.ctl("snapshot overlay.qcow2")
			chain := d.chain()
			if len(chain) != 2 || filepath.Base(chain[0].file) != "overlay.qcow2" || filepath.Base(chain[1].file) != "disk.qcow2" {
				t.Fatalf("chain after snapshot: %+v", chain)
			}
			if !chain[0].has("b0") || !chain[1].has("b0") {
				t.Fatalf("b0 must be in both layers after the snapshot: %+v", chain)
			}
			// The overlay's b0 starts empty: the union is still the base's.
			d.requireBitmap("b0", "---XXX--")
			d.requireContent("A-ABBB--")

			d.put('C', 2, 3)
			d.requireContent("A-CCBB--")
			d.requireBitmap("b0", "--XXXX--")
			inc := d.copyIncremental("b0", "inc.qcow2")
			requireBackup(t, inc, g.clusterSize, "--CCBB--")
			rebase(t, inc, full)
			d.requireRestores(inc)

			d.ctl("bitmap add b1 granularity=" + g.granularity)
			d.put('D', 6)
			d.requireBitmap("b1", "------X-")

			d.ctl("commit")
			chain = d.chain()
			if len(chain) != 1 || filepath.Base(chain[0].file) != "disk.qcow2" {
				t.Fatalf("chain after commit: %+v", chain)
			}
			d.requireContent("A-CCBBD-")
			d.requireBitmap("b0", "--XXXXX-")
			d.requireBitmap("b1", "------X-")
			d.m.Unmount(t)

			base, overlay := d.path("disk.qcow2"), d.path("overlay.qcow2")
			requireClean(t, base)
			requireClean(t, overlay)
			requireBackup(t, base, g.clusterSize, "A-CCBBD-")
			// Seen by qemu: the base's bitmaps after the commit.
			for name, want := range map[string]string{"b0": "--XXXXX-", "b1": "------X-"} {
				nbd := testutil.StartQemuNBD(t, base, "-r", "-B", name)
				if got := bitmapLetters(t, testutil.NbdinfoMap(t, nbd.URI, "qemu:dirty-bitmap:"+name, false), g.clusterSize); got != want {
					t.Fatalf("qemu-nbd -B %s on the base: %s, want %s", name, got, want)
				}
				nbd.Stop(t)
			}
			// The committed overlay is left on disk and still reads as the
			// disk did at the commit.
			raw := filepath.Join(t.TempDir(), "o.raw")
			testutil.ConvertRaw(t, overlay, raw)
			data, err := os.ReadFile(raw)
			if err != nil {
				t.Fatal(err)
			}
			if got := lettersOf(data, g.clusterSize); got != "A-CCBBD-" {
				t.Fatalf("overlay reads %s after the commit, want A-CCBBD-", got)
			}
		})
	}
}

// bitmapLetters turns an nbdinfo dirty-bitmap listing into X and '-'.
func bitmapLetters(t *testing.T, listing string, cs uint64) string {
	t.Helper()
	return xLetters(clustersOfType(parseNbdinfoMap(t, listing), cs))
}

// xLetters shows dirty clusters as X and clean ones as '-'.
func xLetters(dirty []bool) string {
	var s strings.Builder
	for _, x := range dirty {
		if x {
			s.WriteByte('X')
		} else {
			s.WriteByte('-')
		}
	}
	return s.String()
}

// layerInfo is one layer of MNT/info.json's "chain".
type layerInfo struct {
	file    string
	bitmaps []string
}

func (l layerInfo) has(name string) bool {
	for _, b := range l.bitmaps {
		if b == name {
			return true
		}
	}
	return false
}

// chain reads the layers and their bitmaps from MNT/info.json.
func (d *talkDisk) chain() []layerInfo {
	d.t.Helper()
	data, err := os.ReadFile(filepath.Join(d.m.Dir, "info.json"))
	if err != nil {
		d.t.Fatal(err)
	}
	var info struct {
		Chain []struct {
			Filename       string `json:"filename"`
			FormatSpecific struct {
				Data struct {
					Bitmaps []struct {
						Name string `json:"name"`
					} `json:"bitmaps"`
				} `json:"data"`
			} `json:"format-specific"`
		} `json:"chain"`
	}
	if err := json.Unmarshal(data, &info); err != nil {
		d.t.Fatal(err)
	}
	var out []layerInfo
	for _, l := range info.Chain {
		li := layerInfo{file: l.Filename}
		for _, b := range l.FormatSpecific.Data.Bitmaps {
			li.bitmaps = append(li.bitmaps, b.Name)
		}
		out = append(out, li)
	}
	return out
}

// TestWorkflowPullNBD: the talk's pull-mode demo with `cbtfs mount --nbd`.
// An incremental made by the talk's copy.sh recipe (qemu-img create -b
// NBD-URI, nbdinfo --map of the bitmap, qemu-io -C reads of each dirty
// extent, qemu-img rebase onto the full backup) reads identical to the
// disk; so does a copy of incremental.qcow2 rebased the same way, and so
// does a raw copy of the full backup onto which the dirty extents of a
// saved copy of extents were written from the dirty view (zeroed dirty
// clusters included).
func TestWorkflowPullNBD(t *testing.T) {
	for _, g := range []geometry{geo64K, geo2M} {
		t.Run(g.name, func(t *testing.T) {
			testutil.RequireTool(t, "qemu-io")
			testutil.RequireTool(t, "nbdinfo")
			sock := filepath.Join(t.TempDir(), "nbd.sock")
			d := newTalkDisk(t, g, "--nbd", "unix:"+sock)
			uri := "nbd+unix:///?socket=" + sock
			d.put('A', 0, 2, 3, 5)
			full := d.fullBackup("b0")
			fullRaw := d.path("full.raw")
			testutil.ConvertRaw(t, full, fullRaw)

			d.put('B', 3, 4, 5)
			d.put('C', 2, 3)
			// A dirty cluster that now reads as zeros: cluster 0 punched.
			zeroCluster(t, d.m.Disk, 0, g.clusterSize)
			d.requireContent("0-CCBB--")
			d.requireBitmap("b0", "X-XXXX--")

			// copy.sh: an overlay over the NBD export filled by copy-on-read
			// of each dirty extent, then rebased onto the full backup.
			inc := d.path("copysh.qcow2")
			testutil.Img(t, "create", "-q", "-f", "qcow2", "-b", uri, "-F", "raw", inc)
			var exts []struct {
				Offset, Length uint64
				Type           int
			}
			if err := json.Unmarshal([]byte(testutil.NbdinfoMap(t, uri, "qemu:dirty-bitmap:b0", true)), &exts); err != nil {
				t.Fatal(err)
			}
			for _, e := range exts {
				if e.Type == 1 {
					testutil.Run(t, "qemu-io", "-C", "-f", "qcow2", "-c", fmt.Sprintf("r %d %d", e.Offset, e.Length), inc)
				}
			}
			rebase(t, inc, full)
			requireClean(t, inc)
			d.requireRestores(inc)

			// incremental.qcow2, rebased the same way.
			inc2 := d.copyIncremental("b0", "inc.qcow2")
			requireBackup(t, inc2, g.clusterSize, "0-CCBB--")
			rebase(t, inc2, full)
			d.requireRestores(inc2)

			// The dirty view copied with cp, applied onto a raw full backup
			// at the extents of a saved listing.
			listing, err := os.ReadFile(filepath.Join(d.m.Dir, "bitmaps", "b0", "extents"))
			if err != nil {
				t.Fatal(err)
			}
			incRaw := d.path("inc.raw")
			testutil.Run(t, "cp", filepath.Join(d.m.Dir, "bitmaps", "b0", "dirty"), incRaw)
			restored := d.path("restored.raw")
			testutil.CopyFile(t, fullRaw, restored)
			for _, line := range strings.Split(strings.TrimSpace(string(listing)), "\n") {
				f := strings.Fields(line)
				if f[2] != "1" {
					continue
				}
				testutil.Run(t, "dd", "if="+incRaw, "of="+restored, "bs=64K", "iflag=skip_bytes,count_bytes", "oflag=seek_bytes",
					"skip="+f[0], "seek="+f[0], "count="+f[1], "conv=notrunc", "status=none")
			}
			d.requireRestores(restored)
		})
	}
}

// zeroCluster punches cluster c of the file at path (fallocate
// PUNCH_HOLE|KEEP_SIZE through the mount).
func zeroCluster(t *testing.T, path string, c int, cs uint64) {
	t.Helper()
	testutil.Run(t, "fallocate", "-p", "-o", strconv.FormatUint(uint64(c)*cs, 10), "-l", strconv.FormatUint(cs, 10), path)
}
