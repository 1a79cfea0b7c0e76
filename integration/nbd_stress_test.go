package integration

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cbtfs/cbtfs/internal/testutil"
)

// Geometry of TestNBDConcurrentClients: every client owns a region of the
// disk, a multiple of every bitmap granularity, so that no two clients
// ever touch the same byte or the same granule.
const (
	stressNBDClients  = 32
	stressFUSEWriters = 4
	stressRegion      = 1 << 20
	stressSlots       = 8 // requests a client may have in flight, each in its own slot of its region
	stressSlot        = stressRegion / stressSlots
	stressCluster     = 64 << 10 // the granularity of bitmap cbt
)

// stressSpan is a range a client wrote, to be marked in the model.
type stressSpan struct{ off, n int64 }

// TestNBDConcurrentClients runs 32 NBD clients on their own connections
// to `cbtfs mount --nbd` (each pipelining up to 8 requests: reads, writes,
// FUA writes, write zeroes, flushes, and block status of a bitmap),
// together with 4 writers through MNT/disk, each on a disjoint range, for
// 30 s (3 s with -short). The mount process is built with -race when the
// tests are, and must exit with status 0. Every read must return the
// client's own model; at the end the disk, the bitmaps (over NBD, in the
// mount, and through qemu-nbd -B after unmount) are exactly the model's,
// and qemu-img check is clean.
func TestNBDConcurrentClients(t *testing.T) {
	testutil.RequireFUSE(t)
	for _, tool := range []string{"qemu-img", "qemu-io", "qemu-nbd", "nbdinfo"} {
		testutil.RequireTool(t, tool)
	}
	duration := 30 * time.Second
	if testing.Short() {
		duration = 3 * time.Second
	}
	b := &builder{t: t, dir: t.TempDir()}
	base := b.qcow2("base.qcow2", "40M")
	b.io(base, "write -P 0x11 0 20M")
	img := b.overlay("top.qcow2", "base.qcow2", "qcow2", "")
	nbdAddBitmap(t, img, "cbt")
	nbdAddBitmap(t, img, "fine", "-g", "4k")
	nbdAddBitmap(t, img, "off", "--disable")
	md := newNBDModel(t, img, map[string]int64{"cbt": stressCluster, "fine": 4 << 10, "off": stressCluster}, "cbt", "fine")
	m, addr := nbdMount(t, img)

	deadline := time.Now().Add(duration)
	var (
		wg    sync.WaitGroup
		mu    sync.Mutex // guards errs and marks
		errs  []error
		marks []stressSpan
		ops   atomic.Int64
	)
	report := func(err error, spans []stressSpan) {
		mu.Lock()
		defer mu.Unlock()
		if err != nil {
			errs = append(errs, err)
		}
		marks = append(marks, spans...)
	}
	for i := range stressNBDClients {
		lo := int64(i) * stressRegion
		// Each client owns md.data[lo:lo+stressRegion]: disjoint slices
		// of one array, written by one goroutine each.
		own := md.data[lo : lo+stressRegion]
		wg.Go(func() {
			spans, err := stressNBDClient(addr, i, lo, own, deadline, &ops)
			if err != nil {
				err = fmt.Errorf("NBD client %d: %w", i, err)
			}
			report(err, spans)
		})
	}
	for w := range stressFUSEWriters {
		lo := int64(stressNBDClients+w) * stressRegion
		own := md.data[lo : lo+stressRegion]
		wg.Go(func() {
			spans, err := stressFUSEWriter(m.Disk, w, lo, own, deadline, &ops)
			if err != nil {
				err = fmt.Errorf("FUSE writer %d: %w", w, err)
			}
			report(err, spans)
		})
	}
	wg.Wait()
	for _, err := range errs {
		t.Error(err)
	}
	if t.Failed() {
		t.FailNow()
	}
	t.Logf("%d operations in %v", ops.Load(), duration)
	for _, s := range marks {
		md.mark(s.off, s.n)
	}

	// The largest requests the export advertises, 32 MiB, across every
	// client's region.
	c, err := testutil.DialNBDExport(addr, "")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	big := make([]byte, 32<<20)
	stressRandom(rand.New(rand.NewPCG(1, 2)), big)
	nbdMust(t, "WRITE of 32 MiB", c.Write(big, 4<<20, testutil.NBDCmdFlagFUA))
	md.write(4<<20, big)
	got, err := c.Read(0, 32<<20, 0)
	if err != nil || !bytes.Equal(got, md.data[:32<<20]) {
		t.Errorf("READ of 32 MiB: %v, same as the model: %v", err, bytes.Equal(got, md.data[:32<<20]))
	}
	nbdMust(t, "disconnect", c.Disconnect())

	uri := testutil.NBDURI(addr, "")
	md.checkServed(t, "cbtfs mount --nbd", uri)
	for _, name := range md.names() {
		want := md.bitmaps[name].mapText(int64(len(md.data)))
		if got := nbdReadFile(t, filepath.Join(m.Dir, "bitmaps", name, "extents")); got != want {
			t.Errorf("MNT/bitmaps/%s/extents:\n%s\nwant:\n%s", name, got, want)
		}
	}
	got, err = os.ReadFile(m.Disk)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, md.data) {
		t.Errorf("MNT/disk differs from the model at %d", firstDiff(got, md.data))
	}
	m.Unmount(t)
	md.checkClosed(t, img)
}

