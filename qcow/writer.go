package qcow

import (
	"errors"
	"fmt"
	"os"
	"slices"
	"syscall"

	"golang.org/x/sys/unix"
)

// writer holds the state of the writable top layer: the refcounts, the
// metadata changed since the last flush, and the clusters to free once the
// metadata that stopped referencing them is on disk.
//
// All of it is guarded by Image.mu held for writing.
type writer struct {
	l  *qcow2Layer
	rc *refcounts

	dirtyL2 map[*table]struct{}
	l1Dirty map[uint64]struct{}
	pending []hostRange // clusters to free after the next metadata flush

	fileEnd uint64 // host bytes in use or reserved: allocations beyond read zeros

	// bitmapsClean is set after a store that cleared the in-use flags;
	// the next change must set them again first (markInUse).
	bitmapsClean bool
	zeros        []byte // one cluster of zeros, read-only
}

type hostRange struct{ off, n uint64 }

// newWriter prepares l for writing.
func newWriter(l *qcow2Layer) (*writer, error) {
	w := &writer{
		l:       l,
		dirtyL2: map[*table]struct{}{},
		l1Dirty: map[uint64]struct{}{},
		zeros:   make([]byte, l.clusterSize),
	}
	rc, err := l.loadRefcounts()
	if err != nil {
		return nil, err
	}
	w.rc = rc
	sz, err := fileSize(l.f)
	if err != nil {
		return nil, err
	}
	w.fileEnd = (uint64(sz) + l.clusterSize - 1) &^ (l.clusterSize - 1)
	// Only a complete writer is attached: Close flushes through it.
	l.w = w
	return w, nil
}

// reserve makes sure host clusters [x, x+n) exist in the file, so that
// writing metadata there later cannot fail for lack of space. Data
// clusters are not reserved: their first write extends the file.
func (w *writer) reserve(x, n uint64) error {
	cs := w.l.clusterSize
	end := (x + n) * cs
	if end <= w.fileEnd {
		return nil
	}
	start := max(x*cs, w.fileEnd)
	if f, ok := w.l.f.(*os.File); ok {
		err := unix.Fallocate(int(f.Fd()), 0, int64(start), int64(end-start))
		if err == nil {
			w.fileEnd = end
			return nil
		}
		if errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.EDQUOT) {
			return fmt.Errorf("qcow: %s: %w", w.l.name, ErrNoSpace)
		}
	}
	// No fallocate: write zeros.
	for off := start; off < end; off += cs {
		if _, err := w.l.f.WriteAt(w.zeros[:min(cs, end-off)], int64(off)); err != nil {
			return w.ioErr("extend", err)
		}
	}
	w.fileEnd = end
	return nil
}

// ioErr wraps a host I/O error, mapping a full disk to ErrNoSpace.
func (w *writer) ioErr(what string, err error) error {
	if errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.EDQUOT) || errors.Is(err, syscall.EFBIG) {
		return fmt.Errorf("qcow: %s: %s: %w (%v)", w.l.name, what, ErrNoSpace, err)
	}
	return fmt.Errorf("qcow: %s: %s: %w", w.l.name, what, err)
}

// alloc allocates n contiguous host clusters with refcount 1 and returns
// the index of the first.
func (w *writer) alloc(n uint64) (uint64, error) {
	x, err := w.rc.findFree(n)
	if err != nil {
		return 0, err
	}
	for k := uint64(0); k < n; k++ {
		if err := w.rc.add(x+k, 1); err != nil {
			w.unalloc(x, k)
			return 0, err
		}
	}
	return x, nil
}

// unalloc undoes alloc for clusters nothing references yet (a data
// write that failed): their refcounts drop at once.
func (w *writer) unalloc(x, n uint64) {
	for k := uint64(0); k < n; k++ {
		_ = w.rc.add(x+k, -1)
	}
}

// freeLater records host bytes [off, off+n) whose clusters lose one
// reference. The decrement waits for the next flush, after the L1/L2
// tables that stopped pointing at them are on disk: until then the old
// on-disk tables may still point there.
func (w *writer) freeLater(off, n uint64) {
	if n > 0 {
		w.pending = append(w.pending, hostRange{off, n})
	}
}

// markL2 records that an L2 table changed.
func (w *writer) markL2(t *table) {
	t.dirty = true
	w.dirtyL2[t] = struct{}{}
}

