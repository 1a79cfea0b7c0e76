package qcow

// Hostile input: hand-patched copies of the committed fixtures, opened from
// memory. Every case names the rule it breaks (formats.md A.11, B.7, the
// qcow2 spec) and the sentinel the engine must return. The patch points
// are found with the small independent decoders below, not with the code
// under test.

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

var be = binary.BigEndian

// fixtureBytes returns a private copy of testdata/img/rel.
func fixtureBytes(t testing.TB, rel string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("testdata/img", rel))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// memFiles serves a chain from memory through Options.OpenFile.
type memFiles map[string][]byte

func (m memFiles) open(name string, writable bool) (File, error) {
	if writable {
		return nil, &fs.PathError{Op: "open", Path: name, Err: fs.ErrPermission}
	}
	if b, ok := m[filepath.Clean(name)]; ok {
		return NewBytesFile(b), nil
	}
	return nil, &fs.PathError{Op: "open", Path: name, Err: fs.ErrNotExist}
}

func (m memFiles) Open(top string) (*Image, error) {
	return Open(top, &Options{OpenFile: m.open})
}

// fixtureFiles loads every file of the fixture directory dir (under
// testdata/img) into memory, named as Open derives them from "dir/...".
func fixtureFiles(t testing.TB, dir string) memFiles {
	t.Helper()
	m := memFiles{}
	root := filepath.Join("testdata/img", dir)
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		rel, err := filepath.Rel("testdata/img", p)
		if err != nil {
			return err
		}
		m[rel] = fixtureBytes(t, rel)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// Independent decoding of the fields the patches need.

func clusterSize(b []byte) uint64 { return 1 << be.Uint32(b[20:]) }

type extLoc struct {
	typ     uint32
	hdr     int // offset of the extension's type field
	dataOff int
	n       int
}

// extensions walks the header extensions of a v3 image.
func extensions(t testing.TB, b []byte) []extLoc {
	t.Helper()
	var out []extLoc
	off := int(be.Uint32(b[100:]))
	for {
		typ, n := be.Uint32(b[off:]), int(be.Uint32(b[off+4:]))
		if typ == 0 {
			return out
		}
		out = append(out, extLoc{typ, off, off + 8, n})
		off += 8 + (n+7)&^7
		if off >= int(clusterSize(b)) {
			t.Fatal("fixture: extensions run off cluster 0")
		}
	}
}

func findExt(t testing.TB, b []byte, typ uint32) extLoc {
	t.Helper()
	for _, e := range extensions(t, b) {
		if e.typ == typ {
			return e
		}
	}
	t.Fatalf("fixture has no extension %#x", typ)
	return extLoc{}
}

type dirLoc struct {
	pos       int // absolute offset of the entry in the file
	tableOff  uint64
	tableSize uint32
	nameSize  int
	name      string
}

// bitmapDir decodes the bitmap directory of a fixture.
func bitmapDir(t testing.TB, b []byte) (ext extLoc, entries []dirLoc) {
	t.Helper()
	ext = findExt(t, b, extBitmaps)
	nb := int(be.Uint32(b[ext.dataOff:]))
	dirOff := int(be.Uint64(b[ext.dataOff+16:]))
	pos := dirOff
	for range nb {
		e := dirLoc{
			pos:       pos,
			tableOff:  be.Uint64(b[pos:]),
			tableSize: be.Uint32(b[pos+8:]),
			nameSize:  int(be.Uint16(b[pos+18:])),
		}
		e.name = string(b[pos+24 : pos+24+e.nameSize])
		entries = append(entries, e)
		pos += (24 + e.nameSize + int(be.Uint32(b[pos+20:])) + 7) &^ 7
	}
	return ext, entries
}

func dirEntryNamed(t testing.TB, b []byte, name string) dirLoc {
	t.Helper()
	_, es := bitmapDir(t, b)
	for _, e := range es {
		if e.name == name {
			return e
		}
	}
	t.Fatalf("fixture has no bitmap %q", name)
	return dirLoc{}
}

// l2EntryAt returns the file offset of the (first word of the) L2 entry of
// the guest cluster holding guest offset off.
func l2EntryAt(t testing.TB, b []byte, off uint64) int {
	t.Helper()
	cs := clusterSize(b)
	entry := uint64(8)
	if be.Uint32(b[4:]) >= 3 && be.Uint64(b[72:])&incompatExtL2 != 0 {
		entry = 16
	}
	per := cs / entry
	l1 := be.Uint64(b[40:])
	l1e := be.Uint64(b[l1+8*(off/cs/per):]) & 0x00fffffffffffe00
	if l1e == 0 {
		t.Fatalf("fixture: no L2 table for offset %d", off)
	}
	return int(l1e + entry*(off/cs%per))
}

// hostile is one hand-patched image.
type hostile struct {
	name    string
	fixture string // under testdata/img; the top of a memFiles chain for "chain/top.qcow2"
	patch   func(t testing.TB, b []byte) []byte
	// onRead: Open must succeed, and ReadAt at guest offset readAt (and
	// Extents over the disk) must fail instead.
	onRead  bool
	readAt  int64
	wantErr error
	want    []string // substrings of the message besides the file name
	file    string   // the file the message must name, if not the fixture
	// extentsOK: Extents need not fail (it does not decompress).
	extentsOK bool
}

func put32(b []byte, off int, v uint32) { be.PutUint32(b[off:], v) }
func put64(b []byte, off int, v uint64) { be.PutUint64(b[off:], v) }

func set32(off int, v uint32) func(testing.TB, []byte) []byte {
	return func(_ testing.TB, b []byte) []byte { put32(b, off, v); return b }
}

func set64(off int, v uint64) func(testing.TB, []byte) []byte {
	return func(_ testing.TB, b []byte) []byte { put64(b, off, v); return b }
}

func or64(off int, v uint64) func(testing.TB, []byte) []byte {
	return func(_ testing.TB, b []byte) []byte { put64(b, off, be.Uint64(b[off:])|v); return b }
}

// bitmapsExt patches the bitmaps extension: field at offset off of its data.
func bitmapsExtField(off int, v uint64, width int) func(testing.TB, []byte) []byte {
	return func(t testing.TB, b []byte) []byte {
		e := findExt(t, b, extBitmaps)
		if width == 4 {
			put32(b, e.dataOff+off, uint32(v))
		} else {
			put64(b, e.dataOff+off, v)
		}
		return b
	}
}

// dirField patches a field of bitmap name's directory entry.
func dirField(name string, off int, width int, v uint64) func(testing.TB, []byte) []byte {
	return func(t testing.TB, b []byte) []byte {
		e := dirEntryNamed(t, b, name)
		switch width {
		case 1:
			b[e.pos+off] = byte(v)
		case 2:
			be.PutUint16(b[e.pos+off:], uint16(v))
		case 4:
			put32(b, e.pos+off, uint32(v))
		case 8:
			put64(b, e.pos+off, v)
		}
		return b
	}
}

func hostileCases() []hostile {
	const (
		bm    = "bitmaps/disk.qcow2" // v3, 4 KiB clusters, 5 bitmaps
		c4k   = "c4k/disk.qcow2"
		c64k  = "c64k/disk.qcow2" // has the feature name table
		chain = "chain/top.qcow2" // backing sub/mid.qcow2, format ext
		snap  = "snap/disk.qcow2" // two internal snapshots
	)
	return []hostile{
		// Header (formats.md A.1, A.2, A.11).
		{name: "bad magic", fixture: c4k, patch: set32(0, 0x514649fc), wantErr: ErrNotQcow2, want: []string{"not a qcow2"}},
		{name: "empty file", fixture: c4k, patch: func(testing.TB, []byte) []byte { return nil }, wantErr: ErrNotQcow2},
		{name: "three bytes of the magic", fixture: c4k, patch: func(_ testing.TB, b []byte) []byte { return b[:3] }, wantErr: ErrNotQcow2},
		{name: "header cut at 71 bytes", fixture: c4k, patch: func(_ testing.TB, b []byte) []byte { return b[:71] }, wantErr: ErrCorrupt, want: []string{"header too short"}},
		{name: "v3 header cut short", fixture: c4k, patch: func(_ testing.TB, b []byte) []byte { return b[:100] }, wantErr: ErrCorrupt, want: []string{"v3 header"}},
		{name: "version 1", fixture: c4k, patch: set32(4, 1), wantErr: ErrUnsupported, want: []string{"version 1"}},
		{name: "version 4", fixture: c4k, patch: set32(4, 4), wantErr: ErrUnsupported, want: []string{"version 4"}},
		{name: "cluster_bits 8", fixture: c4k, patch: set32(20, 8), wantErr: ErrCorrupt, want: []string{"cluster_bits", "8"}},
		{name: "cluster_bits 22", fixture: c4k, patch: set32(20, 22), wantErr: ErrCorrupt, want: []string{"cluster_bits", "22"}},
		{name: "cluster_bits 63", fixture: c4k, patch: set32(20, 63), wantErr: ErrCorrupt, want: []string{"cluster_bits"}},
		{name: "header_length not a multiple of 8", fixture: c4k, patch: set32(100, 108), wantErr: ErrCorrupt, want: []string{"header_length", "108"}},
		{name: "header_length below 104", fixture: c4k, patch: set32(100, 96), wantErr: ErrCorrupt, want: []string{"header_length"}},
		{name: "header_length past the cluster", fixture: c4k, patch: set32(100, 4096+8), wantErr: ErrCorrupt, want: []string{"header_length"}},
		{name: "header_length huge", fixture: c4k, patch: set32(100, 0xfffffff8), wantErr: ErrCorrupt, want: []string{"header_length"}},
		{name: "unknown incompatible bit 5", fixture: c4k, patch: or64(72, 1<<5), wantErr: ErrUnsupported, want: []string{"incompatible", "0x20"}},
		{name: "unknown incompatible bit 63", fixture: c4k, patch: or64(72, 1<<63), wantErr: ErrUnsupported, want: []string{"incompatible"}},
		{name: "corrupt bit", fixture: c4k, patch: or64(72, incompatCorrupt), wantErr: ErrUnsupported, want: []string{"corrupt"}},
		{name: "crypt_method 1", fixture: c4k, patch: set32(32, 1), wantErr: ErrUnsupported, want: []string{"encryption", "AES"}},
		{name: "crypt_method 2", fixture: c4k, patch: set32(32, 2), wantErr: ErrUnsupported, want: []string{"encryption", "LUKS"}},
		{name: "crypt_method 3", fixture: c4k, patch: set32(32, 3), wantErr: ErrUnsupported, want: []string{"encryption"}},
		{name: "external data file bit", fixture: c4k, patch: or64(72, incompatDataFile), wantErr: ErrUnsupported, want: []string{"external data file"}},
		{name: "compression bit with zlib", fixture: c4k, patch: or64(72, incompatCompression), wantErr: ErrCorrupt, want: []string{"compression"}},
		{name: "zstd without the compression bit", fixture: c4k,
			patch: func(_ testing.TB, b []byte) []byte { b[104] = 1; return b }, wantErr: ErrCorrupt, want: []string{"compression_type"}},
		{name: "zstd image with the compression bit cleared", fixture: "c2m/disk.qcow2",
			patch: func(_ testing.TB, b []byte) []byte {
				put64(b, 72, be.Uint64(b[72:])&^incompatCompression)
				return b
			}, wantErr: ErrCorrupt, want: []string{"compression_type"}},
		{name: "compression type 2", fixture: c4k,
			patch: func(_ testing.TB, b []byte) []byte {
				b[104] = 2
				put64(b, 72, be.Uint64(b[72:])|incompatCompression)
				return b
			}, wantErr: ErrUnsupported, want: []string{"compression type 2"}},
		{name: "extended L2 with 4 KiB clusters", fixture: c4k, patch: or64(72, incompatExtL2), wantErr: ErrCorrupt, want: []string{"extended L2"}},
		{name: "refcount_order 7", fixture: c4k, patch: set32(96, 7), wantErr: ErrCorrupt, want: []string{"refcount_order", "7"}},
		{name: "refcount_table_clusters 0", fixture: c4k, patch: set32(56, 0), wantErr: ErrCorrupt, want: []string{"refcount_table_clusters"}},
		{name: "refcount table over 8 MiB", fixture: c4k, patch: set32(56, 8<<20/4096+1), wantErr: ErrCorrupt, want: []string{"refcount_table_clusters"}},
		{name: "refcount table offset unaligned", fixture: c4k,
			patch: func(_ testing.TB, b []byte) []byte { put64(b, 48, be.Uint64(b[48:])+512); return b }, wantErr: ErrCorrupt, want: []string{"refcount_table_offset"}},
		{name: "refcount table offset 0", fixture: c4k, patch: set64(48, 0), wantErr: ErrCorrupt, want: []string{"refcount_table_offset"}},
		{name: "refcount table offset past 2^56", fixture: c4k, patch: set64(48, 1<<56), wantErr: ErrCorrupt, want: []string{"refcount_table_offset"}},
		{name: "l1_size too small", fixture: "c512/disk.qcow2",
			patch: func(_ testing.TB, b []byte) []byte { put32(b, 36, be.Uint32(b[36:])-1); return b }, wantErr: ErrCorrupt, want: []string{"l1_size", "too small"}},
		{name: "l1_size 0", fixture: c4k, patch: set32(36, 0), wantErr: ErrCorrupt, want: []string{"l1_size"}},
		{name: "l1_size over 32 MiB", fixture: c4k, patch: set32(36, 32<<20/8+1), wantErr: ErrCorrupt, want: []string{"l1_size"}},
		{name: "l1_size 2^32-1", fixture: c4k, patch: set32(36, 0xffffffff), wantErr: ErrCorrupt, want: []string{"l1_size"}},
		{name: "L1 offset unaligned", fixture: c4k,
			patch: func(_ testing.TB, b []byte) []byte { put64(b, 40, be.Uint64(b[40:])+8); return b }, wantErr: ErrCorrupt, want: []string{"l1_table_offset"}},
		{name: "L1 offset 0", fixture: c4k, patch: set64(40, 0), wantErr: ErrCorrupt, want: []string{"l1_table_offset"}},
		{name: "virtual size 2^63", fixture: c4k, patch: set64(24, 1<<63), wantErr: ErrCorrupt, want: []string{"virtual size"}},
		{name: "virtual size needs too many L1 entries", fixture: "c512/disk.qcow2", patch: set64(24, 1<<50), wantErr: ErrCorrupt, want: []string{"virtual size"}},

		// Backing file name (A.1, A.11).
		{name: "backing name too long", fixture: chain, patch: set32(16, 1024), wantErr: ErrCorrupt, want: []string{"backing_file_size", "1024"}},
		{name: "backing offset past the cluster", fixture: chain, patch: set64(8, 4096+8), wantErr: ErrCorrupt, want: []string{"backing_file_offset"}},
		{name: "backing name past the cluster", fixture: chain,
			patch: func(_ testing.TB, b []byte) []byte {
				put64(b, 8, 4096-8)
				put32(b, 16, 13)
				return b
			}, wantErr: ErrCorrupt, want: []string{"backing_file_size"}},
		{name: "backing name size 0", fixture: chain, patch: set32(16, 0), wantErr: ErrCorrupt, want: []string{"backing_file_size"}},
		{name: "backing file missing", fixture: chain,
			patch: func(_ testing.TB, b []byte) []byte {
				copy(b[be.Uint64(b[8:]):], "sub/xyz.qcow2")
				return b
			}, wantErr: fs.ErrNotExist, want: []string{"backing file", "sub/xyz.qcow2"}},
		{name: "backing file not local", fixture: chain,
			patch: func(_ testing.TB, b []byte) []byte {
				copy(b[be.Uint64(b[8:]):], "nbd://h/x.qc")
				put32(b, 16, 12)
				return b
			}, wantErr: ErrUnsupported, want: []string{"nbd://h/x.qc"}},
		{name: "backing format too long", fixture: chain,
			patch: func(t testing.TB, b []byte) []byte {
				e := findExt(t, b, extBackingFormat)
				put32(b, e.hdr+4, 16)
				return b
			}, wantErr: ErrCorrupt, want: []string{"backing format"}},
		{name: "backing format unknown", fixture: chain,
			patch: func(t testing.TB, b []byte) []byte {
				e := findExt(t, b, extBackingFormat)
				copy(b[e.dataOff:], "vmdk\x00")
				put32(b, e.hdr+4, 4)
				return b
			}, wantErr: ErrUnsupported, want: []string{"vmdk"}, file: "chain/sub/mid.qcow2"},

		// Header extensions (A.3).
		{name: "extension overruns the cluster", fixture: c64k,
			patch: func(t testing.TB, b []byte) []byte {
				e := findExt(t, b, extFeatureTable)
				put32(b, e.hdr+4, 0xffff0000)
				return b
			}, wantErr: ErrCorrupt, want: []string{"extension", "length"}},
		{name: "extension overruns the backing name", fixture: chain,
			patch: func(t testing.TB, b []byte) []byte {
				e := findExt(t, b, extBackingFormat)
				put32(b, e.hdr+4, 15) // now ends inside the name at 0x88
				return b
			}, wantErr: ErrCorrupt, want: []string{"extension"}},
		{name: "crypto extension without encryption", fixture: c64k,
			patch: func(t testing.TB, b []byte) []byte {
				e := findExt(t, b, extFeatureTable)
				put32(b, e.hdr, extCryptoHeader)
				return b
			}, wantErr: ErrCorrupt, want: []string{"crypto"}},
		{name: "external data file extension", fixture: chain,
			patch: func(t testing.TB, b []byte) []byte {
				e := findExt(t, b, extBackingFormat)
				put32(b, e.hdr, extDataFile)
				return b
			}, wantErr: ErrUnsupported, want: []string{"external data file", "qcow2"}},
		{name: "duplicate extension", fixture: bm,
			patch: func(t testing.TB, b []byte) []byte {
				e := findExt(t, b, extBitmaps)
				end := e.dataOff + 24
				copy(b[end:], b[e.hdr:end]) // a second copy replaces the end marker
				return b
			}, wantErr: ErrCorrupt, want: []string{"duplicate"}},

		// Bitmaps extension (B.1, B.7).
		{name: "bitmaps extension length 32", fixture: bm,
			patch: func(t testing.TB, b []byte) []byte {
				e := findExt(t, b, extBitmaps)
				put32(b, e.hdr+4, 32)
				return b
			}, wantErr: ErrCorrupt, want: []string{"bitmaps extension length", "32"}},
		{name: "bitmaps extension length 16", fixture: bm,
			patch: func(t testing.TB, b []byte) []byte {
				e := findExt(t, b, extBitmaps)
				put32(b, e.hdr+4, 16)
				return b
			}, wantErr: ErrCorrupt, want: []string{"bitmaps extension length", "16"}},
		{name: "bitmaps extension reserved", fixture: bm, patch: bitmapsExtField(4, 1, 4), wantErr: ErrCorrupt, want: []string{"reserved"}},
		{name: "nb_bitmaps 0", fixture: bm, patch: bitmapsExtField(0, 0, 4), wantErr: ErrCorrupt, want: []string{"nb_bitmaps"}},
		{name: "nb_bitmaps 65536", fixture: bm, patch: bitmapsExtField(0, 65536, 4), wantErr: ErrCorrupt, want: []string{"nb_bitmaps"}},
		{name: "nb_bitmaps one more than the directory holds", fixture: bm, patch: bitmapsExtField(0, 6, 4), wantErr: ErrCorrupt, want: []string{"bitmap directory"}},
		{name: "nb_bitmaps one less than the directory holds", fixture: bm, patch: bitmapsExtField(0, 4, 4), wantErr: ErrCorrupt, want: []string{"bitmap directory"}},
		{name: "bitmap directory size 0", fixture: bm, patch: bitmapsExtField(8, 0, 8), wantErr: ErrCorrupt, want: []string{"directory size"}},
		{name: "bitmap directory size over 64 MiB", fixture: bm, patch: bitmapsExtField(8, 1024*65535+8, 8), wantErr: ErrCorrupt, want: []string{"directory size"}},
		{name: "bitmap directory larger than its entries", fixture: bm,
			patch: func(t testing.TB, b []byte) []byte {
				e := findExt(t, b, extBitmaps)
				put64(b, e.dataOff+8, be.Uint64(b[e.dataOff+8:])+8)
				return append(b, make([]byte, 4096)...) // the directory ends the file
			}, wantErr: ErrCorrupt, want: []string{"bitmap directory", "broken"}},
		{name: "bitmap directory smaller than its entries", fixture: bm,
			patch: func(t testing.TB, b []byte) []byte {
				e := findExt(t, b, extBitmaps)
				put64(b, e.dataOff+8, be.Uint64(b[e.dataOff+8:])-8)
				return b
			}, wantErr: ErrCorrupt, want: []string{"bitmap directory"}},
		{name: "bitmap directory offset unaligned", fixture: bm,
			patch: func(t testing.TB, b []byte) []byte {
				e := findExt(t, b, extBitmaps)
				put64(b, e.dataOff+16, be.Uint64(b[e.dataOff+16:])+8)
				return b
			}, wantErr: ErrCorrupt, want: []string{"directory offset"}},
		{name: "bitmap directory offset 0", fixture: bm, patch: bitmapsExtField(16, 0, 8), wantErr: ErrCorrupt, want: []string{"directory offset"}},
		{name: "bitmap directory past the end of the file", fixture: bm, patch: bitmapsExtField(16, 1<<40, 8), wantErr: ErrCorrupt, want: []string{"bitmap directory"}},

		// Bitmap directory entries (B.2, B.7).
		{name: "bitmap table size 0", fixture: bm, patch: dirField("g64k", 8, 4, 0), wantErr: ErrCorrupt, want: []string{"g64k", "table size"}},
		{name: "bitmap table size over 2^27", fixture: bm, patch: dirField("g64k", 8, 4, 1<<27+1), wantErr: ErrCorrupt, want: []string{"g64k", "table size"}},
		{name: "bitmap larger than 512 MiB", fixture: bm, patch: dirField("g64k", 8, 4, 512<<20/4096+1), wantErr: ErrCorrupt, want: []string{"g64k", "table size"}},
		{name: "bitmap table size not what the disk needs", fixture: bm, patch: dirField("g64k", 8, 4, 2), wantErr: ErrCorrupt, want: []string{"g64k", "table size"}},
		{name: "bitmap table offset 0", fixture: bm, patch: dirField("g4k", 0, 8, 0), wantErr: ErrCorrupt, want: []string{"g4k", "table offset"}},
		{name: "bitmap table offset unaligned", fixture: bm,
			patch: func(t testing.TB, b []byte) []byte {
				e := dirEntryNamed(t, b, "g4k")
				put64(b, e.pos, e.tableOff+512)
				return b
			}, wantErr: ErrCorrupt, want: []string{"g4k", "table offset"}},
		{name: "bitmap granularity_bits 8", fixture: bm, patch: dirField("g512", 17, 1, 8), wantErr: ErrCorrupt, want: []string{"g512", "granularity"}},
		{name: "bitmap granularity_bits 32", fixture: bm, patch: dirField("g1m", 17, 1, 32), wantErr: ErrCorrupt, want: []string{"g1m", "granularity"}},
		{name: "bitmap flag bit 2 (extra data compatible)", fixture: bm, patch: dirField("off", 12, 4, 4), wantErr: ErrCorrupt, want: []string{"off", "flags"}},
		{name: "bitmap flag bit 31", fixture: bm, patch: dirField("g4k", 12, 4, 1<<31|2), wantErr: ErrCorrupt, want: []string{"g4k", "flags"}},
		{name: "bitmap type 0", fixture: bm, patch: dirField("g4k", 16, 1, 0), wantErr: ErrCorrupt, want: []string{"g4k", "type"}},
		{name: "bitmap type 2", fixture: bm, patch: dirField("g4k", 16, 1, 2), wantErr: ErrCorrupt, want: []string{"g4k", "type"}},
		{name: "bitmap extra data", fixture: bm, patch: dirField("g4k", 20, 4, 8), wantErr: ErrCorrupt, want: []string{"extra_data_size"}},
		{name: "bitmap name overruns the directory", fixture: bm, patch: dirField("off", 18, 2, 1000), wantErr: ErrCorrupt, want: []string{"bitmap directory"}},
		{name: "bitmap names duplicate", fixture: bm,
			patch: func(t testing.TB, b []byte) []byte {
				e := dirEntryNamed(t, b, "g4k")
				copy(b[e.pos+24:], "g1m") // same length: the directory stays valid
				return b
			}, wantErr: ErrCorrupt, want: []string{"duplicate", "g1m"}},

		// Bitmap table entries (B.3).
		{name: "bitmap table entry reserved bit 1", fixture: bm,
			patch: func(t testing.TB, b []byte) []byte {
				e := dirEntryNamed(t, b, "g4k")
				put64(b, int(e.tableOff), be.Uint64(b[e.tableOff:])|2)
				return b
			}, wantErr: ErrCorrupt, want: []string{"g4k", "table entry"}},
		{name: "bitmap table entry reserved bit 63", fixture: bm,
			patch: func(t testing.TB, b []byte) []byte {
				e := dirEntryNamed(t, b, "g64k")
				put64(b, int(e.tableOff), be.Uint64(b[e.tableOff:])|1<<63)
				return b
			}, wantErr: ErrCorrupt, want: []string{"g64k", "table entry"}},
		{name: "bitmap table entry unaligned", fixture: bm,
			patch: func(t testing.TB, b []byte) []byte {
				e := dirEntryNamed(t, b, "g4k")
				put64(b, int(e.tableOff), be.Uint64(b[e.tableOff:])+512)
				return b
			}, wantErr: ErrCorrupt, want: []string{"g4k", "table entry"}},
		{name: "bitmap table entry offset with all-ones bit", fixture: bm,
			patch: func(t testing.TB, b []byte) []byte {
				e := dirEntryNamed(t, b, "g4k")
				if be.Uint64(b[e.tableOff:]) == 0 {
					t.Fatal("fixture: g4k has no data cluster")
				}
				put64(b, int(e.tableOff), be.Uint64(b[e.tableOff:])|1)
				return b
			}, wantErr: ErrCorrupt, want: []string{"g4k", "table entry"}},

		// Snapshot table (A.9).
		{name: "snapshot table truncated in an entry header", fixture: snap,
			patch: func(_ testing.TB, b []byte) []byte { return b[:be.Uint64(b[64:])+20] }, wantErr: ErrCorrupt, want: []string{"snapshot table"}},
		{name: "snapshot table truncated in the second entry", fixture: snap,
			patch: func(_ testing.TB, b []byte) []byte {
				off := be.Uint64(b[64:])
				first := 40 + uint64(be.Uint32(b[off+36:])) + uint64(be.Uint16(b[off+12:])) + uint64(be.Uint16(b[off+14:]))
				return b[:off+(first+7)&^7+44]
			}, wantErr: ErrCorrupt, want: []string{"snapshot table"}},
		{name: "more snapshots than the table holds", fixture: snap,
			patch: func(_ testing.TB, b []byte) []byte {
				put32(b, 60, 1000)
				return b[:be.Uint64(b[64:])+4096] // the rest of the table's cluster reads as zeros
			}, wantErr: ErrCorrupt, want: []string{"snapshot"}},
		{name: "nb_snapshots over 65536", fixture: snap, patch: set32(60, 65537), wantErr: ErrCorrupt, want: []string{"nb_snapshots"}},
		{name: "snapshots offset unaligned", fixture: snap,
			patch: func(_ testing.TB, b []byte) []byte { put64(b, 64, be.Uint64(b[64:])+8); return b }, wantErr: ErrCorrupt, want: []string{"snapshots_offset"}},
		{name: "snapshots offset past the end", fixture: snap, patch: set64(64, 1<<40), wantErr: ErrCorrupt, want: []string{"snapshots_offset"}},
		{name: "snapshot extra data over 1 KiB", fixture: snap,
			patch: func(_ testing.TB, b []byte) []byte { put32(b, int(be.Uint64(b[64:]))+36, 1025); return b }, wantErr: ErrCorrupt, want: []string{"snapshot extra data"}},
		{name: "snapshot extra data too small for v3", fixture: snap,
			patch: func(_ testing.TB, b []byte) []byte { put32(b, int(be.Uint64(b[64:]))+36, 8); return b }, wantErr: ErrCorrupt, want: []string{"snapshot extra data"}},
		{name: "snapshot L1 over 32 MiB", fixture: snap,
			patch: func(_ testing.TB, b []byte) []byte { put32(b, int(be.Uint64(b[64:]))+8, 32<<20/8+1); return b }, wantErr: ErrCorrupt, want: []string{"snapshot L1"}},
		{name: "snapshot L1 offset unaligned", fixture: snap,
			patch: func(_ testing.TB, b []byte) []byte {
				off := int(be.Uint64(b[64:]))
				put64(b, off, be.Uint64(b[off:])+8)
				return b
			}, wantErr: ErrCorrupt, want: []string{"snapshot L1"}},

		// Mapping entries found while reading (A.4, A.5, A.6): ReadAt and
		// Extents must fail, never panic, never return garbage.
		{name: "L2 entry with unaligned data offset", fixture: c4k, onRead: true, readAt: 4096,
			patch: func(t testing.TB, b []byte) []byte {
				p := l2EntryAt(t, b, 4096)
				put64(b, p, be.Uint64(b[p:])+512)
				return b
			}, wantErr: ErrCorrupt, want: []string{"L2 entry", "unaligned"}},
		{name: "ZERO_ALLOC L2 entry with unaligned offset", fixture: c4k, onRead: true, readAt: 8192,
			patch: func(t testing.TB, b []byte) []byte {
				p := l2EntryAt(t, b, 8192)
				e := be.Uint64(b[p:])
				if e&1 == 0 || e&0x00fffffffffffe00 == 0 {
					t.Fatalf("fixture: cluster 2 of c4k is not ZERO_ALLOC: %#x", e)
				}
				put64(b, p, e+512)
				return b
			}, wantErr: ErrCorrupt, want: []string{"L2 entry", "unaligned"},
			// qemu 7.2: "qcow2: Image is corrupt: Cluster allocation offset
			// 0x7200 unaligned (L2 offset: 0x4000, L2 index: 0x2)", and the
			// read fails with EIO (qcow2_get_host_offset checks NORMAL and
			// ZERO_ALLOC entries alike).
		},
		{name: "L1 entry with unaligned L2 offset", fixture: c4k, onRead: true, readAt: 0,
			patch: func(_ testing.TB, b []byte) []byte {
				l1 := be.Uint64(b[40:])
				put64(b, int(l1), be.Uint64(b[l1:])+512)
				return b
			}, wantErr: ErrCorrupt, want: []string{"L2 table offset"}},
		{name: "zero flag in a v2 image", fixture: "v2/disk.qcow2", onRead: true, readAt: 0,
			patch: func(t testing.TB, b []byte) []byte {
				p := l2EntryAt(t, b, 0)
				put64(b, p, be.Uint64(b[p:])|1)
				return b
			}, wantErr: ErrCorrupt, want: []string{"zero flag", "v2"}},
		{name: "extended L2: allocated subclusters without a host cluster", fixture: "extl2/top.qcow2", onRead: true, readAt: 32768,
			patch: func(t testing.TB, b []byte) []byte {
				p := l2EntryAt(t, b, 32768)
				if be.Uint64(b[p:]) != 0 {
					t.Fatal("fixture: cluster 1 of extl2 has a host cluster")
				}
				put64(b, p+8, be.Uint64(b[p+8:])|1<<5)
				return b
			}, wantErr: ErrCorrupt, want: []string{"extended L2"}},
		{name: "extended L2: subcluster both allocated and zero", fixture: "extl2/top.qcow2", onRead: true, readAt: 0,
			patch: func(t testing.TB, b []byte) []byte {
				p := l2EntryAt(t, b, 0)
				put64(b, p+8, be.Uint64(b[p+8:])|1<<32|1)
				return b
			}, wantErr: ErrCorrupt, want: []string{"extended L2", "both"}},
		{name: "compressed cluster that does not inflate", fixture: "zlib4k/disk.qcow2", onRead: true, readAt: 0,
			patch: func(t testing.TB, b []byte) []byte {
				p := l2EntryAt(t, b, 0)
				e := be.Uint64(b[p:])
				if e&entryCompressed == 0 {
					t.Fatal("fixture: cluster 0 of zlib4k is not compressed")
				}
				off := e & (1<<(62-(12-8)) - 1)
				for i := range 16 {
					b[off+uint64(i)] = 0xff
				}
				return b
			}, wantErr: ErrCorrupt, want: []string{"compressed cluster"}, extentsOK: true},
		{name: "compressed cluster that is not zstd", fixture: "c2m/disk.qcow2", onRead: true, readAt: 0,
			patch: func(t testing.TB, b []byte) []byte {
				p := l2EntryAt(t, b, 0)
				e := be.Uint64(b[p:])
				if e&entryCompressed == 0 {
					t.Fatal("fixture: cluster 0 of c2m is not compressed")
				}
				off := e & (1<<(62-(21-8)) - 1)
				put32(b, int(off), 0x12345678)
				return b
			}, wantErr: ErrCorrupt, want: []string{"compressed cluster"}, extentsOK: true},
		{name: "compressed cluster past 2^56", fixture: "zlib4k/disk.qcow2", onRead: true, readAt: 0,
			patch: func(t testing.TB, b []byte) []byte {
				p := l2EntryAt(t, b, 0)
				put64(b, p, be.Uint64(b[p:])|1<<57)
				return b
			}, wantErr: ErrCorrupt, want: []string{"compressed cluster"}, extentsOK: true},
	}
}

func TestHostile(t *testing.T) {
	for _, c := range hostileCases() {
		t.Run(c.name, func(t *testing.T) {
			name := c.fixture
			files := fixtureFiles(t, strings.Split(name, "/")[0])
			files[name] = c.patch(t, files[name])
			img, err := files.Open(name)
			file := name
			if c.file != "" {
				file = c.file
			}
			if c.onRead {
				if err != nil {
					t.Fatalf("Open: %v; want it to open and ReadAt(%d) to fail", err, c.readAt)
				}
				defer img.Close()
				_, err = img.ReadAt(make([]byte, 4096), c.readAt)
				checkErr(t, "ReadAt", err, c.wantErr, file, c.want)
				if !c.extentsOK {
					err = img.Extents(0, img.Size(), func(Extent) bool { return true })
					checkErr(t, "Extents", err, c.wantErr, file, c.want)
				}
				return
			}
			if err == nil {
				img.Close()
			}
			checkErr(t, "Open", err, c.wantErr, file, c.want)
		})
	}
}

func checkErr(t *testing.T, op string, err, want error, file string, words []string) {
	t.Helper()
	if err == nil {
		t.Fatalf("%s: no error; want %v", op, want)
	}
	if !errors.Is(err, want) {
		t.Errorf("%s: %v; want errors.Is %v", op, err, want)
	}
	msg := err.Error()
	for _, w := range append([]string{file}, words...) {
		if !strings.Contains(msg, w) {
			t.Errorf("%s: error %q does not mention %q", op, msg, w)
		}
	}
}

// diskSHA256 reads the whole disk through ReadAt and returns its sha256.
func diskSHA256(t testing.TB, img *Image) string {
	t.Helper()
	h := sha256.New()
	if _, err := io.Copy(h, io.NewSectionReader(img, 0, int64(img.Size()))); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(h.Sum(nil))
}

// goldenSHA256 is the recorded sha256 of `qemu-img convert -O raw`.
func goldenSHA256(t testing.TB, fixture string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("testdata/golden", fixture, "raw.sha256"))
	if err != nil {
		t.Fatal(err)
	}
	return string(bytes.Fields(b)[0])
}

