package qcow

// Fuzz targets for the decoders, seeded from the fixtures in testdata/img.
// Inputs whose declared sizes exceed a small budget are skipped, so the
// fuzzer hunts logic errors rather than allocations the limits allow (a
// 32 MiB L1 table, a 512 MiB bitmap). Run each for a while with, e.g.,
//
//	go test -run '^$' -fuzz '^FuzzOpen$' -fuzztime 60s ./qcow/

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"testing"
)

const (
	fuzzBudget   = 1 << 20 // bytes any one declared table or bitmap may need
	fuzzSeedSize = 1 << 20 // seeds are cut to this (c2m is 10 MiB of mostly zeros)
	fuzzName     = "fuzz.qcow2"
)

// fixtureSeeds returns every fixture file, cut to fuzzSeedSize.
func fixtureSeeds(f *testing.F) [][]byte {
	f.Helper()
	var seeds [][]byte
	err := filepath.WalkDir("testdata/img", func(p string, d fs.DirEntry, err error) error {
		if err != nil || !d.Type().IsRegular() {
			return err
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		seeds = append(seeds, b[:min(len(b), fuzzSeedSize)])
		return nil
	})
	if err != nil {
		f.Fatal(err)
	}
	if len(seeds) == 0 {
		f.Fatal("no fixtures in testdata/img")
	}
	return seeds
}

// isKnownErr reports whether err is one of the errors Open documents.
func isKnownErr(err error) bool {
	for _, s := range []error{ErrNotQcow2, ErrCorrupt, ErrUnsupported, ErrBackingLoop, fs.ErrNotExist} {
		if errors.Is(err, s) {
			return true
		}
	}
	return false
}

func FuzzHeader(f *testing.F) {
	for _, s := range fixtureSeeds(f) {
		f.Add(s[:min(len(s), 4096)])
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		h, err := parseHeader(fuzzName, b)
		if err != nil {
			if h != nil {
				t.Fatalf("parseHeader returned a header with error %v", err)
			}
			if !errors.Is(err, ErrNotQcow2) && !errors.Is(err, ErrCorrupt) && !errors.Is(err, ErrUnsupported) {
				t.Fatalf("parseHeader: error matches no sentinel: %v", err)
			}
			return
		}
		// What a successful parse guarantees (formats.md A.11).
		cs := uint64(1) << h.clusterBits
		switch {
		case h.version != 2 && h.version != 3:
			t.Fatalf("version %d accepted", h.version)
		case h.clusterBits < minClusterBits || h.clusterBits > maxClusterBits:
			t.Fatalf("cluster_bits %d accepted", h.clusterBits)
		case h.version == 3 && (h.headerLen < headerV3MinLen || h.headerLen%8 != 0 || uint64(h.headerLen) > cs):
			t.Fatalf("header_length %d accepted", h.headerLen)
		case h.incompat&^incompatKnown != 0 || h.incompat&incompatCorrupt != 0 || h.incompat&incompatDataFile != 0:
			t.Fatalf("incompatible features %#x accepted", h.incompat)
		case h.cryptMethod != 0:
			t.Fatalf("crypt_method %d accepted", h.cryptMethod)
		case h.refcountOrder > maxRefcountOrder:
			t.Fatalf("refcount_order %d accepted", h.refcountOrder)
		case uint64(h.l1Size)*8 > maxL1Bytes:
			t.Fatalf("l1_size %d accepted", h.l1Size)
		case h.l1Size > 0 && (h.l1Off == 0 || h.l1Off%cs != 0):
			t.Fatalf("l1_table_offset %#x accepted", h.l1Off)
		case h.reftableClusters == 0 || uint64(h.reftableClusters)*cs > maxReftableBytes:
			t.Fatalf("refcount_table_clusters %d accepted", h.reftableClusters)
		case h.reftableOff == 0 || h.reftableOff%cs != 0:
			t.Fatalf("refcount_table_offset %#x accepted", h.reftableOff)
		case h.size > maxVirtualSize:
			t.Fatalf("size %d accepted", h.size)
		case h.extL2() && h.clusterBits < minExtL2ClusterBits:
			t.Fatalf("extended L2 with cluster_bits %d accepted", h.clusterBits)
		case (h.compressionType != 0) != (h.incompat&incompatCompression != 0) || h.compressionType > 1:
			t.Fatalf("compression type %d with incompatible bits %#x accepted", h.compressionType, h.incompat)
		case len(h.backingFile) > maxBackingNameLen || h.backingOff > cs:
			t.Fatalf("backing name of %d bytes at %d accepted", len(h.backingFile), h.backingOff)
		case len(h.backingFormat) > maxBackingFormatLen:
			t.Fatalf("backing format %q accepted", h.backingFormat)
		}
		need, _ := l1EntriesFor(h.size, h.clusterBits, h.l2Entries())
		if uint64(h.l1Size) < need {
			t.Fatalf("l1_size %d < %d needed for size %d", h.l1Size, need, h.size)
		}
		if b := h.bitmaps; b != nil {
			if h.version != 3 || h.autoclear&autoclearBitmaps == 0 {
				t.Fatal("bitmaps extension kept without the autoclear bit")
			}
			if b.reserved != 0 || b.nbBitmaps == 0 || b.nbBitmaps > maxBitmaps || b.dirSize == 0 ||
				b.dirSize > maxBitmapDirSize || b.dirOff == 0 || b.dirOff%cs != 0 {
				t.Fatalf("bitmaps extension %+v accepted", *b)
			}
		}
	})
}

