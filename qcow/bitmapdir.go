package qcow

import (
	"encoding/binary"
	"fmt"
)

// Bitmap directory entry flags (formats.md B.2). qemu treats every bit
// other than IN_USE and AUTO as reserved, including bit 2
// (EXTRA_DATA_COMPATIBLE), and refuses images that set one.
const (
	bmeInUse         = 1 << 0
	bmeAuto          = 1 << 1
	bmeReservedFlags = 0xfffffffc
	bmeTypeDirty     = 1

	// Bitmap table entries (formats.md B.3).
	bmeTableReserved = 0xff000000000001fe
	bmeTableOffMask  = 0x00fffffffffffe00
	bmeTableAllOnes  = 1 << 0
)

// dirEntry is one decoded bitmap directory entry.
type dirEntry struct {
	name      string
	tableOff  uint64
	tableSize uint32
	flags     uint32
	granBits  uint8
}

func (e *dirEntry) inUse() bool { return e.flags&bmeInUse != 0 }
func (e *dirEntry) auto() bool  { return e.flags&bmeAuto != 0 }

// bitmapTableSize is the exact number of bitmap table entries qemu
// requires for a disk of size bytes (formats.md B.4):
// ceil(ceil(ceil(size/gran)/8)/cluster_size).
func bitmapTableSize(size uint64, granBits, clusterBits uint32) uint64 {
	bitsN := (size + 1<<granBits - 1) >> granBits
	bytesN := (bitsN + 7) / 8
	return (bytesN + 1<<clusterBits - 1) >> clusterBits
}

// readBitmapDir loads and validates the bitmap directory of l, as qemu's
// bitmap_list_load and check_dir_entry do: an image whose directory breaks
// a rule is refused as corrupt. It returns nil when the image has no
// consistent bitmaps extension.
func (l *qcow2Layer) readBitmapDir() ([]dirEntry, error) {
	ext := l.h.bitmaps
	if ext == nil {
		return nil, nil
	}
	fsz, err := fileSize(l.f)
	if err != nil {
		return nil, err
	}
	// The directory must lie inside the file: qemu would read zeros past
	// the end and then reject the zero entries; refusing first avoids
	// allocating for a size the file cannot hold.
	if ext.dirOff > uint64(fsz) || ext.dirSize > uint64(fsz)-ext.dirOff {
		return nil, l.corrupt(-1, "bitmap directory (past end of file)", ext.dirOff)
	}
	dir := make([]byte, ext.dirSize)
	if err := readFull(l.f, dir, int64(ext.dirOff)); err != nil {
		return nil, fmt.Errorf("qcow: %s: read bitmap directory: %w", l.name, err)
	}
	return parseBitmapDir(l.name, dir, ext, l.h.size, l.clusterBits)
}

// parseBitmapDir decodes a bitmap directory read from dirOff.
func parseBitmapDir(file string, dir []byte, ext *bitmapsExt, diskSize uint64, clusterBits uint32) ([]dirEntry, error) {
	be := binary.BigEndian
	bad := func(pos int, field string, val any) error {
		return &FormatError{File: file, Off: int64(ext.dirOff) + int64(pos), Field: field, Val: val}
	}
	cs := uint64(1) << clusterBits
	entries := make([]dirEntry, 0, min(ext.nbBitmaps, uint32(len(dir)/bitmapEntryHdrBytes)))
	names := map[string]bool{}
	pos := 0
	for pos < len(dir) {
		if len(dir)-pos < bitmapEntryHdrBytes {
			return nil, bad(pos, "bitmap directory (broken entry)", nil)
		}
		if len(entries) == int(ext.nbBitmaps) {
			return nil, bad(pos, "bitmap directory (more bitmaps than the header extension says)", ext.nbBitmaps)
		}
		e := dir[pos:]
		nameSize := int(be.Uint16(e[18:]))
		extra := be.Uint32(e[20:])
		// "Bitmap extra data is not supported" (qemu).
		if extra != 0 {
			return nil, bad(pos+20, "bitmap extra_data_size", extra)
		}
		size := (bitmapEntryHdrBytes + nameSize + 7) &^ 7
		if size > len(dir)-pos {
			return nil, bad(pos, "bitmap directory (entry overruns the directory)", nil)
		}
		d := dirEntry{
			tableOff:  be.Uint64(e[0:]),
			tableSize: be.Uint32(e[8:]),
			flags:     be.Uint32(e[12:]),
			granBits:  e[17],
			name:      string(e[bitmapEntryHdrBytes : bitmapEntryHdrBytes+nameSize]),
		}
		typ := e[16]
		switch {
		case d.tableSize == 0 || d.tableSize > maxBitmapTableSize:
			return nil, bad(pos+8, fmt.Sprintf("bitmap %q table size", d.name), d.tableSize)
		case d.tableOff == 0 || d.tableOff%cs != 0 || d.tableOff > maxHostOffset:
			return nil, bad(pos, fmt.Sprintf("bitmap %q table offset", d.name), d.tableOff)
		case d.granBits < minBitmapGranBits || d.granBits > maxBitmapGranBits:
			return nil, bad(pos+17, fmt.Sprintf("bitmap %q granularity bits", d.name), d.granBits)
		case d.flags&bmeReservedFlags != 0:
			return nil, bad(pos+12, fmt.Sprintf("bitmap %q flags", d.name), fmt.Sprintf("%#x", d.flags))
		case nameSize > maxBitmapNameLen:
			return nil, bad(pos+18, "bitmap name size", nameSize)
		case typ != bmeTypeDirty:
			return nil, bad(pos+16, fmt.Sprintf("bitmap %q type", d.name), typ)
		case names[d.name]:
			return nil, bad(pos, "bitmap name (duplicate)", d.name)
		}
		phys := uint64(d.tableSize) * cs
		if phys > maxBitmapPhysSize {
			return nil, bad(pos+8, fmt.Sprintf("bitmap %q table size (bitmap too large)", d.name), d.tableSize)
		}
		// A consistent bitmap must cover the disk; an in-use one may be
		// stale after a resize and is only ever removed.
		if !d.inUse() && diskSize > (phys*8)<<d.granBits {
			return nil, bad(pos+8, fmt.Sprintf("bitmap %q table size (too small for the disk)", d.name), d.tableSize)
		}
		names[d.name] = true
		entries = append(entries, d)
		pos += size
	}
	if len(entries) != int(ext.nbBitmaps) {
		return nil, bad(0, "bitmap directory (fewer bitmaps than the header extension says)", ext.nbBitmaps)
	}
	return entries, nil
}
