package qcow

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"io/fs"
	"os"
	"sync"
	"syscall"
	"testing"
)

// memFile is a writable in-memory File that refuses to grow past max
// bytes (ENOSPC), so a hostile image cannot make a test allocate without
// bound by pointing the allocator far away.
type memFile struct {
	mu  sync.Mutex
	b   []byte
	max int64
}

func (f *memFile) ReadAt(p []byte, off int64) (int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if off < 0 {
		return 0, os.ErrInvalid
	}
	if off >= int64(len(f.b)) {
		return 0, io.EOF
	}
	n := copy(p, f.b[off:])
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

func (f *memFile) WriteAt(p []byte, off int64) (int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if off < 0 || off > f.max || int64(len(p)) > f.max-off {
		return 0, &fs.PathError{Op: "write", Path: "mem", Err: syscall.ENOSPC}
	}
	if end := int(off) + len(p); end > len(f.b) {
		f.b = append(f.b, make([]byte, end-len(f.b))...)
	}
	return copy(f.b[off:], p), nil
}

func (f *memFile) Truncate(size int64) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if size < 0 || size > f.max {
		return &fs.PathError{Op: "truncate", Path: "mem", Err: syscall.ENOSPC}
	}
	if size <= int64(len(f.b)) {
		f.b = f.b[:size]
	} else {
		f.b = append(f.b, make([]byte, int(size)-len(f.b))...)
	}
	return nil
}

func (f *memFile) Stat() (os.FileInfo, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return bytesInfo(len(f.b)), nil
}

func (f *memFile) Sync() error  { return nil }
func (f *memFile) Close() error { return nil }

func (f *memFile) bytes() []byte {
	f.mu.Lock()
	defer f.mu.Unlock()
	return bytes.Clone(f.b)
}

// FuzzRefcount checks the refcount block entry codec against an
// independent decoder (formats.md A.7: sub-byte widths LSB-first, wider
// ones big-endian) and that setting one entry leaves the others alone.
func FuzzRefcount(f *testing.F) {
	f.Add(uint8(4), []byte{0, 1, 0, 1, 0, 1}, uint16(1), uint64(7))
	f.Add(uint8(0), []byte{0x3f}, uint16(6), uint64(1))
	f.Add(uint8(1), []byte{0x55, 0x05}, uint16(5), uint64(2))
	f.Add(uint8(6), bytes.Repeat([]byte{0xff}, 16), uint16(1), uint64(0))
	f.Fuzz(func(t *testing.T, order uint8, blk []byte, idx uint16, v uint64) {
		order %= maxRefcountOrder + 1
		bits := uint64(1) << order
		cs := 512
		b := make([]byte, cs)
		copy(b, blk)
		rc := &refcounts{bits: bits, perBlock: uint64(cs) * 8 / bits, dirtyRB: map[*table]struct{}{}}
		tb := &table{b: b}
		n := rc.perBlock
		i := uint64(idx) % n
		decode := func(b []byte, i uint64) uint64 {
			switch {
			case bits < 8:
				per := 8 / bits
				return uint64(b[i/per]>>((i%per)*bits)) & (1<<bits - 1)
			case bits == 8:
				return uint64(b[i])
			case bits == 16:
				return uint64(binary.BigEndian.Uint16(b[i*2:]))
			case bits == 32:
				return uint64(binary.BigEndian.Uint32(b[i*4:]))
			}
			return binary.BigEndian.Uint64(b[i*8:])
		}
		for j := range n {
			if got, want := rc.entry(tb, j), decode(b, j); got != want {
				t.Fatalf("order %d: entry %d = %d, want %d", order, j, got, want)
			}
		}
		before := bytes.Clone(b)
		v &= rc.maxRefcount()
		rc.setEntry(tb, i, v)
		if got := rc.entry(tb, i); got != v {
			t.Fatalf("order %d: entry %d = %d after setting %d", order, i, got, v)
		}
		for j := range n {
			if j != i && decode(b, j) != decode(before, j) {
				t.Fatalf("order %d: setting entry %d changed entry %d", order, i, j)
			}
		}
		if !tb.dirty {
			t.Fatal("setEntry did not mark the block dirty")
		}
	})
}

