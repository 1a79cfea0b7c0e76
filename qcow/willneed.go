package qcow

import (
	"os"

	"golang.org/x/sys/unix"
)

// WillNeed tells the engine that the guest bytes [off, off+n) will be read
// soon. The host ranges that hold them, in whichever layer provides each
// part, are read into the page cache in the background
// (posix_fadvise(POSIX_FADV_WILLNEED)), so that a reader going through
// scattered ranges one at a time finds them there instead of waiting for
// the disk once per range. It is a hint: it reports no error and changes
// nothing a read returns. Zero and unallocated ranges have nothing to
// read; compressed clusters are left to the read itself.
func (img *Image) WillNeed(off, n uint64) {
	if off >= img.size || n == 0 {
		return
	}
	n = min(n, img.size-off)
	img.mu.RLock()
	defer img.mu.RUnlock()
	img.willNeed(0, off, n)
}

// willNeed hints the data runs of layer d over [off, off+n), falling
// through to the backing layers for unallocated runs as readLayer does.
func (img *Image) willNeed(d int, off, n uint64) {
	l := img.layers[d]
	size := l.virtualSize()
	if off >= size {
		return
	}
	n = min(n, size-off)
	var f *os.File
	switch l := l.(type) {
	case *qcow2Layer:
		f, _ = l.f.(*os.File)
	case *rawLayer:
		f, _ = l.f.(*os.File)
	}
	for n > 0 {
		r, err := l.mapRange(off, n)
		if err != nil {
			return // the read will report it
		}
		switch {
		case r.kind == runUnalloc && d+1 < len(img.layers):
			img.willNeed(d+1, off, r.n)
		case r.kind == runData && f != nil:
			_ = unix.Fadvise(int(f.Fd()), int64(r.host), int64(r.n), unix.FADV_WILLNEED)
		}
		off += r.n
		n -= r.n
	}
}