// TestTolerated: images that qemu opens and the engine must open too, with
// unchanged content.
func TestTolerated(t *testing.T) {
	for _, c := range []struct {
		name, fixture string
		patch         func(testing.TB, []byte) []byte
	}{
		{"unknown compatible bit", "c4k", or64(80, 1<<7)},
		{"unknown autoclear bit", "c4k", or64(88, 1<<9)},
		{"dirty bit (refcounts stale, reads fine)", "c4k", or64(72, incompatDirty)},
		{"lazy refcounts bit cleared", "c64k", func(_ testing.TB, b []byte) []byte { put64(b, 80, 0); return b }},
		{"unknown header extension", "c64k", func(t testing.TB, b []byte) []byte {
			e := findExt(t, b, extFeatureTable)
			put32(b, e.hdr, 0x12345678)
			return b
		}},
		{"feature name table absent", "c64k", func(t testing.TB, b []byte) []byte {
			e := findExt(t, b, extFeatureTable)
			clear(b[e.hdr : e.hdr+8])
			return b
		}},
		{"header_length 120 with unknown header fields", "c4k", func(_ testing.TB, b []byte) []byte {
			put32(b, 100, 120)
			copy(b[112:], "abcdefgh")
			return b
		}},
		{"header_length 104 (no compression type field)", "c4k", func(_ testing.TB, b []byte) []byte {
			put32(b, 100, 104)
			clear(b[104:112])
			return b
		}},
	} {
		t.Run(c.name, func(t *testing.T) {
			name := c.fixture + ".qcow2"
			files := memFiles{name: c.patch(t, fixtureBytes(t, c.fixture+"/disk.qcow2"))}
			img, err := files.Open(name)
			if err != nil {
				t.Fatalf("Open: %v", err)
			}
			defer img.Close()
			if got, want := diskSHA256(t, img), goldenSHA256(t, c.fixture); got != want {
				t.Errorf("content sha256 = %s, want %s", got, want)
			}
		})
	}
}

