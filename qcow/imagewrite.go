package qcow

import (
	"errors"
	"fmt"
)

// Writes go to the top layer only; backing layers are never written.
// Each change marks the enabled bitmaps of the top layer over the whole
// range it touches, before the data is written, as qemu does for writes,
// write-zeroes and discards.

// flushThreshold bounds the metadata tables kept dirty between flushes.
const flushThreshold = 1024

// writer returns the top layer's writer, or nil for a read-only image.
func (img *Image) writer() *writer {
	if !img.writable || len(img.layers) == 0 {
		return nil
	}
	if q, ok := img.layers[0].(*qcow2Layer); ok {
		return q.w
	}
	return nil
}

// ClusterSize returns the cluster size of the top layer (512 for a raw
// top, which has no clusters).
func (img *Image) ClusterSize() uint64 {
	if q, ok := img.layers[0].(*qcow2Layer); ok {
		return q.clusterSize
	}
	return 512
}

// Writable reports whether the image was opened for writing.
func (img *Image) Writable() bool { return img.writable }

// Version returns a counter that changes whenever the disk's content,
// allocation or bitmaps change.
func (img *Image) Version() uint64 { return img.version.Load() }

// openForWriting prepares the top layer for writing, as qemu does on a
// read-write open: refuse what cannot be written safely, clear unknown
// autoclear bits, drop an invalidated bitmaps extension, and set the
// in-use flag of every consistent bitmap before any guest write.
func (img *Image) openForWriting() error {
	q, ok := img.layers[0].(*qcow2Layer)
	if !ok {
		return fmt.Errorf("qcow: %s: only qcow2 images can be written", img.layers[0].path())
	}
	h := q.h
	// "Dirty bit: ... refcounts may be inconsistent": qemu repairs them on
	// a read-write open; cbtfs does not, and refuses to write.
	if h.incompat&incompatDirty != 0 {
		return &FeatureError{File: q.name, Feature: "dirty bit set (refcounts may be stale after a crash with lazy refcounts; run qemu-img check -r all)"}
	}
	w, err := newWriter(q)
	if err != nil {
		return err
	}
	rewrite := false
	// "Autoclear bits ... a writer that does not understand them must
	// clear them."
	if unknown := h.autoclear &^ (autoclearBitmaps | autoclearRawData); unknown != 0 {
		h.autoclear &^= unknown
		rewrite = true
	}
	if h.staleBitmaps {
		// qemu drops the invalidated extension; its clusters leak.
		h.staleBitmaps = false
		rewrite = true
	}
	if rewrite {
		if err := w.writeHeader(); err != nil {
			return err
		}
	}
	return w.markInUse()
}

// beforeChange runs before anything modifies the image: after a store
// that cleared the in-use flags, they are set again first.
func (w *writer) beforeChange() error {
	if w.bitmapsClean {
		w.bitmapsClean = false
		return w.markInUse()
	}
	return nil
}

// markBitmaps marks [off, off+n) in every enabled, consistent bitmap of
// the top layer.
func (w *writer) markBitmaps(off, n uint64) {
	for _, b := range w.l.bitmaps {
		if b.enabled && b.bits != nil {
			b.bits.Set(off, n)
		}
	}
}

// change runs one modification of the guest range [off, off+n) under the
// write lock.
func (img *Image) change(off, n uint64, fn func(w *writer) error) error {
	w := img.writer()
	if w == nil {
		return ErrReadOnly
	}
	if n > img.size || off > img.size-n {
		return fmt.Errorf("%w: [%d, +%d) on a disk of %d bytes", ErrOutOfRange, off, n, img.size)
	}
	if n == 0 {
		return nil
	}
	img.mu.Lock()
	defer img.mu.Unlock()
	if err := w.beforeChange(); err != nil {
		return err
	}
	w.markBitmaps(off, n)
	if img.commitTrack != nil {
		img.commitTrack.Set(off, n)
	}
	img.version.Add(1)
	err := fn(w)
	if err == nil && w.dirtyTables() > flushThreshold {
		err = w.flush()
	}
	return err
}

// WriteAt writes p at guest offset off. The data reaches stable storage
// with the next Flush.
func (img *Image) WriteAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("%w: negative offset", ErrOutOfRange)
	}
	err := img.change(uint64(off), uint64(len(p)), func(w *writer) error {
		return w.write(img, p, uint64(off))
	})
	if err != nil {
		return 0, err
	}
	return len(p), nil
}

// WriteZeroes makes [off, off+n) read as zeros. With mayUnmap the host
// clusters of whole zeroed clusters are released (a hole); otherwise
// clusters the image owns stay allocated.
func (img *Image) WriteZeroes(off, n uint64, mayUnmap bool) error {
	return img.change(off, n, func(w *writer) error {
		return w.zero(img, off, n, mayUnmap, false)
	})
}

// Discard releases the whole clusters inside [off, off+n). What the range
// reads afterwards is zeros on v3 images; on v2 images the backing file
// may show through (NBD TRIM semantics).
func (img *Image) Discard(off, n uint64) error {
	return img.change(off, n, func(w *writer) error {
		return w.zero(img, off, n, true, true)
	})
}

// Flush makes every completed write durable: data, then metadata in
// crash-safe order, then a sync. Bitmaps stay marked in use; they are
// stored by Close (or StoreBitmaps).
func (img *Image) Flush() error {
	w := img.writer()
	if w == nil {
		return nil
	}
	img.mu.Lock()
	defer img.mu.Unlock()
	return w.flush()
}

// closeClean stores the bitmaps with their in-use flags cleared and
// flushes everything: the image is then exactly as qemu leaves it after a
// clean close.
func (w *writer) closeClean() error {
	var errs []error
	if w.l.h.bitmaps != nil || len(w.l.bitmaps) > 0 {
		errs = append(errs, w.store(true))
	}
	errs = append(errs, w.flush())
	return errors.Join(errs...)
}
