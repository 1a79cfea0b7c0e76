package qcow

import (
	"errors"
	"os"
	"syscall"

	"golang.org/x/sys/unix"
)

// runKind says how one layer provides a run of guest bytes.
type runKind uint8

const (
	// runUnalloc: the layer does not hold these bytes; they come from the
	// backing layer, or are zeros when there is none.
	runUnalloc runKind = iota
	// runZero: the layer records that these bytes read as zeros (a zero
	// cluster or subcluster, or a hole in a raw file).
	runZero
	// runData: the bytes are stored uncompressed at host offset run.host.
	runData
	// runCompressed: the bytes lie in one compressed cluster whose L2
	// descriptor is run.host.
	runCompressed
)

func (k runKind) String() string {
	switch k {
	case runUnalloc:
		return "unallocated"
	case runZero:
		return "zero"
	case runData:
		return "data"
	case runCompressed:
		return "compressed"
	}
	return "unknown"
}

// run is the answer of layer.mapRange: the first n bytes of the asked range
// are all of one kind (and, for data, contiguous on the host).
type run struct {
	kind runKind
	host uint64 // runData: host offset of the first byte; runCompressed: the L2 entry
	n    uint64
}

// allocated reports whether the run counts as allocated in its layer for
// qemu:allocation-depth (data and zero clusters both do, formats.md C.3).
func (r run) allocated() bool { return r.kind != runUnalloc }

// layer is one file of a backing chain.
type layer interface {
	// path is the file name as the chain refers to it.
	path() string
	// format is "qcow2" or "raw".
	format() string
	// virtualSize is the guest-visible size of this layer.
	virtualSize() uint64
	// mapRange describes the longest run starting at off, at most n bytes
	// long (n > 0, off+n <= virtualSize), whose bytes share one kind.
	mapRange(off, n uint64) (run, error)
	// readRun reads the bytes of a data or compressed run that start at
	// guest offset off into p (len(p) <= the run's length).
	readRun(r run, p []byte, off uint64) error
	close() error
}

// rawLayer is a raw backing file: guest offset == host offset.
type rawLayer struct {
	name  string
	f     File
	fsize uint64 // host file size
	size  uint64 // fsize rounded up to 512, as qemu's raw driver reports it
}

func openRaw(name string, f File) (*rawLayer, error) {
	n, err := fileSize(f)
	if err != nil {
		return nil, err
	}
	sz := (uint64(n) + 511) &^ 511
	return &rawLayer{name: name, f: f, fsize: uint64(n), size: sz}, nil
}

func (l *rawLayer) path() string        { return l.name }
func (l *rawLayer) format() string      { return "raw" }
func (l *rawLayer) virtualSize() uint64 { return l.size }
func (l *rawLayer) close() error        { return l.f.Close() }

// mapRange reports host holes (SEEK_HOLE) as zero runs and everything else
// as data, as qemu's file driver does for base:allocation. Both count as
// allocated in this layer.
func (l *rawLayer) mapRange(off, n uint64) (run, error) {
	if off >= l.fsize {
		return run{kind: runZero, n: n}, nil
	}
	if end := l.fsize - off; n > end {
		n = end
	}
	osf, ok := l.f.(*os.File)
	if !ok {
		return run{kind: runData, host: off, n: n}, nil
	}
	fd := int(osf.Fd())
	data, err := unix.Seek(fd, int64(off), unix.SEEK_DATA)
	switch {
	case errors.Is(err, syscall.ENXIO):
		// No data at or after off: the rest of the file is a hole.
		return run{kind: runZero, n: n}, nil
	case err != nil:
		// Filesystems without SEEK_DATA: everything is data.
		return run{kind: runData, host: off, n: n}, nil
	case uint64(data) > off:
		return run{kind: runZero, n: min(n, uint64(data)-off)}, nil
	}
	hole, err := unix.Seek(fd, int64(off), unix.SEEK_HOLE)
	if err != nil || uint64(hole) <= off {
		return run{kind: runData, host: off, n: n}, nil
	}
	return run{kind: runData, host: off, n: min(n, uint64(hole)-off)}, nil
}

func (l *rawLayer) readRun(r run, p []byte, off uint64) error {
	return readFull(l.f, p, int64(off))
}
