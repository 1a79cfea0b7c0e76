package qcow

import (
	"encoding/binary"
	"fmt"
	"math/bits"
	"strings"
)

// qcow2 header layout (docs/interop/qcow2.rst, "Header"). All fields are
// big-endian.
const (
	qcowMagic       = 0x514649fb // "QFI\xfb"
	headerV2Len     = 72
	headerV3MinLen  = 104 // up to and including header_length
	headerV3Len     = 112 // what qemu writes: v3 fields + compression_type + padding
	compressionByte = 104 // offset of the optional compression_type field
)

// Incompatible feature bits (header bytes 72-79).
const (
	incompatDirty       = 1 << 0
	incompatCorrupt     = 1 << 1
	incompatDataFile    = 1 << 2
	incompatCompression = 1 << 3
	incompatExtL2       = 1 << 4
	incompatKnown       = incompatDirty | incompatCorrupt | incompatDataFile | incompatCompression | incompatExtL2
)

// Compatible and autoclear feature bits.
const (
	compatLazyRefcounts = 1 << 0
	autoclearBitmaps    = 1 << 0
	autoclearRawData    = 1 << 1
)

// Header extension types (docs/interop/qcow2.rst, "Header extensions").
const (
	extEnd           = 0x00000000
	extBackingFormat = 0xe2792aca
	extFeatureTable  = 0x6803f857
	extCryptoHeader  = 0x0537be77
	extBitmaps       = 0x23852875
	extDataFile      = 0x44415441
)

// Compression types (header byte 104).
const (
	compressionZlib = 0
	compressionZstd = 1
)

// Crypt methods (header bytes 32-35).
const (
	cryptNone = 0
	cryptAES  = 1
	cryptLUKS = 2
)

// header is the decoded qcow2 header with its extensions. Unknown header
// fields and unknown extensions are kept verbatim so that a rewrite of the
// header preserves them, as qemu does.
type header struct {
	version          uint32
	backingOff       uint64
	backingSize      uint32
	clusterBits      uint32
	size             uint64
	cryptMethod      uint32
	l1Size           uint32
	l1Off            uint64
	reftableOff      uint64
	reftableClusters uint32
	nbSnapshots      uint32
	snapshotsOff     uint64

	incompat  uint64
	compat    uint64
	autoclear uint64

	refcountOrder   uint32
	headerLen       uint32
	compressionType uint8
	extraFields     []byte // header bytes [112, headerLen), preserved

	backingFile   string
	backingFormat string
	dataFile      string
	hasDataFile   bool
	hasCrypto     bool
	features      []featureName
	bitmaps       *bitmapsExt
	staleBitmaps  bool // a bitmaps extension that is not consistent (B.5): ignored
	unknownExts   []rawExt
}

// featureName is one entry of the feature name table extension.
type featureName struct {
	kind uint8 // 0 incompatible, 1 compatible, 2 autoclear
	bit  uint8
	name string
}

// bitmapsExt is the bitmaps header extension (formats.md B.1).
type bitmapsExt struct {
	nbBitmaps uint32
	reserved  uint32
	dirSize   uint64
	dirOff    uint64
}

// rawExt is a header extension the engine does not interpret.
type rawExt struct {
	typ  uint32
	data []byte
}

func (h *header) clusterSize() uint64 { return 1 << h.clusterBits }
func (h *header) extL2() bool         { return h.incompat&incompatExtL2 != 0 }

// l2Entries is the number of entries in one L2 table.
func (h *header) l2Entries() uint64 {
	if h.extL2() {
		return h.clusterSize() / 16
	}
	return h.clusterSize() / 8
}