func FuzzBitmapDirectory(f *testing.F) {
	for _, s := range fixtureSeeds(f) {
		h, err := parseHeader(fuzzName, s[:min(len(s), 1<<maxClusterBits)])
		if err != nil || h.bitmaps == nil || h.bitmaps.dirOff+h.bitmaps.dirSize > uint64(len(s)) {
			continue
		}
		dir := s[h.bitmaps.dirOff : h.bitmaps.dirOff+h.bitmaps.dirSize]
		f.Add(dir, h.bitmaps.nbBitmaps, h.size, uint8(h.clusterBits))
	}
	f.Add(dirEntryBytes(0x30000, 1, bmeAuto, 1, 16, "a", 0), uint32(1), uint64(1<<20), uint8(16))
	f.Fuzz(func(t *testing.T, dir []byte, nb uint32, size uint64, cb uint8) {
		cb = minClusterBits + cb%(maxClusterBits-minClusterBits+1)
		size &= maxVirtualSize
		ext := &bitmapsExt{nbBitmaps: nb, dirSize: uint64(len(dir)), dirOff: 1 << 20}
		es, err := parseBitmapDir(fuzzName, dir, ext, size, uint32(cb))
		if err != nil {
			if !errors.Is(err, ErrCorrupt) {
				t.Fatalf("parseBitmapDir: error does not match ErrCorrupt: %v", err)
			}
			return
		}
		if len(es) != int(nb) {
			t.Fatalf("%d entries for nb_bitmaps %d", len(es), nb)
		}
		cs := uint64(1) << cb
		names := map[string]bool{}
		for _, e := range es {
			switch {
			case names[e.name]:
				t.Fatalf("duplicate name %q accepted", e.name)
			case len(e.name) > maxBitmapNameLen:
				t.Fatalf("name of %d bytes accepted", len(e.name))
			case e.tableSize == 0 || e.tableSize > maxBitmapTableSize || uint64(e.tableSize)*cs > maxBitmapPhysSize:
				t.Fatalf("table size %d accepted", e.tableSize)
			case e.tableOff == 0 || e.tableOff%cs != 0:
				t.Fatalf("table offset %#x accepted", e.tableOff)
			case e.granBits < minBitmapGranBits || e.granBits > maxBitmapGranBits:
				t.Fatalf("granularity bits %d accepted", e.granBits)
			case e.flags&^(bmeInUse|bmeAuto) != 0:
				t.Fatalf("flags %#x accepted", e.flags)
			case !e.inUse() && size > uint64(e.tableSize)*cs*8<<e.granBits:
				t.Fatalf("table size %d too small for disk size %d accepted", e.tableSize, size)
			}
			names[e.name] = true
		}
	})
}

