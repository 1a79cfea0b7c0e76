package qcow

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/bits"
	"sort"

	"github.com/cbtfs/cbtfs/dirtymap"
)

// Incremental is a qcow2 image generated on the fly that holds exactly
// the dirty clusters of a bitmap (design.md, bitmaps/NAME/incremental.qcow2):
// a v3 image without a backing file name, whose cluster size is the
// bitmap granularity clamped to 512 B..2 MiB. Each dirty cluster is a data
// cluster holding the disk's bytes, or a zero cluster when it reads as
// zeros; clean clusters are unallocated. Rebased onto a full backup with
// `qemu-img rebase -u -b FULL -F qcow2`, it reads exactly as the disk did.
//
// The file is laid out as header | refcount table | refcount blocks | L1
// table | L2 tables | data clusters, every cluster with refcount 1, so it
// is exactly as large as its metadata plus the dirty data and passes
// qemu-img check. Metadata is generated when read; data clusters are read
// from the image on demand.
type Incremental struct {
	img         *Image
	size        uint64 // virtual size
	cs          uint64
	clusterBits uint32
	l2Entries   uint64

	dirty   []uint64 // dirty guest cluster indices, ascending
	data    []bool   // whether dirty[i] holds data (else it reads as zeros)
	dataIdx []uint64 // for dirty[i] with data: its data cluster number
	dataGC  []uint64 // data cluster number -> guest cluster index
	tables  []uint64 // L1 indices that have an L2 table, ascending

	header                           []byte
	rtOff, rbOff, l1Off, l2Off, dOff uint64 // region offsets in bytes
	rtCls, rbCls, l1Cls              uint64
	total                            uint64 // clusters in the file
}

// NewIncremental builds the incremental image of bitmap m over img. It
// reads every dirty cluster once, to tell data from zeros.
func NewIncremental(img *Image, m *dirtymap.Map) (*Incremental, error) {
	cs := min(max(m.Granularity(), 512), 2<<20)
	x := &Incremental{
		img:         img,
		size:        img.Size(),
		cs:          cs,
		clusterBits: uint32(bits.TrailingZeros64(cs)),
		l2Entries:   cs / 8,
	}
	var ferr error
	buf := make([]byte, cs)
	m.Extents(0, x.size, func(off, n uint64, dirty bool) bool {
		if !dirty {
			return true
		}
		for c := off / cs; c*cs < off+n; c++ {
			isData, err := x.holdsData(c, buf)
			if err != nil {
				ferr = err
				return false
			}
			x.dirty = append(x.dirty, c)
			x.data = append(x.data, isData)
			if isData {
				x.dataIdx = append(x.dataIdx, uint64(len(x.dataGC)))
				x.dataGC = append(x.dataGC, c)
			} else {
				x.dataIdx = append(x.dataIdx, 0)
			}
			if l1i := c / x.l2Entries; len(x.tables) == 0 || x.tables[len(x.tables)-1] != l1i {
				x.tables = append(x.tables, l1i)
			}
		}
		return true
	})
	if ferr != nil {
		return nil, ferr
	}
	if err := x.layout(); err != nil {
		return nil, err
	}
	return x, nil
}

// holdsData reports whether guest cluster c reads as anything but zeros:
// cheaply from the extents when they say zero, else by reading it.
func (x *Incremental) holdsData(c uint64, buf []byte) (bool, error) {
	off := c * x.cs
	n := min(x.cs, x.size-off)
	allZero := true
	if err := x.img.Extents(off, n, func(e Extent) bool {
		if !e.Zero {
			allZero = false
			return false
		}
		return true
	}); err != nil {
		return false, err
	}
	if allZero {
		return false, nil
	}
	if _, err := x.img.ReadAt(buf[:n], int64(off)); err != nil && !errors.Is(err, io.EOF) {
		return false, err
	}
	return !isZero(buf[:n]), nil
}

