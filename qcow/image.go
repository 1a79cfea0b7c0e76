package qcow

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/cbtfs/cbtfs/dirtymap"
)

// Options configure [Open]. The zero value (or nil) gives the defaults.
type Options struct {
	// Logger receives diagnostics that cannot be returned as errors.
	// Nil discards them.
	Logger *slog.Logger

	// L2CacheBytes bounds the L2 table cache of each layer; 0 means 32 MiB.
	L2CacheBytes int

	// Writable opens the top image for writing. Backing files are always
	// opened read-only.
	Writable bool

	// ForceShare opens a read-only image without taking or checking
	// locks, like qemu-img -U: it then reads an image another process may
	// be writing, at the risk of seeing it inconsistent.
	ForceShare bool

	// OpenFile opens the file of one layer, for writing when writable is
	// set. Nil means os.OpenFile. Tests and fuzzers use it to serve layers
	// from memory.
	OpenFile func(name string, writable bool) (File, error)
}

// Image is an open qcow2 image together with its whole backing chain. Its
// guest-visible content is what qemu shows for the top image.
//
// # Concurrency
//
// ReadAt and Extents are safe for parallel calls. Close must not run
// concurrently with anything else.
type Image struct {
	// Immutable after Open.
	layers   []layer // layers[0] is the top image
	size     uint64
	log      *slog.Logger
	writable bool

	// mu is held for reading by ReadAt, Extents and bitmap queries, and
	// for writing by every change: writes, bitmap operations, flushes.
	// It is held across the host I/O of a request, so a read never sees a
	// cluster that a concurrent write is moving.
	mu sync.RWMutex

	// version counts changes to the disk or its bitmaps, so that views
	// generated from them know when to regenerate.
	version atomic.Uint64

	// commitTrack records the guest ranges written while a commit runs;
	// guarded by mu.
	commitTrack *dirtymap.Map

	// umu guards unions: the bitmap unions computed at a version, shared
	// by every reader (listings, the dirty view, NBD block status) until
	// the next change.
	umu    sync.Mutex
	unions map[string]unionAt

	closeOnce sync.Once
	closeErr  error
}

