package qcow_test

// Golden tests over the committed fixtures in testdata/img (made by
// testdata/gen.sh). The expectations in testdata/golden were recorded from
// the real tools, and a plain `go test` replays them with no qemu
// installed. `go test ./qcow/ -run TestFixtures -update` re-records them:
//
//	raw.sha256        sha256 and size of `qemu-img convert -O raw`
//	windows.txt       random windows of that raw disk: off len n sha256
//	info.json         `qemu-img info --output=json --backing-chain`
//	allocation.txt    `nbdinfo --map` against `qemu-nbd -r -A` (and .json)
//	depth.txt         `nbdinfo --map=qemu:allocation-depth` (and .json)
//	bitmap-NAME.txt   `nbdinfo --map=qemu:dirty-bitmap:NAME` against
//	                  `qemu-nbd -r -B NAME` (and .json); for a name held by
//	                  several layers, against a scratch copy in which
//	                  `qemu-img bitmap --merge` OR-ed the lower layers' NAME
//	                  into the highest one: the union the engine must show
//	bitmap-NAME.err   qemu-nbd's refusal of a bitmap found in use

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"hash/fnv"
	"io"
	"io/fs"
	"maps"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cbtfs/cbtfs/internal/report"
	"github.com/cbtfs/cbtfs/qcow"
)

var update = flag.Bool("update", false, "re-record testdata/golden from qemu-img, qemu-nbd and nbdinfo")

const (
	imgDir    = "testdata/img"
	goldenDir = "testdata/golden"
)

type fixture struct {
	name string // golden/NAME
	top  string // path of the top image, relative to the package directory
}

// fixtures reads testdata/fixtures.txt, the manifest gen.sh writes.
func fixtures(t testing.TB) []fixture {
	t.Helper()
	b, err := os.ReadFile("testdata/fixtures.txt")
	if err != nil {
		t.Fatal(err)
	}
	var out []fixture
	for line := range strings.Lines(string(b)) {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		f := strings.Fields(line)
		if len(f) != 2 {
			t.Fatalf("fixtures.txt: bad line %q", line)
		}
		out = append(out, fixture{name: f[0], top: filepath.Join(imgDir, f[1])})
	}
	if len(out) == 0 {
		t.Fatal("fixtures.txt lists no fixtures")
	}
	return out
}

func TestFixtures(t *testing.T) {
	fxs := fixtures(t)
	if *update {
		for _, tool := range []string{"qemu-img", "qemu-nbd", "nbdinfo"} {
			if _, err := exec.LookPath(tool); err != nil {
				t.Skipf("-update needs %s to record the expectations: %v", tool, err)
			}
		}
		unsparse(t)
		for _, fx := range fxs {
			record(t, fx)
		}
	}
	for _, fx := range fxs {
		t.Run(fx.name, func(t *testing.T) {
			g := loadGolden(t, fx)
			img, err := qcow.Open(fx.top, nil)
			if err != nil {
				t.Fatalf("Open(%s): %v", fx.top, err)
			}
			t.Cleanup(func() { img.Close() })
			t.Run("content", func(t *testing.T) { checkContent(t, img, g) })
			t.Run("windows", func(t *testing.T) { checkWindows(t, img, g, 1) })
			t.Run("parallel", func(t *testing.T) { checkWindows(t, img, g, 4) })
			t.Run("allocation", func(t *testing.T) { checkAllocation(t, img, g) })
			t.Run("depth", func(t *testing.T) { checkDepth(t, img, g) })
			t.Run("extents", func(t *testing.T) { checkExtentWindows(t, img, g) })
			t.Run("layers", func(t *testing.T) { checkLayers(t, img, g) })
			t.Run("bitmaps", func(t *testing.T) { checkBitmaps(t, img, g) })
		})
	}
}

// ---------------------------------------------------------------------------
// Recording (-update).