// withinBudget reports whether opening b as a single qcow2 file stays
// within the fuzz budget: small L1 and snapshot tables, small bitmaps, and
// no backing file named like itself (loops are a unit test's business).
func withinBudget(b []byte) bool {
	h, err := parseHeader(fuzzName, b[:min(len(b), 1<<maxClusterBits)])
	if err != nil {
		return true // Open fails in the header too
	}
	if uint64(h.l1Size)*8 > fuzzBudget {
		return false
	}
	if h.backingFile != "" && filepath.Clean(backingPath(fuzzName, h.backingFile)) == fuzzName {
		return false
	}
	bm := h.bitmaps
	if bm == nil {
		return true
	}
	if bm.dirOff > uint64(len(b)) || bm.dirSize > uint64(len(b))-bm.dirOff {
		return true // refused before any allocation
	}
	es, err := parseBitmapDir(fuzzName, b[bm.dirOff:bm.dirOff+bm.dirSize], bm, h.size, h.clusterBits)
	if err != nil {
		return true
	}
	for _, e := range es {
		if uint64(e.tableSize)*8 > fuzzBudget || (h.size>>e.granBits)/8 > fuzzBudget {
			return false
		}
	}
	return true
}

func FuzzOpen(f *testing.F) {
	for _, s := range fixtureSeeds(f) {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		if !withinBudget(b) {
			t.Skip("declared sizes over the fuzz budget")
		}
		img, err := Open(fuzzName, &Options{
			L2CacheBytes: 1 << 20,
			OpenFile: func(name string, writable bool) (File, error) {
				if name == fuzzName && !writable {
					return NewBytesFile(b), nil
				}
				return nil, &fs.PathError{Op: "open", Path: name, Err: fs.ErrNotExist}
			},
		})
		if err != nil {
			if img != nil {
				t.Fatalf("Open returned an image with error %v", err)
			}
			if !isKnownErr(err) {
				t.Fatalf("Open: error matches no documented sentinel: %v", err)
			}
			return
		}
		defer img.Close()
		fuzzImage(t, img)
	})
}

// fuzzImage exercises an image that opened: a few reads, extents over the
// start and the end of the disk, layers and bitmaps.
func fuzzImage(t *testing.T, img *Image) {
	size := img.Size()
	buf := make([]byte, 70000)
	for _, r := range []struct{ off, n uint64 }{
		{0, 4096}, {0, 70000}, {size / 2, 1}, {size / 3 &^ 511, 512}, {max(size, 1) - 1, 1}, {max(size, 4096) - 4096, 5000},
	} {
		if r.off >= size {
			continue
		}
		n, err := img.ReadAt(buf[:r.n], int64(r.off))
		switch {
		case err == nil && n != int(r.n):
			t.Fatalf("ReadAt(%d, %d) = %d, nil", r.n, r.off, n)
		case err == io.EOF && r.off+uint64(n) != size:
			t.Fatalf("ReadAt(%d, %d) = %d, EOF before the end %d", r.n, r.off, n, size)
		case err != nil && err != io.EOF && !errors.Is(err, ErrCorrupt):
			t.Fatalf("ReadAt(%d, %d): error does not match ErrCorrupt: %v", r.n, r.off, err)
		}
	}
	for _, r := range []struct{ off, n uint64 }{{0, 4 << 20}, {max(size, 1<<20) - 1<<20, 2 << 20}} {
		fuzzExtents(t, img, r.off, r.n)
	}
	if _, err := img.Layers(); err != nil {
		t.Fatalf("Layers: %v", err)
	}
	for _, bi := range img.Bitmaps() {
		m, err := img.Bitmap(bi.Name)
		switch {
		case bi.InUse && !errors.Is(err, ErrInconsistent):
			t.Fatalf("Bitmap(%q) of an in-use bitmap: %v", bi.Name, err)
		case !bi.InUse && err != nil:
			t.Fatalf("Bitmap(%q): %v", bi.Name, err)
		case err == nil && (m.Size() != size || m.Granularity() != bi.Granularity || m.DirtyBytes() != bi.DirtyBytes):
			t.Fatalf("Bitmap(%q): size %d gran %d dirty %d, Bitmaps() says %+v", bi.Name, m.Size(), m.Granularity(), m.DirtyBytes(), bi)
		}
	}
}