// l2ForWrite returns the L2 table covering guest offset off, ready to be
// modified: allocated if missing, copied if shared with a snapshot (its L1
// entry lacks COPIED, formats.md A.9).
func (w *writer) l2ForWrite(off uint64) (*table, uint64, error) {
	l := w.l
	cs := l.clusterSize
	covBits := l.l1Bits
	l1i := off >> covBits
	if l1i >= uint64(len(l.l1)) {
		return nil, 0, fmt.Errorf("%w: offset %d beyond the L1 table", ErrOutOfRange, off)
	}
	idx := (off >> l.clusterBits) & (l.l2Entries - 1)
	e := l.l1[l1i]
	old := e & l1OffsetMask
	if old != 0 && e&entryCopied != 0 {
		t, err := l.l2Table(old)
		return t, idx, err
	}
	var src *table
	if old != 0 {
		var err error
		if src, err = l.l2Table(old); err != nil {
			return nil, 0, err
		}
	}
	x, err := w.alloc(1)
	if err != nil {
		return nil, 0, err
	}
	if err := w.reserve(x, 1); err != nil {
		w.unalloc(x, 1)
		return nil, 0, err
	}
	t := &table{off: x * cs, b: make([]byte, cs)}
	if src != nil {
		copy(t.b, src.b)
		w.freeLater(old, cs)
	}
	w.markL2(t)
	l.l2.put(t)
	l.l1[l1i] = t.off | entryCopied
	w.l1Dirty[l1i] = struct{}{}
	return t, idx, nil
}

// pendingWrite coalesces guest data writes that land in adjacent host
// clusters into one pwrite.
type pendingWrite struct {
	w    *writer
	host uint64
	buf  []byte
}

func (pw *pendingWrite) add(host uint64, b []byte) error {
	if len(pw.buf) > 0 && pw.host+uint64(len(pw.buf)) == host && cap(pw.buf) > len(pw.buf) && &pw.buf[:len(pw.buf)+1][len(pw.buf)] == &b[0] {
		pw.buf = pw.buf[:len(pw.buf)+len(b)]
		return nil
	}
	if err := pw.flush(); err != nil {
		return err
	}
	pw.host, pw.buf = host, b
	return nil
}

func (pw *pendingWrite) flush() error {
	if len(pw.buf) == 0 {
		return nil
	}
	_, err := pw.w.l.f.WriteAt(pw.buf, int64(pw.host))
	pw.buf = nil
	if err != nil {
		return pw.w.ioErr("write data", err)
	}
	return nil
}

// write stores p at guest offset off of the top layer.
func (w *writer) write(img *Image, p []byte, off uint64) error {
	l := w.l
	cs := l.clusterSize
	pw := pendingWrite{w: w}
	for len(p) > 0 {
		within := off & (cs - 1)
		n := min(uint64(len(p)), cs-within)
		t, idx, err := w.l2ForWrite(off)
		if err != nil {
			pw.flush()
			return err
		}
		if l.h.extL2() {
			if err := pw.flush(); err != nil {
				return err
			}
			err = w.writeExt(img, t, idx, off-within, within, p[:n])
		} else {
			e := t.u64(idx)
			host := e & l2OffsetMask
			if e&(entryCompressed|entryZero) == 0 && e&entryCopied != 0 && host != 0 {
				// A cluster this image alone owns: write in place.
				err = pw.add(host+within, p[:n])
			} else {
				if err := pw.flush(); err != nil {
					return err
				}
				err = w.cowCluster(img, t, idx, e, off-within, within, p[:n])
			}
		}
		if err != nil {
			pw.flush()
			return err
		}
		p = p[n:]
		off += n
	}
	return pw.flush()
}

// cowCluster writes data into the cluster at guest offset gc (standard L2
// entries) that cannot be written in place: unallocated, a zero cluster,
// compressed, or shared with a snapshot. The rest of the cluster is copied
// from what the guest sees there now. Order: allocate (refcount +1), write
// the data, then change the L2 entry in the cache; the old cluster is
// freed after the next metadata flush. A crash before that flush leaves
// the old entry on disk and at most a leaked cluster.
func (w *writer) cowCluster(img *Image, t *table, idx, e, gc, within uint64, data []byte) error {
	l := w.l
	cs := l.clusterSize
	oldHost := e & l2OffsetMask
	compressed := e&entryCompressed != 0

	// A preallocated zero cluster owned by this image is reused in place.
	reuse := !compressed && e&entryZero != 0 && oldHost != 0 && e&entryCopied != 0
	var x, host uint64
	if reuse {
		host = oldHost
	} else {
		var err error
		if x, err = w.alloc(1); err != nil {
			return err
		}
		host = x * cs
	}
	fresh := !reuse && host >= w.fileEnd
	full := within == 0 && uint64(len(data)) == cs
	zeroView := !compressed && (e&entryZero != 0 || (oldHost == 0 && !img.backedAt(w.l, gc)))

	var err error
	switch {
	case full:
		_, err = l.f.WriteAt(data, int64(host))
	case zeroView && fresh:
		// The new cluster lies past the end of the file and reads as
		// zeros: only the data needs writing.
		_, err = l.f.WriteAt(data, int64(host+within))
	default:
		buf := make([]byte, cs)
		if !zeroView {
			if err := img.readLayer(img.depthOf(w.l), buf, gc); err != nil {
				if !reuse {
					w.unalloc(x, 1)
				}
				return err
			}
		}
		copy(buf[within:], data)
		_, err = l.f.WriteAt(buf, int64(host))
	}
	if err != nil {
		if !reuse {
			w.unalloc(x, 1)
		}
		return w.ioErr("write data", err)
	}
	w.fileEnd = max(w.fileEnd, host+cs)
	t.setU64(idx, host|entryCopied)
	w.markL2(t)
	if !reuse {
		w.releaseEntry(e)
	}
	return nil
}

