package dirtymap_test

import (
	"bytes"
	"errors"
	"fmt"
	"math"
	"testing"

	"github.com/cbtfs/cbtfs/dirtymap"
)

const (
	kib = 1 << 10
	mib = 1 << 20
	gib = 1 << 30
	tib = 1 << 40
)

func mustNew(t testing.TB, size, g uint64) *dirtymap.Map {
	t.Helper()
	m, err := dirtymap.New(size, g)
	if err != nil {
		t.Fatalf("New(%d, %d): %v", size, g, err)
	}
	return m
}

func TestNew(t *testing.T) {
	tests := []struct {
		name     string
		size, g  uint64
		wantErr  error
		wantBits uint64
		big      bool // allocates hundreds of MiB
	}{
		{name: "empty", size: 0, g: 512, wantBits: 0},
		{name: "one byte", size: 1, g: 512, wantBits: 1},
		{name: "partial last granule", size: 64*kib + 1, g: 64 * kib, wantBits: 2},
		{name: "max granularity", size: 5 * gib, g: 2 * gib, wantBits: 3},
		{name: "granularity 0", size: mib, g: 0, wantErr: dirtymap.ErrGranularity},
		{name: "granularity 256", size: mib, g: 256, wantErr: dirtymap.ErrGranularity},
		{name: "granularity 511", size: mib, g: 511, wantErr: dirtymap.ErrGranularity},
		{name: "granularity 513", size: mib, g: 513, wantErr: dirtymap.ErrGranularity},
		{name: "granularity 3 MiB", size: mib, g: 3 * mib, wantErr: dirtymap.ErrGranularity},
		{name: "granularity 2^32", size: mib, g: 1 << 32, wantErr: dirtymap.ErrGranularity},
		{name: "granularity 2^63", size: mib, g: 1 << 63, wantErr: dirtymap.ErrGranularity},
		{name: "one granule over the limit", size: 2*tib + 1, g: 512, wantErr: dirtymap.ErrOutOfRange},
		{name: "max size at 512", size: math.MaxUint64, g: 512, wantErr: dirtymap.ErrOutOfRange},
		{name: "max size at 2 GiB", size: math.MaxUint64, g: 2 * gib, wantErr: dirtymap.ErrOutOfRange},
		{name: "exactly the limit", size: 2 * tib, g: 512, wantBits: 1 << 32, big: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if tt.big && testing.Short() {
				t.Skip("allocates 512 MiB")
			}
			m, err := dirtymap.New(tt.size, tt.g)
			if tt.wantErr != nil {
				if err == nil {
					t.Fatalf("New(%d, %d) succeeded, want error %v", tt.size, tt.g, tt.wantErr)
				}
				if !errors.Is(err, tt.wantErr) {
					t.Fatalf("New(%d, %d) = %v, want %v", tt.size, tt.g, err, tt.wantErr)
				}
				if m != nil {
					t.Errorf("New(%d, %d) returned a map with its error", tt.size, tt.g)
				}
				return
			}
			if err != nil {
				t.Fatalf("New(%d, %d): %v", tt.size, tt.g, err)
			}
			if m.Size() != tt.size || m.Granularity() != tt.g || m.Bits() != tt.wantBits {
				t.Errorf("New(%d, %d): Size %d Granularity %d Bits %d, want %d %d %d",
					tt.size, tt.g, m.Size(), m.Granularity(), m.Bits(), tt.size, tt.g, tt.wantBits)
			}
			if got, want := m.SerializedSize(), (tt.wantBits+7)/8; got != want {
				t.Errorf("SerializedSize = %d, want %d", got, want)
			}
			if tt.big {
				m.Set(tt.size-1, 1)
				if got, ok := m.NextDirty(0); !ok || got != tt.size-512 {
					t.Errorf("NextDirty(0) = %d, %v; want %d, true", got, ok, tt.size-512)
				}
			}
		})
	}
}

func TestErrorText(t *testing.T) {
	for _, err := range []error{dirtymap.ErrGranularity, dirtymap.ErrOutOfRange} {
		if s := err.Error(); len(s) < 10 || s[:10] != "dirtymap: " {
			t.Errorf("error %q lacks the package prefix", s)
		}
	}
	_, err := dirtymap.New(mib, 1000)
	if err == nil || !bytes.Contains([]byte(err.Error()), []byte("1000")) {
		t.Errorf("New(mib, 1000) error %v does not name the granularity", err)
	}
}

type rng struct{ off, n uint64 }

