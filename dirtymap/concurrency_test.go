package dirtymap

import (
	"math"
	"sync"
	"testing"
)

// TestConcurrent runs every kind of operation in parallel (for -race), with
// merges and comparisons in both directions between two maps, and Extents
// callbacks that call back into the map. It then checks the invariants.
func TestConcurrent(t *testing.T) {
	const size, g = 64 << 20, 4096
	a, err := New(size, g)
	if err != nil {
		t.Fatal(err)
	}
	b, err := New(size+12345, 2*g)
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	for i := range 4 {
		wg.Go(func() {
			for j := range uint64(300) {
				off := (j*7919 + uint64(i)*104729) * 1000 % size
				switch j % 10 {
				case 0:
					a.Clear(off, 3*g)
				case 1:
					a.Merge(b)
				case 2:
					b.Merge(a)
				case 3:
					a.Equal(b)
					b.Equal(a)
				case 4:
					a.Extents(off, 64*g, func(o, n uint64, d bool) bool {
						a.IsDirty(o)
						if d {
							b.Set(o, n) // callbacks may modify maps
						}
						return true
					})
				case 5:
					buf := make([]byte, 100)
					a.MarshalRange(off/g/8, buf)
					b.UnmarshalRange(off/(2*g)/8, buf)
				case 6:
					a.NextDirty(off)
					b.NextClean(off)
					a.Count()
					b.DirtyBytes()
					a.Clone()
				case 7:
					b.Clear(off, math.MaxUint64)
				default:
					a.Set(off, 5*g)
					b.Set(off+g, 1)
				}
			}
		})
	}
	wg.Wait()
	for _, m := range []*Map{a, b} {
		if err := checkInvariants(m); err != nil {
			t.Fatal(err)
		}
	}
}