// FuzzOpenWritable opens each input for writing from memory (the file
// may grow to 16 MiB), writes a little, closes, and reopens read-only:
// the writes must read back, and every failure must be a documented
// error, never a panic.
func FuzzOpenWritable(f *testing.F) {
	for _, s := range fixtureSeeds(f) {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		if !withinBudget(b) {
			t.Skip("declared sizes over the fuzz budget")
		}
		if h, err := parseHeader(fuzzName, b[:min(len(b), 1<<maxClusterBits)]); err == nil &&
			uint64(h.reftableClusters)<<h.clusterBits > fuzzBudget {
			t.Skip("refcount table over the fuzz budget")
		}
		mf := &memFile{b: bytes.Clone(b), max: 16 << 20}
		opts := &Options{
			L2CacheBytes: 1 << 20,
			Writable:     true,
			OpenFile: func(name string, writable bool) (File, error) {
				if name == fuzzName {
					return mf, nil
				}
				return nil, &fs.PathError{Op: "open", Path: name, Err: fs.ErrNotExist}
			},
		}
		img, err := Open(fuzzName, opts)
		if err != nil {
			if !isKnownErr(err) && !errors.Is(err, syscall.ENOSPC) {
				t.Fatalf("Open: error matches no documented sentinel: %v", err)
			}
			return
		}
		size := img.Size()
		pattern := bytes.Repeat([]byte("cbtfs"), 1000)
		var wrote []uint64
		for _, off := range []uint64{0, size / 2 &^ 511, max(size, 5000) - 5000} {
			if off+uint64(len(pattern)) > size {
				continue
			}
			if _, err := img.WriteAt(pattern, int64(off)); err != nil {
				if !isKnownErr(err) && !errors.Is(err, syscall.ENOSPC) && !errors.Is(err, ErrNoSpace) {
					t.Fatalf("WriteAt(%d): error matches no documented sentinel: %v", off, err)
				}
				img.Close()
				return
			}
			wrote = append(wrote, off)
		}
		if err := img.Close(); err != nil {
			if !isKnownErr(err) && !errors.Is(err, syscall.ENOSPC) && !errors.Is(err, ErrNoSpace) {
				t.Fatalf("Close: error matches no documented sentinel: %v", err)
			}
			return
		}
		img, err = memFiles{fuzzName: mf.bytes()}.Open(fuzzName)
		if err != nil {
			t.Fatalf("reopen after a clean close: %v", err)
		}
		defer img.Close()
		got := make([]byte, len(pattern))
		for _, off := range wrote {
			if _, err := img.ReadAt(got, int64(off)); err != nil {
				t.Fatalf("ReadAt(%d) after writing: %v", off, err)
			}
			if !bytes.Equal(got, pattern) {
				// Later writes may overlap earlier ones; check the last.
				if off == wrote[len(wrote)-1] {
					t.Fatalf("ReadAt(%d) does not return what was written", off)
				}
			}
		}
	})
}

// TestWritableOpenFailure: a writable Open that fails must return the
// error, like a read-only one.
func TestWritableOpenFailure(t *testing.T) {
	corrupt := func(patch func([]byte)) []byte {
		b := fixtureBytes(t, "c4k/disk.qcow2")
		patch(b)
		return b
	}
	for _, c := range []struct {
		name string
		file []byte // nil: the file does not exist
		want error
	}{
		{"missing", nil, fs.ErrNotExist},
		{"not qcow2", []byte("not a qcow2 image, just text"), ErrNotQcow2},
		{"corrupt header", corrupt(func(b []byte) { put32(b, 20, 40) }), ErrCorrupt},
		{"refcount table entry with a reserved bit", corrupt(func(b []byte) {
			rt := be.Uint64(b[48:])
			put64(b, int(rt), be.Uint64(b[rt:])|1)
		}), ErrCorrupt},
		{"dirty bit", corrupt(func(b []byte) { put64(b, 72, be.Uint64(b[72:])|incompatDirty) }), ErrUnsupported},
	} {
		t.Run(c.name, func(t *testing.T) {
			img, err := Open(fuzzName, &Options{Writable: true, OpenFile: func(name string, _ bool) (File, error) {
				if name == fuzzName && c.file != nil {
					return &memFile{b: c.file, max: 1 << 24}, nil
				}
				return nil, &fs.PathError{Op: "open", Path: name, Err: fs.ErrNotExist}
			}})
			if err == nil {
				img.Close()
				t.Fatal("Open succeeded")
			}
			if !errors.Is(err, c.want) {
				t.Errorf("Open: %v, want %v", err, c.want)
			}
		})
	}
}
