package dirtymap

import (
	"fmt"
	"math/bits"
	"slices"
	"sync"
)

// Granularity limits, from qemu's block/qcow2-bitmap.c (formats.md B.4):
// qemu refuses granularities below 512 ("Granularity must be power of 2 and
// at least 512"), and granularity_bits must be in
// [BME_MIN_GRANULARITY_BITS, BME_MAX_GRANULARITY_BITS] = [9, 31].
const (
	MinGranularity = 512     // 1 << BME_MIN_GRANULARITY_BITS
	MaxGranularity = 1 << 31 // 1 << BME_MAX_GRANULARITY_BITS
)

// MaxBitmapBytes is the largest bitmap [New] accepts, counted as serialized
// bytes (one bit per granule, see [Map.SerializedSize]). It mirrors qemu's
// BME_MAX_PHYS_SIZE (0x20000000) in block/qcow2-bitmap.c, so every bitmap
// qemu can load fits, and a hostile size cannot make [New] allocate without
// bound. At 512-byte granularity it covers a 2 TiB disk; at 64 KiB, 256 TiB.
const MaxBitmapBytes = 0x20000000

// Map is an in-memory dirty bitmap over a disk of [Map.Size] bytes at a
// power-of-two granularity: granule b covers bytes
// [b*granularity, (b+1)*granularity) clipped to the size, and is either
// dirty or clean.
//
// A Map is safe for concurrent use by multiple goroutines. The zero value is
// not usable; create maps with [New].
type Map struct {
	// Immutable after New.
	size  uint64
	shift uint   // log2(granularity)
	nbits uint64 // number of granules: ceil(size / granularity)
	tail  uint64 // valid-bit mask of the last word (all ones if nbits%64 == 0)

	// mu guards everything below. It is never held while user code runs
	// (the Extents callback), and never together with another Map's mu
	// (Merge and Equal copy the other map in chunks), so there is no lock
	// order to follow.
	mu sync.RWMutex
	// words holds granule b at bit b%64 of words[b/64]. Bits >= nbits
	// are always zero.
	words []uint64
	count uint64  // number of set bits in words
	nz    summary // item w set iff words[w] != 0
	nf    summary // item w set iff words[w] != all ones (so always set for a partial last word)
}

// New returns a clean map over a disk of size bytes, tracked in granules of
// granularity bytes.
//
// The granularity must be a power of two in [MinGranularity, MaxGranularity];
// otherwise the error wraps [ErrGranularity]. A size of 0 gives an empty map
// on which every operation is a no-op. If the bitmap would be larger than
// [MaxBitmapBytes] the error wraps [ErrOutOfRange]. The memory used is
// one bit per granule plus about 1/32 of that for the summaries.
func New(size, granularity uint64) (*Map, error) {
	if granularity < MinGranularity || granularity > MaxGranularity || granularity&(granularity-1) != 0 {
		return nil, fmt.Errorf("%w: %d is not a power of two in [%d, %d]",
			ErrGranularity, granularity, MinGranularity, MaxGranularity)
	}
	shift := uint(bits.TrailingZeros64(granularity))
	nbits := size >> shift
	if size&(granularity-1) != 0 {
		nbits++
	}
	// Validate, then allocate.
	if ser := (nbits + 7) / 8; ser > MaxBitmapBytes {
		return nil, fmt.Errorf("%w: size %d at granularity %d needs a %d-byte bitmap, limit is %d",
			ErrOutOfRange, size, granularity, ser, MaxBitmapBytes)
	}
	nw := (nbits + 63) / 64
	m := &Map{
		size:  size,
		shift: shift,
		nbits: nbits,
		tail:  ^uint64(0),
		words: make([]uint64, nw),
		nz:    newSummary(nw),
		nf:    newSummary(nw),
	}
	if r := nbits & 63; r != 0 {
		m.tail = 1<<r - 1
	}
	m.nf.setRange(0, nw) // no word is full yet
	return m, nil
}

// Size returns the size in bytes of the disk the map covers.
func (m *Map) Size() uint64 { return m.size }

// Granularity returns the number of bytes each bit stands for.
func (m *Map) Granularity() uint64 { return 1 << m.shift }

// Bits returns the number of granules, ceil(Size / Granularity).
func (m *Map) Bits() uint64 { return m.nbits }

// granules converts the byte range [off, off+n), clipped to the size, into
// the granule range [lo, hi) it touches. ok is false when nothing is left.
func (m *Map) granules(off, n uint64) (lo, hi uint64, ok bool) {
	if n == 0 || off >= m.size {
		return 0, 0, false
	}
	end := m.size
	if n < m.size-off { // off+n < size, without overflow
		end = off + n
	}
	return off >> m.shift, (end-1)>>m.shift + 1, true
}

