package qcow_test

import (
	"testing"

	"github.com/cbtfs/cbtfs/qcow"
)

// TestWillNeed hints every fixture's whole disk, pieces of it and ranges
// at and past its end: a hint must never fail, panic or change what a
// read returns.
func TestWillNeed(t *testing.T) {
	for _, fx := range fixtures(t) {
		t.Run(fx.name, func(t *testing.T) {
			g := loadGolden(t, fx)
			img, err := qcow.Open(fx.top, nil)
			if err != nil {
				t.Fatalf("Open(%s): %v", fx.top, err)
			}
			t.Cleanup(func() { img.Close() })
			size := img.Size()
			img.WillNeed(0, size)
			img.WillNeed(0, ^uint64(0))
			for off := uint64(0); off < size; off += 70001 {
				img.WillNeed(off, 4097)
			}
			img.WillNeed(size, 1)
			img.WillNeed(^uint64(0), ^uint64(0))
			img.WillNeed(0, 0)
			checkContent(t, img, g)
		})
	}
}
