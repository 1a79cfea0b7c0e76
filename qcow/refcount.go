package qcow

import (
	"encoding/binary"
	"fmt"
)

// Refcount table entries (formats.md A.7).
const reftOffsetMask = 0xfffffffffffffe00

// refcounts is the refcount structure of a writable layer: the refcount
// table, kept whole in memory, and the refcount blocks, cached.
//
// Increments are applied at once (in the cache) and may reach the disk
// at any time: an excess refcount is only a leak. Decrements are deferred
// (see writer.freeLater) until no on-disk L1/L2 entry can still point at
// the cluster, so that the on-disk refcount of a cluster is never lower
// than the number of on-disk references to it (formats.md A.8).
type refcounts struct {
	l         *qcow2Layer
	bits      uint64 // refcount width: 1..64
	perBlock  uint64 // entries per refcount block
	table     []uint64
	tableOff  uint64 // host offset of the table on disk (changes when it grows)
	tableCls  uint64 // clusters the on-disk table occupies
	tableMove bool   // the table was relocated: write it whole and switch the header
	dirtyRT   map[uint64]struct{}
	blocks    *metaCache
	dirtyRB   map[*table]struct{}
	freeIndex uint64 // no free cluster lies below this index
}

// loadRefcounts reads the refcount table of l.
func (l *qcow2Layer) loadRefcounts() (*refcounts, error) {
	h := l.h
	rc := &refcounts{
		l:        l,
		bits:     1 << h.refcountOrder,
		tableOff: h.reftableOff,
		tableCls: uint64(h.reftableClusters),
		dirtyRT:  map[uint64]struct{}{},
		blocks:   newMetaCache(8 << 20),
		dirtyRB:  map[*table]struct{}{},
	}
	rc.perBlock = l.clusterSize * 8 / rc.bits
	n := rc.tableCls * l.clusterSize / 8
	buf := make([]byte, n*8)
	if err := readFull(l.f, buf, int64(rc.tableOff)); err != nil {
		return nil, fmt.Errorf("qcow: %s: read refcount table: %w", l.name, err)
	}
	rc.table = make([]uint64, n)
	for i := range rc.table {
		e := binary.BigEndian.Uint64(buf[i*8:])
		// "Bits 0-8 of each entry are reserved and must be zero" and a
		// refcount block is cluster aligned.
		if e&^reftOffsetMask != 0 || (e&reftOffsetMask)%l.clusterSize != 0 {
			return nil, l.corrupt(int64(rc.tableOff)+int64(i)*8, "refcount table entry", fmt.Sprintf("%#x", e))
		}
		rc.table[i] = e
	}
	return rc, nil
}

// maxRefcount is the largest value a refcount entry can hold.
func (rc *refcounts) maxRefcount() uint64 {
	if rc.bits == 64 {
		return ^uint64(0)
	}
	return 1<<rc.bits - 1
}

// entry reads refcount i of block t. Sub-byte widths are packed
// LSB-first; wider ones are big-endian (formats.md A.7).
func (rc *refcounts) entry(t *table, i uint64) uint64 {
	switch rc.bits {
	case 1, 2, 4:
		per := 8 / rc.bits
		b := t.b[i/per]
		return uint64(b>>((i%per)*rc.bits)) & (1<<rc.bits - 1)
	case 8:
		return uint64(t.b[i])
	case 16:
		return uint64(binary.BigEndian.Uint16(t.b[i*2:]))
	case 32:
		return uint64(binary.BigEndian.Uint32(t.b[i*4:]))
	}
	return binary.BigEndian.Uint64(t.b[i*8:])
}

// setEntry writes refcount i of block t and marks the block dirty.
func (rc *refcounts) setEntry(t *table, i, v uint64) {
	switch rc.bits {
	case 1, 2, 4:
		per := 8 / rc.bits
		shift := (i % per) * rc.bits
		mask := byte(1<<rc.bits-1) << shift
		t.b[i/per] = t.b[i/per]&^mask | byte(v<<shift)&mask
	case 8:
		t.b[i] = byte(v)
	case 16:
		binary.BigEndian.PutUint16(t.b[i*2:], uint16(v))
	case 32:
		binary.BigEndian.PutUint32(t.b[i*4:], uint32(v))
	default:
		binary.BigEndian.PutUint64(t.b[i*8:], v)
	}
	t.dirty = true
	rc.dirtyRB[t] = struct{}{}
}

// block returns the refcount block covering cluster idx, or nil when it
// does not exist (all its refcounts are 0).
func (rc *refcounts) block(idx uint64) (*table, error) {
	ri := idx / rc.perBlock
	if ri >= uint64(len(rc.table)) || rc.table[ri] == 0 {
		return nil, nil
	}
	off := rc.table[ri] & reftOffsetMask
	if t := rc.blocks.get(off); t != nil {
		return t, nil
	}
	t := &table{off: off, b: make([]byte, rc.l.clusterSize)}
	if err := readFull(rc.l.f, t.b, int64(off)); err != nil {
		return nil, fmt.Errorf("qcow: %s: read refcount block at %#x: %w", rc.l.name, off, err)
	}
	return rc.blocks.put(t), nil
}

// get returns the refcount of cluster idx.
func (rc *refcounts) get(idx uint64) (uint64, error) {
	t, err := rc.block(idx)
	if err != nil || t == nil {
		return 0, err
	}
	return rc.entry(t, idx%rc.perBlock), nil
}