// Set marks dirty every granule touched by the byte range [off, off+n),
// clipped to the size. It does nothing when n is 0 or off >= Size.
func (m *Map) Set(off, n uint64) {
	lo, hi, ok := m.granules(off, n)
	if !ok {
		return
	}
	m.mu.Lock()
	m.setLocked(lo, hi)
	m.mu.Unlock()
}

// Clear marks clean every granule touched by the byte range [off, off+n),
// clipped to the size, including granules only partly covered. It does
// nothing when n is 0 or off >= Size.
func (m *Map) Clear(off, n uint64) {
	lo, hi, ok := m.granules(off, n)
	if !ok {
		return
	}
	m.mu.Lock()
	m.clearLocked(lo, hi)
	m.mu.Unlock()
}

// SetAll marks every granule dirty.
func (m *Map) SetAll() {
	m.mu.Lock()
	m.setLocked(0, m.nbits)
	m.mu.Unlock()
}

// ClearAll marks every granule clean.
func (m *Map) ClearAll() {
	m.mu.Lock()
	m.clearLocked(0, m.nbits)
	m.mu.Unlock()
}

// setLocked sets granules [lo, hi), hi <= nbits. Interior words are
// written whole.
func (m *Map) setLocked(lo, hi uint64) {
	if lo >= hi {
		return
	}
	a, b := lo>>6, (hi-1)>>6
	first, last := ^uint64(0)<<(lo&63), ^uint64(0)>>(63-((hi-1)&63))
	if a == b {
		m.orWordBitsLocked(a, first&last)
	} else {
		m.orWordBitsLocked(a, first)
		for w := a + 1; w < b; w++ {
			m.count += uint64(bits.OnesCount64(^m.words[w]))
			m.words[w] = ^uint64(0)
		}
		m.orWordBitsLocked(b, last)
	}
	m.nz.setRange(a, b+1) // every touched word is non-zero now
	// Interior words are full now; the edge words may not be.
	s, e := a, b+1
	if m.words[s] != ^uint64(0) {
		s++
	}
	if e > s && m.words[e-1] != ^uint64(0) {
		e--
	}
	m.nf.clearRange(s, e)
}

// clearLocked clears granules [lo, hi), hi <= nbits.
func (m *Map) clearLocked(lo, hi uint64) {
	if lo >= hi {
		return
	}
	a, b := lo>>6, (hi-1)>>6
	first, last := ^uint64(0)<<(lo&63), ^uint64(0)>>(63-((hi-1)&63))
	if a == b {
		m.andNotWordBitsLocked(a, first&last)
	} else {
		m.andNotWordBitsLocked(a, first)
		for w := a + 1; w < b; w++ {
			m.count -= uint64(bits.OnesCount64(m.words[w]))
			m.words[w] = 0
		}
		m.andNotWordBitsLocked(b, last)
	}
	m.nf.setRange(a, b+1) // no touched word is full now
	s, e := a, b+1
	if m.words[s] != 0 {
		s++
	}
	if e > s && m.words[e-1] != 0 {
		e--
	}
	m.nz.clearRange(s, e)
}

// orWordBitsLocked sets mask in words[w] and keeps count, but not the
// summaries, up to date.
func (m *Map) orWordBitsLocked(w, mask uint64) {
	old := m.words[w]
	m.count += uint64(bits.OnesCount64(mask &^ old))
	m.words[w] = old | mask
}

// andNotWordBitsLocked clears mask in words[w] and keeps count, but not the
// summaries, up to date.
func (m *Map) andNotWordBitsLocked(w, mask uint64) {
	old := m.words[w]
	m.count -= uint64(bits.OnesCount64(mask & old))
	m.words[w] = old &^ mask
}

// orWordLocked sets mask (which must have no bits >= nbits) in words[w] and
// keeps the count and the summaries up to date.
func (m *Map) orWordLocked(w, mask uint64) {
	old := m.words[w]
	nw := old | mask
	if nw == old {
		return
	}
	m.count += uint64(bits.OnesCount64(nw ^ old))
	m.words[w] = nw
	if old == 0 {
		m.nz.setBit(w)
	}
	if nw == ^uint64(0) {
		m.nf.clearBit(w)
	}
}

// bitLocked reports whether granule b < nbits is dirty.
func (m *Map) bitLocked(b uint64) bool {
	return m.words[b>>6]>>(b&63)&1 != 0
}