// parseHeader decodes and validates the header in buf, which holds the
// start of the file: at least the whole first cluster or the whole file if
// it is shorter. name is used in error messages only.
func parseHeader(name string, buf []byte) (*header, error) {
	bad := func(off int64, field string, val any) error {
		return &FormatError{File: name, Off: off, Field: field, Val: val}
	}
	be := binary.BigEndian
	if len(buf) < 4 || be.Uint32(buf) != qcowMagic {
		return nil, fmt.Errorf("%w: %s", ErrNotQcow2, name)
	}
	if len(buf) < headerV2Len {
		return nil, bad(0, "header (qcow2 header too short)", len(buf))
	}
	h := &header{
		version:          be.Uint32(buf[4:]),
		backingOff:       be.Uint64(buf[8:]),
		backingSize:      be.Uint32(buf[16:]),
		clusterBits:      be.Uint32(buf[20:]),
		size:             be.Uint64(buf[24:]),
		cryptMethod:      be.Uint32(buf[32:]),
		l1Size:           be.Uint32(buf[36:]),
		l1Off:            be.Uint64(buf[40:]),
		reftableOff:      be.Uint64(buf[48:]),
		reftableClusters: be.Uint32(buf[56:]),
		nbSnapshots:      be.Uint32(buf[60:]),
		snapshotsOff:     be.Uint64(buf[64:]),
	}
	if h.version != 2 && h.version != 3 {
		return nil, &FeatureError{File: name, Feature: fmt.Sprintf("qcow2 version %d", h.version)}
	}
	// "cluster_bits: ... Must not be less than 9 (i.e. 512 byte clusters)";
	// qemu also caps it at 21 (2 MiB).
	if h.clusterBits < minClusterBits || h.clusterBits > maxClusterBits {
		return nil, bad(20, "cluster_bits", h.clusterBits)
	}
	cs := h.clusterSize()
	if h.version == 2 {
		h.headerLen = headerV2Len
		h.refcountOrder = 4
	} else {
		if len(buf) < headerV3MinLen {
			return nil, bad(72, "v3 header (file too short)", len(buf))
		}
		h.incompat = be.Uint64(buf[72:])
		h.compat = be.Uint64(buf[80:])
		h.autoclear = be.Uint64(buf[88:])
		h.refcountOrder = be.Uint32(buf[96:])
		h.headerLen = be.Uint32(buf[100:])
		// "header_length: ... Must be a multiple of 8" and at least 104;
		// qemu: "qcow2 header exceeds cluster size".
		if h.headerLen < headerV3MinLen || h.headerLen%8 != 0 || uint64(h.headerLen) > cs {
			return nil, bad(100, "header_length", h.headerLen)
		}
		if uint64(len(buf)) < uint64(h.headerLen) {
			return nil, bad(100, "header_length (past end of file)", h.headerLen)
		}
		if h.headerLen > compressionByte {
			h.compressionType = buf[compressionByte]
		}
		if h.headerLen > headerV3Len {
			h.extraFields = append([]byte(nil), buf[headerV3Len:h.headerLen]...)
		}
	}

	// Incompatible features: "If the image has any of these bits set that
	// it does not know about, it must refuse to open it."
	if unknown := h.incompat &^ incompatKnown; unknown != 0 {
		return nil, &FeatureError{File: name, Feature: h.unknownIncompat(unknown)}
	}
	if h.refcountOrder > maxRefcountOrder {
		return nil, bad(96, "refcount_order", h.refcountOrder)
	}
	if h.backingOff > cs {
		return nil, bad(8, "backing_file_offset", h.backingOff)
	}
	if h.size > maxVirtualSize {
		return nil, bad(24, "virtual size", h.size)
	}

	if err := h.parseExtensions(name, buf); err != nil {
		return nil, err
	}

	if h.backingOff != 0 {
		// "backing_file_size: Length of the backing file name in bytes. Must
		// not be longer than 1023 bytes."
		if h.backingSize > maxBackingNameLen || uint64(h.backingSize) > cs-h.backingOff {
			return nil, bad(16, "backing_file_size", h.backingSize)
		}
		end := h.backingOff + uint64(h.backingSize)
		if end > uint64(len(buf)) {
			return nil, bad(8, "backing file name (past end of file)", h.backingOff)
		}
		h.backingFile = string(buf[h.backingOff:end])
		if h.backingFile == "" {
			return nil, bad(16, "backing_file_size", 0)
		}
	}
	if err := h.validate(name); err != nil {
		return nil, err
	}
	return h, nil
}