// Open opens the qcow2 image at path and every layer of its backing chain.
// Backing file names are resolved against the directory of the image that
// names them. Open either returns a fully usable Image or an error naming
// the file and the cause: a feature the engine cannot serve (matches
// [ErrUnsupported]), bad metadata ([ErrCorrupt]), a file that is not qcow2
// ([ErrNotQcow2]), a missing backing file ([os.ErrNotExist]) or a looping
// chain ([ErrBackingLoop]).
func Open(path string, opts *Options) (*Image, error) {
	var o Options
	if opts != nil {
		o = *opts
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.OpenFile == nil {
		o.OpenFile = func(name string, writable bool) (File, error) {
			if writable {
				return os.OpenFile(name, os.O_RDWR, 0)
			}
			return os.Open(name)
		}
	}
	img := &Image{log: o.Logger, writable: o.Writable}
	ok := false
	defer func() {
		if !ok {
			img.Close()
		}
	}()

	var seen []os.FileInfo
	name, format := path, "qcow2"
	for depth := 0; ; depth++ {
		if depth >= MaxChainDepth {
			return nil, fmt.Errorf("%w: %s: more than %d layers", ErrBackingLoop, path, MaxChainDepth)
		}
		f, err := o.OpenFile(name, o.Writable && depth == 0)
		if err != nil {
			if depth == 0 {
				return nil, fmt.Errorf("qcow: %w", err)
			}
			prev := img.layers[depth-1].path()
			return nil, fmt.Errorf("qcow: %s: backing file: %w", prev, err)
		}
		if fi, err := f.Stat(); err == nil && fi.Sys() != nil {
			for _, s := range seen {
				if os.SameFile(s, fi) {
					f.Close()
					return nil, fmt.Errorf("%w: %s refers back to %s", ErrBackingLoop, img.layers[depth-1].path(), name)
				}
			}
			seen = append(seen, fi)
		}
		if format == "" {
			format, err = probeFormat(f)
			if err != nil {
				f.Close()
				return nil, fmt.Errorf("qcow: %s: %w", name, err)
			}
		}
		var l layer
		switch format {
		case "qcow2":
			l, err = openQcow2(name, f, &o)
		case "raw":
			l, err = openRaw(name, f)
		default:
			err = &FeatureError{File: name, Feature: fmt.Sprintf("image format %q", format)}
		}
		if err == nil && !(o.ForceShare && !o.Writable) {
			locks := readLocks
			if o.Writable && depth == 0 {
				locks = writeLocks
			}
			err = lockFile(name, f, locks)
		}
		if err != nil {
			f.Close()
			return nil, err
		}
		img.layers = append(img.layers, l)
		q, isQcow := l.(*qcow2Layer)
		if !isQcow || q.h.backingFile == "" {
			break
		}
		next := q.h.backingFile
		if strings.HasPrefix(next, "json:") || strings.Contains(next, "://") || strings.HasPrefix(next, "nbd:") {
			return nil, &FeatureError{File: name, Feature: fmt.Sprintf("backing file %q is not a local file", next)}
		}
		name, format = backingPath(name, next), q.h.backingFormat
		if format == "file" {
			format = "raw"
		}
	}
	img.size = img.layers[0].virtualSize()
	if o.Writable {
		if err := img.openForWriting(); err != nil {
			return nil, err
		}
	}
	ok = true
	return img, nil
}

// backingPath resolves a backing file name the way qemu's path_combine
// does: absolute names are kept, relative ones are taken relative to the
// directory of the image that names them (not the working directory).
func backingPath(naming, name string) string {
	if filepath.IsAbs(name) {
		return name
	}
	i := strings.LastIndexByte(naming, '/')
	if i < 0 {
		return name
	}
	return naming[:i+1] + name
}

// probeFormat tells qcow2 from raw by the magic, for backing files whose
// overlay does not record a format. Nothing else is probed: guessing other
// formats from guest-controlled bytes is the classic backing-file hole.
func probeFormat(f File) (string, error) {
	var b [4]byte
	if err := readFull(f, b[:], 0); err != nil {
		return "", err
	}
	if binary.BigEndian.Uint32(b[:]) == qcowMagic {
		return "qcow2", nil
	}
	return "raw", nil
}

// Close stores the bitmaps of a writable image (clearing their in-use
// flags), flushes everything and closes every file of the chain, which
// releases the locks. It is safe to call more than once.
func (img *Image) Close() error {
	img.closeOnce.Do(func() {
		var errs []error
		if w := img.writer(); w != nil {
			img.mu.Lock()
			errs = append(errs, w.closeClean())
			img.mu.Unlock()
		}
		for _, l := range img.layers {
			errs = append(errs, l.close())
		}
		img.closeErr = errors.Join(errs...)
	})
	return img.closeErr
}

// Size returns the virtual size of the disk in bytes.
func (img *Image) Size() uint64 { return img.size }

// Path returns the file name of the top image as given to [Open].
func (img *Image) Path() string { return img.layers[0].path() }

// ReadAt reads the guest-visible bytes of the disk at off, exactly as qemu
// reads them: through zero clusters, compressed clusters, subclusters and
// down the backing chain. Reads at or past the end return io.EOF.
func (img *Image) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("%w: negative offset %d", ErrOutOfRange, off)
	}
	if uint64(off) >= img.size {
		if len(p) == 0 {
			return 0, nil
		}
		return 0, io.EOF
	}
	n := len(p)
	if rest := img.size - uint64(off); uint64(n) > rest {
		n = int(rest)
	}
	img.mu.RLock()
	err := img.readLayer(0, p[:n], uint64(off))
	img.mu.RUnlock()
	if err != nil {
		return 0, err
	}
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

// readLayer fills p with the content of layer d at off, falling through
// to the backing layers for unallocated runs. Past the end of a layer
// (a backing file shorter than its overlay) it reads zeros.
func (img *Image) readLayer(d int, p []byte, off uint64) error {
	l := img.layers[d]
	size := l.virtualSize()
	if off >= size {
		clear(p)
		return nil
	}
	if rest := size - off; uint64(len(p)) > rest {
		clear(p[rest:])
		p = p[:rest]
	}
	for len(p) > 0 {
		r, err := l.mapRange(off, uint64(len(p)))
		if err != nil {
			return err
		}
		chunk := p[:r.n]
		switch {
		case r.kind == runUnalloc && d+1 < len(img.layers):
			err = img.readLayer(d+1, chunk, off)
		case r.kind == runData || r.kind == runCompressed:
			err = l.readRun(r, chunk, off)
		default:
			clear(chunk)
		}
		if err != nil {
			return err
		}
		p = p[r.n:]
		off += r.n
	}
	return nil
}

