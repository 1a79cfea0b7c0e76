package dirtymap

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"math"
	"math/bits"
	"math/rand/v2"
	"slices"
	"testing"
)

// model is the naive reference: one bool per granule, every operation done
// granule by granule straight from the definitions in the API docs.
type model struct {
	size, g uint64
	dirty   []bool
}

func newModel(size, g uint64) *model {
	return &model{size: size, g: g, dirty: make([]bool, (size+g-1)/g)}
}

// granuleEnd is the end of granule b, clipped to the size.
func (md *model) granuleEnd(b uint64) uint64 { return min((uint64(b)+1)*md.g, md.size) }

// touches reports whether granule b intersects [off, off+n).
func (md *model) touches(b, off, n uint64) bool {
	if n == 0 {
		return false
	}
	end := off + n
	if end < off {
		end = math.MaxUint64
	}
	return b*md.g < end && off < md.granuleEnd(b)
}

func (md *model) setRange(off, n uint64, v bool) {
	// Only granules from off/g on can touch the range, and they do so
	// in one run; scanning just that run keeps big models fast.
	for b := off / md.g; b < uint64(len(md.dirty)); b++ {
		if !md.touches(b, off, n) && b > off/md.g {
			break
		}
		if md.touches(b, off, n) {
			md.dirty[b] = v
		}
	}
}

func (md *model) setAll(v bool) {
	for b := range md.dirty {
		md.dirty[b] = v
	}
}

func (md *model) merge(src *model) {
	for b, d := range src.dirty {
		if d {
			s := uint64(b) * src.g
			md.setRange(s, src.granuleEnd(uint64(b))-s, true)
		}
	}
}

func (md *model) count() (n uint64) {
	for _, d := range md.dirty {
		if d {
			n++
		}
	}
	return n
}

func (md *model) dirtyBytes() (n uint64) {
	for b, d := range md.dirty {
		if d {
			n += md.granuleEnd(uint64(b)) - uint64(b)*md.g
		}
	}
	return n
}

func (md *model) isDirty(off uint64) bool {
	for b, d := range md.dirty {
		if uint64(b)*md.g <= off && off < md.granuleEnd(uint64(b)) {
			return d
		}
	}
	return false
}

func (md *model) nextDirty(off uint64) (uint64, bool) {
	for b, d := range md.dirty {
		if d && off < md.granuleEnd(uint64(b)) {
			return max(off, uint64(b)*md.g), true
		}
	}
	return 0, false
}

func (md *model) nextClean(off uint64) uint64 {
	for b, d := range md.dirty {
		if !d && off < md.granuleEnd(uint64(b)) {
			return max(off, uint64(b)*md.g)
		}
	}
	return md.size
}

type extent struct {
	Off, N uint64
	Dirty  bool
}

func (e extent) String() string { return fmt.Sprintf("{%#x+%#x %v}", e.Off, e.N, e.Dirty) }

// extents lists the extents of [off, off+n) granule by granule, merging
// neighbours in the same state.
func (md *model) extents(off, n uint64) []extent {
	end := off + n
	if end < off {
		end = math.MaxUint64
	}
	end = min(end, md.size)
	var out []extent
	for b, d := range md.dirty {
		s, e := max(uint64(b)*md.g, off), min(md.granuleEnd(uint64(b)), end)
		if s >= e {
			continue
		}
		if k := len(out) - 1; k >= 0 && out[k].Dirty == d && out[k].Off+out[k].N == s {
			out[k].N += e - s
			continue
		}
		out = append(out, extent{s, e - s, d})
	}
	return out
}

// serialized returns the whole serialized bitmap, bit by bit.
func (md *model) serialized() []byte {
	buf := make([]byte, (len(md.dirty)+7)/8)
	for b, d := range md.dirty {
		if d {
			buf[b/8] |= 1 << (b % 8)
		}
	}
	return buf
}

