package fsnode

import (
	"errors"
	"fmt"
	"log/slog"
	"syscall"
	"testing"

	"github.com/cbtfs/cbtfs/qcow"
)

const seekData, seekHole = 3, 4

// walkOf turns a list of [off, end, data] extents into a walk function.
func walkOf(ext [][3]uint64) func(uint64, func(off, n uint64, data bool) bool) error {
	return func(from uint64, fn func(off, n uint64, data bool) bool) error {
		for _, e := range ext {
			if e[1] <= from {
				continue
			}
			if !fn(max(e[0], from), e[1]-max(e[0], from), e[2] == 1) {
				return nil
			}
		}
		return nil
	}
}

func TestSeekDataHole(t *testing.T) {
	// hole [0,100) data [100,200) hole [200,300) data [300,400); size 400.
	ext := walkOf([][3]uint64{{0, 100, 0}, {100, 200, 1}, {200, 300, 0}, {300, 400, 1}})
	tests := []struct {
		off    uint64
		whence uint32
		want   uint64
		err    error
	}{
		{0, seekData, 100, nil},
		{100, seekData, 100, nil},
		{150, seekData, 150, nil},
		{200, seekData, 300, nil},
		{399, seekData, 399, nil},
		{400, seekData, 0, syscall.ENXIO},
		{1 << 40, seekData, 0, syscall.ENXIO},
		{0, seekHole, 0, nil},
		{100, seekHole, 200, nil},
		{250, seekHole, 250, nil},
		{300, seekHole, 400, nil}, // EOF counts as a hole
		{400, seekHole, 0, syscall.ENXIO},
		{0, 0, 0, syscall.EINVAL},
	}
	for _, tc := range tests {
		t.Run(fmt.Sprintf("%d/%d", tc.off, tc.whence), func(t *testing.T) {
			got, err := seekDataHole(tc.off, 400, tc.whence, ext)
			if tc.err != nil {
				if !errors.Is(err, tc.err) {
					t.Fatalf("err = %v, want %v", err, tc.err)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Fatalf("got %d, %v; want %d", got, err, tc.want)
			}
		})
	}
	// No data at all: SEEK_DATA is ENXIO, SEEK_HOLE the offset itself.
	empty := walkOf([][3]uint64{{0, 400, 0}})
	if _, err := seekDataHole(10, 400, seekData, empty); !errors.Is(err, syscall.ENXIO) {
		t.Errorf("SEEK_DATA on an all-hole file: %v, want ENXIO", err)
	}
	if got, err := seekDataHole(10, 400, seekHole, empty); err != nil || got != 10 {
		t.Errorf("SEEK_HOLE on an all-hole file: %d, %v; want 10", got, err)
	}
}

func TestErrnoOf(t *testing.T) {
	log := slog.New(slog.DiscardHandler)
	tests := []struct {
		err  error
		want syscall.Errno
	}{
		{nil, 0},
		{fmt.Errorf("wrapped: %w", syscall.ENOSPC), syscall.ENOSPC},
		{fmt.Errorf("x: %w", qcow.ErrReadOnly), syscall.EROFS},
		{fmt.Errorf("x: %w", qcow.ErrOutOfRange), syscall.EINVAL},
		{fmt.Errorf("x: %w", qcow.ErrNoSpace), syscall.ENOSPC},
		{fmt.Errorf("x: %w", qcow.ErrNoBitmap), syscall.ENOENT},
		{errors.New("anything else"), syscall.EIO},
		{&qcow.FormatError{File: "f", Off: 1, Field: "x"}, syscall.EIO},
	}
	for _, tc := range tests {
		if got := errnoOf(log, "test", tc.err); got != tc.want {
			t.Errorf("errnoOf(%v) = %v, want %v", tc.err, got, tc.want)
		}
	}
}
