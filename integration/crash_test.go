package integration

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/cbtfs/cbtfs/internal/testutil"
)

// This file holds the crash test of issue 4: a cbtfs mount, a separate
// process, is killed with SIGKILL in the middle of a write workload, again
// and again on the same images; after each kill the image must pass
// qemu-img check (leaks allowed), every write fsync'ed before the kill
// must read back, the bitmaps must be in use (or exact), and the next
// mount must work.

// crashKinds are the images of the crash test; each lives through
// crashRounds kills.
var crashKinds = []struct {
	name  string
	build func(b *builder) string
}{
	{"v3-c64k", func(b *builder) string {
		img := b.qcow2("a.qcow2", "24M")
		b.io(img, "write -P 0x71 0 4M", "write -z 8M 1M")
		return img
	}},
	{"c512-refcount64", func(b *builder) string {
		// One refblock covers 64 clusters (32 KiB): writes keep growing
		// the refcount table.
		return b.qcow2("a.qcow2", "8M", "-o", "cluster_size=512,refcount_bits=64")
	}},
	{"extl2-over-backing", func(b *builder) string {
		b.raw("base.raw", 16<<20, pattern(0x72))
		return b.overlay("a.qcow2", "base.raw", "raw", "", "-o", "extended_l2=on")
	}},
	{"snapshot-c4k", func(b *builder) string {
		img := b.qcow2("a.qcow2", "16M", "-o", "cluster_size=4k,refcount_bits=4")
		b.io(img, "write -P 0x73 0 12M")
		b.snapshot(img, "s1")
		return img
	}},
	{"v2-c4k-over-qcow2", func(b *builder) string {
		base := b.qcow2("base.qcow2", "16M", "-o", "cluster_size=2M")
		b.io(base, "write -P 0x74 0 16M")
		return b.overlay("a.qcow2", "base.qcow2", "qcow2", "", "-o", "compat=0.10,cluster_size=4k")
	}},
	{"refcount1-c2M", func(b *builder) string {
		img := b.qcow2("a.qcow2", "32M", "-o", "cluster_size=2M,refcount_bits=1")
		b.io(img, "write -P 0x75 1M 5M")
		return img
	}},
	{"compressed-zstd", func(b *builder) string {
		src := b.raw("src.raw", 16<<20, mixed(24<<10, 7))
		img := b.convert(src, "a.qcow2", "-f", "raw", "-c", "-o", "compression_type=zstd")
		b.requireCompressed(img)
		return img
	}},
}

// crashRounds is how many kills each image of crashKinds goes through
// (7 kinds x 10 = 70 kills).
const crashRounds = 10

// crashWriter is one writer of a crash round: it owns [lo, hi) of the
// disk, remembers what that range held at its last successful fsync, and
// the operations issued since (the last of which may have been cut short
// by the kill).
type crashWriter struct {
	lo, hi  int64
	durable []byte // the zone as of the last successful fsync
	pending []wOp  // issued since then, in order
	synced  []wOp  // every operation made durable by a fsync
	issued  []wOp  // every operation issued (all that may have reached the disk)
	syncs   int
	err     error // the error that ended the writer (the kill)
}

// TestCrashKill kills a read-write cbtfs mount with SIGKILL in the middle
// of a write workload (two writers on disjoint halves of the disk, random
// writes, zero-ranges and punch-holes with fsync'ed checkpoints), 10
// times on each of 7 images (one with an internal snapshot, one growing
// its refcount table, one extended-L2 over a backing file, a v2 one over
// a backing file, one with 1-bit refcounts and 2 MiB clusters, one
// compressed). The kill comes after a random delay, right after a fsync
// returned, while a fsync is running, or a few milliseconds after SIGTERM
// started the clean close (which stores the bitmaps). After each kill the
// stale mount is cleared, and:
//   - qemu-img check finds no corruption (exit 0, or 3 for leaks);
//   - every byte reads back as of its writer's last fsync, or as one of
//     the operations issued since;
//   - every bitmap that was consistent before the mount is in use, or
//     holds its old content plus at least the granules of the fsync'ed
//     operations and at most those of all issued ones;
//   - bitmaps found in use stay in use, and a close that finished left
//     none of the others in use.
//
// The next round's mount on the same image lists the in-use bitmaps as
// inconsistent. Every other round starts with fresh bitmaps (the in-use
// ones removed and added again with qemu-img). At the end a clean mount
// and unmount keeps the in-use flags, qemu-img check -r leaks repairs
// the leaks, and the internal snapshot still restores its data.
func TestCrashKill(t *testing.T) {
	testutil.RequireFUSE(t)
	testutil.RequireTool(t, "nbdinfo")
	t.Parallel()
	wRunPool(t, len(crashKinds), len(crashKinds), func(i int) (string, func(t *testing.T)) {
		k := crashKinds[i]
		return k.name, func(t *testing.T) {
			dir := t.TempDir()
			b := &builder{t: t, dir: filepath.Join(dir, "img")}
			img := k.build(b)
			var snaps []string
			for _, s := range wImgInfo(t, img).Snapshots {
				p := filepath.Join(dir, "snap-"+s.Name+".raw")
				testutil.Convert(t, img, p, "-O", "raw", "-l", s.Name)
				snaps = append(snaps, s.Name, p)
			}
			mnt := mkdir(t, dir, "mnt")
			for r := range crashRounds {
				if r%2 == 0 {
					crashFreshBitmaps(t, img)
				}
				seed := uint64(i*1000 + r)
				if !t.Run(fmt.Sprintf("round%d", r), func(t *testing.T) { crashRound(t, img, mnt, dir, seed) }) {
					t.FailNow()
				}
			}
			crashFinal(t, img, mnt, dir, snaps)
		}
	})
}

