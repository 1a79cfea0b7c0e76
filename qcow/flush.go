package qcow

import (
	"encoding/binary"
	"os"
	"slices"

	"golang.org/x/sys/unix"
)

// Metadata reaches the disk only here, in an order that keeps the image
// consistent for qemu-img check after a crash at any point (formats.md
// A.8: "on-disk refcount >= number of on-disk references at every
// instant"):
//
//  1. dirty refcount blocks (increments only), then sync: every cluster
//     referenced below is counted, and the guest data written so far is
//     durable before any table points at it;
//  2. the refcount table: a relocated table is written whole, synced, and
//     the header switched to it (one 12-byte write, synced); otherwise the
//     changed entries, synced;
//  3. dirty L2 tables, synced if an L1 entry or a free depends on them;
//  4. dirty L1 entries, synced;
//  5. the deferred frees: refcounts drop only now that no on-disk table
//     points at those clusters; the blocks are written and synced;
//  6. the old refcount table of step 2 is among those frees.
//
// A crash after 1, 2 or 3 leaves clusters counted but unreferenced (leaks,
// qemu-img check exit 3, harmless); after 4 the new data is reachable;
// during 5 some frees are lost (leaks again). Nothing ever points at a
// cluster whose refcount is not on disk.
func (w *writer) flush() error {
	l := w.l
	rc := w.rc
	if len(rc.dirtyRB) == 0 && len(rc.dirtyRT) == 0 && !rc.tableMove &&
		len(w.dirtyL2) == 0 && len(w.l1Dirty) == 0 && len(w.pending) == 0 {
		return w.sync()
	}
	// 1.
	if err := w.writeBlocks(); err != nil {
		return err
	}
	if err := w.sync(); err != nil {
		return err
	}
	// 2.
	if rc.tableMove {
		buf := make([]byte, rc.tableCls*l.clusterSize)
		for i, e := range rc.table {
			binary.BigEndian.PutUint64(buf[i*8:], e)
		}
		if _, err := l.f.WriteAt(buf, int64(rc.tableOff)); err != nil {
			return w.ioErr("write refcount table", err)
		}
		if err := w.sync(); err != nil {
			return err
		}
		var hb [12]byte
		binary.BigEndian.PutUint64(hb[0:], rc.tableOff)
		binary.BigEndian.PutUint32(hb[8:], uint32(rc.tableCls))
		if _, err := l.f.WriteAt(hb[:], 48); err != nil {
			return w.ioErr("write header", err)
		}
		l.h.reftableOff, l.h.reftableClusters = rc.tableOff, uint32(rc.tableCls)
		rc.tableMove = false
		clear(rc.dirtyRT)
		if err := w.sync(); err != nil {
			return err
		}
	} else if len(rc.dirtyRT) > 0 {
		if err := w.writeEntries("refcount table", rc.table, rc.tableOff, rc.dirtyRT); err != nil {
			return err
		}
	}
	// 3.
	if len(w.dirtyL2) > 0 {
		ts := make([]*table, 0, len(w.dirtyL2))
		for t := range w.dirtyL2 {
			ts = append(ts, t)
		}
		slices.SortFunc(ts, func(a, b *table) int { return cmpU64(a.off, b.off) })
		for _, t := range ts {
			if _, err := l.f.WriteAt(t.b, int64(t.off)); err != nil {
				return w.ioErr("write L2 table", err)
			}
			t.dirty = false
			delete(w.dirtyL2, t)
		}
		if len(w.l1Dirty) > 0 || len(w.pending) > 0 {
			if err := w.sync(); err != nil {
				return err
			}
		}
	}
	// 4.
	if len(w.l1Dirty) > 0 {
		if err := w.writeEntries("L1 table", l.l1, l.h.l1Off, w.l1Dirty); err != nil {
			return err
		}
	}
	// 5.
	if len(w.pending) > 0 {
		pending := w.pending
		w.pending = nil
		sortRanges(pending)
		cs := l.clusterSize
		for _, r := range pending {
			for c := r.off / cs; c <= (r.off+r.n-1)/cs; c++ {
				if err := rc.add(c, -1); err != nil {
					return err
				}
				if v, _ := rc.get(c); v == 0 {
					l.l2.drop(c * cs)
				}
			}
		}
		if err := w.writeBlocks(); err != nil {
			return err
		}
		return w.sync()
	}
	return nil
}

// writeEntries writes the changed 8-byte entries (indices in dirty) of an
// on-disk table at off whose in-memory copy is tbl, in offset order, then
// syncs and forgets them.
func (w *writer) writeEntries(what string, tbl []uint64, off uint64, dirty map[uint64]struct{}) error {
	idx := make([]uint64, 0, len(dirty))
	for i := range dirty {
		idx = append(idx, i)
	}
	slices.Sort(idx)
	var b [8]byte
	for _, i := range idx {
		binary.BigEndian.PutUint64(b[:], tbl[i])
		if _, err := w.l.f.WriteAt(b[:], int64(off+i*8)); err != nil {
			return w.ioErr("write "+what, err)
		}
	}
	clear(dirty)
	return w.sync()
}

// writeBlocks writes the dirty refcount blocks.
func (w *writer) writeBlocks() error {
	rc := w.rc
	if len(rc.dirtyRB) == 0 {
		return nil
	}
	ts := make([]*table, 0, len(rc.dirtyRB))
	for t := range rc.dirtyRB {
		ts = append(ts, t)
	}
	slices.SortFunc(ts, func(a, b *table) int { return cmpU64(a.off, b.off) })
	for _, t := range ts {
		if _, err := w.l.f.WriteAt(t.b, int64(t.off)); err != nil {
			return w.ioErr("write refcount block", err)
		}
		t.dirty = false
		delete(rc.dirtyRB, t)
	}
	return nil
}

// sync makes everything written so far durable (fdatasync).
func (w *writer) sync() error {
	var err error
	if f, ok := w.l.f.(*os.File); ok {
		err = unix.Fdatasync(int(f.Fd()))
	} else {
		err = w.l.f.Sync()
	}
	if err != nil {
		return w.ioErr("sync", err)
	}
	return nil
}

// dirtyTables is the number of metadata tables waiting to be written.
func (w *writer) dirtyTables() int { return len(w.dirtyL2) + len(w.rc.dirtyRB) }

func cmpU64(a, b uint64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}