func (md *model) unmarshal(byteOff uint64, buf []byte) {
	nbytes := uint64(len(md.dirty)+7) / 8
	for i, x := range buf {
		p := byteOff + uint64(i)
		if p < byteOff || p >= nbytes {
			break // wrapped around, or past the bitmap
		}
		for j := range 8 {
			if b := p*8 + uint64(j); x&(1<<j) != 0 && b < uint64(len(md.dirty)) {
				md.dirty[b] = true
			}
		}
	}
}

func (md *model) setSerialized(byteOff, n uint64) {
	for b := range md.dirty {
		if byteOff <= uint64(b)/8 && uint64(b)/8-byteOff < n {
			md.dirty[b] = true
		}
	}
}

// checkInvariants verifies the internal structure of m: count, zero padding,
// and both summaries at every level.
func checkInvariants(m *Map) error {
	m.mu.RLock()
	defer m.mu.RUnlock()
	if want := (m.nbits + 63) / 64; uint64(len(m.words)) != want {
		return fmt.Errorf("%d words, want %d", len(m.words), want)
	}
	var c uint64
	for _, w := range m.words {
		c += uint64(bits.OnesCount64(w))
	}
	if c != m.count {
		return fmt.Errorf("count %d, popcount %d", m.count, c)
	}
	if n := len(m.words); n > 0 && m.words[n-1]&^m.tail != 0 {
		return fmt.Errorf("padding bits set in last word %#x (tail %#x)", m.words[n-1], m.tail)
	}
	if err := checkSummary("nz", m.nz, m.words, func(w uint64) bool { return w != 0 }); err != nil {
		return err
	}
	return checkSummary("nf", m.nf, m.words, func(w uint64) bool { return w != ^uint64(0) })
}

func checkSummary(name string, s summary, words []uint64, item func(uint64) bool) error {
	base := make([]bool, len(words))
	for i, w := range words {
		base[i] = item(w)
	}
	for lvl, l := range s.levels {
		if want := (len(base) + 63) / 64; len(l) != want {
			return fmt.Errorf("%s level %d: %d words, want %d", name, lvl, len(l), want)
		}
		next := make([]bool, len(l))
		for i, w := range l {
			for j := range 64 {
				got, want := w>>j&1 != 0, false
				if k := i*64 + j; k < len(base) {
					want = base[k]
				}
				if got != want {
					return fmt.Errorf("%s level %d bit %d: %v, want %v", name, lvl, i*64+j, got, want)
				}
			}
			next[i] = w != 0
		}
		base = next
	}
	if len(base) > 1 {
		return fmt.Errorf("%s: top level has %d words", name, len(base))
	}
	return nil
}

// source yields the numbers that drive an operation sequence: a PRNG in
// TestModel, the fuzzer's bytes in FuzzDirtyMap.
type source interface {
	// n returns a number in [0, max); max > 0.
	n(max uint64) uint64
	done() bool
}

type randSource struct {
	r    *rand.Rand
	left int
}

func (s *randSource) n(max uint64) uint64 { return s.r.Uint64N(max) }
func (s *randSource) done() bool          { s.left--; return s.left < 0 }

type byteSource struct{ b []byte }

func (s *byteSource) n(max uint64) uint64 {
	if len(s.b) == 0 {
		return 0
	}
	var v uint64
	for k := max - 1; k > 0 && len(s.b) > 0; k >>= 8 {
		v = v<<8 | uint64(s.b[0])
		s.b = s.b[1:]
	}
	return v % max
}
func (s *byteSource) done() bool { return len(s.b) == 0 }

// offset picks an interesting byte offset for a map of the given size and
// granularity: anywhere, near a granule or word boundary, past the end, or
// near 2^64.
func offset(s source, size, g uint64) uint64 {
	switch s.n(6) {
	case 0:
		return s.n(size + 2*g)
	case 1:
		return s.n(size/g+2)*g + s.n(3) - 1 // granule boundary ±1 (wraps to 2^64-1 at 0)
	case 2:
		return s.n(size/(64*g)+2) * 64 * g
	case 3:
		return math.MaxUint64 - s.n(2*g)
	case 4:
		return size - min(size, s.n(3*g))
	default:
		return s.n(4 * g)
	}
}