// Extent describes a range of the disk by where its bytes come from.
type Extent struct {
	Off, Len uint64

	// Depth is the layer that provides the bytes, as in qemu's
	// qemu:allocation-depth: 1 for the top image, 2 for its backing file
	// and so on; 0 when no layer of the chain allocates the range.
	Depth int

	// Zero reports that the range reads as zeros without being data: a zero
	// cluster, a hole of a raw layer, a range no layer allocates, or the
	// range past the end of a short backing file. It is base:allocation's
	// "hole,zero" (NBD_STATE_HOLE|NBD_STATE_ZERO); !Zero is "data".
	Zero bool
}

// Extents calls fn for the extents covering [off, off+n) clipped to the
// disk size, in order, with adjacent extents of equal Depth and Zero
// merged. It stops when fn returns false.
func (img *Image) Extents(off, n uint64, fn func(Extent) bool) error {
	if off >= img.size || n == 0 {
		return nil
	}
	n = min(n, img.size-off)
	w := extentWalker{fn: fn}
	img.mu.RLock()
	err := img.status(&w, 0, off, n)
	img.mu.RUnlock()
	if err != nil {
		return err
	}
	w.flush()
	return nil
}

// extentWalker merges adjacent equal extents before handing them on.
type extentWalker struct {
	fn      func(Extent) bool
	cur     Extent
	have    bool
	stopped bool
}

func (w *extentWalker) emit(e Extent) {
	if w.stopped {
		return
	}
	if w.have && w.cur.Depth == e.Depth && w.cur.Zero == e.Zero && w.cur.Off+w.cur.Len == e.Off {
		w.cur.Len += e.Len
		return
	}
	if w.have && !w.fn(w.cur) {
		w.stopped = true
		return
	}
	w.cur, w.have = e, true
}

func (w *extentWalker) flush() {
	if w.have && !w.stopped {
		w.fn(w.cur)
	}
	w.have = false
}

// status walks layer d over [off, off+n), which lies inside the layer.
func (img *Image) status(w *extentWalker, d int, off, n uint64) error {
	l := img.layers[d]
	for n > 0 && !w.stopped {
		r, err := l.mapRange(off, n)
		if err != nil {
			return err
		}
		switch {
		case r.allocated():
			w.emit(Extent{Off: off, Len: r.n, Depth: d + 1, Zero: r.kind == runZero})
		case d+1 < len(img.layers):
			bsize := img.layers[d+1].virtualSize()
			inside := uint64(0)
			if off < bsize {
				inside = min(r.n, bsize-off)
				if err := img.status(w, d+1, off, inside); err != nil {
					return err
				}
			}
			if inside < r.n {
				// Past the end of a short backing file qemu synthesizes
				// zeros "as if they were allocated at this layer"
				// (bdrv_co_common_block_status_above).
				w.emit(Extent{Off: off + inside, Len: r.n - inside, Depth: d + 2, Zero: true})
			}
		default:
			w.emit(Extent{Off: off, Len: r.n, Depth: 0, Zero: true})
		}
		off += r.n
		n -= r.n
	}
	return nil
}

// HostRange reports where the guest bytes [off, off+n) lie when they are
// one contiguous run of uncompressed data in a single layer's file, entirely
// inside that file: the file and the host offset. Readers of a read-only
// image can then move the bytes without copying them (splice). It returns
// ok == false in every other case, and always for a writable image, whose
// clusters may move once the lock is released.
func (img *Image) HostRange(off, n uint64) (f *os.File, host uint64, ok bool) {
	if img.writable || n == 0 || off >= img.size || n > img.size-off {
		return nil, 0, false
	}
	img.mu.RLock()
	defer img.mu.RUnlock()
	for _, l := range img.layers {
		if off+n > l.virtualSize() {
			return nil, 0, false
		}
		r, err := l.mapRange(off, n)
		if err != nil || r.n < n {
			return nil, 0, false
		}
		switch l := l.(type) {
		case *qcow2Layer:
			switch r.kind {
			case runData:
				osf, isFile := l.f.(*os.File)
				if !isFile || r.host+n > l.hostSize {
					return nil, 0, false
				}
				return osf, r.host, true
			case runUnalloc:
				continue
			}
			return nil, 0, false
		case *rawLayer:
			osf, isFile := l.f.(*os.File)
			if r.kind != runData || !isFile || r.host+n > l.fsize {
				return nil, 0, false
			}
			return osf, r.host, true
		}
		return nil, 0, false
	}
	return nil, 0, false
}
