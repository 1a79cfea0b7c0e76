package qcow

import (
	"encoding/binary"
	"fmt"
	"math/bits"
	"sync"
)

// L1/L2 entry bits (docs/interop/qcow2.rst, "Cluster mapping").
const (
	entryCopied     = 1 << 63
	entryCompressed = 1 << 62
	entryZero       = 1 << 0
	l1OffsetMask    = 0x00fffffffffffe00
	l2OffsetMask    = 0x00fffffffffffe00
	subclusters     = 32 // per cluster with extended L2 entries
	subAllocMask    = 0xffffffff
)

// Default bound for the L2 table cache of one layer.
const defaultL2CacheBytes = 32 << 20

// qcow2Layer is one qcow2 file of a chain.
//
// # Concurrency
//
// Immutable after open: name, f, h and the derived geometry. The L2 cache
// and the decompressed-cluster cache lock themselves. l1 is read without a
// lock: the read-only engine never changes it after open.
type qcow2Layer struct {
	name        string
	f           File
	hostSize    uint64 // file size at open; grows as a writer allocates
	h           *header
	clusterBits uint32
	clusterSize uint64
	l2Entries   uint64 // entries per L2 table
	l1Bits      uint64 // log2 of the guest bytes one L1 entry (one L2 table) covers
	unitBits    uint32 // subcluster size bits with extended L2, else clusterBits

	l1        []uint64
	l2        *metaCache
	dec       decompressor
	snapshots []Snapshot
	dir       []dirEntry // the bitmap directory
	bitmaps   []*layerBitmap
	removed   []dirEntry // stored bitmaps removed since the last store
	w         *writer    // nil unless this is the writable top layer

	zmu   sync.Mutex // guards zlast
	zlast struct {   // the most recently decompressed cluster
		entry uint64
		data  []byte
	}
}

// openQcow2 parses the header of f, validates it and loads the L1 table.
func openQcow2(name string, f File, opts *Options) (*qcow2Layer, error) {
	fsz, err := fileSize(f)
	if err != nil {
		return nil, err
	}
	// Read the first cluster (or the whole file if shorter); the header
	// and its extensions must lie inside it. 2 MiB at most.
	first := make([]byte, min(fsz, int64(1)<<maxClusterBits))
	if err := readFull(f, first, 0); err != nil {
		return nil, fmt.Errorf("qcow: %s: read header: %w", name, err)
	}
	h, err := parseHeader(name, first)
	if err != nil {
		return nil, err
	}
	l := &qcow2Layer{
		name:        name,
		f:           f,
		hostSize:    uint64(fsz),
		h:           h,
		clusterBits: h.clusterBits,
		clusterSize: h.clusterSize(),
		l2Entries:   h.l2Entries(),
		l1Bits:      uint64(h.clusterBits) + uint64(bits.TrailingZeros64(h.l2Entries())),
		unitBits:    h.clusterBits,
	}
	if h.extL2() {
		l.unitBits = h.clusterBits - 5
	}
	l.dec.zstd = h.compressionType == compressionZstd
	cacheBytes := defaultL2CacheBytes
	if opts != nil && opts.L2CacheBytes > 0 {
		cacheBytes = opts.L2CacheBytes
	}
	l.l2 = newMetaCache(cacheBytes)
	if err := l.loadL1(); err != nil {
		return nil, err
	}
	if l.snapshots, err = l.readSnapshots(); err != nil {
		return nil, err
	}
	if l.dir, err = l.readBitmapDir(); err != nil {
		return nil, err
	}
	if err := l.loadBitmaps(); err != nil {
		return nil, err
	}
	return l, nil
}

// loadL1 reads the active L1 table. Entries past the end of the host file
// read as zero (unallocated), so a table that claims more than the file
// holds costs at most the 32 MiB limit checked in validate.
func (l *qcow2Layer) loadL1() error {
	n := uint64(l.h.l1Size)
	buf := make([]byte, n*8)
	if err := readFull(l.f, buf, int64(l.h.l1Off)); err != nil {
		return fmt.Errorf("qcow: %s: read L1 table: %w", l.name, err)
	}
	l.l1 = make([]uint64, n)
	for i := range l.l1 {
		l.l1[i] = binary.BigEndian.Uint64(buf[i*8:])
	}
	return nil
}