// fuzzExtents checks that Extents tiles [off, off+n) clipped to the disk
// with merged, non-empty extents, and that zero extents read as zeros.
func fuzzExtents(t *testing.T, img *Image, off, n uint64) {
	size := img.Size()
	end := min(off+n, size)
	if off >= size {
		return
	}
	pos := off
	var prev Extent
	var zeros []Extent
	err := img.Extents(off, n, func(e Extent) bool {
		if e.Off != pos || e.Len == 0 || e.Len > end-pos {
			t.Fatalf("Extents(%d, %d): extent [%d, +%d) at position %d", off, n, e.Off, e.Len, pos)
		}
		if pos != off && prev.Depth == e.Depth && prev.Zero == e.Zero {
			t.Fatalf("Extents(%d, %d): equal extents not merged at %d", off, n, e.Off)
		}
		if e.Depth < 0 || e.Depth > MaxChainDepth || (e.Depth == 0 && !e.Zero) {
			t.Fatalf("Extents(%d, %d): extent %+v", off, n, e)
		}
		if e.Zero && len(zeros) < 8 {
			zeros = append(zeros, e)
		}
		prev, pos = e, e.Off+e.Len
		return true
	})
	if err != nil {
		if !errors.Is(err, ErrCorrupt) {
			t.Fatalf("Extents(%d, %d): error does not match ErrCorrupt: %v", off, n, err)
		}
		return
	}
	if pos != end {
		t.Fatalf("Extents(%d, %d) stopped at %d, want %d", off, n, pos, end)
	}
	for _, z := range zeros {
		b := make([]byte, min(z.Len, 1<<16))
		if _, err := img.ReadAt(b, int64(z.Off)); err != nil && err != io.EOF {
			continue // a corrupt entry further on; ReadAt reports it
		}
		if i := slices.IndexFunc(b, func(c byte) bool { return c != 0 }); i >= 0 {
			t.Fatalf("extent %+v is zero but reads %#x at %d", z, b[i], z.Off+uint64(i))
		}
	}
}

// synthImage builds a qcow2 image around one L2 table: cluster 0 the
// header, 1 a refcount table, 2 the L1 table, 3 the L2 table (l2, cut or
// zero-padded to a cluster), then data from cluster 4 on. The disk covers
// the first entries of l2 (at most 64), so every cluster can be checked.
func synthImage(cb uint32, v3, extL2, zstd bool, l2, data []byte) (img []byte, entries int) {
	cs := 1 << cb
	es := 8
	if extL2 {
		es = 16
	}
	entries = min(max(len(l2)/es, 1), 64, cs/es)
	b := make([]byte, 4*cs, 4*cs+len(data))
	be := binary.BigEndian
	be.PutUint32(b[0:], qcowMagic)
	be.PutUint32(b[4:], 2)
	be.PutUint32(b[20:], cb)
	be.PutUint64(b[24:], uint64(entries)<<cb)
	be.PutUint32(b[36:], 1)            // l1_size
	be.PutUint64(b[40:], uint64(2*cs)) // l1_table_offset
	be.PutUint64(b[48:], uint64(cs))   // refcount_table_offset
	be.PutUint32(b[56:], 1)            // refcount_table_clusters
	if v3 {
		be.PutUint32(b[4:], 3)
		var incompat uint64
		if extL2 {
			incompat |= incompatExtL2
		}
		if zstd {
			incompat |= incompatCompression
			b[compressionByte] = compressionZstd
		}
		be.PutUint64(b[72:], incompat)
		be.PutUint32(b[96:], 4)
		be.PutUint32(b[100:], headerV3Len)
	}
	be.PutUint64(b[2*cs:], uint64(3*cs)|entryCopied)
	copy(b[3*cs:4*cs], l2)
	return append(b, data...), entries
}

// unit is what an oracle expects of one allocation unit (a cluster, or a
// subcluster with extended L2).
type unit struct {
	kind  runKind
	host  uint64 // runData: host offset
	valid bool   // false: reading it must fail
	known bool   // false: compressed, content not predicted
}

