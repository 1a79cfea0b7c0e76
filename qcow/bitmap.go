package qcow

import (
	"encoding/binary"
	"fmt"
	"slices"

	"github.com/cbtfs/cbtfs/dirtymap"
)

// layerBitmap is a persistent bitmap of one layer with its loaded bits.
type layerBitmap struct {
	dirEntry
	bits    *dirtymap.Map // nil when the bitmap was found in use: inconsistent
	enabled bool          // writes mark it (the auto flag)
}

// loadBitmaps reads the bits of every consistent bitmap of the layer, as
// qemu's load_bitmap does. In-use bitmaps are kept without data.
func (l *qcow2Layer) loadBitmaps() error {
	l.bitmaps = make([]*layerBitmap, 0, len(l.dir))
	for _, e := range l.dir {
		b := &layerBitmap{dirEntry: e, enabled: e.auto()}
		if !e.inUse() {
			m, err := l.loadBitmapData(&e)
			if err != nil {
				return err
			}
			b.bits = m
		}
		l.bitmaps = append(l.bitmaps, b)
	}
	return nil
}

// loadBitmapData reads the bitmap table of e and its data clusters.
func (l *qcow2Layer) loadBitmapData(e *dirEntry) (*dirtymap.Map, error) {
	cs := l.clusterSize
	// qemu requires the table to have exactly the size the disk needs
	// (load_bitmap_data: "tab_size != bitmap_table_size" is -EINVAL).
	if want := bitmapTableSize(l.h.size, uint32(e.granBits), l.clusterBits); uint64(e.tableSize) != want {
		return nil, l.corrupt(-1, fmt.Sprintf("bitmap %q table size (want %d)", e.name, want), e.tableSize)
	}
	m, err := dirtymap.New(l.h.size, 1<<e.granBits)
	if err != nil {
		return nil, fmt.Errorf("qcow: %s: bitmap %q: %w", l.name, e.name, err)
	}
	raw := make([]byte, uint64(e.tableSize)*8)
	if err := readFull(l.f, raw, int64(e.tableOff)); err != nil {
		return nil, fmt.Errorf("qcow: %s: read bitmap %q table: %w", l.name, e.name, err)
	}
	serialized := m.SerializedSize()
	buf := make([]byte, cs)
	for i := uint64(0); i < uint64(e.tableSize); i++ {
		ent := binary.BigEndian.Uint64(raw[i*8:])
		off := ent & bmeTableOffMask
		// check_table_entry: reserved bits clear; with an offset, bit 0
		// (all ones) is reserved and the offset is cluster aligned.
		if ent&bmeTableReserved != 0 || (off != 0 && (ent&bmeTableAllOnes != 0 || off%cs != 0)) {
			return nil, l.corrupt(int64(e.tableOff+i*8), fmt.Sprintf("bitmap %q table entry", e.name), fmt.Sprintf("%#x", ent))
		}
		pos := i * cs
		n := min(cs, serialized-pos)
		switch {
		case off != 0:
			if err := readFull(l.f, buf[:n], int64(off)); err != nil {
				return nil, fmt.Errorf("qcow: %s: read bitmap %q data: %w", l.name, e.name, err)
			}
			m.UnmarshalRange(pos, buf[:n])
		case ent&bmeTableAllOnes != 0:
			m.SetSerializedRange(pos, n)
		}
	}
	return m, nil
}

// BitmapInfo describes bitmap NAME of a chain: the union of the bitmaps
// called NAME in every layer (design.md "Bitmaps across a chain").
type BitmapInfo struct {
	Name string
	// Granularity is that of the topmost layer holding the bitmap; the
	// union is kept at that granularity.
	Granularity uint64
	// Enabled reports that writes mark the bitmap: the top layer holds it
	// with the auto flag.
	Enabled bool
	// InUse reports that some layer's copy was found in use: the union
	// is inconsistent and its bits cannot be used.
	InUse bool
	// Layers lists the depths (1 = top) of the layers that hold NAME.
	Layers []int
	// DirtyBytes is the number of dirty bytes of the union, clipped to
	// the disk; 0 when inconsistent.
	DirtyBytes uint64
}

// Bitmaps describes every bitmap name of the chain, sorted by name.
func (img *Image) Bitmaps() []BitmapInfo {
	img.mu.RLock()
	defer img.mu.RUnlock()
	byName := map[string]*BitmapInfo{}
	var names []string
	for d, l := range img.layers {
		q, ok := l.(*qcow2Layer)
		if !ok {
			continue
		}
		for _, b := range q.bitmaps {
			bi := byName[b.name]
			if bi == nil {
				bi = &BitmapInfo{Name: b.name, Granularity: 1 << b.granBits, Enabled: d == 0 && b.enabled}
				byName[b.name] = bi
				names = append(names, b.name)
			}
			bi.Layers = append(bi.Layers, d+1)
			bi.InUse = bi.InUse || b.bits == nil
		}
	}
	slices.Sort(names)
	out := make([]BitmapInfo, 0, len(names))
	for _, n := range names {
		bi := byName[n]
		if !bi.InUse {
			if m, err := img.union(n); err == nil {
				bi.DirtyBytes = m.DirtyBytes()
			}
		}
		out = append(out, *bi)
	}
	return out
}

// Bitmap returns a snapshot of the union of the bitmaps called name in
// every layer of the chain, at the granularity of the topmost layer that
// holds one and over the whole disk. The snapshot is shared until the
// image next changes: callers must not modify it. It fails with
// [ErrNoBitmap] when no layer holds name and [ErrInconsistent] when any
// layer's copy was found in use.
func (img *Image) Bitmap(name string) (*dirtymap.Map, error) {
	img.mu.RLock()
	defer img.mu.RUnlock()
	return img.union(name)
}

// unionAt is a bitmap union as of an image version.
type unionAt struct {
	ver  uint64
	bits *dirtymap.Map
}

// union returns Bitmap's snapshot, computed once per image version. The
// caller holds img.mu, so the version cannot change meanwhile.
func (img *Image) union(name string) (*dirtymap.Map, error) {
	v := img.version.Load()
	img.umu.Lock()
	c, ok := img.unions[name]
	img.umu.Unlock()
	if ok && c.ver == v {
		return c.bits, nil
	}
	m, err := img.computeUnion(name)
	if err != nil {
		return nil, err
	}
	img.umu.Lock()
	if img.unions == nil {
		img.unions = map[string]unionAt{}
	}
	img.unions[name] = unionAt{v, m}
	img.umu.Unlock()
	return m, nil
}

// computeUnion merges the bitmaps called name of every layer.
func (img *Image) computeUnion(name string) (*dirtymap.Map, error) {
	var union *dirtymap.Map
	for _, l := range img.layers {
		q, ok := l.(*qcow2Layer)
		if !ok {
			continue
		}
		for _, b := range q.bitmaps {
			if b.name != name {
				continue
			}
			if b.bits == nil {
				return nil, fmt.Errorf("%w: %q in %s", ErrInconsistent, name, q.name)
			}
			if union == nil {
				var err error
				if union, err = dirtymap.New(img.size, 1<<b.granBits); err != nil {
					return nil, err
				}
			}
			union.Merge(b.bits)
		}
	}
	if union == nil {
		return nil, fmt.Errorf("%w: %q", ErrNoBitmap, name)
	}
	return union, nil
}