// TestBitOrder pins the serialized layout to what qemu writes (formats.md
// B.4): bit b%8 of byte b/8, least significant bit first.
func TestBitOrder(t *testing.T) {
	tests := []struct {
		name    string
		size, g uint64
		set     []rng
		want    []byte
	}{
		{"64k clusters 3 and 9", mib, 64 * kib, []rng{{3 * 64 * kib, 64 * kib}, {9 * 64 * kib, 64 * kib}}, []byte{0x08, 0x02}},
		{"64k partial writes in 3 and 9", mib, 64 * kib, []rng{{3*64*kib + 4096, 512}, {10*64*kib - 1, 1}}, []byte{0x08, 0x02}},
		{"4k writes at 0 and 8k", 32 * kib, 4 * kib, []rng{{0, 4 * kib}, {8 * kib, 4 * kib}}, []byte{0x05}},
		{"one byte at a granule end", 32 * kib, 4 * kib, []rng{{4*kib - 1, 1}}, []byte{0x01}},
		{"two bytes straddling granules 0 and 1", 32 * kib, 4 * kib, []rng{{4*kib - 1, 2}}, []byte{0x03}},
		{"straddling granules 7 and 8", 64 * kib, 4 * kib, []rng{{32*kib - 1, 2}}, []byte{0x80, 0x01}},
		{"last bit of a word", 128 * 512, 512, []rng{{63 * 512, 1}}, []byte{0, 0, 0, 0, 0, 0, 0, 0x80, 0, 0, 0, 0, 0, 0, 0, 0}},
		{"9 granules, last partial", 8*512 + 1, 512, []rng{{8 * 512, 1}}, []byte{0, 0x01}},
		{"past the end ignored", 3 * 512, 512, []rng{{2 * 512, math.MaxUint64}}, []byte{0x04}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := mustNew(t, tt.size, tt.g)
			for _, r := range tt.set {
				m.Set(r.off, r.n)
			}
			got := make([]byte, m.SerializedSize())
			m.MarshalRange(0, got)
			if !bytes.Equal(got, tt.want) {
				t.Fatalf("serialized % x, want % x", got, tt.want)
			}
			// And back: the same bytes load into the same granules.
			r := mustNew(t, tt.size, tt.g)
			r.UnmarshalRange(0, tt.want)
			if !r.Equal(m) {
				t.Fatalf("UnmarshalRange(% x) does not give back the map", tt.want)
			}
		})
	}
}

// TestStraddle: a write that crosses a granule boundary, even by one byte
// on each side, dirties both granules; a 1-byte write dirties one.
func TestStraddle(t *testing.T) {
	const g = 4 * kib
	m := mustNew(t, mib, g)
	m.Set(g-1, 2)
	if !m.IsDirty(0) || !m.IsDirty(g) || m.Count() != 2 {
		t.Fatalf("Set(g-1, 2): IsDirty(0) %v IsDirty(g) %v Count %d, want true true 2", m.IsDirty(0), m.IsDirty(g), m.Count())
	}
	m.ClearAll()
	m.Set(2*g-1, 1)
	if !m.IsDirty(g) || m.Count() != 1 {
		t.Fatalf("Set(2g-1, 1): IsDirty(g) %v Count %d, want true 1", m.IsDirty(g), m.Count())
	}
	// Clear is just as wide: a 2-byte clear across the boundary cleans both.
	m.SetAll()
	m.Clear(g-1, 2)
	if m.IsDirty(0) || m.IsDirty(g) || m.Count() != m.Bits()-2 {
		t.Fatalf("Clear(g-1, 2): IsDirty(0) %v IsDirty(g) %v Count %d, want false false %d", m.IsDirty(0), m.IsDirty(g), m.Count(), m.Bits()-2)
	}
}

func TestMergeGranularity(t *testing.T) {
	tests := []struct {
		name      string
		dst, src  [2]uint64 // size, granularity
		srcSet    []rng
		wantDirty []rng // dirty extents of dst afterwards
	}{
		{"4k into 64k", [2]uint64{mib, 64 * kib}, [2]uint64{mib, 4 * kib}, []rng{{68 * kib, 1}}, []rng{{64 * kib, 64 * kib}}},
		{"4k straddling into 64k", [2]uint64{mib, 64 * kib}, [2]uint64{mib, 4 * kib}, []rng{{124 * kib, 8 * kib}}, []rng{{64 * kib, 128 * kib}}},
		{"64k into 4k", [2]uint64{mib, 4 * kib}, [2]uint64{mib, 64 * kib}, []rng{{64 * kib, 1}}, []rng{{64 * kib, 64 * kib}}},
		{"bigger source clipped", [2]uint64{100 * kib, 4 * kib}, [2]uint64{mib, 64 * kib}, []rng{{64 * kib, 1}}, []rng{{64 * kib, 36 * kib}}},
		{"smaller source, partial last granule", [2]uint64{mib, 64 * kib}, [2]uint64{130 * kib, 4 * kib}, []rng{{129 * kib, 1}}, []rng{{128 * kib, 64 * kib}}},
		// The source's dirty granule starts exactly at the target's size,
		// inside the target's last granule: nothing to merge.
		{"source dirty only past target size", [2]uint64{1536, 1024}, [2]uint64{2048, 512}, []rng{{1536, 1}}, nil},
		{"same granularity, bigger source", [2]uint64{1536, 512}, [2]uint64{4096, 512}, []rng{{1024, 4096}}, []rng{{1024, 512}}},
		{"same granularity, smaller source", [2]uint64{4096, 512}, [2]uint64{1000, 512}, []rng{{600, 1}}, []rng{{512, 512}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dst := mustNew(t, tt.dst[0], tt.dst[1])
			src := mustNew(t, tt.src[0], tt.src[1])
			for _, r := range tt.srcSet {
				src.Set(r.off, r.n)
			}
			dst.Merge(src)
			var got []rng
			dst.Extents(0, dst.Size(), func(off, n uint64, dirty bool) bool {
				if dirty {
					got = append(got, rng{off, n})
				}
				return true
			})
			if fmt.Sprint(got) != fmt.Sprint(tt.wantDirty) {
				t.Fatalf("dirty extents after Merge = %v, want %v", got, tt.wantDirty)
			}
		})
	}
}