// TestChainFromMemory opens the three-layer chain through Options.OpenFile:
// the backing names must be resolved against the naming image's
// directory, not the working directory.
func TestChainFromMemory(t *testing.T) {
	files := fixtureFiles(t, "chain")
	var asked []string
	img, err := Open("chain/top.qcow2", &Options{OpenFile: func(name string, writable bool) (File, error) {
		asked = append(asked, name)
		return files.open(name, writable)
	}})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	want := []string{"chain/top.qcow2", "chain/sub/mid.qcow2", "chain/sub/../base.raw"}
	if strings.Join(asked, " ") != strings.Join(want, " ") {
		t.Errorf("opened %q, want %q", asked, want)
	}
	if got, want := diskSHA256(t, img), goldenSHA256(t, "chain"); got != want {
		t.Errorf("content sha256 = %s, want %s", got, want)
	}
}

// TestBackingLoop: an image that names itself as its backing file.
func TestBackingLoop(t *testing.T) {
	b := fixtureBytes(t, "chain/top.qcow2")
	name := "./top.qcow2"
	copy(b[be.Uint64(b[8:]):], name)
	put32(b, 16, uint32(len(name)))
	e := findExt(t, b, extBackingFormat)
	copy(b[e.dataOff:], "qcow2")
	dir := t.TempDir()
	p := filepath.Join(dir, "top.qcow2")
	if err := os.WriteFile(p, b, 0o644); err != nil {
		t.Fatal(err)
	}
	img, err := Open(p, nil)
	if err == nil {
		img.Close()
		t.Fatal("Open of a self-referencing image succeeded")
	}
	if !errors.Is(err, ErrBackingLoop) || !strings.Contains(err.Error(), p) {
		t.Errorf("Open: %v; want ErrBackingLoop naming %s", err, p)
	}
	// The same from memory, where files have no identity: the depth
	// limit must stop it.
	img, err = memFiles{"top.qcow2": b}.Open("top.qcow2") // "./top.qcow2", "././top.qcow2", ...
	if err == nil {
		img.Close()
		t.Fatal("Open of a self-referencing image from memory succeeded")
	}
	if !errors.Is(err, ErrBackingLoop) {
		t.Errorf("Open from memory: %v; want ErrBackingLoop", err)
	}
}