// backedAt reports whether the layers below l could hold data at guest
// offset off (there is a backing layer that reaches there).
func (img *Image) backedAt(l layer, off uint64) bool {
	d := img.depthOf(l)
	return d+1 < len(img.layers) && off < img.layers[d+1].virtualSize()
}

// depthOf returns the index of layer l in the chain (0 = top).
func (img *Image) depthOf(l layer) int {
	for i, x := range img.layers {
		if x == l {
			return i
		}
	}
	return 0
}

// writeExt writes data into the cluster at guest offset gc of an image
// with extended L2 entries: subcluster by subcluster, copying on write only
// within the subclusters the write touches, as qemu does.
func (w *writer) writeExt(img *Image, t *table, idx, gc, within uint64, data []byte) error {
	l := w.l
	cs := l.clusterSize
	ss := uint64(1) << l.unitBits
	e, bm := t.u64(2*idx), t.u64(2*idx+1)
	host := e & l2OffsetMask
	end := within + uint64(len(data))
	first, last := within/ss, (end-1)/ss
	touched := uint64(0)
	for sc := first; sc <= last; sc++ {
		touched |= 1 << sc
	}

	if e&entryCompressed != 0 || (host != 0 && e&entryCopied == 0) {
		// Compressed or shared with a snapshot: copy the whole cluster as
		// the guest sees it into a new one. Every subcluster of a
		// compressed cluster is allocated; a shared cluster keeps its
		// unallocated subclusters unallocated.
		buf := make([]byte, cs)
		if err := img.readLayer(img.depthOf(w.l), buf, gc); err != nil {
			return err
		}
		copy(buf[within:], data)
		x, err := w.alloc(1)
		if err != nil {
			return err
		}
		if _, err := l.f.WriteAt(buf, int64(x*cs)); err != nil {
			w.unalloc(x, 1)
			return w.ioErr("write data", err)
		}
		w.fileEnd = max(w.fileEnd, (x+1)*cs)
		alloc := bm & subAllocMask
		if e&entryCompressed != 0 {
			alloc = subAllocMask
		}
		w.releaseEntry(e)
		alloc |= touched
		zero := (bm >> 32) &^ alloc
		t.setU64(2*idx, x*cs|entryCopied)
		t.setU64(2*idx+1, zero<<32|alloc)
		w.markL2(t)
		return nil
	}

	var x uint64
	fresh := false
	if host == 0 {
		var err error
		if x, err = w.alloc(1); err != nil {
			return err
		}
		host = x * cs
		fresh = host >= w.fileEnd
	}
	for sc := first; sc <= last; sc++ {
		s0 := sc * ss
		lo, hi := max(within, s0), min(end, s0+ss)
		piece := data[lo-within : hi-within]
		var err error
		switch {
		case bm>>sc&1 != 0, lo == s0 && hi == s0+ss:
			// Allocated subcluster, or a whole one: write the data.
			_, err = l.f.WriteAt(piece, int64(host+lo))
		case bm>>(32+sc)&1 != 0 && fresh:
			_, err = l.f.WriteAt(piece, int64(host+lo))
		default:
			// Copy on write within the subcluster: its current view
			// (backing data or zeros) around the new bytes.
			buf := make([]byte, ss)
			if bm>>(32+sc)&1 == 0 {
				if err := img.readLayer(img.depthOf(w.l), buf, gc+s0); err != nil {
					if x != 0 {
						w.unalloc(x, 1)
					}
					return err
				}
			}
			copy(buf[lo-s0:], piece)
			_, err = l.f.WriteAt(buf, int64(host+s0))
		}
		if err != nil {
			if x != 0 {
				w.unalloc(x, 1)
			}
			return w.ioErr("write data", err)
		}
	}
	w.fileEnd = max(w.fileEnd, host+cs)
	bm = (bm | touched) &^ (touched << 32)
	t.setU64(2*idx, host|entryCopied)
	t.setU64(2*idx+1, bm)
	w.markL2(t)
	return nil
}