func TestSetSerializedRange(t *testing.T) {
	// A 4 MiB disk at 64 KiB granularity has 64 bits = 8 serialized bytes;
	// an "all ones" bitmap cluster covering them marks everything.
	m := mustNew(t, 4*mib, 64*kib)
	m.SetSerializedRange(0, 64*kib)
	if m.Count() != 64 || m.DirtyBytes() != 4*mib {
		t.Fatalf("Count %d DirtyBytes %d, want 64 %d", m.Count(), m.DirtyBytes(), 4*mib)
	}
	m.ClearAll()
	m.SetSerializedRange(1, 1) // granules 8..15
	if got, ok := m.NextDirty(0); !ok || got != 8*64*kib || m.NextClean(got) != 16*64*kib {
		t.Fatalf("after SetSerializedRange(1, 1): NextDirty %d %v NextClean %d", got, ok, m.NextClean(got))
	}
	m.SetSerializedRange(math.MaxUint64, math.MaxUint64) // must not overflow or panic
	if m.Count() != 8 {
		t.Fatalf("SetSerializedRange past the end changed Count to %d", m.Count())
	}
}

func TestEmpty(t *testing.T) {
	m := mustNew(t, 0, 512)
	m.Set(0, math.MaxUint64)
	m.SetAll()
	m.SetSerializedRange(0, 10)
	m.UnmarshalRange(0, []byte{0xff})
	m.Merge(mustNew(t, 1000, 512))
	m.Extents(0, math.MaxUint64, func(off, n uint64, dirty bool) bool {
		t.Fatalf("Extents on an empty map reported %d+%d", off, n)
		return false
	})
	buf := []byte{1, 2, 3}
	m.MarshalRange(0, buf)
	if _, ok := m.NextDirty(0); ok || m.NextClean(0) != 0 || m.Count() != 0 || m.DirtyBytes() != 0 || m.IsDirty(0) || !bytes.Equal(buf, []byte{0, 0, 0}) {
		t.Fatal("empty map is not empty")
	}
	if !m.Equal(m.Clone()) || m.Equal(mustNew(t, 0, 1024)) {
		t.Fatal("Equal on empty maps")
	}
}

// scattered returns a map of the given size and granularity with n dirty
// granules spread pseudo-randomly, some of them adjacent.
func scattered(t testing.TB, size, g uint64, n int) *dirtymap.Map {
	m := mustNew(t, size, g)
	x := uint64(0x9e3779b97f4a7c15)
	for i := 0; i < n; i++ {
		x ^= x << 13
		x ^= x >> 7
		x ^= x << 17
		b := x % m.Bits()
		if i%10 == 0 {
			b = b &^ 1 // pairs now and then
			m.Set((b+1)*g, 1)
			i++
		}
		m.Set(b*g, 1)
	}
	return m
}

// TestExtentsLarge checks that iterating a 1 TiB map touches only its
// extents: the reported extents tile the disk and match Count.
func TestExtentsLarge(t *testing.T) {
	grans := []uint64{64 * kib, 512}
	if testing.Short() {
		grans = grans[:1]
	}
	for _, g := range grans {
		t.Run(fmt.Sprint(g), func(t *testing.T) {
			m := scattered(t, tib, g, 10000)
			var next, dirty, extents uint64
			last := true
			m.Extents(0, math.MaxUint64, func(off, n uint64, d bool) bool {
				if off != next || n == 0 || d == last && extents > 0 {
					t.Fatalf("extent %d: %d+%d %v after end %d state %v", extents, off, n, d, next, last)
				}
				next, last = off+n, d
				extents++
				if d {
					dirty += n
				}
				return true
			})
			if next != tib || dirty != m.DirtyBytes() || dirty != m.Count()*g {
				t.Fatalf("extents end at %d covering %d dirty bytes; want %d, %d", next, dirty, uint64(tib), m.Count()*g)
			}
			if extents < m.Count() {
				t.Fatalf("%d extents for %d dirty granules: too few", extents, m.Count())
			}
		})
	}
}
