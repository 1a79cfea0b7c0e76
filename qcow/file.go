package qcow

import (
	"errors"
	"io"
	"os"
	"time"
)

// File is the storage under one layer of a chain. *os.File satisfies it.
// ReadAt must be safe for parallel calls.
type File interface {
	io.ReaderAt
	io.WriterAt
	Stat() (os.FileInfo, error)
	Sync() error
	Truncate(size int64) error
	Close() error
}

// readFull reads len(p) bytes at off, treating everything past the end of
// the file as zeros: fresh qemu images end in the middle of their L1
// cluster, and data clusters may lie partly past a short host file
// (formats.md A.1, E.1.3).
func readFull(r io.ReaderAt, p []byte, off int64) error {
	n, err := r.ReadAt(p, off)
	if n == len(p) {
		return nil
	}
	if err != nil && !errors.Is(err, io.EOF) {
		return err
	}
	clear(p[n:])
	return nil
}

// fileSize returns the current size of f.
func fileSize(f File) (int64, error) {
	fi, err := f.Stat()
	if err != nil {
		return 0, err
	}
	return fi.Size(), nil
}

// bytesFile adapts a byte slice to [File] for tests and fuzzing. It is
// read-only.
type bytesFile struct {
	b []byte
}

func (f *bytesFile) ReadAt(p []byte, off int64) (int, error) {
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

func (f *bytesFile) WriteAt(p []byte, off int64) (int, error) { return 0, ErrReadOnly }
func (f *bytesFile) Stat() (os.FileInfo, error)               { return bytesInfo(len(f.b)), nil }
func (f *bytesFile) Sync() error                              { return nil }
func (f *bytesFile) Truncate(int64) error                     { return ErrReadOnly }
func (f *bytesFile) Close() error                             { return nil }

// NewBytesFile returns a read-only [File] reading from b.
func NewBytesFile(b []byte) File { return &bytesFile{b: b} }

type bytesInfo int64

func (s bytesInfo) Name() string       { return "bytes" }
func (s bytesInfo) Size() int64        { return int64(s) }
func (s bytesInfo) Mode() os.FileMode  { return 0o444 }
func (s bytesInfo) ModTime() time.Time { return time.Time{} }
func (s bytesInfo) IsDir() bool        { return false }
func (s bytesInfo) Sys() any           { return nil }