// l2Oracle classifies entry i of the L2 table in img independently of
// the engine, following formats.md A.4 and A.5 and qemu's rules.
func l2Oracle(img []byte, cb uint32, v3, extL2 bool, i int) []unit {
	be := binary.BigEndian
	cs := uint64(1) << cb
	const offMask = 0x00fffffffffffe00
	if !extL2 {
		e := be.Uint64(img[3*cs+uint64(i)*8:])
		off := e & offMask
		switch {
		case e&entryCompressed != 0:
			return []unit{{kind: runCompressed, valid: true}}
		case e&1 != 0 && !v3:
			return []unit{{}} // "Zero cluster entry found in pre-v3 image"
		case e&1 != 0:
			// qemu also refuses a ZERO_ALLOC entry whose offset is not
			// cluster aligned; the engine reads it as zeros (the skipped
			// case in TestHostile). The oracle follows the engine here so
			// that the fuzzer looks for other bugs.
			return []unit{{kind: runZero, valid: true, known: true}}
		case off == 0:
			return []unit{{kind: runUnalloc, valid: true, known: true}}
		case off%cs != 0:
			return []unit{{}}
		}
		return []unit{{kind: runData, host: off, valid: true, known: true}}
	}
	e := be.Uint64(img[3*cs+uint64(i)*16:])
	bm := be.Uint64(img[3*cs+uint64(i)*16+8:])
	off := e & offMask
	us := make([]unit, subclusters)
	bad := e&entryCompressed == 0 &&
		((off == 0 && bm&subAllocMask != 0) || (off != 0 && (off%cs != 0 || (bm>>32)&bm&subAllocMask != 0)))
	for sc := range us {
		switch {
		case e&entryCompressed != 0:
			us[sc] = unit{kind: runCompressed, valid: true}
		case bad:
			us[sc] = unit{}
		case bm>>(32+sc)&1 != 0:
			us[sc] = unit{kind: runZero, valid: true, known: true}
		case bm>>sc&1 != 0:
			us[sc] = unit{kind: runData, host: off + uint64(sc)*(cs/subclusters), valid: true, known: true}
		default:
			us[sc] = unit{kind: runUnalloc, valid: true, known: true}
		}
	}
	return us
}