func (l *qcow2Layer) path() string        { return l.name }
func (l *qcow2Layer) format() string      { return "qcow2" }
func (l *qcow2Layer) virtualSize() uint64 { return l.h.size }
func (l *qcow2Layer) close() error        { return l.f.Close() }

func (l *qcow2Layer) corrupt(off int64, field string, val any) error {
	return &FormatError{File: l.name, Off: off, Field: field, Val: val}
}

// l2Table returns the L2 table at host offset off, from the cache or the
// file. Readers must not modify it.
func (l *qcow2Layer) l2Table(off uint64) (*table, error) {
	if t := l.l2.get(off); t != nil {
		return t, nil
	}
	// "Offset into the image file at which the L2 table starts. Must be
	// aligned to a cluster boundary."
	if off%l.clusterSize != 0 || off > maxHostOffset {
		return nil, l.corrupt(int64(off), "L2 table offset (unaligned)", fmt.Sprintf("%#x", off))
	}
	t := &table{off: off, b: make([]byte, l.clusterSize)}
	if err := readFull(l.f, t.b, int64(off)); err != nil {
		return nil, fmt.Errorf("qcow: %s: read L2 table at %#x: %w", l.name, off, err)
	}
	return l.l2.put(t), nil
}

// classify returns the kind of allocation unit u (a cluster, or with
// extended L2 a subcluster) of the table tbl at index i, and for data the
// host offset of the unit's first byte. It follows qemu's
// qcow2_get_cluster_type and qcow2_get_subcluster_type.
func (l *qcow2Layer) classify(tbl *table, i uint64, sc uint64) (runKind, uint64, error) {
	if !l.h.extL2() {
		e := tbl.u64(i)
		if e&entryCompressed != 0 {
			return runCompressed, e &^ (entryCopied | entryCompressed), nil
		}
		off := e & l2OffsetMask
		// qemu checks the alignment of every host offset, a preallocated
		// zero cluster's included ("Cluster allocation offset ... unaligned").
		if off%l.clusterSize != 0 {
			return 0, 0, l.corrupt(-1, "L2 entry (unaligned data offset)", fmt.Sprintf("%#x", e))
		}
		if e&entryZero != 0 {
			// "Zero cluster entry found in pre-v3 image" (qemu).
			if l.h.version < 3 {
				return 0, 0, l.corrupt(-1, "L2 entry (zero flag in a v2 image)", fmt.Sprintf("%#x", e))
			}
			return runZero, 0, nil
		}
		if off == 0 {
			return runUnalloc, 0, nil
		}
		return runData, off, nil
	}
	e, bm := tbl.u64(2*i), tbl.u64(2*i+1)
	if e&entryCompressed != 0 {
		return runCompressed, e &^ (entryCopied | entryCompressed), nil
	}
	off := e & l2OffsetMask
	zeroBit := bm >> (32 + sc) & 1
	allocBit := bm >> sc & 1
	if off == 0 {
		// An unallocated cluster with any subcluster marked allocated is
		// invalid (QCOW2_SUBCLUSTER_INVALID).
		if bm&subAllocMask != 0 {
			return 0, 0, l.corrupt(-1, "extended L2 entry (allocated subclusters without a host cluster)", fmt.Sprintf("%#x/%#x", e, bm))
		}
		if zeroBit != 0 {
			return runZero, 0, nil
		}
		return runUnalloc, 0, nil
	}
	if off%l.clusterSize != 0 {
		return 0, 0, l.corrupt(-1, "L2 entry (unaligned data offset)", fmt.Sprintf("%#x", e))
	}
	// "If both bits are set for the same subcluster ... the entry is
	// invalid" (any subcluster, as qemu checks the whole bitmap).
	if (bm>>32)&bm&subAllocMask != 0 {
		return 0, 0, l.corrupt(-1, "extended L2 bitmap (subcluster both allocated and zero)", fmt.Sprintf("%#x", bm))
	}
	switch {
	case zeroBit != 0:
		return runZero, 0, nil
	case allocBit != 0:
		return runData, off + sc<<l.unitBits, nil
	}
	return runUnalloc, 0, nil
}