// add changes the refcount of cluster idx by delta (+1 or -1), creating
// the refcount block (and growing the table) when needed.
func (rc *refcounts) add(idx uint64, delta int) error {
	t, err := rc.block(idx)
	if err != nil {
		return err
	}
	if t == nil {
		if delta < 0 {
			return rc.l.corrupt(-1, "refcount (decrement below zero)", idx)
		}
		if t, err = rc.newBlock(idx); err != nil {
			return err
		}
	}
	i := idx % rc.perBlock
	v := rc.entry(t, i)
	switch {
	case delta > 0 && v == rc.maxRefcount():
		return fmt.Errorf("qcow: %s: refcount overflow for cluster %d (refcount_bits=%d)", rc.l.name, idx, rc.bits)
	case delta < 0 && v == 0:
		return rc.l.corrupt(-1, "refcount (decrement below zero)", idx)
	case delta > 0:
		v++
	default:
		v--
		if v == 0 && idx < rc.freeIndex {
			rc.freeIndex = idx
		}
	}
	rc.setEntry(t, i, v)
	return nil
}

// newBlock creates the refcount block covering cluster idx. As in qemu,
// the block is placed at the first free cluster; if that cluster is
// covered by the new block itself, the block holds its own refcount.
// The block reaches the disk before the table entry that points to it
// (flush writes blocks, syncs, then writes the table).
func (rc *refcounts) newBlock(idx uint64) (*table, error) {
	ri := idx / rc.perBlock
	if ri >= uint64(len(rc.table)) {
		if err := rc.grow(ri + 1); err != nil {
			return nil, err
		}
		if rc.table[ri] != 0 {
			// Growing the table created this block already.
			return rc.block(idx)
		}
	}
	x, err := rc.findFree(1)
	if err != nil {
		return nil, err
	}
	cs := rc.l.clusterSize
	t := &table{off: x * cs, b: make([]byte, cs), dirty: true}
	rc.blocks.put(t)
	rc.dirtyRB[t] = struct{}{}
	rc.table[ri] = t.off
	rc.dirtyRT[ri] = struct{}{}
	if err := rc.l.w.reserve(x, 1); err != nil {
		return nil, err
	}
	if x/rc.perBlock == ri {
		rc.setEntry(t, x%rc.perBlock, 1)
	} else if err := rc.add(x, 1); err != nil {
		return nil, err
	}
	return t, nil
}

// grow relocates the refcount table to a larger one holding at least
// need entries. The new table and the refcount blocks for its own clusters
// are allocated beyond everything in use; flush writes them, syncs,
// switches the header to the new table, and only then frees the old one.
func (rc *refcounts) grow(need uint64) error {
	cs := rc.l.clusterSize
	entries := max(need, uint64(len(rc.table))*2)
	for {
		cls := (entries*8 + cs - 1) / cs
		if cls*cs > maxReftableBytes {
			return fmt.Errorf("qcow: %s: refcount table would exceed %d bytes: %w", rc.l.name, maxReftableBytes, ErrNoSpace)
		}
		// The clusters the new table will occupy, and those of the
		// blocks covering them, must be covered by the new table.
		start, err := rc.peekFree(cls)
		if err != nil {
			return err
		}
		end := start + cls + (cls+rc.perBlock-1)/rc.perBlock + 2
		if (end+rc.perBlock-1)/rc.perBlock > entries {
			entries = (end + rc.perBlock - 1) / rc.perBlock
			continue
		}
		old, oldOff, oldCls := rc.table, rc.tableOff, rc.tableCls
		rc.table = make([]uint64, cls*cs/8)
		copy(rc.table, old)
		x, err := rc.findFree(cls)
		if err != nil {
			rc.table = old
			return err
		}
		if err := rc.l.w.reserve(x, cls); err != nil {
			rc.table = old
			return err
		}
		for k := uint64(0); k < cls; k++ {
			if err := rc.add(x+k, 1); err != nil {
				return err
			}
		}
		rc.tableOff, rc.tableCls, rc.tableMove = x*cs, cls, true
		rc.l.w.freeLater(oldOff, oldCls*cs)
		return nil
	}
}

// peekFree returns where findFree(n) would allocate, without allocating.
func (rc *refcounts) peekFree(n uint64) (uint64, error) {
	saved := rc.freeIndex
	x, err := rc.findFree(n)
	rc.freeIndex = saved
	return x, err
}

// findFree returns the first run of n clusters with refcount 0 at or
// after freeIndex (qemu's first fit) and moves freeIndex past it, so that
// allocations made before the refcounts are set (a refcount block for the
// run itself) cannot pick the same clusters.
func (rc *refcounts) findFree(n uint64) (uint64, error) {
	i := rc.freeIndex
	if i == 0 {
		i = 1 // cluster 0 is the header
	}
	run := uint64(0)
	for run < n {
		if (i+run+1)*rc.l.clusterSize > maxHostOffset {
			return 0, fmt.Errorf("qcow: %s: host offsets exhausted: %w", rc.l.name, ErrNoSpace)
		}
		// Skip a whole missing refcount block at once.
		ri := (i + run) / rc.perBlock
		if ri >= uint64(len(rc.table)) || rc.table[ri] == 0 {
			run += rc.perBlock - (i+run)%rc.perBlock
			continue
		}
		v, err := rc.get(i + run)
		if err != nil {
			return 0, err
		}
		if v != 0 {
			i, run = i+run+1, 0
			continue
		}
		run++
	}
	rc.freeIndex = i + n
	return i, nil
}
