package integration

import (
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/cbtfs/cbtfs/internal/testutil"
)

// This file and the other nbd*_test.go files hold the acceptance tests of
// issue 6: cbtfs serve and cbtfs mount --nbd, run as separate processes,
// against qemu-nbd serving the same images, and with qemu-io, qemu-img,
// nbdinfo, nbdcopy and a raw-socket client as clients.

// Meta context names (formats.md C.1).
const (
	nbdCtxBase   = "base:allocation"
	nbdCtxDepth  = "qemu:allocation-depth"
	nbdCtxBitmap = "qemu:dirty-bitmap:"
)

// nbdCase is one image or chain served by both cbtfs and qemu-nbd.
type nbdCase struct {
	name string
	// img is the top image cbtfs serves.
	img string
	// qemuImg is the image qemu-nbd serves: img itself, or a copy of the
	// chain in which each same-named bitmap of the backing layers was
	// merged into the top's, since qemu-nbd -B exports one layer's bitmap
	// and cbtfs the union across the chain (design.md).
	qemuImg string
	// bitmaps are the consistent bitmap names of the chain, sorted as
	// cbtfs lists them.
	bitmaps []string
	// hidden are bitmaps left in use by a crash: inconsistent, so not
	// exported.
	hidden []string
	// mapsOnly skips nbdcopy and qemu-img compare, which take half a
	// minute on an image of 262144 extents (with qemu-nbd too).
	mapsOnly bool
}

// qemuBitmapArgs returns qemu-nbd's -B options for names. qemu-nbd 7.2
// lists the contexts of "-B a -B c" as c, then a (formats.md C.1), and
// cbtfs sorts them by name: -B in reverse order lists them in the same
// order.
func qemuBitmapArgs(names []string) []string {
	var args []string
	for _, n := range slices.Backward(names) {
		args = append(args, "-B", n)
	}
	return args
}

// nbdAddBitmap runs `qemu-img bitmap --add [opts...] img name`.
func nbdAddBitmap(t *testing.T, img, name string, opts ...string) {
	t.Helper()
	args := append([]string{"bitmap", "--add"}, opts...)
	testutil.Img(t, append(args, img, name)...)
}

