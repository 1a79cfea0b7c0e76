package integration

import (
	"fmt"
	"maps"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cbtfs/cbtfs/internal/testutil"
)

// This file holds the crash test of issue 5's bitmap metadata updates: a
// read-write mount is killed with SIGKILL right after control commands,
// some rounds before a flush and some right after one. qemu-img check
// must never report corruption, and every bitmap qemu-img info shows
// without the in-use flag must be one the mount stored with a flush, with
// its granularity and flags, and must mark at least every byte written
// while a bitmap of that name was enabled (or merged into it): a crash
// may leave the old state, the new state, or bitmaps in use, never a
// consistent-looking wrong bitmap.

// ccCrashRounds is the number of kills; each round starts from a fresh
// copy of the template.
const ccCrashRounds = 15

// ccRange is a byte range of the disk.
type ccRange struct{ off, n int64 }

// ccModelBitmap is what the test knows of one bitmap.
type ccModelBitmap struct {
	gran    uint64
	enabled bool
	// must holds the ranges written while the bitmap was enabled since it
	// was added or last cleared, and those of the bitmaps merged into it.
	must []ccRange
}

type ccModel map[string]*ccModelBitmap

func (m ccModel) clone() ccModel {
	c := ccModel{}
	for k, b := range m {
		nb := *b
		nb.must = slices.Clone(b.must)
		c[k] = &nb
	}
	return c
}

// ccCrashRound is one mount of a round's image, the commands it ran and
// what the model expects.
type ccCrashRound struct {
	t   *testing.T
	rng *rand.Rand
	img string
	m   *testutil.Mounted
	cur ccModel // the mount's state
	// flushed is the state the last flush stored (the template's at
	// first), since the ranges each name must also mark since then.
	flushed ccModel
	since   map[string][]ccRange
	seq     int
	log     []string
}

func (r *ccCrashRound) names() []string { return slices.Sorted(maps.Keys(r.cur)) }

func (r *ccCrashRound) pick() string {
	n := r.names()
	return n[r.rng.IntN(len(n))]
}

// write writes a random range through the mount and records it.
func (r *ccCrashRound) write() {
	n := 1 + r.rng.Int64N(200000)
	off := r.rng.Int64N(ccSize - n)
	ccPwrite(r.t, r.m.Disk, off, n, byte(1+r.rng.IntN(255)))
	r.log = append(r.log, fmt.Sprintf("write %d+%d", off, n))
	for name, b := range r.cur {
		if b.enabled {
			b.must = append(b.must, ccRange{off, n})
			r.since[name] = append(r.since[name], ccRange{off, n})
		}
	}
}

// command returns a random control command and applies it to the model.
func (r *ccCrashRound) command() string {
	for {
		k := r.rng.IntN(7)
		if len(r.cur) == 0 {
			k = 0
		}
		switch k {
		case 0, 1:
			r.seq++
			name := fmt.Sprintf("n%d", r.seq)
			gran := []uint64{512, 4 << 10, 64 << 10, 1 << 20}[r.rng.IntN(4)]
			b := &ccModelBitmap{gran: gran, enabled: r.rng.IntN(3) != 0}
			r.cur[name] = b
			cmd := fmt.Sprintf("bitmap add %s granularity=%d", name, gran)
			if !b.enabled {
				cmd += " disabled"
			}
			return cmd
		case 2:
			name := r.pick()
			r.cur[name].must = nil
			return "bitmap clear " + name
		case 3:
			name := r.pick()
			b := r.cur[name]
			b.enabled = !b.enabled
			if b.enabled {
				return "bitmap enable " + name
			}
			return "bitmap disable " + name
		case 4, 5:
			src, dst := r.pick(), r.pick()
			if src == dst {
				continue
			}
			r.cur[dst].must = append(r.cur[dst].must, r.cur[src].must...)
			r.since[dst] = append(r.since[dst], r.cur[src].must...)
			return fmt.Sprintf("bitmap merge %s %s", src, dst)
		case 6:
			name := r.pick()
			delete(r.cur, name)
			return "bitmap remove " + name
		}
	}
}

