package integration

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/cbtfs/cbtfs/internal/testutil"
)

// This file holds the write acceptance tests of issue 4: randomised write
// workloads through a read-write MNT/disk, checked against a raw model
// file with qemu-img check, qemu-img compare, and the dirty bitmaps as
// qemu-nbd -B shows them; and the reverse, qemu-io writing to an image
// cbtfs wrote.

// wKind says what a workload operation does.
type wKind int

const (
	wWrite     wKind = iota // pwrite of data
	wZero                   // fallocate(FALLOC_FL_ZERO_RANGE)
	wPunch                  // fallocate(FALLOC_FL_PUNCH_HOLE|FALLOC_FL_KEEP_SIZE)
	wFsync                  // fsync
	wFdatasync              // fdatasync
)

func (k wKind) String() string {
	return [...]string{"write", "zero-range", "punch-hole", "fsync", "fdatasync"}[k]
}

// wOp is one operation of a workload. After a write, zero-range or
// punch-hole, [off, off+len(data)) (or [off, off+n)) reads as data (or
// zeros), and the enabled bitmaps mark every granule it touched.
type wOp struct {
	kind wKind
	off  int64
	n    int64
	data []byte // wWrite only; len(data) == n
}

func (o wOp) String() string {
	if o.kind == wFsync || o.kind == wFdatasync {
		return o.kind.String()
	}
	return fmt.Sprintf("%s %d+%d", o.kind, o.off, o.n)
}

// touches reports whether o changes the disk (and marks bitmaps).
func (o wOp) touches() bool {
	return (o.kind == wWrite || o.kind == wZero || o.kind == wPunch) && o.n > 0
}

// apply applies o to the raw model of the disk.
func (o wOp) apply(model []byte) {
	switch o.kind {
	case wWrite:
		copy(model[o.off:], o.data)
	case wZero, wPunch:
		clear(model[o.off : o.off+o.n])
	}
}

// do performs o on the open disk f.
func (o wOp) do(f *os.File) error {
	fd := int(f.Fd())
	var err error
	switch o.kind {
	case wWrite:
		var n int
		n, err = f.WriteAt(o.data, o.off)
		if err == nil && n != len(o.data) {
			err = fmt.Errorf("short write: %d of %d bytes", n, len(o.data))
		}
	case wZero:
		err = unix.Fallocate(fd, unix.FALLOC_FL_ZERO_RANGE, o.off, o.n)
	case wPunch:
		err = unix.Fallocate(fd, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, o.off, o.n)
	case wFsync:
		err = unix.Fsync(fd)
	case wFdatasync:
		err = unix.Fdatasync(fd)
	}
	if err != nil {
		return fmt.Errorf("%v: %w", o, err)
	}
	return nil
}

// wGen generates random operations inside a range of the disk.
type wGen struct {
	rng     *rand.Rand
	cluster int64 // the image's cluster size, to align some offsets
	maxLen  int64 // the longest write (8 MiB)
}

// length returns a length from 1 byte to at most limit, log-uniformly
// distributed so that tiny and huge operations are both common.
func (g *wGen) length(limit int64) int64 {
	limit = min(limit, g.maxLen)
	if limit <= 1 {
		return limit
	}
	n := int64(math.Exp(g.rng.Float64() * math.Log(float64(limit))))
	return min(max(n, 1), limit)
}

