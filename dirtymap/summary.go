package dirtymap

import "math/bits"

// summary is a hierarchical bitset. levels[0] holds one bit per item (for
// [Map], one bit per data word); every bit of levels[k+1] says whether the
// corresponding 64-bit word of levels[k] is non-zero. The top level is a
// single word (no level at all when there are no items).
//
// Invariants: bit j of levels[k+1] is set iff levels[k][j] != 0, and bits
// past the end of a level are zero.
type summary struct {
	levels [][]uint64
}

// newSummary returns an all-clear summary over n items.
func newSummary(n uint64) summary {
	var s summary
	for n > 0 {
		w := (n + 63) / 64
		s.levels = append(s.levels, make([]uint64, w))
		if w == 1 {
			break
		}
		n = w
	}
	return s
}

// clone returns an independent copy of s.
func (s *summary) clone() summary {
	c := summary{levels: make([][]uint64, len(s.levels))}
	for i, l := range s.levels {
		c.levels[i] = append([]uint64(nil), l...)
	}
	return c
}

// setBit sets item i.
func (s *summary) setBit(i uint64) {
	for _, l := range s.levels {
		old := l[i>>6]
		l[i>>6] = old | 1<<(i&63)
		if old != 0 {
			return // upper levels already record this word as non-zero
		}
		i >>= 6
	}
}

// clearBit clears item i.
func (s *summary) clearBit(i uint64) {
	for _, l := range s.levels {
		l[i>>6] &^= 1 << (i & 63)
		if l[i>>6] != 0 {
			return
		}
		i >>= 6
	}
}

// setRange sets items [lo, hi).
func (s *summary) setRange(lo, hi uint64) {
	for _, l := range s.levels {
		if lo >= hi {
			return
		}
		setBits(l, lo, hi)
		// Every touched word is now non-zero.
		lo, hi = lo>>6, (hi-1)>>6+1
	}
}

// clearRange clears items [lo, hi).
func (s *summary) clearRange(lo, hi uint64) {
	for _, l := range s.levels {
		if lo >= hi {
			return
		}
		clearBits(l, lo, hi)
		// Words strictly inside [lo, hi) are now zero; the two edge words
		// may still hold bits outside the range.
		a, b := lo>>6, (hi-1)>>6+1
		if l[a] != 0 {
			a++
		}
		if b > a && l[b-1] != 0 {
			b--
		}
		lo, hi = a, b
	}
}

// next returns the first set item >= i.
func (s *summary) next(i uint64) (uint64, bool) {
	lvl := 0
	for {
		if lvl == len(s.levels) {
			return 0, false
		}
		l := s.levels[lvl]
		w := i >> 6
		if w >= uint64(len(l)) {
			return 0, false
		}
		if x := l[w] & (^uint64(0) << (i & 63)); x != 0 {
			i = w<<6 + uint64(bits.TrailingZeros64(x))
			break
		}
		// Nothing left in word w: continue with word w+1, which is bit
		// w+1 of the next level up.
		i = w + 1
		lvl++
	}
	for lvl > 0 {
		lvl--
		i = i<<6 + uint64(bits.TrailingZeros64(s.levels[lvl][i]))
	}
	return i, true
}

// setBits sets bits [lo, hi) of ws; lo < hi.
func setBits(ws []uint64, lo, hi uint64) {
	a, b := lo>>6, (hi-1)>>6
	first, last := ^uint64(0)<<(lo&63), ^uint64(0)>>(63-((hi-1)&63))
	if a == b {
		ws[a] |= first & last
		return
	}
	ws[a] |= first
	for w := a + 1; w < b; w++ {
		ws[w] = ^uint64(0)
	}
	ws[b] |= last
}

// clearBits clears bits [lo, hi) of ws; lo < hi.
func clearBits(ws []uint64, lo, hi uint64) {
	a, b := lo>>6, (hi-1)>>6
	first, last := ^uint64(0)<<(lo&63), ^uint64(0)>>(63-((hi-1)&63))
	if a == b {
		ws[a] &^= first & last
		return
	}
	ws[a] &^= first
	clear(ws[a+1 : b])
	ws[b] &^= last
}