// TestStaleBitmaps: with the autoclear bit cleared, qemu ignores every
// bitmap (formats.md B.5); the engine must too, and say so.
func TestStaleBitmaps(t *testing.T) {
	img, err := Open("testdata/img/stale/disk.qcow2", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	if bms := img.Bitmaps(); len(bms) != 0 {
		t.Errorf("Bitmaps() = %+v, want none", bms)
	}
	if _, err := img.Bitmap("gone"); !errors.Is(err, ErrNoBitmap) {
		t.Errorf("Bitmap(gone) = %v, want ErrNoBitmap", err)
	}
	ls, err := img.Layers()
	if err != nil {
		t.Fatal(err)
	}
	if !ls[0].StaleBitmaps || len(ls[0].Bitmaps) != 0 {
		t.Errorf("Layers()[0]: StaleBitmaps %v, Bitmaps %v; want true, none", ls[0].StaleBitmaps, ls[0].Bitmaps)
	}
}

// TestAllOnesBitmapEntry: qemu never writes a bitmap table entry of 1 (a
// cluster of bitmap data that is all ones) but reads it: patched into a
// table, nbdinfo reported the whole range dirty (formats.md B.3).
func TestAllOnesBitmapEntry(t *testing.T) {
	b := fixtureBytes(t, "bitmaps/disk.qcow2")
	for _, name := range []string{"g512", "off"} {
		e := dirEntryNamed(t, b, name)
		put64(b, int(e.tableOff), 1)
	}
	img, err := memFiles{"bitmaps.qcow2": b}.Open("bitmaps.qcow2")
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	// g512: one table entry covers 4096*8 granules of 512 bytes = 16 MiB,
	// more than the disk; off: 64 KiB granules.
	for _, name := range []string{"g512", "off"} {
		m, err := img.Bitmap(name)
		if err != nil {
			t.Fatal(err)
		}
		if m.DirtyBytes() != img.Size() {
			t.Errorf("%s: DirtyBytes = %d, want the whole disk %d", name, m.DirtyBytes(), img.Size())
		}
	}
}

// dirEntryBytes encodes one bitmap directory entry.
func dirEntryBytes(tableOff uint64, tableSize, flags uint32, typ, gran uint8, name string, extra int) []byte {
	n := (24 + extra + len(name) + 7) &^ 7
	e := make([]byte, n)
	be.PutUint64(e[0:], tableOff)
	be.PutUint32(e[8:], tableSize)
	be.PutUint32(e[12:], flags)
	e[16], e[17] = typ, gran
	be.PutUint16(e[18:], uint16(len(name)))
	be.PutUint32(e[20:], uint32(extra))
	copy(e[24+extra:], name)
	return e
}

// TestParseBitmapDir covers the rules of formats.md B.7 that a patched
// fixture cannot reach: long names, bitmaps too small for the disk.
func TestParseBitmapDir(t *testing.T) {
	const cb = 16 // 64 KiB clusters
	good := dirEntryBytes(0x30000, 1, bmeAuto, 1, 16, "a", 0)
	for _, c := range []struct {
		name    string
		dir     [][]byte
		nb      uint32
		size    uint64
		wantErr bool
		want    string
	}{
		{name: "valid", dir: [][]byte{good, dirEntryBytes(0x40000, 1, 0, 1, 9, "b", 0)}, size: 1 << 20},
		{name: "name of 1023 bytes", dir: [][]byte{dirEntryBytes(0x30000, 1, 0, 1, 16, strings.Repeat("n", 1023), 0)}, size: 1 << 20},
		{name: "name of 1024 bytes", dir: [][]byte{dirEntryBytes(0x30000, 1, 0, 1, 16, strings.Repeat("n", 1024), 0)}, size: 1 << 20,
			wantErr: true, want: "name size"},
		{name: "table too small for the disk", dir: [][]byte{good}, size: 1<<16*8*1<<16 + 512, wantErr: true, want: "too small"},
		{name: "in-use table too small for the disk", dir: [][]byte{dirEntryBytes(0x30000, 1, bmeInUse|bmeAuto, 1, 16, "a", 0)},
			size: 1<<16*8*1<<16 + 512},
		{name: "table exactly the disk", dir: [][]byte{good}, size: 1 << 16 * 8 << 16},
		{name: "granularity 2^31", dir: [][]byte{dirEntryBytes(0x30000, 1, 0, 1, 31, "a", 0)}, size: 1 << 40},
		{name: "extra data", dir: [][]byte{dirEntryBytes(0x30000, 1, 0, 1, 16, "a", 16)}, size: 1 << 20, wantErr: true, want: "extra_data_size"},
		{name: "duplicate names", dir: [][]byte{good, good}, size: 1 << 20, wantErr: true, want: "duplicate"},
		{name: "entry count above nb_bitmaps", dir: [][]byte{good, dirEntryBytes(0x40000, 1, 0, 1, 9, "b", 0)}, nb: 1, size: 1 << 20,
			wantErr: true, want: "bitmap directory"},
		{name: "table size 0", dir: [][]byte{dirEntryBytes(0x30000, 0, 0, 1, 16, "a", 0)}, size: 1 << 20, wantErr: true, want: "table size"},
		{name: "empty directory", dir: nil, nb: 1, size: 1 << 20, wantErr: true, want: "bitmap directory"},
		{name: "truncated entry", dir: [][]byte{good[:16]}, nb: 1, size: 1 << 20, wantErr: true, want: "bitmap directory"},
	} {
		t.Run(c.name, func(t *testing.T) {
			dir := bytes.Join(c.dir, nil)
			nb := c.nb
			if nb == 0 {
				nb = uint32(len(c.dir))
			}
			ext := &bitmapsExt{nbBitmaps: nb, dirSize: uint64(len(dir)), dirOff: 0x20000}
			es, err := parseBitmapDir("x.qcow2", dir, ext, c.size, cb)
			if !c.wantErr {
				if err != nil {
					t.Fatalf("parseBitmapDir: %v", err)
				}
				if len(es) != int(nb) {
					t.Errorf("got %d entries, want %d", len(es), nb)
				}
				return
			}
			checkErr(t, "parseBitmapDir", err, ErrCorrupt, "x.qcow2", []string{c.want})
		})
	}
}