// mapRange implements layer. A run never extends past the end of one L2
// table, except across unallocated L1 entries, and a compressed run never
// extends past its cluster.
func (l *qcow2Layer) mapRange(off, n uint64) (run, error) {
	cb := l.clusterBits
	covBits := l.l1Bits
	l1i := off >> covBits
	if l1i >= uint64(len(l.l1)) || l.l1[l1i]&l1OffsetMask == 0 {
		// Unallocated L1 entries: skip whole L2 coverages at once.
		end := (l1i + 1) << covBits
		for i := l1i + 1; i < uint64(len(l.l1)) && l.l1[i]&l1OffsetMask == 0 && end < off+n; i++ {
			end += 1 << covBits
		}
		if end == 0 || end-off > n { // end == 0: wrapped at 2^64
			return run{kind: runUnalloc, n: n}, nil
		}
		return run{kind: runUnalloc, n: end - off}, nil
	}
	tbl, err := l.l2Table(l.l1[l1i] & l1OffsetMask)
	if err != nil {
		return run{}, err
	}
	ub := l.unitBits
	unit := uint64(1) << ub
	perCluster := uint64(1) << (cb - ub) // units per cluster: 1 or 32
	tableEnd := (l1i + 1) << covBits
	if tableEnd == 0 || tableEnd-off > n {
		tableEnd = off + n
	}
	idx := (off >> cb) & (l.l2Entries - 1)
	sc := (off >> ub) & (perCluster - 1)
	kind, host, err := l.classify(tbl, idx, sc)
	if err != nil {
		return run{}, err
	}
	if kind == runCompressed {
		cend := (off | (l.clusterSize - 1)) + 1
		return run{kind: runCompressed, host: host, n: min(cend, tableEnd) - off}, nil
	}
	if kind == runData {
		host += off & (unit - 1)
	}
	// Extend over following units of the same kind (and, for data,
	// contiguous host offsets).
	pos := (off | (unit - 1)) + 1
	for pos < tableEnd {
		sc++
		if sc == perCluster {
			sc = 0
			idx++
		}
		k, h, err := l.classify(tbl, idx, sc)
		if err != nil || k != kind || k == runCompressed {
			break
		}
		if k == runData && h != host+(pos-off) {
			break
		}
		pos += unit
	}
	return run{kind: kind, host: host, n: min(pos, tableEnd) - off}, nil
}

// readRun implements layer.
func (l *qcow2Layer) readRun(r run, p []byte, off uint64) error {
	switch r.kind {
	case runData:
		if err := readFull(l.f, p, int64(r.host)); err != nil {
			return fmt.Errorf("qcow: %s: read data at %#x: %w", l.name, r.host, err)
		}
		return nil
	case runCompressed:
		data, err := l.cluster(r.host)
		if err != nil {
			return err
		}
		copy(p, data[off&(l.clusterSize-1):])
		return nil
	}
	clear(p)
	return nil
}

// cluster returns the decompressed contents of the compressed cluster
// described by entry (the L2 entry without its flag bits). The last
// cluster is kept, so sequential reads smaller than a cluster decompress
// it once.
func (l *qcow2Layer) cluster(entry uint64) ([]byte, error) {
	l.zmu.Lock()
	if l.zlast.data != nil && l.zlast.entry == entry {
		d := l.zlast.data
		l.zmu.Unlock()
		return d, nil
	}
	l.zmu.Unlock()

	d := decodeCompressed(entry, l.clusterBits)
	if d.off > maxHostOffset {
		return nil, l.corrupt(-1, "compressed cluster offset", fmt.Sprintf("%#x", d.off))
	}
	src := make([]byte, d.size)
	if err := readFull(l.f, src, int64(d.off)); err != nil {
		return nil, fmt.Errorf("qcow: %s: read compressed cluster at %#x: %w", l.name, d.off, err)
	}
	dst := make([]byte, l.clusterSize)
	if err := l.dec.decompress(dst, src); err != nil {
		return nil, &FormatError{File: l.name, Off: int64(d.off), Field: "compressed cluster", Val: err}
	}
	l.zmu.Lock()
	l.zlast.entry, l.zlast.data = entry, dst
	l.zmu.Unlock()
	return dst, nil
}