// crashFreshBitmaps replaces the bitmaps of img with the fresh, empty
// wAddBitmaps (unless img is a v2 image, which has no bitmaps).
func crashFreshBitmaps(t *testing.T, img string) {
	t.Helper()
	info := wImgInfo(t, img)
	if info.FormatSpecific.Data.Compat == "0.10" {
		return
	}
	for _, bm := range info.FormatSpecific.Data.Bitmaps {
		testutil.Img(t, "bitmap", "--remove", img, bm.Name)
	}
	wAddAll(t, img)
}

// crashRound runs one round of TestCrashKill.
func crashRound(t *testing.T, img, mnt, dir string, seed uint64) {
	info := wImgInfo(t, img)
	size := info.VirtualSize
	bitmaps := info.FormatSpecific.Data.Bitmaps
	var consistent []string
	for _, bm := range bitmaps {
		if !bm.inUse() {
			consistent = append(consistent, bm.Name)
		}
	}
	before := wBitmapMaps(t, img, consistent)
	ref := filepath.Join(dir, "ref.raw")
	testutil.ConvertRaw(t, img, ref)
	model, err := os.ReadFile(ref)
	if err != nil {
		t.Fatal(err)
	}

	m := testutil.MountRW(t, cbtfs, img, mnt, testutil.MountOptions{})
	// The mount lists in-use bitmaps as inconsistent, and only those.
	for _, bm := range bitmaps {
		text, err := os.ReadFile(filepath.Join(mnt, "bitmaps", bm.Name, "info"))
		if err != nil {
			t.Errorf("MNT/bitmaps/%s/info: %v", bm.Name, err)
			continue
		}
		inconsistent := strings.Contains(string(text), "in use: true") && strings.Contains(string(text), "inconsistent")
		if inconsistent != bm.inUse() {
			t.Errorf("MNT/bitmaps/%s/info with in-use=%v on disk:\n%s", bm.Name, bm.inUse(), text)
		}
		_, err = os.Stat(filepath.Join(mnt, "bitmaps", bm.Name, "extents"))
		if bm.inUse() != errors.Is(err, os.ErrNotExist) {
			t.Errorf("MNT/bitmaps/%s/extents of a bitmap with in-use=%v: stat: %v", bm.Name, bm.inUse(), err)
		}
	}

	rng := rand.New(rand.NewPCG(seed, 0xc0ffee))
	half := size / 2
	ws := []*crashWriter{
		{lo: 0, hi: half, durable: slices.Clone(model[:half])},
		{lo: half, hi: size, durable: slices.Clone(model[half:])},
	}
	// The kill: after a random delay, right after the k-th fsync
	// returned, while the k-th fsync runs, or (mode 3) after a random
	// delay once the writers have stopped and fsync'ed everything and
	// SIGTERM has started the clean close, which stores the bitmaps.
	mode, k := rng.IntN(4), 1+rng.IntN(3)
	delay := time.Duration(rng.IntN(400)) * time.Millisecond
	if mode == 3 {
		delay = time.Duration(rng.IntN(40000)) * time.Microsecond
	}
	var syncsMu sync.Mutex
	syncStarted, syncDone := 0, 0
	fire := make(chan struct{})
	var fireOnce sync.Once
	syncEvent := func(done bool) {
		syncsMu.Lock()
		defer syncsMu.Unlock()
		if done {
			syncDone++
		} else {
			syncStarted++
		}
		if (mode == 1 && done && syncDone == k) || (mode == 2 && !done && syncStarted == k) {
			fireOnce.Do(func() { close(fire) })
		}
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for wi, w := range ws {
		g := &wGen{rng: rand.New(rand.NewPCG(seed, uint64(wi+1))), cluster: info.ClusterSize, maxLen: 2 << 20}
		wg.Go(func() { w.run(m.Disk, g, stop, syncEvent) })
	}
	closed := false // mode 3: cbtfs finished its clean close before the kill
	switch mode {
	case 0:
		time.Sleep(delay)
	case 3:
		time.Sleep(time.Duration(rng.IntN(300)) * time.Millisecond)
		close(stop)
		wg.Wait()
		m.AllowAnyExit()
		if err := m.Signal(syscall.SIGTERM); err != nil {
			t.Fatal(err)
		}
		time.Sleep(delay)
		if err := m.Signal(syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
			t.Fatal(err)
		}
		st, ok := m.Wait(testutil.ExitTimeout)
		if !ok {
			t.Fatalf("cbtfs still running %v after SIGKILL", testutil.ExitTimeout)
		}
		closed = st.Exited()
		if closed && st.ExitStatus() != 0 {
			t.Errorf("cbtfs ended its clean close with %v; stderr %q", st, m.Stderr())
		}
	default:
		select {
		case <-fire:
		case <-time.After(20 * time.Second):
			t.Errorf("mode %d: fsync %d did not come within 20s", mode, k)
		}
	}
	if mode != 3 {
		m.Kill(t)
		close(stop)
		wg.Wait()
	}
	for wi, w := range ws {
		t.Logf("seed %d, kill mode %d (k %d, delay %v, closed %v): writer %d: %d ops durable through %d fsyncs, %d pending; ended by %v",
			seed, mode, k, delay, closed, wi, len(w.synced), w.syncs, len(w.pending), w.err)
	}
	if len(testutil.MountsAt(t, mnt)) > 0 {
		if err := testutil.Detach(t, mnt); err != nil {
			t.Error(err)
		}
	}
	testutil.RequireNoMount(t, mnt)

	if r, code := testutil.Check(t, img); code != 0 && code != 3 || r.Corruptions != 0 || r.CheckErrors != 0 {
		out, _, _ := testutil.RunErr(t, "qemu-img", "check", img)
		t.Fatalf("qemu-img check after the kill: exit %d, %+v:\n%s", code, r, out)
	}

	testutil.ConvertRaw(t, img, ref)
	got, err := os.ReadFile(ref)
	if err != nil {
		t.Fatal(err)
	}
	for wi, w := range ws {
		if err := w.verify(got[w.lo:w.hi]); err != nil {
			t.Errorf("writer %d (%d+%d): %v", wi, w.lo, w.hi-w.lo, err)
		}
	}

	after := wImgInfo(t, img).FormatSpecific.Data.Bitmaps
	t.Logf("bitmaps after the kill: %v", after)
	var notInUse []wBitmap
	for _, bm := range bitmaps {
		i := slices.IndexFunc(after, func(a wBitmap) bool { return a.Name == bm.Name })
		if i < 0 {
			t.Errorf("bitmap %s gone after the kill: %+v", bm.Name, after)
			continue
		}
		a := after[i]
		if a.Granularity != bm.Granularity || a.enabled() != bm.enabled() {
			t.Errorf("bitmap %s after the kill: %+v, want %+v", bm.Name, a, bm)
		}
		switch {
		case bm.inUse() && !a.inUse():
			t.Errorf("bitmap %s was in use before the mount and is not after the kill: %+v", bm.Name, a)
		case closed && a.inUse() && !bm.inUse():
			t.Errorf("bitmap %s still in use after a clean close: %+v", bm.Name, a)
		case !a.inUse():
			notInUse = append(notInUse, a)
		}
	}
	if len(notInUse) > 0 {
		maps := wBitmapMaps(t, img, wNames(notInUse))
		for _, bm := range notInUse {
			lo := wGranules(t, bm.Name+" before", before[bm.Name], size, bm.Granularity)
			hi := slices.Clone(lo)
			if bm.enabled() {
				for _, w := range ws {
					wMark(lo, w.synced, bm.Granularity)
					wMark(hi, w.issued, bm.Granularity)
				}
			}
			got := wGranules(t, bm.Name+" after", maps[bm.Name], size, bm.Granularity)
			for i := range got {
				if lo[i] && !got[i] || got[i] && !hi[i] {
					t.Errorf("bitmap %s (enabled %v) not in use after the kill and not exact: fsync'ed %s; issued %s; got %s",
						bm.Name, bm.enabled(), wRuns(lo, bm.Granularity, size), wRuns(hi, bm.Granularity, size), wRuns(got, bm.Granularity, size))
					break
				}
			}
		}
	}
}

// run issues random operations on [w.lo, w.hi) of disk until one fails
// (the kill) or stop is closed, reporting each fsync to syncEvent.
func (w *crashWriter) run(disk string, g *wGen, stop <-chan struct{}, syncEvent func(done bool)) {
	f, err := os.OpenFile(disk, os.O_RDWR, 0)
	if err != nil {
		w.err = err
		return
	}
	defer f.Close()
	for {
		select {
		case <-stop:
			// A last fsync makes everything durable, unless the mount is
			// dead already.
			w.err = errors.New("stopped")
			if err := f.Sync(); err != nil {
				w.err = fmt.Errorf("stopped; last fsync: %w", err)
				return
			}
			w.settle()
			return
		default:
		}
		o := g.op(w.lo, w.hi, false)
		if g.rng.IntN(5) == 0 {
			o = wOp{kind: wFsync}
			if g.rng.IntN(2) == 0 {
				o.kind = wFdatasync
			}
		}
		if o.touches() {
			p := o
			p.off -= w.lo // pending and durable are zone-relative
			w.pending = append(w.pending, p)
			w.issued = append(w.issued, wOp{kind: o.kind, off: o.off, n: o.n})
		} else {
			syncEvent(false)
		}
		if err := o.do(f); err != nil {
			w.err = err
			return
		}
		if !o.touches() {
			w.settle()
			syncEvent(true)
		}
	}
}

// settle records a successful fsync: the pending operations are durable.
func (w *crashWriter) settle() {
	for _, p := range w.pending {
		p.apply(w.durable)
		w.synced = append(w.synced, wOp{kind: p.kind, off: p.off + w.lo, n: p.n})
	}
	w.pending = w.pending[:0]
	w.syncs++
}

// verify checks the zone as read after the kill: each byte as of the
// last fsync, or as written by one of the operations issued since.
func (w *crashWriter) verify(got []byte) error {
	bad := 0
	var first error
	const chunk = 4096
	for i := 0; i < len(got); i++ {
		if i%chunk == 0 {
			// Skip equal chunks without a byte loop (slow under -race).
			if end := min(i+chunk, len(got)); bytes.Equal(got[i:end], w.durable[i:end]) {
				i = end - 1
				continue
			}
		}
		if got[i] == w.durable[i] {
			continue
		}
		ok := false
		for _, p := range w.pending {
			if int64(i) < p.off || int64(i) >= p.off+p.n {
				continue
			}
			v := byte(0)
			if p.kind == wWrite {
				v = p.data[int64(i)-p.off]
			}
			if v == got[i] {
				ok = true
				break
			}
		}
		if !ok {
			bad++
			if first == nil {
				first = fmt.Errorf("byte %d reads %#x, as of the last fsync %#x, and no pending operation wrote it (pending: %v)", i, got[i], w.durable[i], w.pending)
			}
		}
	}
	if bad > 0 {
		return fmt.Errorf("%d bytes lost or wrong; first: %w", bad, first)
	}
	return nil
}

// crashFinal ends TestCrashKill on one image: a clean mount reads the
// image as qemu does, its unmount keeps in-use bitmaps in use, qemu-img
// check -r leaks repairs the leaks, and the internal snapshots (name,
// raw file pairs) restore their data.
func crashFinal(t *testing.T, img, mnt, dir string, snaps []string) {
	t.Helper()
	before := wImgInfo(t, img).FormatSpecific.Data.Bitmaps
	ref := filepath.Join(dir, "ref.raw")
	testutil.ConvertRaw(t, img, ref)
	m := testutil.MountRW(t, cbtfs, img, mnt, testutil.MountOptions{})
	if out, _, err := testutil.RunErr(t, "cmp", m.Disk, ref); err != nil {
		t.Errorf("MNT/disk after the crashes differs from qemu-img convert -O raw: %s %v", out, err)
	}
	m.Unmount(t)
	after := wImgInfo(t, img).FormatSpecific.Data.Bitmaps
	for _, bm := range before {
		i := slices.IndexFunc(after, func(a wBitmap) bool { return a.Name == bm.Name })
		if i < 0 || after[i].inUse() != bm.inUse() {
			t.Errorf("bitmap %+v after a clean mount and unmount: %+v", bm, after)
		}
	}
	if _, code := testutil.Check(t, img); code != 0 && code != 3 {
		t.Errorf("qemu-img check after a clean unmount: exit %d", code)
	}
	testutil.Img(t, "check", "-q", "-r", "leaks", img)
	wRequireClean(t, img)
	for _, bm := range after {
		testutil.Img(t, "bitmap", "--remove", img, bm.Name)
	}
	for i := 0; i < len(snaps); i += 2 {
		testutil.Img(t, "snapshot", "-a", snaps[i], img)
		if !testutil.Compare(t, img, snaps[i+1], "-f", "qcow2", "-F", "raw") {
			t.Errorf("qemu-img snapshot -a %s after the crashes: the image differs from the snapshot's data", snaps[i])
		}
	}
	wRequireClean(t, img)
}