// nbdCases builds the images compared with qemu-nbd. Data is written in
// whole clusters wherever a cluster is first allocated: qemu reports the
// never-written part of a partly written fresh cluster as "zero" (a hole
// in the host file), which design.md lets cbtfs report as data. Partial
// writes go to clusters that are already fully allocated, or over backing
// data (copy-on-write then writes the whole cluster).
func nbdCases(t *testing.T, dir string) []nbdCase {
	b := &builder{t: t, dir: dir}
	var cases []nbdCase

	// One layer: bitmaps of granularities 512 B to 1 MiB, one disabled
	// halfway, one left in use by a crash (inconsistent: neither cbtfs nor
	// qemu-nbd export it); data, compressed, zero (plain and allocated)
	// and unmapped clusters.
	img := b.qcow2("bitmaps/disk.qcow2", "8M")
	nbdAddBitmap(t, img, "broken")
	b.io(img, "write -P 9 7M 64k")
	// qemu-io's abort kills it with SIGABRT, leaving "broken" in use.
	if _, _, err := testutil.RunErr(t, "qemu-io", "-f", "qcow2", "-c", "write -P 9 7M 64k", "-c", "abort", img); testutil.ExitCode(err) != -1 {
		t.Fatalf("qemu-io ... abort: %v, want it killed by SIGABRT", err)
	}
	b.io(img, "write -P 1 0 2M") // before the bitmaps: untracked
	nbdAddBitmap(t, img, "g512", "-g", "512")
	nbdAddBitmap(t, img, "g4k", "-g", "4k")
	nbdAddBitmap(t, img, "g64k")
	nbdAddBitmap(t, img, "g1m", "-g", "1M")
	nbdAddBitmap(t, img, "off")
	b.io(img, "write -P 5 1000 3000", "write -P 6 70000 200000", "write -c -P 2 2M 256k",
		"write -z 3M 128k", "write -P 3 4M 128k", "write -z 4M 64k", "write -z -u 4160k 64k")
	testutil.Img(t, "bitmap", "--disable", img, "off")
	b.io(img, "write -P 7 6M 64k", "write -P 8 6292456 1")
	b.requireCompressed(img)
	b.requireZeroAlloc(img)
	cases = append(cases, nbdCase{name: "bitmaps", img: img, qemuImg: img, bitmaps: []string{"g1m", "g4k", "g512", "g64k", "off"}, hidden: []string{"broken"}})

	// Two layers: formats.md F with whole-cluster writes, a bitmap in the
	// top and another only in the base (qemu-nbd -B finds it there).
	base := b.qcow2("chain/cb.qcow2", "4M")
	nbdAddBitmap(t, base, "old")
	b.io(base, "write -P 1 0 1M", "write -z 3M 64k")
	top := b.overlay("chain/ct.qcow2", "cb.qcow2", "qcow2", "")
	nbdAddBitmap(t, top, "bm0")
	b.io(top, "write -P 2 512k 256k", "write -z 2M 128k", "write -P 3 2560k 64k", "write -P 4 100000 1000")
	cases = append(cases, nbdCase{name: "chain", img: top, qemuImg: top, bitmaps: []string{"bm0", "old"}})

	// Same-named bitmaps in both layers (an external snapshot copies them
	// into the new overlay), one with different granularities, and one
	// only in the top.
	base = b.qcow2("same/base.qcow2", "8M")
	b.io(base, "write -P 1 0 4M")
	nbdAddBitmap(t, base, "cbt")
	nbdAddBitmap(t, base, "mix", "-g", "4k")
	b.io(base, "write -P 2 100000 5000", "write -P 3 1M 64k", "write -P 4 3M 300000")
	top = b.overlay("same/top.qcow2", "base.qcow2", "qcow2", "")
	nbdAddBitmap(t, top, "cbt")
	nbdAddBitmap(t, top, "mix")
	nbdAddBitmap(t, top, "new", "-g", "4k")
	b.io(top, "write -P 5 2M 64k", "write -P 6 300000 10000", "write -z 1M 64k", "write -P 7 5M 192k", "write -z 6M 64k")
	// qemu-nbd's view: the base's bitmaps merged into the top's, in a copy.
	qdir := filepath.Join(dir, "same-merged")
	if err := os.MkdirAll(qdir, 0o755); err != nil {
		t.Fatal(err)
	}
	testutil.CopyFile(t, base, filepath.Join(qdir, "base.qcow2"))
	qtop := filepath.Join(qdir, "top.qcow2")
	testutil.CopyFile(t, top, qtop)
	for _, n := range []string{"cbt", "mix"} {
		testutil.Img(t, "bitmap", "--merge", n, "-b", filepath.Join(qdir, "base.qcow2"), "-F", "qcow2", qtop, n)
	}
	cases = append(cases, nbdCase{name: "same-named", img: top, qemuImg: qtop, bitmaps: []string{"cbt", "mix", "new"}})

	// Three layers over a sparse raw base (2 MiB of data, then a hole),
	// 512-byte clusters in the middle.
	raw := b.raw("raw3/base.raw", 2<<20, pattern(3))
	if err := os.Truncate(raw, 4<<20); err != nil {
		t.Fatal(err)
	}
	mid := b.overlay("raw3/mid.qcow2", "base.raw", "raw", "", "-o", "cluster_size=512")
	nbdAddBitmap(t, mid, "m", "-g", "512")
	b.io(mid, "write -P 1 1000 3000", "write -z 1M 512", "write -P 2 3M 4096")
	top = b.overlay("raw3/top.qcow2", "mid.qcow2", "qcow2", "")
	nbdAddBitmap(t, top, "t")
	b.io(top, "write -P 3 64k 64k", "write -z 3M 64k", "write -P 4 1536k 128k")
	cases = append(cases, nbdCase{name: "raw-base", img: top, qemuImg: top, bitmaps: []string{"m", "t"}})

	if testing.Short() {
		return cases
	}
	// More extents than one BLOCK_STATUS chunk carries (qemu: 131072):
	// 512-byte clusters, every other one data, over 128 MiB.
	many := b.raw("many/src.raw", 128<<20, func(off int64, p []byte) {
		for i := range p {
			if (off+int64(i))&512 == 0 {
				p[i] = 0x5a
			}
		}
	})
	img = b.convert(many, "many/many.qcow2", "-f", "raw", "-S", "512", "-o", "cluster_size=512")
	cases = append(cases, nbdCase{name: "many-extents", img: img, qemuImg: img, mapsOnly: true})
	return cases
}