// parseExtensions walks the header extensions. qemu reads them up to the
// end marker, bounded by the backing file name if there is one, else by the
// end of cluster 0; an extension that overruns that bound is an error.
func (h *header) parseExtensions(name string, buf []byte) error {
	be := binary.BigEndian
	end := h.clusterSize()
	if h.backingOff != 0 {
		end = h.backingOff
	}
	if end > uint64(len(buf)) {
		end = uint64(len(buf))
	}
	seen := map[uint32]bool{}
	off := uint64(h.headerLen)
	for {
		if off+8 > end {
			if h.version == 2 && off >= end {
				// A v2 image may have no extension area at all.
				return nil
			}
			return &FormatError{File: name, Off: int64(off), Field: "header extension (no end marker)"}
		}
		typ := be.Uint32(buf[off:])
		n := uint64(be.Uint32(buf[off+4:]))
		if typ == extEnd {
			return nil
		}
		dataOff := off + 8
		if n > end-dataOff {
			return &FormatError{File: name, Off: int64(off), Field: fmt.Sprintf("header extension %#x length", typ), Val: n}
		}
		data := buf[dataOff : dataOff+n]
		if seen[typ] && typ != extFeatureTable {
			return &FormatError{File: name, Off: int64(off), Field: fmt.Sprintf("duplicate header extension %#x", typ)}
		}
		seen[typ] = true
		switch typ {
		case extBackingFormat:
			if n > maxBackingFormatLen {
				return &FormatError{File: name, Off: int64(off), Field: "backing format extension length", Val: n}
			}
			h.backingFormat = string(data)
		case extFeatureTable:
			for i := 0; i+48 <= len(data); i += 48 {
				h.features = append(h.features, featureName{
					kind: data[i], bit: data[i+1],
					name: strings.TrimRight(string(data[i+2:i+48]), "\x00"),
				})
			}
		case extCryptoHeader:
			h.hasCrypto = true
		case extBitmaps:
			// "Bitmaps extension ... length 24" (formats.md B.1).
			if n != 24 {
				return &FormatError{File: name, Off: int64(off), Field: "bitmaps extension length", Val: n}
			}
			h.bitmaps = &bitmapsExt{
				nbBitmaps: be.Uint32(data[0:]),
				reserved:  be.Uint32(data[4:]),
				dirSize:   be.Uint64(data[8:]),
				dirOff:    be.Uint64(data[16:]),
			}
		case extDataFile:
			h.hasDataFile = true
			h.dataFile = string(data)
		default:
			h.unknownExts = append(h.unknownExts, rawExt{typ: typ, data: append([]byte(nil), data...)})
		}
		off = dataOff + (n+7)&^7
	}
}