// length picks an interesting length for a range starting at off.
func length(s source, size, g, off uint64) uint64 {
	switch s.n(6) {
	case 5:
		return size - off + s.n(3) - 1 // ends at Size ±1 (or wraps)

	case 0:
		return s.n(3)
	case 1:
		return s.n(2 * g)
	case 2:
		return s.n(size + 2*g)
	case 3:
		return math.MaxUint64 - s.n(2)
	default:
		return s.n(65*g) + 1
	}
}

// randomMap returns a map of its own granularity and size, with a model,
// filled with a few random ranges.
func randomMap(t testing.TB, s source, size uint64) (*Map, *model) {
	g := uint64(MinGranularity) << s.n(8)
	switch s.n(4) {
	case 0: // same size
	case 1: // the target's size rounded up or down to this granularity
		size = (size + s.n(2)*(g-1)) / g * g
	case 2:
		size = size + s.n(2*g) - min(size, g)
	default:
		size = size/2 + s.n(size+g)
	}
	size = min(size, 4096*g) // keep the model small
	m, err := New(size, g)
	if err != nil {
		t.Fatalf("New(%d, %d): %v", size, g, err)
	}
	md := newModel(size, g)
	for range s.n(8) {
		off := offset(s, size, g)
		n := length(s, size, g, off)
		if s.n(3) == 0 {
			m.Clear(off, n)
			md.setRange(off, n, false)
		} else {
			m.Set(off, n)
			md.setRange(off, n, true)
		}
	}
	return m, md
}