// nbdJSON decodes nbdinfo's JSON output and drops the "uri" keys, which
// name the socket.
func nbdJSON(t *testing.T, s string) any {
	t.Helper()
	var v any
	if err := json.Unmarshal([]byte(s), &v); err != nil {
		t.Fatalf("bad nbdinfo JSON %q: %v", s, err)
	}
	var strip func(any)
	strip = func(v any) {
		switch v := v.(type) {
		case map[string]any:
			delete(v, "uri")
			for _, x := range v {
				strip(x)
			}
		case []any:
			for _, x := range v {
				strip(x)
			}
		}
	}
	strip(v)
	return v
}

// nbdSameJSON compares `nbdinfo ARGS... URI` of cbtfs and qemu-nbd, uri
// keys aside.
func nbdSameJSON(t *testing.T, cbtfsURI, qemuURI string, args ...string) {
	t.Helper()
	got := testutil.Run(t, "nbdinfo", append(args, cbtfsURI)...)
	want := testutil.Run(t, "nbdinfo", append(args, qemuURI)...)
	if g, w := nbdJSON(t, got), nbdJSON(t, want); !reflect.DeepEqual(g, w) {
		t.Errorf("nbdinfo %s:\ncbtfs:\n%s\nqemu-nbd:\n%s", strings.Join(args, " "), got, want)
	}
}

// nbdSameMaps compares nbdinfo --map for each context, text and JSON.
func nbdSameMaps(t *testing.T, cbtfsURI, qemuURI string, contexts ...string) {
	t.Helper()
	for _, ctx := range contexts {
		for _, js := range []bool{false, true} {
			got := testutil.NbdinfoMap(t, cbtfsURI, ctx, js)
			if want := testutil.NbdinfoMap(t, qemuURI, ctx, js); got != want {
				t.Errorf("nbdinfo --map=%s (json %v):\ncbtfs:\n%s\nqemu-nbd:\n%s", ctx, js, got, want)
			}
		}
	}
}