// stressRandom fills p with random bytes.
func stressRandom(rng *rand.Rand, p []byte) {
	for i := 0; i < len(p); i += 8 {
		v := rng.Uint64()
		for j := i; j < min(i+8, len(p)); j++ {
			p[j] = byte(v)
			v >>= 8
		}
	}
}

// stressRange returns a random range inside the slot at slotOff (an
// offset in the client's region), at most max bytes long.
func stressRange(rng *rand.Rand, slotOff, max int64) (off, n int64) {
	off = slotOff + rng.Int64N(stressSlot)
	n = 1 + rng.Int64N(min(max, slotOff+stressSlot-off))
	return off, n
}

// stressNBDClient runs one NBD client on the region at lo of the disk,
// whose model is own, until deadline, and returns the ranges it changed.
// Each batch sends up to stressSlots requests, each on its own slot, then
// reads the replies, which may come in any order.
func stressNBDClient(addr string, id int, lo int64, own []byte, deadline time.Time, ops *atomic.Int64) ([]stressSpan, error) {
	c, err := testutil.DialNBDExport(addr, "", nbdCtxBitmap+"cbt")
	if err != nil {
		return nil, err
	}
	defer c.Close()
	rng := rand.New(rand.NewPCG(uint64(id), 6))
	var spans []stressSpan
	// dirty is the client's view of bitmap cbt over its region.
	dirty := make([]bool, stressRegion/stressCluster)
	type pending struct {
		typ    uint16
		off, n int64 // in the region
		data   []byte
	}
	for batch := 0; time.Now().Before(deadline); batch++ {
		_ = c.SetDeadline(time.Now().Add(time.Minute))
		k := 1 + rng.IntN(stressSlots)
		sent := map[uint64]pending{}
		for j, slot := range rng.Perm(stressSlots)[:k] {
			off, n := stressRange(rng, int64(slot)*stressSlot, 64<<10)
			p := pending{off: off, n: n}
			var flags uint16
			switch op := rng.IntN(20); {
			case op < 9:
				p.typ = testutil.NBDCmdWrite
				p.data = make([]byte, n)
				stressRandom(rng, p.data)
				if op == 0 {
					flags = testutil.NBDCmdFlagFUA
				}
			case op < 16:
				p.typ = testutil.NBDCmdRead
				if op == 10 {
					flags = testutil.NBDCmdFlagDF
				}
			case op < 19:
				p.typ = testutil.NBDCmdWriteZeroes
				if op == 17 {
					flags = testutil.NBDCmdFlagNoHole
				}
			default:
				p.typ = testutil.NBDCmdFlush
				p.off, p.n = 0, 0
			}
			cookie := uint64(batch)<<8 | uint64(j)
			if err := c.Send(flags, p.typ, cookie, uint64(lo+p.off), uint32(p.n), p.data); err != nil {
				return spans, err
			}
			sent[cookie] = p
		}
		readLen := func(cookie uint64) int {
			if p := sent[cookie]; p.typ == testutil.NBDCmdRead {
				return int(p.n)
			}
			return 0
		}
		for range k {
			rep, err := c.ReadReply(readLen)
			if err != nil {
				return spans, err
			}
			p, ok := sent[rep.Cookie]
			if !ok {
				return spans, fmt.Errorf("reply to unknown cookie %d", rep.Cookie)
			}
			delete(sent, rep.Cookie)
			if err := rep.Err(); err != nil {
				return spans, fmt.Errorf("request %d [%d, +%d): %w", p.typ, lo+p.off, p.n, err)
			}
			switch p.typ {
			case testutil.NBDCmdRead:
				got, err := rep.ReadData(uint64(lo+p.off), uint32(p.n))
				if err != nil {
					return spans, err
				}
				if want := own[p.off : p.off+p.n]; !bytes.Equal(got, want) {
					return spans, fmt.Errorf("READ [%d, +%d): wrong data from %d", lo+p.off, p.n, lo+p.off+int64(firstDiff(got, want)))
				}
			case testutil.NBDCmdWrite:
				copy(own[p.off:], p.data)
			case testutil.NBDCmdWriteZeroes:
				clear(own[p.off : p.off+p.n])
			}
			if p.typ == testutil.NBDCmdWrite || p.typ == testutil.NBDCmdWriteZeroes {
				spans = append(spans, stressSpan{lo + p.off, p.n})
				for g := p.off / stressCluster; g <= (p.off+p.n-1)/stressCluster; g++ {
					dirty[g] = true
				}
			}
			ops.Add(1)
		}
		if batch%16 == 15 {
			if err := stressCheckBitmap(c, lo, dirty); err != nil {
				return spans, err
			}
		}
	}
	if err := stressCheckBitmap(c, lo, dirty); err != nil {
		return spans, err
	}
	return spans, c.Disconnect()
}