// control runs cmds in one write of MNT/control.
func (r *ccCrashRound) control(cmds ...string) {
	ccCtl(r.t, r.m.Dir, cmds...)
	r.log = append(r.log, strings.Join(cmds, "; "))
}

func (r *ccCrashRound) flush() {
	r.control("flush")
	r.flushed = r.cur.clone()
	r.since = map[string][]ccRange{}
}

// ccDirtyRanges parses the dirty extents of an nbdinfo --map listing.
func ccDirtyRanges(t *testing.T, listing string) []ccRange {
	t.Helper()
	var out []ccRange
	for _, line := range strings.Split(strings.TrimSpace(listing), "\n") {
		f := strings.Fields(line)
		if len(f) < 3 {
			t.Fatalf("bad nbdinfo line %q", line)
		}
		off, err1 := strconv.ParseInt(f[0], 10, 64)
		n, err2 := strconv.ParseInt(f[1], 10, 64)
		if err1 != nil || err2 != nil {
			t.Fatalf("bad nbdinfo line %q", line)
		}
		if f[2] == "1" {
			out = append(out, ccRange{off, n})
		}
	}
	return out
}

// ccUncovered returns the first range of want not wholly inside the
// sorted, coalesced dirty ranges, or ok.
func ccUncovered(dirty, want []ccRange) (ccRange, bool) {
	for _, w := range want {
		pos, end := w.off, w.off+w.n
		for _, d := range dirty {
			if d.off <= pos && pos < d.off+d.n {
				pos = d.off + d.n
			}
		}
		if pos < end {
			return w, false
		}
	}
	return ccRange{}, true
}

// ccCrashMode says when a round kills the mount.
type ccCrashMode int

const (
	ccKillAfterFlush    ccCrashMode = iota // right after a flush returned
	ccKillAfterCommands                    // right after commands, not flushed
	ccKillDuringFlush                      // while a flush runs
)

// verify checks the image after the kill.
func (r *ccCrashRound) verify(mode ccCrashMode) {
	t := r.t
	t.Helper()
	res, code := testutil.Check(t, r.img)
	if code == 2 || res.Corruptions != 0 || res.CheckErrors != 0 {
		t.Fatalf("qemu-img check after the kill: exit %d: %+v\nrun: %q", code, res, r.log)
	}
	disk := testutil.QemuBitmaps(t, r.img, false)
	t.Logf("after %q: %v", r.log, disk)
	// The states a consistent bitmap may show: the last flush's, and
	// when the kill hit a flush, the one it was storing.
	type state struct {
		m     ccModel
		since map[string][]ccRange
	}
	states := []state{{r.flushed, r.since}}
	if mode == ccKillDuringFlush {
		states = append(states, state{r.cur, nil})
	}
	var consistent []string
	match := map[string][]state{}
	for _, b := range disk {
		if b.InUse() {
			continue
		}
		for _, s := range states {
			if f, ok := s.m[b.Name]; ok && f.gran == b.Granularity && f.enabled == b.Enabled() {
				match[b.Name] = append(match[b.Name], s)
			}
		}
		if len(match[b.Name]) == 0 {
			t.Fatalf("after the kill qemu-img info shows %v, not in use, but no flush stored it so\nrun: %q", b, r.log)
		}
		consistent = append(consistent, b.Name)
	}
	if mode == ccKillAfterFlush {
		if got, want := ccNames(disk), slices.Sorted(maps.Keys(r.flushed)); !slices.Equal(got, want) || len(consistent) != len(disk) {
			t.Fatalf("killed right after a flush: qemu-img info shows %v, want exactly %q, none in use\nrun: %q", disk, want, r.log)
		}
	}
	listings := testutil.BitmapMaps(t, r.img, false, consistent...)
	for _, name := range consistent {
		var miss ccRange
		ok := false
		for _, s := range match[name] {
			want := append(slices.Clone(s.m[name].must), s.since[name]...)
			if miss, ok = ccUncovered(ccDirtyRanges(t, listings[name]), want); ok {
				break
			}
		}
		if !ok {
			t.Fatalf("after the kill bitmap %s is not in use but misses the write %d+%d made while it was enabled:\n%s\nrun: %q",
				name, miss.off, miss.n, listings[name], r.log)
		}
	}

	// The image mounts again; the in-use bitmaps show as inconsistent and
	// can be removed.
	mnt := filepath.Join(filepath.Dir(r.img), "mnt2")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	m := testutil.MountRW(t, cbtfs, r.img, mnt, testutil.MountOptions{})
	ccRequireListing(t, mnt, ccNames(disk), "remount after the kill")
	for _, b := range disk {
		_, err := os.Stat(filepath.Join(mnt, "bitmaps", b.Name, "extents"))
		if b.InUse() != os.IsNotExist(err) {
			t.Fatalf("remount: bitmap %v: stat extents: %v", b, err)
		}
		if b.InUse() {
			ccCtl(t, mnt, "bitmap remove "+b.Name)
		}
	}
	m.Unmount(t)
	res, code = testutil.Check(t, r.img)
	if code == 2 || res.Corruptions != 0 || res.CheckErrors != 0 {
		t.Fatalf("qemu-img check after the remount: exit %d: %+v", code, res)
	}
	if got := ccNames(testutil.QemuBitmaps(t, r.img, false)); !slices.Equal(got, consistent) {
		t.Fatalf("after removing the in-use bitmaps: %q, want %q", got, consistent)
	}
}