// runOps applies operations from s to m and md, comparing them after
// every step.
func runOps(t testing.TB, s source, m *Map, md *model) {
	t.Helper()
	size, g := md.size, md.g
	for step := 0; !s.done(); step++ {
		var desc string
		switch op := s.n(13); op {
		case 0, 1:
			off := offset(s, size, g)
			n := length(s, size, g, off)
			m.Set(off, n)
			md.setRange(off, n, true)
			desc = fmt.Sprintf("Set(%#x, %#x)", off, n)
		case 2:
			off := offset(s, size, g)
			n := length(s, size, g, off)
			m.Clear(off, n)
			md.setRange(off, n, false)
			desc = fmt.Sprintf("Clear(%#x, %#x)", off, n)
		case 3:
			if s.n(4) == 0 {
				m.SetAll()
				md.setAll(true)
				desc = "SetAll()"
			} else {
				m.ClearAll()
				md.setAll(false)
				desc = "ClearAll()"
			}
		case 4:
			src, smd := randomMap(t, s, size)
			m.Merge(src)
			md.merge(smd)
			desc = fmt.Sprintf("Merge(size %#x g %#x)", smd.size, smd.g)
			if m.Equal(src) != (size == smd.size && g == smd.g && slices.Equal(md.dirty, smd.dirty)) {
				t.Fatalf("step %d %s: Equal = %v, model disagrees", step, desc, m.Equal(src))
			}
		case 5:
			off := offset(s, size/8+16, 8) / 8 * 8
			if s.n(2) == 0 {
				off = s.n(size/g/8 + 16)
			}
			buf := make([]byte, s.n(40))
			for i := range buf {
				a, b := s.n(256), s.n(256)
				buf[i] = byte(a & b) // sparse-ish: about a quarter of the bits set
			}
			m.UnmarshalRange(off, buf)
			md.unmarshal(off, buf)
			desc = fmt.Sprintf("UnmarshalRange(%#x, %x)", off, buf)
		case 6:
			off, n := s.n(size/g/8+16), s.n(40)
			if s.n(8) == 0 {
				off = math.MaxUint64 - s.n(4)
			}
			m.SetSerializedRange(off, n)
			md.setSerialized(off, n)
			desc = fmt.Sprintf("SetSerializedRange(%#x, %#x)", off, n)
		case 7:
			off := s.n(size/g/8 + 16)
			buf := bytes.Repeat([]byte{0xa5}, int(s.n(40)))
			m.MarshalRange(off, buf)
			want := make([]byte, len(buf))
			if ser := md.serialized(); off < uint64(len(ser)) {
				copy(want, ser[off:])
			}
			if !bytes.Equal(buf, want) {
				t.Fatalf("step %d: MarshalRange(%#x, %d) = %x, want %x", step, off, len(buf), buf, want)
			}
			continue
		case 8:
			off := offset(s, size, g)
			n := length(s, size, g, off)
			stop := int(s.n(5)) // stop after this many extents, 0 = never
			var got []extent
			m.Extents(off, n, func(o, l uint64, d bool) bool {
				got = append(got, extent{o, l, d})
				return len(got) != stop
			})
			want := md.extents(off, n)
			if stop > 0 && len(want) > stop {
				want = want[:stop]
			}
			if !slices.Equal(got, want) {
				t.Fatalf("step %d: Extents(%#x, %#x) stop %d = %v, want %v", step, off, n, stop, got, want)
			}
			continue
		case 9:
			off := offset(s, size, g)
			got, ok := m.NextDirty(off)
			want, wok := md.nextDirty(off)
			if got != want || ok != wok {
				t.Fatalf("step %d: NextDirty(%#x) = %#x, %v, want %#x, %v", step, off, got, ok, want, wok)
			}
			if got, want := m.NextClean(off), md.nextClean(off); got != want {
				t.Fatalf("step %d: NextClean(%#x) = %#x, want %#x", step, off, got, want)
			}
			if got, want := m.IsDirty(off), md.isDirty(off); got != want {
				t.Fatalf("step %d: IsDirty(%#x) = %v, want %v", step, off, got, want)
			}
			continue
		case 10:
			c := m.Clone()
			if !c.Equal(m) || !m.Equal(c) {
				t.Fatalf("step %d: clone not Equal", step)
			}
			off := offset(s, size, g)
			n := length(s, size, g, off)
			c.Set(off, n)
			cm := newModel(size, g)
			copy(cm.dirty, md.dirty)
			cm.setRange(off, n, true)
			if got, want := c.Equal(m), slices.Equal(cm.dirty, md.dirty); got != want {
				t.Fatalf("step %d: after clone.Set(%#x, %#x), Equal = %v, want %v", step, off, n, got, want)
			}
			if err := checkInvariants(c); err != nil {
				t.Fatalf("step %d: clone: %v", step, err)
			}
			continue
		case 11:
			// A self-merge and a merge from a map of the same granularity
			// and a different size.
			m.Merge(m)
			src, err := New(s.n(size+3*g), g)
			if err != nil {
				t.Fatal(err)
			}
			smd := newModel(src.Size(), g)
			off := offset(s, src.Size(), g)
			n := length(s, src.Size(), g, off)
			src.Set(off, n)
			smd.setRange(off, n, true)
			m.Merge(src)
			md.merge(smd)
			desc = fmt.Sprintf("Merge(same g, size %#x, Set(%#x, %#x))", src.Size(), off, n)
		default:
			if got, want := m.Count(), md.count(); got != want {
				t.Fatalf("step %d: Count = %d, want %d", step, got, want)
			}
			if got, want := m.DirtyBytes(), md.dirtyBytes(); got != want {
				t.Fatalf("step %d: DirtyBytes = %d, want %d", step, got, want)
			}
			continue
		}
		if err := checkInvariants(m); err != nil {
			t.Fatalf("step %d %s: %v", step, desc, err)
		}
		compareAll(t, m, md, fmt.Sprintf("step %d %s", step, desc))
	}
}