// TestNBDSameAsQemuNBD serves each image of nbdCases with `cbtfs serve
// --read-only` and with `qemu-nbd -r -A -B NAME...` at the same time, and
// requires the same answers to nbdinfo --list --json, nbdinfo --json,
// nbdinfo --map (text and JSON) for every context; and that nbdcopy and
// qemu-img compare read the image's content.
//
// cbtfs advertises every consistent bitmap and always
// qemu:allocation-depth, so qemu-nbd gets -A and a -B for each. cbtfs
// advertises NBD_FLAG_CAN_MULTI_CONN (one engine serves every connection
// and a flush flushes it); qemu-nbd 7.2 sets it only when it accepts
// several clients: with `-e 2` or more it does, read-only or writable
// (checked here), and the flags are then identical, so qemu-nbd runs with
// -e 2.
func TestNBDSameAsQemuNBD(t *testing.T) {
	for _, tool := range []string{"qemu-img", "qemu-io", "qemu-nbd", "nbdinfo", "nbdcopy"} {
		testutil.RequireTool(t, tool)
	}
	dir := t.TempDir()
	for _, c := range nbdCases(t, dir) {
		t.Run(c.name, func(t *testing.T) {
			cb := testutil.ServeNBD(t, cbtfs, c.img, testutil.ServeOptions{ReadOnly: true})
			qargs := append([]string{"-r", "-e", "2", "-f", "qcow2", "-A"}, qemuBitmapArgs(c.bitmaps)...)
			q := testutil.StartQemuNBD(t, c.qemuImg, qargs...)

			nbdSameJSON(t, cb.URI, q.URI, "--list", "--json")
			nbdSameJSON(t, cb.URI, q.URI, "--json")
			// The contexts are cbtfs's own list (nbdSameJSON compared it
			// with qemu-nbd's), in its order.
			want := []string{nbdCtxBase, nbdCtxDepth}
			for _, n := range c.bitmaps {
				want = append(want, nbdCtxBitmap+n)
			}
			var info struct {
				Exports []struct {
					Contexts []string `json:"contexts"`
				} `json:"exports"`
			}
			if err := json.Unmarshal([]byte(testutil.Run(t, "nbdinfo", "--json", cb.URI)), &info); err != nil {
				t.Fatal(err)
			}
			if len(info.Exports) != 1 || !slices.Equal(info.Exports[0].Contexts, want) {
				t.Errorf("cbtfs contexts %+v, want %q", info.Exports, want)
			}

			nbdSameMaps(t, cb.URI, q.URI, want...)
			nbdSameBlockStatus(t, cb.Addr, "unix:"+q.Socket, want, nbdSize(t, c.img))
			for _, n := range c.hidden {
				// qemu-nbd -B refuses to start with it; cbtfs does not
				// offer it, and a client asking for it gets nothing.
				cl, err := testutil.DialNBD(cb.Addr)
				if err != nil {
					t.Fatal(err)
				}
				nbdMust(t, "start", cl.Start(testutil.NBDFlagFixed|testutil.NBDFlagNoZeroes))
				nbdMust(t, "structured replies", cl.StructuredReplies())
				nbdMust(t, "SET_META_CONTEXT", cl.SetMetaContext("", nbdCtxBitmap+n))
				if len(cl.Contexts) != 0 {
					t.Errorf("SET_META_CONTEXT %s%s selected %v, want nothing (the bitmap is in use)", nbdCtxBitmap, n, cl.Contexts)
				}
				cl.Close()
			}
			got := testutil.Run(t, "nbdinfo", "--map", "--totals", cb.URI)
			if exp := testutil.Run(t, "nbdinfo", "--map", "--totals", q.URI); got != exp {
				t.Errorf("nbdinfo --map --totals:\ncbtfs:\n%s\nqemu-nbd:\n%s", got, exp)
			}

			if c.mapsOnly {
				return
			}
			out := filepath.Join(t.TempDir(), "copy.raw")
			testutil.Run(t, "nbdcopy", cb.URI, out)
			if !testutil.Compare(t, out, c.img, "-f", "raw", "-F", "qcow2") {
				t.Errorf("nbdcopy of cbtfs's export differs from %s", c.img)
			}
			if !testutil.Compare(t, cb.URI, c.img, "-f", "raw", "-F", "qcow2") {
				t.Errorf("qemu-img compare: cbtfs's export differs from %s", c.img)
			}
		})
	}

	// The flags of a writable export: each server gets its own copy.
	t.Run("writable", func(t *testing.T) {
		b := &builder{t: t, dir: t.TempDir()}
		img := b.qcow2("w.qcow2", "4M")
		nbdAddBitmap(t, img, "a")
		nbdAddBitmap(t, img, "b", "-g", "4k")
		b.io(img, "write -P 1 0 1M", "write -z 2M 64k")
		qimg, q1img := b.path("q.qcow2"), b.path("q1.qcow2")
		testutil.CopyFile(t, img, qimg)
		testutil.CopyFile(t, img, q1img)
		cb := testutil.ServeNBD(t, cbtfs, img, testutil.ServeOptions{})
		q := testutil.StartQemuNBD(t, qimg, append([]string{"-e", "2", "-f", "qcow2", "-A"}, qemuBitmapArgs([]string{"a", "b"})...)...)
		nbdSameJSON(t, cb.URI, q.URI, "--list", "--json")
		// qemu-nbd with one client (-e 1, its default) does not offer
		// multi-conn; cbtfs always does.
		q1 := testutil.StartQemuNBD(t, q1img, "-f", "qcow2")
		if _, _, err := testutil.RunErr(t, "nbdinfo", "--can", "multi-conn", q1.URI); testutil.ExitCode(err) != 2 {
			t.Errorf("qemu-nbd -e 1: nbdinfo --can multi-conn: %v, want exit status 2 (false)", err)
		}
	})
}

// nbdGranules is the expected content of one enabled bitmap: which
// granules writes have touched.
type nbdGranules struct {
	gran  int64
	dirty []bool
}

func newNBDGranules(size, gran int64) *nbdGranules {
	return &nbdGranules{gran: gran, dirty: make([]bool, (size+gran-1)/gran)}
}

// mark marks every granule [off, off+n) touches.
func (g *nbdGranules) mark(off, n int64) {
	if n <= 0 {
		return
	}
	for i := off / g.gran; i <= (off+n-1)/g.gran; i++ {
		g.dirty[i] = true
	}
}

