package dirtymap_test

import (
	"math"
	"testing"
)

// benchExtents iterates all extents of a 1 TiB map with 10,000 scattered
// dirty granules.
func benchExtents(b *testing.B, g uint64) {
	m := scattered(b, tib, g, 10000)
	var n int
	for b.Loop() {
		n = 0
		m.Extents(0, math.MaxUint64, func(off, l uint64, dirty bool) bool {
			n++
			return true
		})
	}
	b.ReportMetric(float64(n), "extents/op")
}

func BenchmarkExtents1TiB(b *testing.B)    { benchExtents(b, 64*kib) }
func BenchmarkExtents1TiB512(b *testing.B) { benchExtents(b, 512) }

// BenchmarkSet measures guest-write sized Sets (4 KiB and 1 MiB) at
// scattered offsets, and a Set/Clear of a whole 1 TiB map at 64 KiB.
func BenchmarkSet(b *testing.B) {
	for _, bc := range []struct {
		name string
		n    uint64
	}{{"4KiB", 4 * kib}, {"1MiB", mib}} {
		b.Run(bc.name, func(b *testing.B) {
			m := mustNew(b, tib, 64*kib)
			off := uint64(0)
			b.SetBytes(int64(bc.n))
			for b.Loop() {
				off = (off + 0x9e3779b97f4a7c15) % tib
				m.Set(off, bc.n)
			}
		})
	}
	b.Run("all-1TiB", func(b *testing.B) {
		m := mustNew(b, tib, 64*kib)
		for b.Loop() {
			m.SetAll()
			m.ClearAll()
		}
	})
}

// BenchmarkMarshal serializes a half-dirty 1 TiB map at 64 KiB granularity
// (2 MiB of bitmap data) one 64 KiB qcow2 cluster at a time.
func BenchmarkMarshal(b *testing.B) {
	m := mustNew(b, tib, 64*kib)
	for off := uint64(0); off < tib; off += 3 * 64 * kib {
		m.Set(off, 64*kib+1)
	}
	buf := make([]byte, 64*kib)
	b.SetBytes(int64(m.SerializedSize()))
	for b.Loop() {
		for off := uint64(0); off < m.SerializedSize(); off += uint64(len(buf)) {
			m.MarshalRange(off, buf)
		}
	}
}

// BenchmarkUnmarshal loads the same data back.
func BenchmarkUnmarshal(b *testing.B) {
	src := mustNew(b, tib, 64*kib)
	for off := uint64(0); off < tib; off += 3 * 64 * kib {
		src.Set(off, 64*kib+1)
	}
	data := make([]byte, src.SerializedSize())
	src.MarshalRange(0, data)
	m := mustNew(b, tib, 64*kib)
	b.SetBytes(int64(len(data)))
	for b.Loop() {
		m.ClearAll()
		m.UnmarshalRange(0, data)
	}
}