// run runs a tool and returns its stdout; stderr goes into the error.
func run(t testing.TB, dir string, name string, args ...string) ([]byte, error) {
	t.Helper()
	cmd := exec.CommandContext(t.Context(), name, args...)
	cmd.Dir = dir
	cmd.WaitDelay = 10 * time.Second
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.Bytes(), fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, bytes.TrimSpace(stderr.Bytes()))
	}
	return stdout.Bytes(), nil
}

func mustRun(t testing.TB, dir string, name string, args ...string) []byte {
	t.Helper()
	out, err := run(t, dir, name, args...)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// nbdMap runs nbdinfo --map against a qemu-nbd it starts itself by socket
// activation, serving image read-only with allocation depth and bitmaps.
func nbdMap(t testing.TB, image, context string, json bool, bitmaps ...string) ([]byte, error) {
	args := []string{"--map=" + context}
	if json {
		args = append(args, "--json")
	}
	args = append(args, "--", "[", "qemu-nbd", "-r", "-A", "-f", "qcow2")
	for _, b := range bitmaps {
		args = append(args, "-B", b)
	}
	args = append(args, image, "]")
	return run(t, "", "nbdinfo", args...)
}

// unsparse rewrites every fixture file with all its bytes present. qemu's
// base:allocation reports host holes inside data clusters as zero, and a
// copy of the fixtures may have holes where a git checkout has none; the
// expectations are recorded for files without holes.
func unsparse(t *testing.T) {
	err := filepath.WalkDir(imgDir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || !d.Type().IsRegular() {
			return err
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		return os.WriteFile(p, b, 0o644)
	})
	if err != nil {
		t.Fatal(err)
	}
}

func record(t *testing.T, fx fixture) {
	dir := filepath.Join(goldenDir, fx.name)
	if err := os.RemoveAll(dir); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	put := func(name string, b []byte) {
		if err := os.WriteFile(filepath.Join(dir, name), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}

	info := mustRun(t, "", "qemu-img", "info", "--output=json", "--backing-chain", fx.top)
	put("info.json", info)

	raw := filepath.Join(t.TempDir(), "disk.raw")
	mustRun(t, "", "qemu-img", "convert", "-O", "raw", fx.top, raw)
	content, err := os.ReadFile(raw)
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(content)
	put("raw.sha256", fmt.Appendf(nil, "%x %d\n", sum, len(content)))
	put("windows.txt", windows(fx.name, content))

	for _, c := range []struct{ file, ctx string }{
		{"allocation", report.ContextAllocation},
		{"depth", report.ContextDepth},
	} {
		put(c.file+".txt", mustMap(t, fx.top, c.ctx, false))
		put(c.file+".json", mustMap(t, fx.top, c.ctx, true))
	}

	var layers []qemuInfo
	if err := json.Unmarshal(info, &layers); err != nil {
		t.Fatal(err)
	}
	for _, name := range chainBitmapNames(layers) {
		holders := holdersOf(layers, name)
		ctx := report.ContextBitmapPrefix + name
		image := fx.top
		if len(holders) > 1 {
			image = mergedCopy(t, fx, layers, name, holders)
		}
		text, err := nbdMap(t, image, ctx, false, name)
		if err != nil {
			if !layers[holders[0]].bitmap(name).inUse() {
				t.Fatalf("%s: bitmap %s: %v", fx.name, name, err)
			}
			put("bitmap-"+name+".err", []byte(err.Error()+"\n"))
			continue
		}
		put("bitmap-"+name+".txt", text)
		put("bitmap-"+name+".json", mustMap(t, image, ctx, true, name))
	}
}

func mustMap(t testing.TB, image, context string, json bool, bitmaps ...string) []byte {
	t.Helper()
	b, err := nbdMap(t, image, context, json, bitmaps...)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// mergedCopy copies the fixture's directory to a scratch directory, ORs the
// bitmap name of every lower layer that holds it into the highest holder
// with `qemu-img bitmap --merge`, and returns the scratch copy of the top.
func mergedCopy(t *testing.T, fx fixture, layers []qemuInfo, name string, holders []int) string {
	rel, err := filepath.Rel(imgDir, fx.top)
	if err != nil {
		t.Fatal(err)
	}
	root := strings.SplitN(rel, string(filepath.Separator), 2)[0]
	scratch := t.TempDir()
	if err := os.CopyFS(filepath.Join(scratch, root), os.DirFS(filepath.Join(imgDir, root))); err != nil {
		t.Fatal(err)
	}
	inScratch := func(p string) string {
		r, err := filepath.Rel(imgDir, filepath.Clean(p))
		if err != nil {
			t.Fatal(err)
		}
		return filepath.Join(scratch, r)
	}
	target := inScratch(layers[holders[0]].Filename)
	for _, h := range holders[1:] {
		src := inScratch(layers[h].Filename)
		mustRun(t, "", "qemu-img", "bitmap", "-f", "qcow2", "--merge", name, "-b", src, "-F", layers[h].Format, target, name)
	}
	return inScratch(fx.top)
}

// windows picks reproducible random windows of the raw disk (plus some
// that cross the end) and records what a ReadAt of each must return.
func windows(name string, raw []byte) []byte {
	h := fnv.New64a()
	h.Write([]byte(name))
	r := rand.New(rand.NewPCG(h.Sum64(), 1))
	size := int64(len(raw))
	var b bytes.Buffer
	add := func(off, n int64) {
		got := max(min(n, size-off), 0)
		s := sha256.Sum256(raw[off : off+got])
		fmt.Fprintf(&b, "%d %d %d %x\n", off, n, got, s)
	}
	if size == 0 {
		return nil
	}
	for range 96 {
		var n int64
		switch r.IntN(3) {
		case 0:
			n = 1 + r.Int64N(600)
		case 1:
			n = 1 + r.Int64N(70000)
		default:
			n = 1 + r.Int64N(1<<20)
		}
		add(r.Int64N(size), n)
	}
	add(0, 1)
	add(size-1, 1)
	add(size-1000, 5000)
	add(size-4096, 4096)
	return b.Bytes()
}

// ---------------------------------------------------------------------------
// qemu-img info --output=json, the fields the tests use.

type qemuInfo struct {
	Filename            string         `json:"filename"`
	Format              string         `json:"format"`
	VirtualSize         uint64         `json:"virtual-size"`
	ClusterSize         uint64         `json:"cluster-size"`
	BackingFilename     string         `json:"backing-filename"`
	FullBackingFilename string         `json:"full-backing-filename"`
	BackingFormat       string         `json:"backing-filename-format"`
	DirtyFlag           bool           `json:"dirty-flag"`
	Snapshots           []qemuSnapshot `json:"snapshots"`
	FormatSpecific      *struct {
		Type string `json:"type"`
		Data struct {
			Compat          string       `json:"compat"`
			CompressionType string       `json:"compression-type"`
			LazyRefcounts   *bool        `json:"lazy-refcounts"`
			RefcountBits    int          `json:"refcount-bits"`
			Corrupt         *bool        `json:"corrupt"`
			ExtendedL2      *bool        `json:"extended-l2"`
			Bitmaps         []qemuBitmap `json:"bitmaps"`
		} `json:"data"`
	} `json:"format-specific"`
}

type qemuBitmap struct {
	Name        string   `json:"name"`
	Granularity uint64   `json:"granularity"`
	Flags       []string `json:"flags"`
}

func (b *qemuBitmap) inUse() bool { return b != nil && slices.Contains(b.Flags, "in-use") }

type qemuSnapshot struct {
	ID          string `json:"id"`
	Name        string `json:"name"`
	DateSec     uint32 `json:"date-sec"`
	DateNsec    uint32 `json:"date-nsec"`
	VMClockSec  uint64 `json:"vm-clock-sec"`
	VMClockNsec uint64 `json:"vm-clock-nsec"`
	VMStateSize uint64 `json:"vm-state-size"`
	ICount      *int64 `json:"icount"`
}

func (q *qemuInfo) bitmaps() []qemuBitmap {
	if q.FormatSpecific == nil {
		return nil
	}
	return q.FormatSpecific.Data.Bitmaps
}

func (q *qemuInfo) bitmap(name string) *qemuBitmap {
	for i, b := range q.bitmaps() {
		if b.Name == name {
			return &q.bitmaps()[i]
		}
	}
	return nil
}

// chainBitmapNames returns every bitmap name of the chain, sorted.
func chainBitmapNames(layers []qemuInfo) []string {
	var names []string
	for _, l := range layers {
		for _, b := range l.bitmaps() {
			if !slices.Contains(names, b.Name) {
				names = append(names, b.Name)
			}
		}
	}
	slices.Sort(names)
	return names
}

// holdersOf returns the indexes (0 = top) of the layers holding name.
func holdersOf(layers []qemuInfo, name string) []int {
	var h []int
	for i := range layers {
		if layers[i].bitmap(name) != nil {
			h = append(h, i)
		}
	}
	return h
}

// ---------------------------------------------------------------------------
// Replay.

type golden struct {
	fx      fixture
	dir     string
	sha     string
	size    int64
	info    []qemuInfo
	infoRaw []map[string]any
}

func loadGolden(t *testing.T, fx fixture) *golden {
	t.Helper()
	g := &golden{fx: fx, dir: filepath.Join(goldenDir, fx.name)}
	b, err := os.ReadFile(filepath.Join(g.dir, "raw.sha256"))
	if err != nil {
		t.Fatalf("%v (record the expectations with: go test ./qcow/ -run TestFixtures -update)", err)
	}
	if _, err := fmt.Sscanf(string(b), "%s %d", &g.sha, &g.size); err != nil {
		t.Fatalf("raw.sha256: %v", err)
	}
	info := g.read(t, "info.json")
	if err := json.Unmarshal(info, &g.info); err != nil {
		t.Fatalf("info.json: %v", err)
	}
	if err := json.Unmarshal(info, &g.infoRaw); err != nil {
		t.Fatalf("info.json: %v", err)
	}
	return g
}

func (g *golden) read(t *testing.T, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(g.dir, name))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func (g *golden) exists(name string) bool {
	_, err := os.Stat(filepath.Join(g.dir, name))
	return err == nil
}

// checkContent reads the whole disk in odd-sized chunks and compares its
// hash with qemu-img convert's.
func checkContent(t *testing.T, img *qcow.Image, g *golden) {
	if got := img.Size(); got != uint64(g.size) {
		t.Fatalf("Size() = %d, want %d", got, g.size)
	}
	h := sha256.New()
	buf := make([]byte, 65537)
	for off := int64(0); off < g.size; {
		n, err := img.ReadAt(buf, off)
		if err != nil && !(errors.Is(err, io.EOF) && off+int64(n) == g.size) {
			t.Fatalf("ReadAt(%d, %d) = %d, %v", len(buf), off, n, err)
		}
		if n == 0 {
			t.Fatalf("ReadAt(%d, %d) made no progress", len(buf), off)
		}
		h.Write(buf[:n])
		off += int64(n)
	}
	if got := hex.EncodeToString(h.Sum(nil)); got != g.sha {
		t.Errorf("sha256 of the disk read through ReadAt = %s, want %s (qemu-img convert -O raw)", got, g.sha)
	}
	// At and past the end.
	if n, err := img.ReadAt(buf[:1], g.size); n != 0 || err != io.EOF {
		t.Errorf("ReadAt(1, size) = %d, %v; want 0, EOF", n, err)
	}
	if n, err := img.ReadAt(nil, g.size); n != 0 || err != nil {
		t.Errorf("ReadAt(0, size) = %d, %v; want 0, nil", n, err)
	}
	if _, err := img.ReadAt(buf[:1], -1); err == nil {
		t.Errorf("ReadAt(1, -1) succeeded")
	}
}

type window struct {
	off, n, got int64
	sha         string
}

func (g *golden) windows(t *testing.T) []window {
	var ws []window
	sc := bufio.NewScanner(bytes.NewReader(g.read(t, "windows.txt")))
	for sc.Scan() {
		var w window
		if _, err := fmt.Sscanf(sc.Text(), "%d %d %d %s", &w.off, &w.n, &w.got, &w.sha); err != nil {
			t.Fatalf("windows.txt: %q: %v", sc.Text(), err)
		}
		ws = append(ws, w)
	}
	return ws
}

// checkWindows reads the recorded random windows, from par goroutines.
func checkWindows(t *testing.T, img *qcow.Image, g *golden, par int) {
	ws := g.windows(t)
	var wg sync.WaitGroup
	for p := range par {
		wg.Go(func() {
			for i := p; i < len(ws); i += par {
				w := ws[i]
				buf := make([]byte, w.n)
				n, err := img.ReadAt(buf, w.off)
				wantErr := error(nil)
				if w.got < w.n {
					wantErr = io.EOF
				}
				if int64(n) != w.got || err != wantErr {
					t.Errorf("ReadAt(len %d, off %d) = %d, %v; want %d, %v", w.n, w.off, n, err, w.got, wantErr)
					continue
				}
				if s := sha256.Sum256(buf[:n]); hex.EncodeToString(s[:]) != w.sha {
					t.Errorf("ReadAt(len %d, off %d): content differs from qemu-img convert's", w.n, w.off)
				}
			}
		})
	}
	wg.Wait()
}

func checkListing(t *testing.T, g *golden, file string, l *report.Listing) {
	t.Helper()
	for _, f := range []struct {
		ext string
		got []byte
	}{{".txt", l.Text()}, {".json", l.JSON()}} {
		want := g.read(t, file+f.ext)
		if !bytes.Equal(f.got, want) {
			t.Errorf("%s%s differs from nbdinfo's:\n--- got\n%s--- want\n%s", file, f.ext, f.got, want)
		}
	}
}

func checkDepth(t *testing.T, img *qcow.Image, g *golden) {
	l, err := report.Depth(img)
	if err != nil {
		t.Fatal(err)
	}
	checkListing(t, g, "depth", l)
}

// checkAllocation compares base:allocation with nbdinfo's. design.md
// allows one difference: qemu may report zero inside a data cluster that
// lies partly past the end of the host file, where the engine may say
// data. Any such difference is accepted only where the disk reads zeros
// and the depth listing says allocated, and is logged.
func checkAllocation(t *testing.T, img *qcow.Image, g *golden) {
	l, err := report.Allocation(img)
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Equal(l.Text(), g.read(t, "allocation.txt")) {
		checkListing(t, g, "allocation", l)
		return
	}
	want := parseText(t, g.read(t, "allocation.txt"))
	got := parseText(t, l.Text())
	for _, d := range diffExtents(got, want) {
		ok := d.got == 0 && d.want&2 != 0 && readsZero(t, img, d.off, d.n)
		if !ok {
			t.Errorf("allocation differs from nbdinfo's at [%d, +%d): type %d, want %d\n--- got\n%s--- want\n%s",
				d.off, d.n, d.got, d.want, l.Text(), g.read(t, "allocation.txt"))
			return
		}
		t.Logf("allowed difference: [%d, +%d) is data, qemu says type %d (zero past the host file's end)", d.off, d.n, d.want)
	}
}

type textExtent struct {
	off, n uint64
	typ    uint32
}

func parseText(t *testing.T, b []byte) []textExtent {
	t.Helper()
	var out []textExtent
	for line := range strings.Lines(string(b)) {
		f := strings.Fields(line)
		if len(f) < 3 {
			t.Fatalf("bad map line %q", line)
		}
		off, err1 := strconv.ParseUint(f[0], 10, 64)
		n, err2 := strconv.ParseUint(f[1], 10, 64)
		typ, err3 := strconv.ParseUint(f[2], 10, 32)
		if err := errors.Join(err1, err2, err3); err != nil {
			t.Fatalf("bad map line %q: %v", line, err)
		}
		out = append(out, textExtent{off, n, uint32(typ)})
	}
	return out
}

type extentDiff struct {
	off, n    uint64
	got, want uint32
}

// diffExtents returns the ranges where two tilings of the disk disagree.
func diffExtents(got, want []textExtent) []extentDiff {
	var out []extentDiff
	i, j := 0, 0
	for i < len(got) && j < len(want) {
		a, b := got[i], want[j]
		lo := max(a.off, b.off)
		hi := min(a.off+a.n, b.off+b.n)
		if lo < hi && a.typ != b.typ {
			if k := len(out) - 1; k >= 0 && out[k].off+out[k].n == lo && out[k].got == a.typ && out[k].want == b.typ {
				out[k].n += hi - lo
			} else {
				out = append(out, extentDiff{lo, hi - lo, a.typ, b.typ})
			}
		}
		if a.off+a.n <= b.off+b.n {
			i++
		} else {
			j++
		}
	}
	return out
}

func readsZero(t *testing.T, img *qcow.Image, off, n uint64) bool {
	buf := make([]byte, n)
	if _, err := img.ReadAt(buf, int64(off)); err != nil && err != io.EOF {
		t.Fatal(err)
	}
	return !slices.ContainsFunc(buf, func(c byte) bool { return c != 0 })
}

// checkExtentWindows checks that Extents over sub-ranges of the disk gives
// the recorded depth listing clipped to the range, and that it stops when
// told to.
func checkExtentWindows(t *testing.T, img *qcow.Image, g *golden) {
	whole := parseText(t, g.read(t, "depth.txt"))
	for _, w := range g.windows(t) {
		off, n := uint64(w.off), uint64(w.n)
		var got []textExtent
		var prev qcow.Extent
		err := img.Extents(off, n, func(e qcow.Extent) bool {
			switch {
			case e.Len == 0:
				t.Errorf("Extents(%d, %d): empty extent at %d", off, n, e.Off)
			case len(got) > 0 && prev.Off+prev.Len != e.Off:
				t.Errorf("Extents(%d, %d): extent at %d does not follow [%d, +%d)", off, n, e.Off, prev.Off, prev.Len)
			case len(got) > 0 && prev.Depth == e.Depth && prev.Zero == e.Zero:
				t.Errorf("Extents(%d, %d): adjacent equal extents not merged at %d", off, n, e.Off)
			}
			prev = e
			got = append(got, textExtent{e.Off, e.Len, uint32(e.Depth)})
			return true
		})
		if err != nil {
			t.Fatalf("Extents(%d, %d): %v", off, n, err)
		}
		var want []textExtent
		end := min(off+n, uint64(g.size))
		for _, e := range whole {
			lo, hi := max(e.off, off), min(e.off+e.n, end)
			if lo < hi {
				want = append(want, textExtent{lo, hi - lo, e.typ})
			}
		}
		// Extents merges on (Depth, Zero); the depth listing only on
		// depth, so merge again before comparing.
		got = mergeExtents(got)
		if !slices.Equal(got, want) {
			t.Errorf("Extents(%d, %d) depths = %v, want %v", off, n, got, want)
		}
	}
	// Stopping early.
	calls := 0
	if err := img.Extents(0, img.Size(), func(qcow.Extent) bool { calls++; return false }); err != nil {
		t.Fatal(err)
	}
	if img.Size() > 0 && calls != 1 {
		t.Errorf("Extents called fn %d times after it returned false, want 1", calls)
	}
	// Empty and out-of-range requests call nothing.
	for _, r := range [][2]uint64{{0, 0}, {img.Size(), 1}, {img.Size() + 512, 1 << 20}, {1<<64 - 1, 1}} {
		if err := img.Extents(r[0], r[1], func(e qcow.Extent) bool {
			t.Errorf("Extents(%d, %d) yielded %+v", r[0], r[1], e)
			return true
		}); err != nil {
			t.Errorf("Extents(%d, %d): %v", r[0], r[1], err)
		}
	}
}

func mergeExtents(es []textExtent) []textExtent {
	var out []textExtent
	for _, e := range es {
		if k := len(out) - 1; k >= 0 && out[k].typ == e.typ && out[k].off+out[k].n == e.off {
			out[k].n += e.n
			continue
		}
		out = append(out, e)
	}
	return out
}

// checkLayers compares Layers() with qemu-img info, field by field, and
// report.Image's JSON with qemu's (apart from actual-size, which depends
// on the host file system).
func checkLayers(t *testing.T, img *qcow.Image, g *golden) {
	ls, err := img.Layers()
	if err != nil {
		t.Fatal(err)
	}
	if len(ls) != len(g.info) {
		t.Fatalf("Layers() has %d layers, qemu-img info %d", len(ls), len(g.info))
	}
	for i, q := range g.info {
		l := ls[i]
		eq := func(field string, got, want any) {
			t.Helper()
			if fmt.Sprint(got) != fmt.Sprint(want) {
				t.Errorf("layer %d (%s): %s = %v, want %v", i+1, q.Filename, field, got, want)
			}
		}
		eq("filename", l.Filename, q.Filename)
		eq("format", l.Format, q.Format)
		eq("virtual-size", l.VirtualSize, q.VirtualSize)
		eq("backing-filename", l.BackingFilename, q.BackingFilename)
		eq("full-backing-filename", l.FullBackingFilename, q.FullBackingFilename)
		eq("backing-filename-format", l.BackingFormat, q.BackingFormat)
		eq("dirty-flag", l.DirtyFlag, q.DirtyFlag)
		if q.Format != "qcow2" {
			continue
		}
		d := q.FormatSpecific.Data
		eq("cluster-size", l.ClusterSize, q.ClusterSize)
		eq("compat", l.Compat, d.Compat)
		eq("compression-type", l.CompressionType, d.CompressionType)
		eq("refcount-bits", l.RefcountBits, d.RefcountBits)
		if d.LazyRefcounts != nil {
			eq("lazy-refcounts", l.LazyRefcounts, *d.LazyRefcounts)
		}
		if d.ExtendedL2 != nil {
			eq("extended-l2", l.ExtendedL2, *d.ExtendedL2)
		}
		var bms []qemuBitmap
		for _, b := range l.Bitmaps {
			bms = append(bms, qemuBitmap{Name: b.Name, Granularity: b.Granularity, Flags: b.Flags()})
		}
		eq("bitmaps", bms, d.Bitmaps)
		var snaps []qemuSnapshot
		for _, s := range l.Snapshots {
			qs := qemuSnapshot{
				ID: s.ID, Name: s.Name, DateSec: s.DateSec, DateNsec: s.DateNsec,
				VMClockSec: s.VMClockNsec / 1e9, VMClockNsec: s.VMClockNsec % 1e9, VMStateSize: s.VMStateSize,
			}
			if s.ICount != -1 {
				qs.ICount = &s.ICount
			}
			snaps = append(snaps, qs)
		}
		eq("snapshots", fmtSnapshots(snaps), fmtSnapshots(q.Snapshots))
	}

	for i, l := range ls {
		var got map[string]any
		if err := json.Unmarshal(report.JSON(report.Image(l)), &got); err != nil {
			t.Fatal(err)
		}
		want := maps.Clone(g.infoRaw[i])
		delete(got, "actual-size")
		delete(want, "actual-size")
		gb, _ := json.Marshal(got) // map keys are sorted
		wb, _ := json.Marshal(want)
		if !bytes.Equal(gb, wb) {
			t.Errorf("layer %d: report.Image JSON differs from qemu-img info:\n got %s\nwant %s", i+1, gb, wb)
		}
	}
}

func fmtSnapshots(ss []qemuSnapshot) string {
	var b strings.Builder
	for _, s := range ss {
		ic := "none"
		if s.ICount != nil {
			ic = strconv.FormatInt(*s.ICount, 10)
		}
		fmt.Fprintf(&b, "{%s %q %d.%09d vm %d.%09d state %d icount %s}", s.ID, s.Name, s.DateSec, s.DateNsec, s.VMClockSec, s.VMClockNsec, s.VMStateSize, ic)
	}
	return b.String()
}

// checkBitmaps compares Bitmaps() with what qemu-img info says of each
// layer, and each bitmap's listing with nbdinfo's.
func checkBitmaps(t *testing.T, img *qcow.Image, g *golden) {
	names := chainBitmapNames(g.info)
	bms := img.Bitmaps()
	var got []string
	for _, b := range bms {
		got = append(got, b.Name)
	}
	if !slices.Equal(got, names) {
		t.Fatalf("Bitmaps() names = %q, want %q", got, names)
	}
	for _, b := range bms {
		holders := holdersOf(g.info, b.Name)
		top := g.info[holders[0]].bitmap(b.Name)
		var depths []int
		inUse := false
		for _, h := range holders {
			depths = append(depths, h+1)
			inUse = inUse || g.info[h].bitmap(b.Name).inUse()
		}
		enabled := holders[0] == 0 && slices.Contains(top.Flags, "auto")
		if b.Granularity != top.Granularity || b.InUse != inUse || b.Enabled != enabled || !slices.Equal(b.Layers, depths) {
			t.Errorf("Bitmaps(): %q = granularity %d, in use %v, enabled %v, layers %v; want %d, %v, %v, %v",
				b.Name, b.Granularity, b.InUse, b.Enabled, b.Layers, top.Granularity, inUse, enabled, depths)
		}

		m, err := img.Bitmap(b.Name)
		if g.exists("bitmap-" + b.Name + ".err") {
			if !errors.Is(err, qcow.ErrInconsistent) {
				t.Errorf("Bitmap(%q) = %v; want ErrInconsistent (qemu-nbd refused it: %s)", b.Name, err,
					bytes.TrimSpace(g.read(t, "bitmap-"+b.Name+".err")))
			}
			if b.DirtyBytes != 0 {
				t.Errorf("Bitmaps(): %q DirtyBytes = %d for an inconsistent bitmap, want 0", b.Name, b.DirtyBytes)
			}
			continue
		}
		if err != nil {
			t.Errorf("Bitmap(%q): %v", b.Name, err)
			continue
		}
		if m.Granularity() != top.Granularity || m.Size() != uint64(g.size) {
			t.Errorf("Bitmap(%q): granularity %d, size %d; want %d, %d", b.Name, m.Granularity(), m.Size(), top.Granularity, g.size)
		}
		checkListing(t, g, "bitmap-"+b.Name, report.Bitmap(b.Name, m))
		var dirty uint64
		for _, e := range parseText(t, g.read(t, "bitmap-"+b.Name+".txt")) {
			if e.typ == 1 {
				dirty += e.n
			}
		}
		if b.DirtyBytes != dirty {
			t.Errorf("Bitmaps(): %q DirtyBytes = %d, want %d (from nbdinfo's map)", b.Name, b.DirtyBytes, dirty)
		}
	}
	if _, err := img.Bitmap("no such bitmap"); !errors.Is(err, qcow.ErrNoBitmap) {
		t.Errorf("Bitmap(missing) = %v, want ErrNoBitmap", err)
	}
}