// stressCheckBitmap checks, with BLOCK_STATUS, that bitmap cbt over the
// region at lo is exactly dirty. The server may answer a part of the
// range at a time.
func stressCheckBitmap(c *testutil.NBDClient, lo int64, dirty []bool) error {
	id := c.Contexts[nbdCtxBitmap+"cbt"]
	for off := int64(0); off < stressRegion; {
		ex, err := c.BlockStatus(uint64(lo+off), uint32(stressRegion-off), 0)
		if err != nil {
			return err
		}
		es := ex[id]
		if len(es) == 0 {
			return fmt.Errorf("BLOCK_STATUS at %d: no extents for cbt", lo+off)
		}
		for _, e := range es {
			if e.Length%stressCluster != 0 && off+int64(e.Length) < stressRegion {
				return fmt.Errorf("BLOCK_STATUS at %d: extent of %d bytes, not whole granules", lo+off, e.Length)
			}
			for g := off / stressCluster; g < min(off+int64(e.Length), stressRegion)/stressCluster; g++ {
				if dirty[g] != (e.Flags&1 != 0) {
					return fmt.Errorf("BLOCK_STATUS: cbt at %d is %d, want dirty=%v", lo+g*stressCluster, e.Flags, dirty[g])
				}
			}
			off += int64(e.Length)
		}
	}
	return nil
}

// stressFUSEWriter writes, reads back and syncs the region at lo of
// MNT/disk until deadline, and returns the ranges it wrote.
func stressFUSEWriter(disk string, id int, lo int64, own []byte, deadline time.Time, ops *atomic.Int64) ([]stressSpan, error) {
	f, err := os.OpenFile(disk, os.O_RDWR, 0)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	rng := rand.New(rand.NewPCG(uint64(id), 7))
	var spans []stressSpan
	buf := make([]byte, 256<<10)
	for time.Now().Before(deadline) {
		off := rng.Int64N(stressRegion)
		n := 1 + rng.Int64N(min(int64(len(buf)), stressRegion-off))
		switch op := rng.IntN(10); {
		case op < 6:
			p := buf[:n]
			stressRandom(rng, p)
			if _, err := f.WriteAt(p, lo+off); err != nil {
				return spans, err
			}
			copy(own[off:], p)
			spans = append(spans, stressSpan{lo + off, n})
		case op < 9:
			p := buf[:n]
			if _, err := f.ReadAt(p, lo+off); err != nil {
				return spans, err
			}
			if want := own[off : off+n]; !bytes.Equal(p, want) {
				return spans, fmt.Errorf("read [%d, +%d): wrong data from %d", lo+off, n, lo+off+int64(firstDiff(p, want)))
			}
		default:
			if err := f.Sync(); err != nil {
				return spans, err
			}
		}
		ops.Add(1)
	}
	return spans, f.Close()
}
