package qcow

import (
	"bytes"
	"encoding/binary"
	"fmt"
)

// Persistent bitmaps follow qemu's protocol (formats.md B.6):
//
//   - When the image is opened for writing, every consistent bitmap gets
//     the in-use flag on disk before any guest write (markInUse). A crash
//     from then on leaves the bitmaps in use: inconsistent, never silently
//     wrong.
//   - A store writes each consistent bitmap's data clusters and table to
//     new clusters, then a new directory, then switches the header to it,
//     and only then frees the old ones (store).
//   - Bitmaps found in use at open are inconsistent: their entries are
//     carried over unchanged and their data is never read or written.

// encodeDir builds the bitmap directory for bms.
func encodeDir(bms []*layerBitmap) []byte {
	var b bytes.Buffer
	for _, bm := range bms {
		var e [bitmapEntryHdrBytes]byte
		binary.BigEndian.PutUint64(e[0:], bm.tableOff)
		binary.BigEndian.PutUint32(e[8:], bm.tableSize)
		binary.BigEndian.PutUint32(e[12:], bm.flags)
		e[16] = bmeTypeDirty
		e[17] = bm.granBits
		binary.BigEndian.PutUint16(e[18:], uint16(len(bm.name)))
		b.Write(e[:])
		b.WriteString(bm.name)
		for b.Len()%8 != 0 {
			b.WriteByte(0)
		}
	}
	return b.Bytes()
}

// markInUse sets the in-use flag on disk for every consistent bitmap, with
// qemu's in-place protocol: clear autoclear bit 0 (synced), rewrite the
// directory in place (synced), set the bit again (synced). A crash in the
// middle leaves the bit clear: all bitmaps dropped, never wrong.
func (w *writer) markInUse() error {
	l := w.l
	h := l.h
	if h.bitmaps == nil {
		return nil
	}
	need := false
	for _, b := range l.bitmaps {
		if b.bits != nil && b.flags&bmeInUse == 0 {
			need = true
		}
	}
	if !need {
		return nil
	}
	for _, b := range l.bitmaps {
		if b.bits != nil {
			b.flags |= bmeInUse
		}
	}
	dir := encodeDir(l.bitmaps)
	if uint64(len(dir)) != h.bitmaps.dirSize {
		return fmt.Errorf("qcow: %s: bitmap directory size changed in place (%d != %d)", l.name, len(dir), h.bitmaps.dirSize)
	}
	h.autoclear &^= autoclearBitmaps
	if err := w.writeAutoclear(); err != nil {
		return err
	}
	if _, err := l.f.WriteAt(dir, int64(h.bitmaps.dirOff)); err != nil {
		return w.ioErr("write bitmap directory", err)
	}
	if err := w.sync(); err != nil {
		return err
	}
	h.autoclear |= autoclearBitmaps
	if err := w.writeAutoclear(); err != nil {
		return err
	}
	w.bitmapsClean = false
	return nil
}

