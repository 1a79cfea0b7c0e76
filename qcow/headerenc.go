package qcow

import (
	"encoding/binary"
	"fmt"
)

// qemu's feature name table (written for v3 images whose clusters are
// larger than 4 KiB, where it fits).
var featureTable = []featureName{
	{0, 0, "dirty bit"},
	{0, 1, "corrupt bit"},
	{0, 2, "external data file"},
	{0, 3, "compression type"},
	{0, 4, "extended L2 entries"},
	{1, 0, "lazy refcounts"},
	{2, 0, "bitmaps"},
	{2, 1, "raw external data"},
}

// encode rebuilds the header area of cluster 0 the way qemu's
// qcow2_update_header lays it out (formats.md A.3): the fixed header and
// any unknown header fields, the backing format, the feature name table,
// the bitmaps extension, unknown extensions (preserved verbatim), the end
// marker, and the backing file name right after it. It updates
// h.backingOff and fails if the result does not fit in cluster 0.
func (h *header) encode() ([]byte, error) {
	be := binary.BigEndian
	hl := uint64(headerV2Len)
	if h.version >= 3 {
		hl = uint64(h.headerLen)
	}
	b := make([]byte, hl, 1024)
	be.PutUint32(b[0:], qcowMagic)
	be.PutUint32(b[4:], h.version)
	be.PutUint32(b[20:], h.clusterBits)
	be.PutUint64(b[24:], h.size)
	be.PutUint32(b[32:], h.cryptMethod)
	be.PutUint32(b[36:], h.l1Size)
	be.PutUint64(b[40:], h.l1Off)
	be.PutUint64(b[48:], h.reftableOff)
	be.PutUint32(b[56:], h.reftableClusters)
	be.PutUint32(b[60:], h.nbSnapshots)
	be.PutUint64(b[64:], h.snapshotsOff)
	if h.version >= 3 {
		be.PutUint64(b[72:], h.incompat)
		be.PutUint64(b[80:], h.compat)
		be.PutUint64(b[88:], h.autoclear)
		be.PutUint32(b[96:], h.refcountOrder)
		be.PutUint32(b[100:], h.headerLen)
		if hl > compressionByte {
			b[compressionByte] = h.compressionType
		}
		copy(b[headerV3Len:], h.extraFields)
	}
	ext := func(typ uint32, data []byte) {
		var hdr [8]byte
		be.PutUint32(hdr[0:], typ)
		be.PutUint32(hdr[4:], uint32(len(data)))
		b = append(b, hdr[:]...)
		b = append(b, data...)
		for len(b)%8 != 0 {
			b = append(b, 0)
		}
	}
	if h.backingFormat != "" {
		ext(extBackingFormat, []byte(h.backingFormat))
	}
	if h.version >= 3 && h.clusterSize() > 4096 {
		ft := make([]byte, 0, 48*len(featureTable))
		for _, f := range featureTable {
			e := make([]byte, 48)
			e[0], e[1] = f.kind, f.bit
			copy(e[2:], f.name)
			ft = append(ft, e...)
		}
		ext(extFeatureTable, ft)
	}
	if bm := h.bitmaps; bm != nil {
		var d [24]byte
		be.PutUint32(d[0:], bm.nbBitmaps)
		be.PutUint64(d[8:], bm.dirSize)
		be.PutUint64(d[16:], bm.dirOff)
		ext(extBitmaps, d[:])
	}
	for _, u := range h.unknownExts {
		ext(u.typ, u.data)
	}
	ext(extEnd, nil)
	if h.backingFile != "" {
		h.backingOff = uint64(len(b))
		h.backingSize = uint32(len(h.backingFile))
		b = append(b, h.backingFile...)
	} else {
		h.backingOff, h.backingSize = 0, 0
	}
	be.PutUint64(b[8:], h.backingOff)
	be.PutUint32(b[16:], h.backingSize)
	if uint64(len(b)) > h.clusterSize() {
		return nil, fmt.Errorf("qcow: header does not fit in the first cluster (%d bytes): %w", len(b), ErrNoSpace)
	}
	return b, nil
}

// writeHeader rewrites the header area of cluster 0 with one write and
// syncs, as qemu does.
func (w *writer) writeHeader() error {
	b, err := w.l.h.encode()
	if err != nil {
		return err
	}
	if _, err := w.l.f.WriteAt(b, 0); err != nil {
		return w.ioErr("write header", err)
	}
	return w.sync()
}

// writeAutoclear writes the autoclear feature field alone (8 bytes at
// offset 88) and syncs.
func (w *writer) writeAutoclear() error {
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], w.l.h.autoclear)
	if _, err := w.l.f.WriteAt(b[:], 88); err != nil {
		return w.ioErr("write header", err)
	}
	return w.sync()
}