// nextDirtyLocked returns the first dirty granule >= b, or nbits.
func (m *Map) nextDirtyLocked(b uint64) uint64 {
	if b >= m.nbits {
		return m.nbits
	}
	w := b >> 6
	if x := m.words[w] & (^uint64(0) << (b & 63)); x != 0 {
		return w<<6 + uint64(bits.TrailingZeros64(x))
	}
	j, ok := m.nz.next(w + 1)
	if !ok {
		return m.nbits
	}
	return j<<6 + uint64(bits.TrailingZeros64(m.words[j]))
}

// nextCleanLocked returns the first clean granule >= b, or nbits.
func (m *Map) nextCleanLocked(b uint64) uint64 {
	if b >= m.nbits {
		return m.nbits
	}
	w := b >> 6
	if x := ^m.words[w] & (^uint64(0) << (b & 63)); x != 0 {
		return min(w<<6+uint64(bits.TrailingZeros64(x)), m.nbits)
	}
	j, ok := m.nf.next(w + 1)
	if !ok {
		return m.nbits
	}
	return min(j<<6+uint64(bits.TrailingZeros64(^m.words[j])), m.nbits)
}

// Count returns the number of dirty granules.
func (m *Map) Count() uint64 {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return m.count
}

// DirtyBytes returns the number of bytes covered by dirty granules. A dirty
// last granule counts only up to Size.
func (m *Map) DirtyBytes() uint64 {
	m.mu.RLock()
	defer m.mu.RUnlock()
	d := m.count << m.shift
	if r := m.size & (1<<m.shift - 1); r != 0 && m.bitLocked(m.nbits-1) {
		d -= 1<<m.shift - r
	}
	return d
}

// IsDirty reports whether the granule holding byte off is dirty. It returns
// false for off >= Size.
func (m *Map) IsDirty(off uint64) bool {
	if off >= m.size {
		return false
	}
	m.mu.RLock()
	defer m.mu.RUnlock()
	return m.bitLocked(off >> m.shift)
}

// NextDirty returns the first byte offset >= off that lies in a dirty
// granule: off itself when its granule is dirty, otherwise the start of the
// next dirty granule. It returns false when there is none before Size.
func (m *Map) NextDirty(off uint64) (uint64, bool) {
	if off >= m.size {
		return 0, false
	}
	m.mu.RLock()
	defer m.mu.RUnlock()
	b := off >> m.shift
	if m.bitLocked(b) {
		return off, true
	}
	c := m.nextDirtyLocked(b + 1)
	if c >= m.nbits {
		return 0, false
	}
	return c << m.shift, true
}

// NextClean returns the first byte offset >= off that lies in a clean
// granule: off itself when its granule is clean, otherwise the start of the
// next clean granule. It returns Size when there is none (and for
// off >= Size), the way SEEK_HOLE reports the implicit hole at EOF.
func (m *Map) NextClean(off uint64) uint64 {
	if off >= m.size {
		return m.size
	}
	m.mu.RLock()
	defer m.mu.RUnlock()
	b := off >> m.shift
	if !m.bitLocked(b) {
		return off
	}
	c := m.nextCleanLocked(b + 1)
	if c >= m.nbits {
		return m.size
	}
	return c << m.shift
}

// extentBatch is how many extents Extents computes per read-lock hold.
const extentBatch = 32

// Extents calls fn for the alternating clean and dirty extents that cover
// the byte range [off, off+n) clipped to Size, in order. Adjacent granules
// in the same state form one extent; the first and last extents are clipped
// to the requested range, and the last granule to Size. Extents stops when
// fn returns false. Nothing is reported when n is 0 or off >= Size.
//
// The cost is proportional to the number of extents reported (times a
// small logarithmic factor), not to the length of the range.
//
// fn is called without the map's lock held, so it may call any method of m,
// including ones that modify it. Extents are computed in small batches under
// the read lock; if m is modified concurrently, each batch reflects one
// moment, so two adjacent extents from different batches may have the same
// state, but the reported extents still cover the range in order without
// gaps or overlaps.
func (m *Map) Extents(off, n uint64, fn func(off, n uint64, dirty bool) bool) {
	if n == 0 || off >= m.size {
		return
	}
	end := m.size
	if n < m.size-off {
		end = off + n
	}
	type extent struct {
		off, n uint64
		dirty  bool
	}
	var batch [extentBatch]extent
	for off < end {
		k := 0
		m.mu.RLock()
		for k < len(batch) && off < end {
			b := off >> m.shift
			dirty := m.bitLocked(b)
			var c uint64
			if dirty {
				c = m.nextCleanLocked(b + 1)
			} else {
				c = m.nextDirtyLocked(b + 1)
			}
			// c <= nbits <= 2^32 and shift <= 31: no overflow.
			e := min(c<<m.shift, end)
			batch[k] = extent{off, e - off, dirty}
			k++
			off = e
		}
		m.mu.RUnlock()
		for _, x := range batch[:k] {
			if !fn(x.off, x.n, x.dirty) {
				return
			}
		}
	}
}