// mapText returns what `nbdinfo --map=qemu:dirty-bitmap:NAME` prints for
// a disk of size bytes (formats.md C.6).
func (g *nbdGranules) mapText(size int64) string {
	var sb strings.Builder
	start := int64(0)
	for i := 1; i <= len(g.dirty); i++ {
		if i < len(g.dirty) && g.dirty[i] == g.dirty[i-1] {
			continue
		}
		end := min(int64(i)*g.gran, size)
		typ, descr := 0, "clean"
		if g.dirty[i-1] {
			typ, descr = 1, "dirty"
		}
		fmt.Fprintf(&sb, "%10d  %10d  %3d  %s\n", start, end-start, typ, descr)
		start = end
	}
	return sb.String()
}

// nbdModel is what a writable image must hold after a series of writes:
// its guest content and, for each bitmap, the granules written (a
// disabled bitmap is modelled as one that nothing marks).
type nbdModel struct {
	data    []byte
	bitmaps map[string]*nbdGranules
	enabled map[string]bool
}

// newNBDModel starts a model of img from its current content (qemu-img
// convert) and its bitmaps, all clean: name -> granularity; enabled says
// which of them writes mark.
func newNBDModel(t *testing.T, img string, grans map[string]int64, enabled ...string) *nbdModel {
	t.Helper()
	raw := filepath.Join(t.TempDir(), "model-start.raw")
	testutil.ConvertRaw(t, img, raw)
	data, err := os.ReadFile(raw)
	if err != nil {
		t.Fatal(err)
	}
	m := &nbdModel{data: data, bitmaps: map[string]*nbdGranules{}, enabled: map[string]bool{}}
	for n, g := range grans {
		m.bitmaps[n] = newNBDGranules(int64(len(data)), g)
	}
	for _, n := range enabled {
		m.enabled[n] = true
	}
	return m
}

// mark marks [off, off+n) in the enabled bitmaps.
func (m *nbdModel) mark(off, n int64) {
	for name, g := range m.bitmaps {
		if m.enabled[name] {
			g.mark(off, n)
		}
	}
}

// write records a write of p at off.
func (m *nbdModel) write(off int64, p []byte) {
	copy(m.data[off:], p)
	m.mark(off, int64(len(p)))
}

// fill records a write of n bytes of b at off (qemu-io write -P).
func (m *nbdModel) fill(off, n int64, b byte) {
	for i := range n {
		m.data[off+i] = b
	}
	m.mark(off, n)
}

// zero records a write of zeros (write zeroes, or a discard of whole
// clusters) over [off, off+n), which marks [markOff, markOff+markN).
func (m *nbdModel) zero(off, n, markOff, markN int64) {
	clear(m.data[off : off+n])
	m.mark(markOff, markN)
}

// names returns the bitmap names, sorted.
func (m *nbdModel) names() []string {
	var out []string
	for n := range m.bitmaps {
		out = append(out, n)
	}
	slices.Sort(out)
	return out
}

// checkServed checks what an NBD export of the image shows: the content
// (qemu-img compare against the model as a raw file) and each bitmap's
// map as nbdinfo prints it.
func (m *nbdModel) checkServed(t *testing.T, what, uri string) {
	t.Helper()
	raw := filepath.Join(t.TempDir(), "model.raw")
	if err := os.WriteFile(raw, m.data, 0o644); err != nil {
		t.Fatal(err)
	}
	if !testutil.Compare(t, raw, uri, "-f", "raw", "-F", "raw") {
		t.Errorf("%s: content differs from the model", what)
	}
	for _, n := range m.names() {
		got := testutil.NbdinfoMap(t, uri, nbdCtxBitmap+n, false)
		if want := m.bitmaps[n].mapText(int64(len(m.data))); got != want {
			t.Errorf("%s: nbdinfo --map=%s%s:\n%s\nwant:\n%s", what, nbdCtxBitmap, n, got, want)
		}
	}
}