// op returns a random operation inside [lo, hi): mostly writes of random
// bytes (some of zeros, some of a byte pattern), zero-ranges and
// punch-holes, at unaligned offsets, with a few aligned to 4 KiB or the
// cluster size; and now and then a fsync or fdatasync when syncs is set.
func (g *wGen) op(lo, hi int64, syncs bool) wOp {
	r := g.rng.IntN(100)
	if syncs && r < 6 {
		if r < 3 {
			return wOp{kind: wFsync}
		}
		return wOp{kind: wFdatasync}
	}
	o := wOp{kind: wWrite}
	switch {
	case r < 20:
		o.kind = wZero
	case r < 34:
		o.kind = wPunch
	}
	o.n = g.length(hi - lo)
	o.off = lo + g.rng.Int64N(hi-lo-o.n+1)
	switch g.rng.IntN(6) {
	case 0: // aligned to the cluster, whole clusters when it fits
		if c := g.cluster; o.n >= c {
			o.off = lo + (o.off-lo)/c*c
			o.n = o.n / c * c
		}
	case 1: // aligned to 4 KiB
		o.off = lo + (o.off-lo)&^4095
	}
	if o.kind == wWrite {
		o.data = make([]byte, o.n)
		switch g.rng.IntN(8) {
		case 0: // zeros: data that reads as zeros still marks the bitmaps
		case 1:
			pattern(byte(g.rng.IntN(255)+1))(o.off, o.data)
		default:
			for i := 0; i < len(o.data); i += 8 {
				v := g.rng.Uint64()
				for j := 0; j < 8 && i+j < len(o.data); j++ {
					o.data[i+j] = byte(v >> (8 * j))
				}
			}
		}
	}
	return o
}

// wWorkload describes a workload run through MNT/disk.
type wWorkload struct {
	seed    uint64
	serial  int   // operations from one file descriptor, in order
	zones   int   // parallel writers, each on its own disjoint zone...
	perZone int   // ...doing this many operations
	dd      bool  // one more zone written by a dd process
	cluster int64 // the image's cluster size
	limit   int64 // if > 0, the workload stays in [0, limit)
}

// wResult is what a workload did.
type wResult struct {
	touched []wOp // every operation that changed the disk
}