// validate checks the header fields that do not need the extensions'
// positions, and refuses features the engine cannot serve.
func (h *header) validate(name string) error {
	bad := func(off int64, field string, val any) error {
		return &FormatError{File: name, Off: off, Field: field, Val: val}
	}
	unsupported := func(f string) error { return &FeatureError{File: name, Feature: f} }
	cs := h.clusterSize()

	if h.incompat&incompatCorrupt != 0 {
		return unsupported("corrupt bit set (qemu found inconsistent metadata; run qemu-img check -r)")
	}
	switch h.cryptMethod {
	case cryptNone:
		if h.hasCrypto {
			return bad(-1, "crypto header extension without LUKS encryption", nil)
		}
	case cryptAES:
		return unsupported("encryption (AES)")
	case cryptLUKS:
		return unsupported("encryption (LUKS)")
	default:
		return unsupported(fmt.Sprintf("encryption method %d", h.cryptMethod))
	}
	if h.incompat&incompatDataFile != 0 || h.hasDataFile {
		f := "external data file"
		if h.dataFile != "" {
			f += fmt.Sprintf(" (%q)", h.dataFile)
		}
		return unsupported(f)
	}
	// compression_type must agree with incompatible bit 3 both ways.
	switch {
	case h.compressionType > compressionZstd:
		return unsupported(fmt.Sprintf("compression type %d", h.compressionType))
	case h.compressionType != compressionZlib && h.incompat&incompatCompression == 0:
		return bad(compressionByte, "compression_type without the compression type feature bit", h.compressionType)
	case h.compressionType == compressionZlib && h.incompat&incompatCompression != 0:
		return bad(72, "compression type feature bit with zlib compression", nil)
	}
	if h.extL2() && h.clusterBits < minExtL2ClusterBits {
		return bad(20, "cluster_bits (extended L2 needs at least 16 KiB clusters)", h.clusterBits)
	}
	if h.version == 2 && h.refcountOrder != 4 {
		return bad(96, "refcount_order", h.refcountOrder)
	}

	// Refcount table: non-empty, at most 8 MiB, cluster aligned.
	if h.reftableClusters == 0 || uint64(h.reftableClusters)*cs > maxReftableBytes {
		return bad(56, "refcount_table_clusters", h.reftableClusters)
	}
	if !validTable(h.reftableOff, uint64(h.reftableClusters)*cs, cs) {
		return bad(48, "refcount_table_offset", h.reftableOff)
	}

	// L1 table: at most 32 MiB, aligned, large enough for the disk.
	if uint64(h.l1Size)*8 > maxL1Bytes {
		return bad(36, "l1_size", h.l1Size)
	}
	need, ok := l1EntriesFor(h.size, h.clusterBits, h.l2Entries())
	if !ok || need > maxL1Entries {
		return bad(24, "virtual size (image is too big)", h.size)
	}
	if uint64(h.l1Size) < need {
		return bad(36, "l1_size (L1 table is too small)", h.l1Size)
	}
	if h.l1Size > 0 && !validTable(h.l1Off, uint64(h.l1Size)*8, cs) {
		return bad(40, "l1_table_offset", h.l1Off)
	}

	// Snapshot table.
	if h.nbSnapshots > maxSnapshots {
		return bad(60, "nb_snapshots", h.nbSnapshots)
	}
	if h.nbSnapshots > 0 && !validTable(h.snapshotsOff, uint64(h.nbSnapshots)*snapshotHeaderBytes, cs) {
		return bad(64, "snapshots_offset", h.snapshotsOff)
	}

	// "Bit 0: Bitmaps extension bit. This bit indicates consistency for the
	// bitmaps extension data." Without it (or in a v2 image, where qemu
	// never stores bitmaps) every bitmap is inconsistent and qemu ignores
	// the extension; so do we.
	if h.bitmaps != nil && (h.version < 3 || h.autoclear&autoclearBitmaps == 0) {
		h.bitmaps, h.staleBitmaps = nil, true
	}
	if b := h.bitmaps; b != nil {
		if b.reserved != 0 {
			return bad(-1, "bitmaps extension reserved field", b.reserved)
		}
		if b.nbBitmaps == 0 || b.nbBitmaps > maxBitmaps {
			return bad(-1, "bitmaps extension nb_bitmaps", b.nbBitmaps)
		}
		if b.dirSize == 0 || b.dirSize > maxBitmapDirSize {
			return bad(-1, "bitmaps extension directory size", b.dirSize)
		}
		if !validTable(b.dirOff, b.dirSize, cs) {
			return bad(-1, "bitmaps extension directory offset", b.dirOff)
		}
	}
	return nil
}

// validTable reports whether a table of n bytes at off is cluster aligned,
// within the 56-bit host offset range and does not overflow.
func validTable(off, n, clusterSize uint64) bool {
	return off != 0 && off%clusterSize == 0 && off <= maxHostOffset && n <= maxHostOffset-off
}

// l1EntriesFor returns the number of L1 entries needed for a disk of size
// bytes (qemu size_to_l1).
func l1EntriesFor(size uint64, clusterBits uint32, l2Entries uint64) (uint64, bool) {
	shift := uint(clusterBits) + uint(bits.TrailingZeros64(l2Entries))
	if shift >= 64 {
		return 1, true
	}
	n := size >> shift
	if size&(1<<shift-1) != 0 {
		n++
	}
	return n, n <= 1<<31-1
}

// unknownIncompat describes unknown incompatible feature bits, with the
// names the image's feature name table gives them (as qemu reports them).
func (h *header) unknownIncompat(bits uint64) string {
	var names []string
	for b := uint8(0); b < 64; b++ {
		if bits&(1<<b) == 0 {
			continue
		}
		if n := h.featureNameFor(0, b); n != "" {
			names = append(names, fmt.Sprintf("%q (bit %d)", n, b))
		} else {
			names = append(names, fmt.Sprintf("bit %d", b))
		}
	}
	return fmt.Sprintf("unknown incompatible feature %s (%#x)", strings.Join(names, ", "), bits)
}

// featureNameFor returns the feature name table's name for an incompatible
// bit, if the image carries one.
func (h *header) featureNameFor(kind, bit uint8) string {
	for _, f := range h.features {
		if f.kind == kind && f.bit == bit {
			return f.name
		}
	}
	return ""
}
