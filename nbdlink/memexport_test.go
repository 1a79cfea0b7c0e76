package nbdlink_test

import (
	"errors"
	"fmt"
	"sync"
	"sync/atomic"

	"github.com/cbtfs/cbtfs/nbdlink"
)

// Cluster states of a memExport layer, modelled on qcow2.
const (
	stAbsent = iota // unallocated: the layer below shows through
	stData          // allocated data
	stZero          // zero cluster: reads as zeros, counts as allocated
)

// layer is one image of a two-level chain.
type layer struct {
	state []uint8
	data  map[uint64][]byte // cluster index -> cluster bytes, for stData
}

// memExport is an in-memory export that behaves like a qcow2 overlay over
// a backing image, so that every meta context has something to say:
// base:allocation from the cluster states, qemu:allocation-depth 1 for the
// top layer and 2 for the base, and a dirty bitmap (cluster granularity)
// marked by every write, zero write and trim through the Export methods.
// Storage is sparse: only clusters holding data take memory.
type memExport struct {
	size    uint64
	cluster uint64
	bitmap  string // bitmap name, "" for none
	depth   bool   // offer qemu:allocation-depth

	flushes atomic.Int64
	writes  atomic.Int64

	mu        sync.RWMutex
	top, base layer
	dirty     []bool
}

var _ nbdlink.Export = (*memExport)(nil)

func newMemExport(size, cluster uint64, bitmap string, depth bool) *memExport {
	n := (size + cluster - 1) / cluster
	return &memExport{
		size:    size,
		cluster: cluster,
		bitmap:  bitmap,
		depth:   depth,
		top:     layer{state: make([]uint8, n), data: map[uint64][]byte{}},
		base:    layer{state: make([]uint8, n), data: map[uint64][]byte{}},
		dirty:   make([]bool, n),
	}
}

func (m *memExport) Size() uint64 { return m.size }

func (m *memExport) inRange(off, n uint64) bool { return n <= m.size && off <= m.size-n }

// pieces calls fn for each cluster-bounded piece of [off, off+n).
func (m *memExport) pieces(off, n uint64, fn func(ci, inOff, rel, n uint64)) {
	for rel := uint64(0); rel < n; {
		pos := off + rel
		ci, in := pos/m.cluster, pos%m.cluster
		k := min(m.cluster-in, n-rel)
		fn(ci, in, rel, k)
		rel += k
	}
}

func (m *memExport) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 || !m.inRange(uint64(off), uint64(len(p))) {
		return 0, fmt.Errorf("memexport: read %d at %d: %w", len(p), off, nbdlink.ErrOutOfRange)
	}
	m.mu.RLock()
	defer m.mu.RUnlock()
	m.pieces(uint64(off), uint64(len(p)), func(ci, in, rel, k uint64) {
		dst := p[rel : rel+k]
		var src []byte
		switch m.top.state[ci] {
		case stData:
			src = m.top.data[ci]
		case stAbsent:
			if m.base.state[ci] == stData {
				src = m.base.data[ci]
			}
		}
		if src == nil {
			clear(dst)
		} else {
			copy(dst, src[in:in+k])
		}
	})
	return len(p), nil
}

// materialize gives cluster ci of the top layer its own data, copied from
// what it shows now (copy-on-write from the base). Call with mu held.
func (m *memExport) materialize(ci uint64) []byte {
	if m.top.state[ci] == stData {
		return m.top.data[ci]
	}
	b := make([]byte, m.cluster)
	if m.top.state[ci] == stAbsent && m.base.state[ci] == stData {
		copy(b, m.base.data[ci])
	}
	m.top.state[ci] = stData
	m.top.data[ci] = b
	return b
}

func (m *memExport) WriteAt(p []byte, off int64) (int, error) {
	if off < 0 || !m.inRange(uint64(off), uint64(len(p))) {
		return 0, fmt.Errorf("memexport: write %d at %d: %w", len(p), off, nbdlink.ErrNoSpace)
	}
	m.writes.Add(1)
	m.mu.Lock()
	defer m.mu.Unlock()
	m.pieces(uint64(off), uint64(len(p)), func(ci, in, rel, k uint64) {
		copy(m.materialize(ci)[in:in+k], p[rel:rel+k])
		m.dirty[ci] = true
	})
	return len(p), nil
}

func (m *memExport) Flush() error {
	m.flushes.Add(1)
	return nil
}