func FuzzL2(f *testing.F) {
	data := bytes.Repeat([]byte("cbtfs FuzzL2 data "), 4096)
	for _, s := range fixtureSeeds(f) {
		h, err := parseHeader(fuzzName, s[:min(len(s), 1<<maxClusterBits)])
		if err != nil || h.clusterBits > 16 || h.l1Off+8 > uint64(len(s)) {
			continue
		}
		l2off := binary.BigEndian.Uint64(s[h.l1Off:]) & l1OffsetMask
		if l2off == 0 || l2off >= uint64(len(s)) {
			continue
		}
		l2 := s[l2off:min(uint64(len(s)), l2off+h.clusterSize())]
		flags := uint8(0)
		if h.version == 3 {
			flags |= 1
		}
		if h.extL2() {
			flags |= 2
		}
		if h.compressionType == compressionZstd {
			flags |= 4
		}
		f.Add(uint8(h.clusterBits-9), flags, l2, data)
	}
	f.Fuzz(func(t *testing.T, cbits, flags uint8, l2, data []byte) {
		v3, extL2, zstd := flags&1 != 0, flags&2 != 0, flags&4 != 0
		cb := uint32(9 + cbits%8) // 512 B .. 64 KiB
		if extL2 {
			v3, cb = true, max(cb, minExtL2ClusterBits)
		}
		if !v3 {
			zstd = false
		}
		data = data[:min(len(data), 1<<20)]
		b, entries := synthImage(cb, v3, extL2, zstd, l2, data)
		img, err := memFiles{fuzzName: b}.Open(fuzzName)
		if err != nil {
			t.Fatalf("Open of a synthetic image: %v", err)
		}
		defer img.Close()

		cs := uint64(1) << cb
		usz := cs
		if extL2 {
			usz = cs / subclusters
		}
		var units []unit
		for i := range entries {
			units = append(units, l2Oracle(b, cb, v3, extL2, i)...)
		}
		// Each cluster on its own: fails exactly when the oracle says
		// so, and reads what the oracle predicts.
		allValid := true
		buf := make([]byte, cs)
		for i := range entries {
			us := units[i*int(cs/usz) : (i+1)*int(cs/usz)]
			valid := !slices.ContainsFunc(us, func(u unit) bool { return !u.valid })
			allValid = allValid && valid
			_, err := img.ReadAt(buf, int64(uint64(i)*cs))
			if !valid {
				if !errors.Is(err, ErrCorrupt) {
					t.Fatalf("cluster %d: ReadAt = %v, want ErrCorrupt", i, err)
				}
				continue
			}
			if err != nil {
				if us[0].kind == runCompressed && errors.Is(err, ErrCorrupt) {
					continue // bad compressed data
				}
				t.Fatalf("cluster %d: ReadAt: %v", i, err)
			}
			for j, u := range us {
				if !u.known {
					continue
				}
				want := make([]byte, usz)
				if u.kind == runData && u.host < uint64(len(b)) {
					copy(want, b[u.host:])
				}
				if got := buf[uint64(j)*usz : uint64(j+1)*usz]; !bytes.Equal(got, want) {
					t.Fatalf("cluster %d unit %d (%v at %#x): content differs from the oracle", i, j, u.kind, u.host)
				}
			}
		}
		// Extents over the whole disk agree with the oracle's kinds.
		var got []Extent
		err = img.Extents(0, img.Size(), func(e Extent) bool { got = append(got, e); return true })
		if !allValid {
			if err == nil {
				t.Fatal("Extents succeeded over invalid entries")
			}
			return
		}
		if err != nil {
			t.Fatalf("Extents: %v", err)
		}
		var want []Extent
		for k, u := range units {
			e := Extent{Off: uint64(k) * usz, Len: usz, Depth: 1, Zero: u.kind == runZero}
			if u.kind == runUnalloc {
				e.Depth, e.Zero = 0, true
			}
			if n := len(want); n > 0 && want[n-1].Depth == e.Depth && want[n-1].Zero == e.Zero {
				want[n-1].Len += usz
				continue
			}
			want = append(want, e)
		}
		if !slices.Equal(got, want) {
			t.Fatalf("Extents = %+v\nwant %+v", got, want)
		}
	})
}

func FuzzDecompress(f *testing.F) {
	for _, s := range fixtureSeeds(f) {
		if i := bytes.Index(s, []byte{0x28, 0xb5, 0x2f, 0xfd}); i >= 0 {
			f.Add(uint8(16), true, s[i:min(len(s), i+4096)])
		}
	}
	f.Add(uint8(12), false, []byte{0x63, 0x60, 0x18, 0x05, 0xa3, 0x60, 0x14, 0x0c, 0x77, 0x00, 0x00})
	f.Fuzz(func(t *testing.T, cbits uint8, zstd bool, src []byte) {
		cb := uint32(minClusterBits + cbits%(maxClusterBits-minClusterBits+1))
		if n, err := zstdFrameLen(src); err == nil && (n <= 0 || n > len(src)) {
			t.Fatalf("zstdFrameLen = %d for %d bytes", n, len(src))
		}
		d := &decompressor{zstd: zstd}
		dst := make([]byte, 1<<cb)
		if err := d.decompress(dst, src); err == nil && len(dst) != 1<<cb {
			t.Fatal("decompress changed the buffer length")
		}
		// Descriptor arithmetic: any entry gives a size of 1..2^(cb-8)
		// sectors minus the offset within the first sector.
		if len(src) >= 8 {
			e := binary.BigEndian.Uint64(src) &^ (entryCopied | entryCompressed)
			c := decodeCompressed(e, cb)
			if c.size == 0 || c.size > uint64(1)<<(cb-8)*512 || c.off >= 1<<(62-(cb-8)) {
				t.Fatalf("decodeCompressed(%#x, %d) = %+v", e, cb, c)
			}
		}
	})
}
