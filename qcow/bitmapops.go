package qcow

import (
	"errors"
	"fmt"
	"math/bits"
	"unicode/utf8"

	"github.com/cbtfs/cbtfs/dirtymap"
)

// Bitmap management (design.md "The control file"). Operations change the
// bitmaps in memory under the image's write lock; they reach the disk with
// the next StoreBitmaps or Close, with qemu's crash-safe directory switch.
// An operation that fails changes nothing.

// These errors are returned by bitmap operations.
var (
	// ErrExist is returned when adding a bitmap whose name the top layer
	// already holds.
	ErrExist = errors.New("qcow: bitmap already exists")

	// ErrInvalid is returned for an invalid bitmap name or granularity,
	// or an operation the bitmap does not allow.
	ErrInvalid = errors.New("qcow: invalid argument")
)

// DefaultGranularity is the granularity qemu gives a new bitmap: the
// cluster size clamped to 4 KiB..64 KiB.
func (img *Image) DefaultGranularity() uint64 {
	q, ok := img.layers[0].(*qcow2Layer)
	if !ok {
		return 64 << 10
	}
	return min(max(q.clusterSize, 4<<10), 64<<10)
}

// ValidBitmapName checks a bitmap name by qemu's rules: 1 to 1023 bytes.
// cbtfs also refuses names it could not show as a directory: "/", NUL,
// "." and "..", and invalid UTF-8.
func ValidBitmapName(name string) error {
	switch {
	case name == "":
		return fmt.Errorf("%w: empty bitmap name", ErrInvalid)
	case len(name) > maxBitmapNameLen:
		return fmt.Errorf("%w: bitmap name longer than %d bytes", ErrInvalid, maxBitmapNameLen)
	case name == "." || name == "..":
		return fmt.Errorf("%w: bitmap name %q", ErrInvalid, name)
	case !utf8.ValidString(name):
		return fmt.Errorf("%w: bitmap name is not valid UTF-8", ErrInvalid)
	}
	for _, c := range name {
		if c == '/' || c == 0 || c == '\n' {
			return fmt.Errorf("%w: bitmap name %q contains %q", ErrInvalid, name, c)
		}
	}
	return nil
}

// topBitmap returns the top layer's bitmap called name, or nil.
func (q *qcow2Layer) bitmap(name string) *layerBitmap {
	for _, b := range q.bitmaps {
		if b.name == name {
			return b
		}
	}
	return nil
}

// writableTop returns the top layer and its writer for a bitmap change.
func (img *Image) writableTop() (*qcow2Layer, *writer, error) {
	w := img.writer()
	if w == nil {
		return nil, nil, ErrReadOnly
	}
	return w.l, w, nil
}

// AddBitmap adds a persistent bitmap to the top layer, enabled unless
// disabled is set. granularity 0 means DefaultGranularity.
func (img *Image) AddBitmap(name string, granularity uint64, disabled bool) error {
	if err := ValidBitmapName(name); err != nil {
		return err
	}
	if granularity == 0 {
		granularity = img.DefaultGranularity()
	}
	if granularity < 1<<minBitmapGranBits || granularity > 1<<maxBitmapGranBits || bits.OnesCount64(granularity) != 1 {
		return fmt.Errorf("%w: granularity %d: must be a power of two from 512 B to 2 GiB", ErrInvalid, granularity)
	}
	q, w, err := img.writableTop()
	if err != nil {
		return err
	}
	img.mu.Lock()
	defer img.mu.Unlock()
	if q.h.version < 3 {
		return fmt.Errorf("%w: cannot store dirty bitmaps in qcow2 v2 files", ErrInvalid)
	}
	if q.bitmap(name) != nil {
		return fmt.Errorf("%w: %q", ErrExist, name)
	}
	if len(q.bitmaps) >= maxBitmaps {
		return fmt.Errorf("%w: too many bitmaps", ErrInvalid)
	}
	granBits := uint32(bits.TrailingZeros64(granularity))
	tsize := bitmapTableSize(q.h.size, granBits, q.clusterBits)
	if tsize == 0 {
		// qemu refuses to open an image with an empty bitmap table (and
		// qemu-img bitmap fails to store one).
		return fmt.Errorf("%w: a bitmap of an empty disk cannot be stored", ErrInvalid)
	}
	if tsize*q.clusterSize > maxBitmapPhysSize || tsize > maxBitmapTableSize {
		return fmt.Errorf("%w: too much space would be occupied by the bitmap; use a larger granularity", ErrInvalid)
	}
	m, err := dirtymap.New(q.h.size, granularity)
	if err != nil {
		return fmt.Errorf("%w: %v", ErrInvalid, err)
	}
	dirBytes := uint64(len(encodeDir(q.bitmaps))) + (bitmapEntryHdrBytes+uint64(len(name))+7)&^7
	if dirBytes > maxBitmapDirSize {
		return fmt.Errorf("%w: bitmap directory would be too large", ErrInvalid)
	}
	if err := w.beforeChange(); err != nil {
		return err
	}
	q.bitmaps = append(q.bitmaps, &layerBitmap{
		dirEntry: dirEntry{name: name, granBits: uint8(granBits), flags: bmeInUse},
		bits:     m,
		enabled:  !disabled,
	})
	img.version.Add(1)
	return nil
}