func TestControlCrash(t *testing.T) {
	t.Parallel()
	testutil.RequireTool(t, "qemu-nbd")
	testutil.RequireTool(t, "nbdinfo")
	dir := t.TempDir()
	tmpl := filepath.Join(dir, "template.qcow2")
	ccNewImage(t, tmpl, 64<<10, ccSize)
	testutil.Img(t, "bitmap", "--add", tmpl, "t0")
	testutil.Img(t, "bitmap", "--add", "-g", "4K", "--disable", tmpl, "t1")
	testutil.IO(t, tmpl, "write -P 9 1M 64k")
	template := ccModel{
		"t0": {gran: 64 << 10, enabled: true, must: []ccRange{{1 << 20, 64 << 10}}},
		"t1": {gran: 4 << 10},
	}
	seed := uint64(os.Getpid())
	t.Logf("seed %d", seed)
	for round := range ccCrashRounds {
		t.Run(strconv.Itoa(round), func(t *testing.T) {
			testutil.RequireFUSE(t)
			rdir := t.TempDir()
			img := filepath.Join(rdir, "d.qcow2")
			testutil.CopyFile(t, tmpl, img)
			mnt := filepath.Join(rdir, "mnt")
			if err := os.Mkdir(mnt, 0o755); err != nil {
				t.Fatal(err)
			}
			r := &ccCrashRound{
				t: t, rng: rand.New(rand.NewPCG(seed, uint64(round))), img: img,
				cur: template.clone(), flushed: template.clone(), since: map[string][]ccRange{},
			}
			r.m = testutil.MountRW(t, cbtfs, img, mnt, testutil.MountOptions{})
			for range 3 + r.rng.IntN(6) {
				switch k := r.rng.IntN(10); {
				case k < 4:
					r.write()
				case k < 8:
					r.control(r.command())
				default:
					r.flush()
				}
			}
			// One to three commands in one write, then the kill: right
			// after them, after a flush, or during a flush.
			var cmds []string
			for range 1 + r.rng.IntN(3) {
				cmds = append(cmds, r.command())
			}
			r.control(cmds...)
			mode := ccCrashMode(round % 3)
			switch mode {
			case ccKillAfterCommands:
				r.m.Kill(t)
			case ccKillAfterFlush:
				r.flush()
				r.m.Kill(t)
			case ccKillDuringFlush:
				done := make(chan error, 1)
				go func() { done <- os.WriteFile(filepath.Join(mnt, "control"), []byte("flush\n"), 0) }()
				// A random moment inside the store, or just before or
				// after it.
				time.Sleep(time.Duration(r.rng.IntN(3000)) * time.Microsecond)
				r.m.Kill(t)
				err := <-done
				r.log = append(r.log, fmt.Sprintf("flush killed (write: %v)", err))
			}
			if err := testutil.Detach(t, mnt); err != nil {
				t.Fatal(err)
			}
			r.verify(mode)
		})
	}
}