// store writes every consistent bitmap of the layer to new clusters,
// then a new directory, switches the header to it and frees the old
// clusters. With clearInUse the stored bitmaps lose the in-use flag (a
// clean close); otherwise they keep it (the image stays open for writing).
func (w *writer) store(clearInUse bool) error {
	l := w.l
	h := l.h
	cs := l.clusterSize
	var oldFree []hostRange
	if h.bitmaps != nil {
		oldFree = append(oldFree, hostRange{h.bitmaps.dirOff, h.bitmaps.dirSize})
	}
	for _, e := range l.removed {
		if e.tableOff != 0 {
			old, err := w.oldTableClusters(&e)
			if err != nil {
				return err
			}
			oldFree = append(oldFree, old...)
		}
	}
	for _, b := range l.bitmaps {
		if b.bits == nil {
			continue // inconsistent: carried over as it is
		}
		if b.tableOff != 0 {
			old, err := w.oldTableClusters(&b.dirEntry)
			if err != nil {
				return err
			}
			oldFree = append(oldFree, old...)
		}
		off, size, err := w.writeBitmap(b)
		if err != nil {
			return err
		}
		b.tableOff, b.tableSize = off, size
		b.flags = 0
		if b.enabled {
			b.flags |= bmeAuto
		}
		if !clearInUse {
			b.flags |= bmeInUse
		}
	}
	if len(l.bitmaps) == 0 {
		h.bitmaps = nil
		h.autoclear &^= autoclearBitmaps
	} else {
		dir := encodeDir(l.bitmaps)
		n := (uint64(len(dir)) + cs - 1) / cs
		x, err := w.alloc(n)
		if err != nil {
			return err
		}
		if err := w.reserve(x, n); err != nil {
			return err
		}
		if _, err := l.f.WriteAt(dir, int64(x*cs)); err != nil {
			return w.ioErr("write bitmap directory", err)
		}
		h.bitmaps = &bitmapsExt{nbBitmaps: uint32(len(l.bitmaps)), dirSize: uint64(len(dir)), dirOff: x * cs}
		h.autoclear |= autoclearBitmaps
	}
	// The new clusters' refcounts and contents are durable before the
	// header points at them.
	if err := w.flush(); err != nil {
		return err
	}
	if err := w.writeHeader(); err != nil {
		return err
	}
	for _, r := range oldFree {
		w.freeLater(r.off, r.n)
	}
	l.removed = nil
	l.dir = l.dir[:0]
	for _, b := range l.bitmaps {
		l.dir = append(l.dir, b.dirEntry)
	}
	w.bitmapsClean = clearInUse
	return w.flush()
}

// writeBitmap writes the data clusters (only those with a set bit, as
// qemu does) and the table of b to newly allocated clusters.
func (w *writer) writeBitmap(b *layerBitmap) (uint64, uint32, error) {
	l := w.l
	cs := l.clusterSize
	m := b.bits
	total := m.SerializedSize()
	n := (total + cs - 1) / cs
	tbl := make([]byte, n*8)
	buf := make([]byte, cs)
	for i := uint64(0); i < n; i++ {
		k := min(cs, total-i*cs)
		clear(buf)
		m.MarshalRange(i*cs, buf[:k])
		if isZero(buf[:k]) {
			continue
		}
		x, err := w.alloc(1)
		if err != nil {
			return 0, 0, err
		}
		if _, err := l.f.WriteAt(buf, int64(x*cs)); err != nil {
			w.unalloc(x, 1)
			return 0, 0, w.ioErr("write bitmap data", err)
		}
		w.fileEnd = max(w.fileEnd, (x+1)*cs)
		binary.BigEndian.PutUint64(tbl[i*8:], x*cs)
	}
	tc := (uint64(len(tbl)) + cs - 1) / cs
	x, err := w.alloc(tc)
	if err != nil {
		return 0, 0, err
	}
	if err := w.reserve(x, tc); err != nil {
		return 0, 0, err
	}
	if _, err := l.f.WriteAt(tbl, int64(x*cs)); err != nil {
		return 0, 0, w.ioErr("write bitmap table", err)
	}
	return x * cs, uint32(n), nil
}

// oldTableClusters lists the clusters of a stored bitmap: its table and
// its data clusters, read back from the table on disk.
func (w *writer) oldTableClusters(e *dirEntry) ([]hostRange, error) {
	l := w.l
	cs := l.clusterSize
	raw := make([]byte, uint64(e.tableSize)*8)
	if err := readFull(l.f, raw, int64(e.tableOff)); err != nil {
		return nil, fmt.Errorf("qcow: %s: read bitmap %q table: %w", l.name, e.name, err)
	}
	out := []hostRange{{e.tableOff, (uint64(len(raw)) + cs - 1) / cs * cs}}
	for i := 0; i < len(raw); i += 8 {
		ent := binary.BigEndian.Uint64(raw[i:])
		off := ent & bmeTableOffMask
		// The table of an inconsistent bitmap is stale but was valid when
		// written; skip anything that is not a plain data cluster.
		if off != 0 && ent&(bmeTableReserved|bmeTableAllOnes) == 0 && off%cs == 0 {
			out = append(out, hostRange{off, cs})
		}
	}
	return out, nil
}

func isZero(b []byte) bool {
	for len(b) >= 8 {
		if binary.LittleEndian.Uint64(b) != 0 {
			return false
		}
		b = b[8:]
	}
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}