// RemoveBitmap removes the bitmap called name from every layer that holds
// it, inconsistent or not. A backing layer is opened for writing for that
// change alone.
func (img *Image) RemoveBitmap(name string) error {
	return img.eachLayerBitmap(name, true, func(q *qcow2Layer, b *layerBitmap) {
		for i, x := range q.bitmaps {
			if x == b {
				q.bitmaps = append(q.bitmaps[:i], q.bitmaps[i+1:]...)
				break
			}
		}
		q.removed = append(q.removed, b.dirEntry)
	})
}

// ClearBitmap clears the bitmap called name in every layer that holds it.
func (img *Image) ClearBitmap(name string) error {
	return img.eachLayerBitmap(name, false, func(q *qcow2Layer, b *layerBitmap) {
		b.bits.ClearAll()
	})
}

// EnableBitmap sets whether writes mark the top layer's bitmap name.
func (img *Image) EnableBitmap(name string, enable bool) error {
	q, w, err := img.writableTop()
	if err != nil {
		return err
	}
	img.mu.Lock()
	defer img.mu.Unlock()
	b := q.bitmap(name)
	if b == nil {
		return img.missing(name)
	}
	if b.bits == nil {
		return fmt.Errorf("%w: %q", ErrInconsistent, name)
	}
	if err := w.beforeChange(); err != nil {
		return err
	}
	b.enabled = enable
	img.version.Add(1)
	return nil
}

// MergeBitmap sets dst |= src, where src is the chain's union of the
// bitmaps called src and dst is the top layer's bitmap. The granularities
// may differ, as in qemu.
func (img *Image) MergeBitmap(src, dst string) error {
	q, w, err := img.writableTop()
	if err != nil {
		return err
	}
	img.mu.Lock()
	defer img.mu.Unlock()
	d := q.bitmap(dst)
	if d == nil {
		return img.missing(dst)
	}
	if d.bits == nil {
		return fmt.Errorf("%w: %q", ErrInconsistent, dst)
	}
	s, err := img.union(src)
	if err != nil {
		return err
	}
	if err := w.beforeChange(); err != nil {
		return err
	}
	d.bits.Merge(s)
	img.version.Add(1)
	return nil
}

// missing explains why name is not a top-layer bitmap.
func (img *Image) missing(name string) error {
	for _, l := range img.layers[1:] {
		if q, ok := l.(*qcow2Layer); ok && q.bitmap(name) != nil {
			return fmt.Errorf("%w: %q is only in a backing layer (%s), not in the top image", ErrNoBitmap, name, q.name)
		}
	}
	return fmt.Errorf("%w: %q", ErrNoBitmap, name)
}

// eachLayerBitmap applies fn to the bitmap called name in every layer that
// holds it. Inconsistent bitmaps are refused unless allowInconsistent. A
// backing layer is reopened for writing, changed, stored and closed again.
// All layers are checked before anything changes.
func (img *Image) eachLayerBitmap(name string, allowInconsistent bool, fn func(*qcow2Layer, *layerBitmap)) error {
	q, w, err := img.writableTop()
	if err != nil {
		return err
	}
	img.mu.Lock()
	defer img.mu.Unlock()
	type hit struct {
		depth int
		q     *qcow2Layer
		b     *layerBitmap
	}
	var hits []hit
	for d, l := range img.layers {
		if lq, ok := l.(*qcow2Layer); ok {
			if b := lq.bitmap(name); b != nil {
				if b.bits == nil && !allowInconsistent {
					return fmt.Errorf("%w: %q in %s", ErrInconsistent, name, lq.name)
				}
				hits = append(hits, hit{d, lq, b})
			}
		}
	}
	if len(hits) == 0 {
		return fmt.Errorf("%w: %q", ErrNoBitmap, name)
	}
	for _, h := range hits {
		if h.depth == 0 {
			continue
		}
		if err := img.changeBacking(h.q, func() { fn(h.q, h.b) }); err != nil {
			return err
		}
	}
	if hits[0].depth == 0 {
		if err := w.beforeChange(); err != nil {
			return err
		}
		fn(q, hits[0].b)
	}
	img.version.Add(1)
	return nil
}

// changeBacking switches backing layer q to writing (its bitmaps marked
// in use first), applies change, stores the bitmaps cleanly and switches
// the layer back to read-only: a backing layer is written for that
// change alone. The caller holds img.mu for writing.
func (img *Image) changeBacking(q *qcow2Layer, change func()) error {
	if err := q.reopenWritable(); err != nil {
		return err
	}
	change()
	err := q.w.closeClean()
	if rerr := q.reopenReadOnly(); rerr != nil {
		return errors.Join(err, rerr)
	}
	return err
}

// StoreBitmaps writes every bitmap of the top layer to the image now, in
// qemu's format and with the in-use flags cleared, so that qemu-img info
// shows exactly what the mount shows. The flags are set again before the
// next change reaches the image.
func (img *Image) StoreBitmaps() error {
	_, w, err := img.writableTop()
	if err != nil {
		return err
	}
	img.mu.Lock()
	defer img.mu.Unlock()
	return w.store(true)
}