// checkClosed checks the image after cbtfs closed it: qemu-img check
// finds nothing, the content and the bitmaps (through qemu-nbd -B) are
// the model's, and no bitmap is left in use.
func (m *nbdModel) checkClosed(t *testing.T, img string) {
	t.Helper()
	if r, code := testutil.Check(t, img); code != 0 {
		t.Errorf("qemu-img check %s: exit status %d: %+v", img, code, r)
	}
	nbdRequireNotInUse(t, img)
	q := testutil.StartQemuNBD(t, img, append([]string{"-r", "-f", "qcow2"}, qemuBitmapArgs(m.names())...)...)
	m.checkServed(t, "qemu-nbd after cbtfs closed the image", q.URI)
	q.Stop(t)
}

// nbdRequireNotInUse fails the test if a bitmap of img carries the
// in-use flag.
func nbdRequireNotInUse(t *testing.T, img string) {
	t.Helper()
	var info struct {
		FormatSpecific struct {
			Data struct {
				Bitmaps []struct {
					Name  string   `json:"name"`
					Flags []string `json:"flags"`
				} `json:"bitmaps"`
			} `json:"data"`
		} `json:"format-specific"`
	}
	if err := json.Unmarshal(testutil.InfoJSON(t, img, false), &info); err != nil {
		t.Fatal(err)
	}
	for _, b := range info.FormatSpecific.Data.Bitmaps {
		if slices.Contains(b.Flags, "in-use") {
			t.Errorf("%s: bitmap %s still in use after cbtfs exited: flags %q", img, b.Name, b.Flags)
		}
	}
}

// nbdSameBlockStatus sends the same BLOCK_STATUS requests, selecting
// every context, to cbtfs and qemu-nbd with a raw client, and requires
// the same extents for each context: unaligned ranges, REQ_ONE, the end
// of the disk, random ranges.
func nbdSameBlockStatus(t *testing.T, cbtfsAddr, qemuAddr string, contexts []string, size uint64) {
	t.Helper()
	c, err := testutil.DialNBDExport(cbtfsAddr, "", contexts...)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	q, err := testutil.DialNBDExport(qemuAddr, "", contexts...)
	if err != nil {
		t.Fatal(err)
	}
	defer q.Close()
	if len(c.Contexts) != len(contexts) || len(q.Contexts) != len(contexts) {
		t.Fatalf("SET_META_CONTEXT %q: cbtfs selected %v, qemu-nbd %v", contexts, c.Contexts, q.Contexts)
	}
	type req struct {
		off   uint64
		n     uint32
		flags uint16
	}
	reqs := []req{{0, uint32(size), 0}, {100, 1000, 0}, {100, 1000, testutil.NBDCmdFlagReqOne},
		{size - 70000, 70000, 0}, {size - 1, 1, testutil.NBDCmdFlagReqOne}, {65535, 2, 0}}
	rng := rand.New(rand.NewPCG(size, 1))
	for range 40 {
		off := rng.Uint64N(size)
		n := 1 + rng.Uint64N(min(size-off, 3<<20))
		reqs = append(reqs, req{off, uint32(n), uint16(rng.IntN(2)) * testutil.NBDCmdFlagReqOne})
	}
	for _, r := range reqs {
		got, err := c.BlockStatus(r.off, r.n, r.flags)
		if err != nil {
			t.Fatalf("cbtfs BLOCK_STATUS %+v: %v", r, err)
		}
		want, err := q.BlockStatus(r.off, r.n, r.flags)
		if err != nil {
			t.Fatalf("qemu-nbd BLOCK_STATUS %+v: %v", r, err)
		}
		for _, ctx := range contexts {
			if g, w := got[c.Contexts[ctx]], want[q.Contexts[ctx]]; !slices.Equal(g, w) {
				t.Errorf("BLOCK_STATUS %+v of %s:\ncbtfs    %v\nqemu-nbd %v", r, ctx, g, w)
			}
		}
	}
}

// nbdSize returns the virtual size of img.
func nbdSize(t *testing.T, img string) uint64 {
	t.Helper()
	var info struct {
		Size uint64 `json:"virtual-size"`
	}
	if err := json.Unmarshal(testutil.InfoJSON(t, img, false), &info); err != nil {
		t.Fatal(err)
	}
	return info.Size
}

// nbdMust fails the test on err.
func nbdMust(t *testing.T, what string, err error) {
	t.Helper()
	if err != nil {
		t.Fatalf("%s: %v", what, err)
	}
}