func (m *memExport) WriteZeroes(off, n uint64, mayUnmap bool) error {
	if !m.inRange(off, n) {
		return fmt.Errorf("memexport: zero %d at %d: %w", n, off, nbdlink.ErrNoSpace)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	m.pieces(off, n, func(ci, in, rel, k uint64) {
		if k == m.cluster || (in == 0 && off+n == m.size) {
			// A whole cluster becomes a zero cluster, as in qcow2.
			m.top.state[ci] = stZero
			delete(m.top.data, ci)
		} else {
			clear(m.materialize(ci)[in : in+k])
		}
		m.dirty[ci] = true
	})
	return nil
}

func (m *memExport) Trim(off, n uint64) error {
	if !m.inRange(off, n) {
		return fmt.Errorf("memexport: trim %d at %d: %w", n, off, nbdlink.ErrOutOfRange)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	m.pieces(off, n, func(ci, in, rel, k uint64) {
		if k != m.cluster {
			return // partial clusters are left alone (rounding inwards)
		}
		if m.base.state[ci] != stAbsent {
			m.top.state[ci] = stZero // the backing must not show through
		} else {
			m.top.state[ci] = stAbsent
		}
		delete(m.top.data, ci)
		m.dirty[ci] = true
	})
	return nil
}

func (m *memExport) MetaContexts() []string {
	c := []string{nbdlink.ContextBaseAllocation}
	if m.depth {
		c = append(c, nbdlink.ContextAllocationDepth)
	}
	if m.bitmap != "" {
		c = append(c, nbdlink.ContextDirtyBitmap+m.bitmap)
	}
	return c
}

// BlockStatus reports one extent per cluster piece, unmerged, so that the
// server's merging and clipping are exercised.
func (m *memExport) BlockStatus(ctx string, off, n uint64, fn func(uint64, uint32) bool) error {
	if !m.inRange(off, n) {
		return fmt.Errorf("memexport: block status %d at %d: %w", n, off, nbdlink.ErrOutOfRange)
	}
	var status func(ci uint64) uint32
	switch {
	case ctx == nbdlink.ContextBaseAllocation:
		status = func(ci uint64) uint32 {
			s := m.top.state[ci]
			if s == stAbsent {
				s = m.base.state[ci]
			}
			if s == stData {
				return 0
			}
			return 3 // hole,zero
		}
	case ctx == nbdlink.ContextAllocationDepth && m.depth:
		status = func(ci uint64) uint32 {
			switch {
			case m.top.state[ci] != stAbsent:
				return 1
			case m.base.state[ci] != stAbsent:
				return 2
			}
			return 0
		}
	case m.bitmap != "" && ctx == nbdlink.ContextDirtyBitmap+m.bitmap:
		status = func(ci uint64) uint32 {
			if m.dirty[ci] {
				return 1
			}
			return 0
		}
	default:
		return fmt.Errorf("memexport: unknown context %q", ctx)
	}
	m.mu.RLock()
	defer m.mu.RUnlock()
	for rel := uint64(0); rel < n; {
		pos := off + rel
		ci := pos / m.cluster
		k := min(m.cluster-pos%m.cluster, n-rel)
		if !fn(k, status(ci)) {
			return nil
		}
		rel += k
	}
	return nil
}

// baseWrite and baseZero build the backing layer (no bitmap marking).
func (m *memExport) baseWrite(p []byte, off uint64) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.pieces(off, uint64(len(p)), func(ci, in, rel, k uint64) {
		if m.base.state[ci] != stData {
			m.base.state[ci] = stData
			m.base.data[ci] = make([]byte, m.cluster)
		}
		copy(m.base.data[ci][in:in+k], p[rel:rel+k])
	})
}

func (m *memExport) baseZero(off, n uint64) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.pieces(off, n, func(ci, in, rel, k uint64) {
		m.base.state[ci] = stZero
		delete(m.base.data, ci)
	})
}

// contents returns every byte of the export.
func (m *memExport) contents() []byte {
	b := make([]byte, m.size)
	if _, err := m.ReadAt(b, 0); err != nil {
		panic(err)
	}
	return b
}

// fastZeroExport adds NBD_CMD_FLAG_FAST_ZERO support: whole clusters can
// be zeroed fast, anything else cannot.
type fastZeroExport struct{ *memExport }

var _ nbdlink.FastZeroer = fastZeroExport{}

func (f fastZeroExport) WriteZeroesFast(off, n uint64, mayUnmap bool) error {
	if off%f.cluster != 0 || (n%f.cluster != 0 && off+n != f.size) {
		return fmt.Errorf("memexport: unaligned fast zero: %w", errors.ErrUnsupported)
	}
	return f.WriteZeroes(off, n, mayUnmap)
}

// gatedExport holds every ReadAt until release is closed, and reports on
// entered when one starts, so that tests can keep requests in flight.
type gatedExport struct {
	*memExport
	entered chan struct{}
	release chan struct{}
}

func newGatedExport(m *memExport) *gatedExport {
	return &gatedExport{memExport: m, entered: make(chan struct{}, 64), release: make(chan struct{})}
}

func (g *gatedExport) ReadAt(p []byte, off int64) (int, error) {
	g.entered <- struct{}{}
	<-g.release
	return g.memExport.ReadAt(p, off)
}

// failExport fails every data operation with err.
type failExport struct {
	*memExport
	err error
}

func (f failExport) ReadAt(p []byte, off int64) (int, error)  { return 0, f.err }
func (f failExport) WriteAt(p []byte, off int64) (int, error) { return 0, f.err }
func (f failExport) Flush() error                             { return f.err }

// stripeExport is a read-only zero-filled export whose base:allocation
// alternates every stripe bytes between data (0) and hole,zero (3): a
// worst case for extent counts that needs no memory.
type stripeExport struct {
	size, stripe uint64
}

func (s stripeExport) Size() uint64 { return s.size }
func (s stripeExport) ReadAt(p []byte, off int64) (int, error) {
	clear(p)
	return len(p), nil
}
func (s stripeExport) WriteAt(p []byte, off int64) (int, error) { return 0, nbdlink.ErrReadOnly }
func (s stripeExport) Flush() error                             { return nil }
func (s stripeExport) Trim(off, n uint64) error                 { return nbdlink.ErrReadOnly }
func (s stripeExport) WriteZeroes(off, n uint64, mayUnmap bool) error {
	return nbdlink.ErrReadOnly
}
func (s stripeExport) MetaContexts() []string { return []string{nbdlink.ContextBaseAllocation} }
func (s stripeExport) BlockStatus(ctx string, off, n uint64, fn func(uint64, uint32) bool) error {
	for pos := off; pos < off+n; {
		k := s.stripe - pos%s.stripe
		var flags uint32
		if (pos/s.stripe)%2 == 1 {
			flags = 3
		}
		if !fn(k, flags) { // may run past the request: the server clips
			return nil
		}
		pos += k
	}
	return nil
}