// zero makes guest range [off, off+n) read as zeros. Whole clusters (or,
// with extended L2, whole subclusters) become zero clusters; with
// mayUnmap their host clusters are released, else an owned cluster stays
// allocated (ZERO_ALLOC, as qemu's write -z). Partial clusters get real
// zeros. discard asks for whole clusters only and never writes zeros.
func (w *writer) zero(img *Image, off, n uint64, mayUnmap, discard bool) error {
	l := w.l
	cs := l.clusterSize
	end := off + n
	for off < end {
		within := off & (cs - 1)
		gc := off - within
		k := min(end-off, cs-within)
		whole := within == 0 && k == cs
		var err error
		switch {
		case whole:
			err = w.zeroCluster(img, gc, mayUnmap || discard, discard)
		case discard:
			// TRIM of a partial cluster: nothing to do.
		case l.h.extL2():
			err = w.zeroExtPartial(img, gc, within, k)
		default:
			err = w.writeZeros(img, off, k)
		}
		if err != nil {
			return err
		}
		off += k
	}
	return nil
}

// writeZeros writes real zero bytes over [off, off+n).
func (w *writer) writeZeros(img *Image, off, n uint64) error {
	for n > 0 {
		k := min(n, uint64(len(w.zeros)))
		if err := w.write(img, w.zeros[:k], off); err != nil {
			return err
		}
		off += k
		n -= k
	}
	return nil
}

// zeroCluster makes the whole cluster at guest offset gc read as zeros.
func (w *writer) zeroCluster(img *Image, gc uint64, unmap, discard bool) error {
	l := w.l
	cs := l.clusterSize
	t, idx, err := w.l2ForWrite(gc)
	if err != nil {
		return err
	}
	if l.h.extL2() {
		e := t.u64(2 * idx)
		host := e & l2OffsetMask
		const allZero = uint64(subAllocMask) << 32
		ne := uint64(0)
		if e&entryCompressed == 0 && host != 0 && e&entryCopied != 0 && !unmap {
			ne = host | entryCopied // keep the owned cluster allocated
		} else {
			w.releaseEntry(e)
		}
		t.setU64(2*idx, ne)
		t.setU64(2*idx+1, allZero)
		w.markL2(t)
		return nil
	}
	e := t.u64(idx)
	host := e & l2OffsetMask
	if l.h.version < 3 {
		// v2 has no zero flag. Without a backing file an unallocated
		// cluster reads as zeros; with one, discard lets the backing
		// show through (TRIM leaves the content unspecified) and a real
		// zero write must store zeros.
		if !discard && img.backedAt(w.l, gc) {
			return w.writeZeros(img, gc, cs)
		}
		w.releaseEntry(e)
		t.setU64(idx, 0)
		w.markL2(t)
		return nil
	}
	switch {
	case e&entryCompressed == 0 && host != 0 && e&entryCopied != 0 && !unmap:
		t.setU64(idx, host|entryCopied|entryZero) // ZERO_ALLOC
	default:
		w.releaseEntry(e)
		t.setU64(idx, entryZero) // ZERO_PLAIN
	}
	w.markL2(t)
	return nil
}

// releaseEntry schedules the host cluster(s) an L2 entry references to be
// freed.
func (w *writer) releaseEntry(e uint64) {
	l := w.l
	if e&entryCompressed != 0 {
		d := decodeCompressed(e&^(entryCopied|entryCompressed), l.clusterBits)
		w.freeLater(d.off, d.size)
		return
	}
	if host := e & l2OffsetMask; host != 0 {
		w.freeLater(host, l.clusterSize)
	}
}

// zeroExtPartial zeroes part of a cluster with extended L2 entries: whole
// subclusters get their zero bit, the rest real zeros.
func (w *writer) zeroExtPartial(img *Image, gc, within, n uint64) error {
	l := w.l
	ss := uint64(1) << l.unitBits
	end := within + n
	for pos := within; pos < end; {
		sc := pos / ss
		s0 := sc * ss
		hi := min(end, s0+ss)
		if pos == s0 && hi == s0+ss {
			t, idx, err := w.l2ForWrite(gc)
			if err != nil {
				return err
			}
			e, bm := t.u64(2*idx), t.u64(2*idx+1)
			if e&entryCompressed != 0 || (e&l2OffsetMask != 0 && e&entryCopied == 0) {
				// Not ours to edit bit by bit: write zeros (copies it).
				if err := w.writeZeros(img, gc+pos, hi-pos); err != nil {
					return err
				}
			} else {
				bm = bm&^(1<<sc) | 1<<(32+sc)
				t.setU64(2*idx+1, bm)
				w.markL2(t)
			}
		} else if err := w.writeZeros(img, gc+pos, hi-pos); err != nil {
			return err
		}
		pos = hi
	}
	return nil
}

// sortRanges orders host ranges by offset.
func sortRanges(r []hostRange) {
	slices.SortFunc(r, func(a, b hostRange) int {
		switch {
		case a.off < b.off:
			return -1
		case a.off > b.off:
			return 1
		}
		return 0
	})
}