// Clone returns an independent copy of m, taken as one consistent snapshot.
func (m *Map) Clone() *Map {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return &Map{
		size:  m.size,
		shift: m.shift,
		nbits: m.nbits,
		tail:  m.tail,
		words: append([]uint64(nil), m.words...),
		count: m.count,
		nz:    m.nz.clone(),
		nf:    m.nf.clone(),
	}
}

// copyChunk is how many words Merge and Equal copy out of the other map per
// lock hold.
const copyChunk = 256

// Equal reports whether m and o have the same size, the same granularity
// and the same dirty granules.
//
// The two maps are never locked at the same time (so concurrent a.Equal(b)
// and b.Equal(a) cannot deadlock); o is compared chunk by chunk. If either
// map is modified during the call, the result is only meaningful for the
// parts that did not change.
func (m *Map) Equal(o *Map) bool {
	if m == o {
		return true
	}
	if m.size != o.size || m.shift != o.shift {
		return false
	}
	if m.Count() != o.Count() {
		return false
	}
	var buf [copyChunk]uint64
	for w := 0; w < len(m.words); w += copyChunk {
		o.mu.RLock()
		k := copy(buf[:], o.words[w:])
		o.mu.RUnlock()
		m.mu.RLock()
		eq := slices.Equal(buf[:k], m.words[w:w+k])
		m.mu.RUnlock()
		if !eq {
			return false
		}
	}
	return true
}

// Merge marks dirty in m every byte range that is dirty in src (m |= src).
// The granularities and sizes may differ: each dirty extent of src, clipped
// to m's size, is Set in m, so every granule of m touched by a dirty
// granule of src becomes dirty. This is what qemu's hbitmap_merge does for
// bitmaps of different granularity. Merging a map into itself does nothing.
//
// The two maps are never locked at the same time, so concurrent a.Merge(b)
// and b.Merge(a) cannot deadlock. src is read and m updated in chunks; a
// concurrent reader of m may see a merge half done (which looks like a
// series of Set calls), and a concurrent change to src may or may not be
// merged.
func (m *Map) Merge(src *Map) {
	if m == src || m.size == 0 || src.size == 0 {
		return
	}
	if m.shift == src.shift {
		m.mergeWords(src)
		return
	}
	m.mergeExtents(src)
}

// mergeWords merges src into m when both have the same granularity, so
// granule b of src is granule b of m: OR whole words, skipping the zero
// words of src through its summary.
func (m *Map) mergeWords(src *Map) {
	nw := uint64(len(m.words))
	var idx [copyChunk]uint64
	var val [copyChunk]uint64
	for w := uint64(0); w < nw; {
		k := 0
		src.mu.RLock()
		for k < copyChunk {
			j, ok := src.nz.next(w)
			if !ok || j >= nw {
				w = nw
				break
			}
			idx[k], val[k] = j, src.words[j]
			k++
			w = j + 1
		}
		src.mu.RUnlock()
		m.mu.Lock()
		for i := range k {
			x := val[i]
			if idx[i] == nw-1 {
				x &= m.tail // src bits past m's last granule
			}
			m.orWordLocked(idx[i], x)
		}
		m.mu.Unlock()
	}
}

// mergeExtents merges src into m when the granularities differ, one batch
// of src's dirty extents at a time.
func (m *Map) mergeExtents(src *Map) {
	lim := min(m.size, src.size)
	var batch [copyChunk][2]uint64 // granule ranges [lo, hi) of m
	for off := uint64(0); off < lim; {
		k := 0
		src.mu.RLock()
		for k < copyChunk && off < lim {
			b := src.nextDirtyLocked(off >> src.shift)
			if b >= src.nbits {
				off = lim
				break
			}
			// off is 0 or the end of src's previous dirty extent, so
			// granule b starts at or after it.
			s := b << src.shift
			if s >= lim {
				off = lim
				break
			}
			e := min(src.nextCleanLocked(b)<<src.shift, lim)
			batch[k] = [2]uint64{s >> m.shift, (e-1)>>m.shift + 1}
			k++
			off = e
		}
		src.mu.RUnlock()
		m.mu.Lock()
		for _, r := range batch[:k] {
			m.setLocked(r[0], r[1])
		}
		m.mu.Unlock()
	}
}