// layout places the regions and builds the header.
func (x *Incremental) layout() error {
	cs := x.cs
	l1n, _ := l1EntriesFor(x.size, x.clusterBits, x.l2Entries)
	if l1n*8 > maxL1Bytes {
		return fmt.Errorf("%w: the disk is too large for an incremental image with %d-byte clusters", ErrInvalid, cs)
	}
	x.l1Cls = max(1, (l1n*8+cs-1)/cs)
	perBlock := cs * 8 / 16
	x.rtCls, x.rbCls = 1, 1
	for {
		total := 1 + x.rtCls + x.rbCls + x.l1Cls + uint64(len(x.tables)) + uint64(len(x.dataGC))
		rb := (total + perBlock - 1) / perBlock
		rt := (rb*8 + cs - 1) / cs
		if rb == x.rbCls && rt == x.rtCls {
			x.total = total
			break
		}
		x.rbCls, x.rtCls = rb, rt
	}
	if x.rtCls*cs > maxReftableBytes {
		return fmt.Errorf("%w: too many dirty clusters for an incremental image", ErrInvalid)
	}
	x.rtOff = cs
	x.rbOff = x.rtOff + x.rtCls*cs
	x.l1Off = x.rbOff + x.rbCls*cs
	x.l2Off = x.l1Off + x.l1Cls*cs
	x.dOff = x.l2Off + uint64(len(x.tables))*cs
	h := &header{
		version:          3,
		clusterBits:      x.clusterBits,
		size:             x.size,
		l1Size:           uint32(l1n),
		l1Off:            x.l1Off,
		reftableOff:      x.rtOff,
		reftableClusters: uint32(x.rtCls),
		refcountOrder:    4,
		headerLen:        headerV3Len,
	}
	hb, err := h.encode()
	if err != nil {
		return err
	}
	x.header = hb
	return nil
}

// Size returns the length of the generated file in bytes.
func (x *Incremental) Size() uint64 { return x.total * x.cs }

// ReadAt reads the generated file.
func (x *Incremental) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("%w: negative offset", ErrOutOfRange)
	}
	size := x.Size()
	if uint64(off) >= size {
		return 0, io.EOF
	}
	n := min(uint64(len(p)), size-uint64(off))
	pos := uint64(off)
	for done := uint64(0); done < n; {
		c := (pos + done) / x.cs
		within := (pos + done) % x.cs
		k := min(n-done, x.cs-within)
		if err := x.readCluster(c, within, p[done:done+k]); err != nil {
			return int(done), err
		}
		done += k
	}
	if n < uint64(len(p)) {
		return int(n), io.EOF
	}
	return int(n), nil
}

// readCluster fills dst with bytes [within, within+len(dst)) of file
// cluster c.
func (x *Incremental) readCluster(c, within uint64, dst []byte) error {
	cs := x.cs
	off := c * cs
	switch {
	case off >= x.dOff:
		gc := x.dataGC[(off-x.dOff)/cs]
		g := gc*cs + within
		clear(dst)
		if g >= x.size {
			return nil
		}
		part := dst[:min(uint64(len(dst)), x.size-g)]
		if _, err := x.img.ReadAt(part, int64(g)); err != nil && !errors.Is(err, io.EOF) {
			return err
		}
		return nil
	case off >= x.l2Off:
		l1i := x.tables[(off-x.l2Off)/cs]
		x.fill(dst, within, func(i uint64) uint64 { return x.l2Entry(l1i*x.l2Entries + i) })
	case off >= x.l1Off:
		first := (off - x.l1Off) / 8
		x.fill(dst, within, func(i uint64) uint64 {
			l1i := first + i
			j := sort.Search(len(x.tables), func(j int) bool { return x.tables[j] >= l1i })
			if j < len(x.tables) && x.tables[j] == l1i {
				return (x.l2Off + uint64(j)*cs) | entryCopied
			}
			return 0
		})
	case off >= x.rbOff:
		// 16-bit refcounts: 1 for every cluster of the file.
		first := (off - x.rbOff) / 2
		for i := range dst {
			e := first + (within+uint64(i))/2
			if (within+uint64(i))%2 == 1 && e < x.total {
				dst[i] = 1
			} else {
				dst[i] = 0
			}
		}
	case off >= x.rtOff:
		first := (off - x.rtOff) / 8
		x.fill(dst, within, func(i uint64) uint64 {
			if b := first + i; b < x.rbCls {
				return x.rbOff + b*cs
			}
			return 0
		})
	default:
		clear(dst)
		if within < uint64(len(x.header)) {
			copy(dst, x.header[within:])
		}
	}
	return nil
}

// fill writes the big-endian 64-bit entries entry(i) of one cluster into
// dst, which starts at byte within of the cluster.
func (x *Incremental) fill(dst []byte, within uint64, entry func(i uint64) uint64) {
	var b [8]byte
	for i := range dst {
		pos := within + uint64(i)
		if pos%8 == 0 || i == 0 {
			binary.BigEndian.PutUint64(b[:], entry(pos/8))
		}
		dst[i] = b[pos%8]
	}
}

// l2Entry returns the L2 entry of guest cluster gc.
func (x *Incremental) l2Entry(gc uint64) uint64 {
	i := sort.Search(len(x.dirty), func(i int) bool { return x.dirty[i] >= gc })
	if i == len(x.dirty) || x.dirty[i] != gc {
		return 0
	}
	if !x.data[i] {
		return entryZero
	}
	return (x.dOff + x.dataIdx[i]*x.cs) | entryCopied
}