// run runs w on MNT/disk of m and applies it to model; dir is scratch
// space for the dd process's input. It fails the test on any error.
func (w wWorkload) run(t *testing.T, m *testutil.Mounted, model []byte, dir string) wResult {
	t.Helper()
	size := int64(len(model))
	if w.limit > 0 {
		size = min(size, w.limit)
	}
	rng := rand.New(rand.NewPCG(w.seed, 0x5eed))
	var res wResult
	record := func(ops []wOp) {
		for _, o := range ops {
			if o.touches() {
				o.apply(model)
				o.data = nil
				res.touched = append(res.touched, o)
			}
		}
	}

	// Serial phase: one descriptor, operations in order.
	f, err := os.OpenFile(m.Disk, os.O_RDWR, 0)
	if err != nil {
		t.Fatalf("open MNT/disk for writing: %v", err)
	}
	g := &wGen{rng: rng, cluster: w.cluster, maxLen: 8 << 20}
	var serial []wOp
	for range w.serial {
		o := g.op(0, size, true)
		if err := o.do(f); err != nil {
			f.Close()
			t.Fatalf("serial %v", err)
		}
		serial = append(serial, o)
	}
	if err := f.Close(); err != nil {
		t.Fatalf("close MNT/disk: %v", err)
	}
	record(serial)

	// Parallel phase: goroutines (and a dd process) on disjoint zones,
	// each with its own descriptor.
	nz := w.zones
	if w.dd {
		nz++
	}
	if nz == 0 {
		return res
	}
	zone := size / int64(nz)
	ops := make([][]wOp, w.zones)
	errs := make([]error, w.zones)
	var wg sync.WaitGroup
	for z := range w.zones {
		lo, hi := int64(z)*zone, int64(z+1)*zone
		zg := &wGen{rng: rand.New(rand.NewPCG(w.seed, uint64(z+1))), cluster: w.cluster, maxLen: 8 << 20}
		for range w.perZone {
			ops[z] = append(ops[z], zg.op(lo, hi, true))
		}
		wg.Go(func() {
			f, err := os.OpenFile(m.Disk, os.O_RDWR, 0)
			if err != nil {
				errs[z] = err
				return
			}
			defer f.Close()
			for _, o := range ops[z] {
				if err := o.do(f); err != nil {
					errs[z] = fmt.Errorf("writer %d: %w", z, err)
					return
				}
			}
		})
	}
	var ddOp wOp
	var dd *testutil.Proc
	if w.dd {
		lo := int64(w.zones) * zone
		dg := &wGen{rng: rand.New(rand.NewPCG(w.seed, 0xdd)), cluster: w.cluster, maxLen: 8 << 20}
		for ddOp = dg.op(lo, size, false); ddOp.kind != wWrite; {
			ddOp = dg.op(lo, size, false)
		}
		src := filepath.Join(dir, "dd.in")
		if err := os.WriteFile(src, ddOp.data, 0o644); err != nil {
			t.Fatal(err)
		}
		bs := strconv.Itoa(1 + int(dg.rng.Int64N(1<<20)))
		dd = testutil.Start(t, "", "dd", "if="+src, "of="+m.Disk, "bs="+bs, "seek="+strconv.FormatInt(ddOp.off, 10), "oflag=seek_bytes", "conv=notrunc,fsync", "status=none")
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
	if dd != nil {
		if _, ok := dd.Wait(testutil.CommandTimeout); !ok {
			t.Fatal("dd did not finish")
		}
		if err := dd.Err(); err != nil {
			t.Errorf("dd %v: %v; stderr: %s", ddOp, err, dd.Stderr())
		}
	}
	if t.Failed() {
		t.FailNow()
	}
	for _, z := range ops {
		record(z)
	}
	if w.dd {
		record([]wOp{ddOp})
	}
	return res
}

// wBitmap is one bitmap of an image as qemu-img info lists it.
type wBitmap struct {
	Name        string   `json:"name"`
	Granularity int64    `json:"granularity"`
	Flags       []string `json:"flags"`
}

func (b wBitmap) enabled() bool { return slices.Contains(b.Flags, "auto") }
func (b wBitmap) inUse() bool   { return slices.Contains(b.Flags, "in-use") }

// wInfo is the part of `qemu-img info --output=json` the write tests use.
type wInfo struct {
	VirtualSize    int64 `json:"virtual-size"`
	ClusterSize    int64 `json:"cluster-size"`
	FormatSpecific struct {
		Data struct {
			Compat  string    `json:"compat"`
			Bitmaps []wBitmap `json:"bitmaps"`
		} `json:"data"`
	} `json:"format-specific"`
	Snapshots []struct {
		Name string `json:"name"`
	} `json:"snapshots"`
}

// wImgInfo returns qemu-img info of img (with -U: it may be in use).
func wImgInfo(t *testing.T, img string) wInfo {
	t.Helper()
	var i wInfo
	out := testutil.Img(t, "info", "-U", "--output=json", img)
	if err := json.Unmarshal([]byte(out), &i); err != nil {
		t.Fatalf("qemu-img info %s: %v", img, err)
	}
	return i
}

// wBitmapMaps returns `nbdinfo --map=qemu:dirty-bitmap:NAME` for each
// of names, against `qemu-nbd -r -B NAME...` serving img.
func wBitmapMaps(t *testing.T, img string, names []string) map[string]string {
	t.Helper()
	maps := map[string]string{}
	if len(names) == 0 {
		return maps
	}
	n := testutil.QemuNBD(t, img, testutil.NBDOptions{Bitmaps: names})
	for _, name := range names {
		maps[name] = testutil.NbdinfoMap(t, n.URI, "qemu:dirty-bitmap:"+name, false)
	}
	n.Stop(t)
	return maps
}

// wGranules parses an nbdinfo dirty-bitmap listing of a disk of size
// bytes into one bool per granule of gran bytes. Every extent must start
// on a granule boundary.
func wGranules(t *testing.T, what, listing string, size, gran int64) []bool {
	t.Helper()
	g := make([]bool, (size+gran-1)/gran)
	next := int64(0)
	for _, line := range strings.Split(strings.TrimSpace(listing), "\n") {
		f := strings.Fields(line)
		if len(f) < 3 {
			t.Fatalf("%s: bad line %q", what, line)
		}
		off, err1 := strconv.ParseInt(f[0], 10, 64)
		n, err2 := strconv.ParseInt(f[1], 10, 64)
		typ, err3 := strconv.ParseInt(f[2], 10, 64)
		if err1 != nil || err2 != nil || err3 != nil || off != next || n <= 0 || off%gran != 0 {
			t.Fatalf("%s: bad extent %q (expected one at %d, granularity %d):\n%s", what, line, next, gran, listing)
		}
		next = off + n
		if typ&1 != 0 {
			for i := off / gran; i < (off+n+gran-1)/gran; i++ {
				g[i] = true
			}
		}
	}
	if next != size {
		t.Fatalf("%s: extents end at %d, want %d:\n%s", what, next, size, listing)
	}
	return g
}

// wMark marks in g (granules of gran bytes) every granule the operations
// touched.
func wMark(g []bool, ops []wOp, gran int64) {
	for _, o := range ops {
		if !o.touches() {
			continue
		}
		for i := o.off / gran; i <= (o.off+o.n-1)/gran; i++ {
			g[i] = true
		}
	}
}

// wRuns renders the dirty granules of g as byte ranges, for messages.
func wRuns(g []bool, gran, size int64) string {
	var s []string
	for i := 0; i < len(g); {
		if !g[i] {
			i++
			continue
		}
		j := i
		for j < len(g) && g[j] {
			j++
		}
		s = append(s, fmt.Sprintf("%d+%d", int64(i)*gran, min(int64(j)*gran, size)-int64(i)*gran))
		i = j
	}
	if len(s) == 0 {
		return "(none)"
	}
	return strings.Join(s, " ")
}

// wGranuleDiff describes how got differs from want.
func wGranuleDiff(got, want []bool, gran, size int64) string {
	extra := make([]bool, len(got))
	missed := make([]bool, len(got))
	for i := range got {
		extra[i] = got[i] && !want[i]
		missed[i] = want[i] && !got[i]
	}
	return fmt.Sprintf("dirty but not touched: %s; touched but clean: %s", wRuns(extra, gran, size), wRuns(missed, gran, size))
}

// wAddBitmaps are the bitmaps the write tests add to every v3 image:
// enabled ones of several granularities (the default follows the cluster
// size) and a disabled one.
var wAddBitmaps = []struct {
	name string
	args []string
}{
	{"w-default", nil},
	{"w-512", []string{"-g", "512"}},
	{"w-1M", []string{"-g", "1M"}},
	{"w-off", []string{"-g", "64k", "--disable"}},
}

// wAddAll adds wAddBitmaps to img with qemu-img bitmap.
func wAddAll(t *testing.T, img string) {
	t.Helper()
	for _, bm := range wAddBitmaps {
		args := append([]string{"bitmap", "--add"}, bm.args...)
		testutil.Img(t, append(args, img, bm.name)...)
	}
}

// wNames returns the names of bitmaps.
func wNames(bitmaps []wBitmap) []string {
	var names []string
	for _, b := range bitmaps {
		names = append(names, b.Name)
	}
	return names
}

// TestWriteMatrix runs a randomised write workload through a read-write
// MNT/disk on every image of the read matrix (with bitmaps of several
// granularities added to the v3 ones): serial writes of 1 byte to 8 MiB
// at unaligned offsets, zero-ranges, punch-holes, fsyncs and fdatasyncs,
// then parallel writers (goroutines and a dd process) on disjoint zones.
// The same operations are applied to a raw model. During the mount
// MNT/disk must read as the model; after unmount `qemu-img check` must be
// clean (exit 0, no leaks), `qemu-img compare` with the model identical,
// no bitmap left in use, every enabled bitmap as qemu-nbd -B shows it
// must be its old content plus exactly the granules the workload touched
// (and the same as MNT/bitmaps/NAME/extents showed before unmount), a
// disabled one unchanged, and every internal snapshot must still restore
// its data with `qemu-img snapshot -a`.
func TestWriteMatrix(t *testing.T) {
	testutil.RequireFUSE(t)
	testutil.RequireTool(t, "nbdinfo")
	t.Parallel()
	cases := imageCases()
	wRunPool(t, wWorkers, len(cases), func(i int) (string, func(t *testing.T)) {
		c := cases[i]
		return c.name, func(t *testing.T) {
			if c.name == "lazy-refcounts-dirty" {
				writeRefusedDirty(t, c)
				return
			}
			w := wWorkload{seed: uint64(i + 1), serial: 14, zones: 3, perZone: 4, dd: true}
			writeCase(t, c, w)
		}
	})
}

// wWorkers is how many subtests wRunPool runs at once. The write tests
// mostly wait for fsync and for processes, so they overlap well beyond
// GOMAXPROCS (which bounds t.Parallel).
const wWorkers = 4

// wRunPool runs n subtests of t, workers at a time; sub(i) names the
// i-th and returns its body.
func wRunPool(t *testing.T, workers, n int, sub func(i int) (string, func(t *testing.T))) {
	next := make(chan int)
	var wg sync.WaitGroup
	for range min(workers, n) {
		wg.Go(func() {
			for i := range next {
				name, f := sub(i)
				t.Run(name, f)
			}
		})
	}
	for i := range n {
		next <- i
	}
	close(next)
	wg.Wait()
}

// writeRefusedDirty checks that a read-write mount of an image with the
// dirty bit set (lazy refcounts, crashed) is refused with one line naming
// the image and the dirty bit, and leaves the image as it was.
func writeRefusedDirty(t *testing.T, c imageCase) {
	dir := t.TempDir()
	b := &builder{t: t, dir: filepath.Join(dir, "img")}
	img, _ := c.build(b)
	before := fileSum(t, img)
	mnt := mkdir(t, dir, "mnt")
	p := testutil.Start(t, "", cbtfs, "mount", img, mnt)
	if _, ok := p.Wait(testutil.ExitTimeout); !ok {
		detachIfMounted(t, mnt)
		p.Wait(testutil.ExitTimeout)
		t.Fatal("cbtfs mount of a dirty image still running")
	}
	checkRefusal(t, "cbtfs mount (read-write) of a dirty image", p.Err(), p.Stderr(), b.dir, filepath.Base(img), regexp.MustCompile(`(?i)dirty`))
	testutil.RequireNoMount(t, mnt)
	if fileSum(t, img) != before {
		t.Errorf("%s changed by a refused mount", img)
	}
}

// writeCase builds the image of c, runs w on it through a read-write
// mount and checks the result (see TestWriteMatrix).
func writeCase(t *testing.T, c imageCase, w wWorkload) {
	dir := t.TempDir()
	b := &builder{t: t, dir: filepath.Join(dir, "img")}
	img, cwd := c.build(b)
	abs := img
	if !filepath.IsAbs(img) {
		abs = filepath.Join(cwd, img)
	}
	if wImgInfo(t, abs).FormatSpecific.Data.Compat != "0.10" {
		wAddAll(t, abs)
	}
	snaps := writeRound(t, img, cwd, dir, w)
	// qemu refuses to apply a snapshot to an image with enabled bitmaps
	// ("Device has active dirty bitmaps").
	for _, bm := range wImgInfo(t, abs).FormatSpecific.Data.Bitmaps {
		testutil.Img(t, "bitmap", "--remove", abs, bm.Name)
	}
	for name, raw := range snaps {
		testutil.Img(t, "snapshot", "-a", name, abs)
		if !testutil.Compare(t, abs, raw, "-f", "qcow2", "-F", "raw") {
			t.Errorf("qemu-img snapshot -a %s: the image differs from the snapshot's data before the workload", name)
		}
		wRequireClean(t, abs)
	}
}

// writeRound runs w through a read-write mount of img (relative to cwd
// when not absolute) and checks the result: MNT/disk reads as the model
// during the mount; after the unmount qemu-img check is clean, qemu-img
// compare finds the model, no bitmap is in use, and every bitmap holds
// its old content plus, when enabled, exactly the granules w touched (as
// MNT/bitmaps/NAME/extents showed before the unmount). dir is scratch
// space. It returns the internal snapshots of img, each with a raw file
// of its data from before the round.
func writeRound(t *testing.T, img, cwd, dir string, w wWorkload) (snaps map[string]string) {
	t.Helper()
	abs := img
	if !filepath.IsAbs(img) {
		abs = filepath.Join(cwd, img)
	}
	info := wImgInfo(t, abs)
	bitmaps := info.FormatSpecific.Data.Bitmaps
	names := wNames(bitmaps)
	before := wBitmapMaps(t, abs, names)
	snaps = map[string]string{}
	for _, s := range info.Snapshots {
		p := filepath.Join(dir, "snap-"+s.Name+".raw")
		testutil.Convert(t, abs, p, "-O", "raw", "-l", s.Name)
		snaps[s.Name] = p
	}
	ref := filepath.Join(dir, "model.raw")
	testutil.ConvertRaw(t, abs, ref)
	model, err := os.ReadFile(ref)
	if err != nil {
		t.Fatal(err)
	}

	mnt := filepath.Join(dir, "mnt")
	if err := os.MkdirAll(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	m := testutil.MountRW(t, cbtfs, img, mnt, testutil.MountOptions{Dir: cwd})
	w.cluster = info.ClusterSize
	res := w.run(t, m, model, dir)
	t.Logf("seed %d: %d operations changed the disk", w.seed, len(res.touched))
	if got, err := os.ReadFile(m.Disk); err != nil {
		t.Errorf("read MNT/disk after the workload: %v", err)
	} else if !bytes.Equal(got, model) {
		t.Errorf("MNT/disk after the workload differs from the model: first difference at %d", firstDiff(got, model))
	}
	live := map[string]string{}
	for _, name := range names {
		b, err := os.ReadFile(filepath.Join(mnt, "bitmaps", name, "extents"))
		if err != nil {
			t.Errorf("MNT/bitmaps/%s/extents: %v", name, err)
		}
		live[name] = string(b)
	}
	m.Unmount(t)

	if err := os.WriteFile(ref, model, 0o644); err != nil {
		t.Fatal(err)
	}
	wRequireClean(t, abs)
	if !testutil.Compare(t, abs, ref, "-f", "qcow2", "-F", "raw") {
		t.Errorf("qemu-img compare: the image differs from the model (seed %d)", w.seed)
	}

	after := wImgInfo(t, abs).FormatSpecific.Data.Bitmaps
	if len(after) != len(bitmaps) {
		t.Errorf("bitmaps after the workload: %+v, want %+v", after, bitmaps)
	}
	maps := wBitmapMaps(t, abs, names)
	for i, bm := range bitmaps {
		if i < len(after) && (after[i].Name != bm.Name || after[i].Granularity != bm.Granularity || after[i].enabled() != bm.enabled() || after[i].inUse()) {
			t.Errorf("bitmap after the workload: %+v, want %+v without in-use", after[i], bm)
		}
		want := wGranules(t, bm.Name+" before", before[bm.Name], info.VirtualSize, bm.Granularity)
		if bm.enabled() {
			wMark(want, res.touched, bm.Granularity)
		}
		got := wGranules(t, bm.Name+" after", maps[bm.Name], info.VirtualSize, bm.Granularity)
		if !slices.Equal(got, want) {
			t.Errorf("bitmap %s (granularity %d, enabled %v) after the workload: %s", bm.Name, bm.Granularity, bm.enabled(), wGranuleDiff(got, want, bm.Granularity, info.VirtualSize))
		}
		if live[bm.Name] != maps[bm.Name] {
			t.Errorf("MNT/bitmaps/%s/extents before unmount:\n%s\nnbdinfo after unmount:\n%s", bm.Name, live[bm.Name], maps[bm.Name])
		}
	}

	return snaps
}

// wRequireClean requires `qemu-img check` to find no errors and no leaks.
func wRequireClean(t *testing.T, img string) {
	t.Helper()
	if r, code := testutil.Check(t, img); code != 0 || r.Corruptions != 0 || r.Leaks != 0 || r.CheckErrors != 0 {
		out, _, _ := testutil.RunErr(t, "qemu-img", "check", img)
		t.Errorf("qemu-img check %s: exit %d, %+v:\n%s", img, code, r, out)
	}
}