// compareAll checks every query on the whole map against the model.
func compareAll(t testing.TB, m *Map, md *model, where string) {
	t.Helper()
	var got []extent
	m.Extents(0, math.MaxUint64, func(o, l uint64, d bool) bool {
		got = append(got, extent{o, l, d})
		return true
	})
	if want := md.extents(0, math.MaxUint64); !slices.Equal(got, want) {
		t.Fatalf("%s: Extents = %v, want %v\nmodel %v", where, got, want, md.dirty)
	}
	buf := make([]byte, m.SerializedSize()+3)
	m.MarshalRange(0, buf)
	want := append(md.serialized(), 0, 0, 0)
	if !bytes.Equal(buf, want) {
		t.Fatalf("%s: MarshalRange = %x, want %x", where, buf, want)
	}
	if got, want := m.Count(), md.count(); got != want {
		t.Fatalf("%s: Count = %d, want %d", where, got, want)
	}
	if got, want := m.DirtyBytes(), md.dirtyBytes(); got != want {
		t.Fatalf("%s: DirtyBytes = %d, want %d", where, got, want)
	}
	// A round trip through the serialized form gives an Equal map.
	r, err := New(m.Size(), m.Granularity())
	if err != nil {
		t.Fatal(err)
	}
	r.UnmarshalRange(0, buf)
	if !r.Equal(m) {
		t.Fatalf("%s: Unmarshal(Marshal(m)) != m", where)
	}
}

var modelConfigs = []struct{ size, g uint64 }{
	{0, 512},
	{1, 512},
	{511, 512},
	{512, 512},
	{513, 512},
	{4095, 4096},
	{100, 65536},
	{64 * 512, 512},
	{64*512 + 1, 512},
	{130*4096 + 7, 4096},
	{1000 * 512, 512},
	{(64*64+3)*64*512 - 100, 512}, // three summary levels
	{200 << 16, 1 << 16},
	{1536, 1024}, // size a multiple of smaller granularities only
	{100<<16 + 4096, 1 << 16},
	{3<<31 + 5, 1 << 31},
}

func TestModel(t *testing.T) {
	steps := 400
	if testing.Short() {
		steps = 100
	}
	for _, c := range modelConfigs {
		for seed := range uint64(3) {
			t.Run(fmt.Sprintf("size=%d/g=%d/seed=%d", c.size, c.g, seed), func(t *testing.T) {
				m, err := New(c.size, c.g)
				if err != nil {
					t.Fatalf("New(%d, %d): %v", c.size, c.g, err)
				}
				n := steps
				if c.size/c.g > 1<<16 {
					n /= 10 // the model is slow on big maps
				}
				s := &randSource{r: rand.New(rand.NewPCG(seed, c.size)), left: n}
				runOps(t, s, m, newModel(c.size, c.g))
			})
		}
	}
}

// FuzzDirtyMap decodes a map size and granularity, then a sequence of
// operations, and checks each against the model.
func FuzzDirtyMap(f *testing.F) {
	for _, c := range modelConfigs {
		if c.size/c.g > 1<<12 {
			continue
		}
		var seed [9]byte
		seed[0] = byte(bits.TrailingZeros64(c.g) - 9)
		binary.BigEndian.PutUint64(seed[1:], c.size)
		f.Add(append(seed[:], 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 0x55, 0xaa, 0xff, 0x80, 0x7f))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		if len(data) < 9 {
			return
		}
		g := uint64(MinGranularity) << (data[0] % 23)
		size := binary.BigEndian.Uint64(data[1:9])
		if size/g > 1<<12 {
			t.Skip("too many granules for the model")
		}
		m, err := New(size, g)
		if err != nil {
			t.Fatalf("New(%d, %d): %v", size, g, err)
		}
		runOps(t, &byteSource{b: data[9:]}, m, newModel(size, g))
	})
}
