package qcow

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/cbtfs/cbtfs/dirtymap"
	"golang.org/x/sys/unix"
)

// Live changes of the chain (design.md "The control file": snapshot and
// commit). Both run on an image open for writing and leave it open: the
// same *Image keeps serving reads and writes, with a new top layer.

// unlockBytes releases the lock bytes of ls held through f.
func unlockBytes(f File, ls lockSet) {
	osf, ok := f.(*os.File)
	if !ok {
		return
	}
	for _, p := range ls.perms {
		lk := unix.Flock_t{Type: unix.F_UNLCK, Start: lockPermBase + int64(p), Len: 1}
		_ = unix.FcntlFlock(osf.Fd(), unix.F_OFD_SETLK, &lk)
	}
	for _, p := range ls.unshared {
		lk := unix.Flock_t{Type: unix.F_UNLCK, Start: lockSharedBase + int64(p), Len: 1}
		_ = unix.FcntlFlock(osf.Fd(), unix.F_OFD_SETLK, &lk)
	}
}

// reopenReadOnly switches a writable layer, already flushed, to a new
// read-only descriptor with read locks, and drops its writer.
func (q *qcow2Layer) reopenReadOnly() error {
	rf, err := os.Open(q.name)
	if err != nil {
		return fmt.Errorf("qcow: %s: reopen read-only: %w", q.name, err)
	}
	unlockBytes(q.f, writeLocks)
	if err := lockFile(q.name, rf, readLocks); err != nil {
		rf.Close()
		_ = lockFile(q.name, q.f, writeLocks)
		return err
	}
	old := q.f
	q.f, q.w = rf, nil
	old.Close()
	return nil
}

// reopenWritable switches a read-only layer to a new read-write
// descriptor with write locks and gives it a writer. Its consistent
// bitmaps get the in-use flag before anything is written.
func (q *qcow2Layer) reopenWritable() error {
	if q.h.incompat&incompatDirty != 0 {
		return &FeatureError{File: q.name, Feature: "dirty bit set (refcounts may be stale; run qemu-img check -r all)"}
	}
	wf, err := os.OpenFile(q.name, os.O_RDWR, 0)
	if err != nil {
		return fmt.Errorf("qcow: %s: open for writing: %w", q.name, err)
	}
	unlockBytes(q.f, readLocks)
	fail := func(err error) error {
		wf.Close()
		_ = lockFile(q.name, q.f, readLocks)
		q.w = nil
		return err
	}
	if err := lockFile(q.name, wf, writeLocks); err != nil {
		return fail(err)
	}
	old := q.f
	q.f = wf
	if _, err := newWriter(q); err != nil {
		q.f = old
		return fail(err)
	}
	if err := q.w.markInUse(); err != nil {
		q.f = old
		return fail(err)
	}
	old.Close()
	return nil
}

// Snapshot makes an external snapshot: a new qcow2 overlay file (backed by
// the current top, format recorded) becomes the top of the live chain. The
// enabled bitmaps of the old top are created empty and enabled in the
// overlay; the old top, its bitmaps stored and intact, becomes a read-only
// backing layer. A relative file name is taken relative to the directory
// of the current top. If anything fails before the switch, nothing has
// changed (a file created by the attempt is removed).
func (img *Image) Snapshot(file string) (string, error) {
	w := img.writer()
	if w == nil {
		return "", ErrReadOnly
	}
	img.mu.Lock()
	defer img.mu.Unlock()
	old := w.l
	if !filepath.IsAbs(file) {
		file = filepath.Join(filepath.Dir(old.name), file)
	}
	if _, err := os.Lstat(file); err == nil {
		return "", fmt.Errorf("%w: %s exists", ErrExist, file)
	}
	absFile, err := filepath.Abs(file)
	if err != nil {
		return "", err
	}
	absOld, err := filepath.Abs(old.name)
	if err != nil {
		return "", err
	}
	backing := absOld
	if filepath.Dir(absFile) == filepath.Dir(absOld) {
		backing = filepath.Base(absOld)
	}
	if err := create(file, CreateOptions{Size: img.size, ClusterSize: old.clusterSize, BackingFile: backing, BackingFormat: "qcow2"}); err != nil {
		return "", err
	}
	nq, err := func() (*qcow2Layer, error) {
		f, err := os.OpenFile(file, os.O_RDWR, 0)
		if err != nil {
			return nil, err
		}
		nq, err := openQcow2(file, f, nil)
		if err == nil {
			err = lockFile(file, f, writeLocks)
		}
		if err == nil {
			_, err = newWriter(nq)
		}
		if err != nil {
			f.Close()
			return nil, err
		}
		for _, b := range old.bitmaps {
			if b.enabled && b.bits != nil {
				m, err := dirtymap.New(img.size, b.bits.Granularity())
				if err != nil {
					f.Close()
					return nil, err
				}
				nq.bitmaps = append(nq.bitmaps, &layerBitmap{
					dirEntry: dirEntry{name: b.name, granBits: b.granBits, flags: bmeInUse},
					bits:     m,
					enabled:  true,
				})
			}
		}
		// Stored at once, in use: a crash from now on leaves them
		// inconsistent rather than missing.
		if len(nq.bitmaps) > 0 {
			if err := nq.w.store(false); err != nil {
				f.Close()
				return nil, err
			}
		}
		return nq, nil
	}()
	if err != nil {
		os.Remove(file)
		return "", fmt.Errorf("qcow: snapshot %s: %w", file, err)
	}
	// The old top: bitmaps stored clean, everything flushed, read-only.
	if err := w.closeClean(); err != nil {
		nq.f.Close()
		os.Remove(file)
		return "", err
	}
	if err := old.reopenReadOnly(); err != nil {
		nq.f.Close()
		os.Remove(file)
		// The old top stays writable; its in-use flags come back first.
		w.bitmapsClean = true
		return "", err
	}
	img.layers = append([]layer{nq}, img.layers...)
	img.version.Add(1)
	return file, nil
}

// CommitProgress receives the bytes copied so far and the bytes to copy.
type CommitProgress func(done, total uint64)

// commitChunk bounds the bytes copied under one hold of the write lock,
// so that reads and writes go on during a commit.
const commitChunk = 8 << 20

// Commit copies the top layer's allocated clusters into its backing layer,
// merges each bitmap of the top into the same-named bitmap of the backing
// layer (creating it when missing), and makes the backing layer the top of
// the live chain. The committed overlay is closed cleanly and left on disk
// with its content. Writes to the top during the commit are tracked and
// copied too. The backing layer's enabled bitmaps are marked for the
// committed ranges, as qemu's commit does. A failure part-way leaves the
// old chain in place, reading the same data.
func (img *Image) Commit(progress CommitProgress) error {
	w := img.writer()
	if w == nil {
		return ErrReadOnly
	}
	img.mu.Lock()
	top := w.l
	if len(img.layers) < 2 {
		img.mu.Unlock()
		return fmt.Errorf("%w: the chain has no backing layer to commit into", ErrInvalid)
	}
	base, ok := img.layers[1].(*qcow2Layer)
	switch {
	case !ok:
		img.mu.Unlock()
		return &FeatureError{File: img.layers[1].path(), Feature: "commit into a raw backing file (bitmaps cannot be stored there)"}
	case base.virtualSize() < img.size:
		img.mu.Unlock()
		return &FeatureError{File: base.name, Feature: "commit into a backing file smaller than its overlay (resizing is not supported)"}
	case base.h.version < 3 && len(top.bitmaps) > 0:
		img.mu.Unlock()
		return &FeatureError{File: base.name, Feature: "commit of bitmaps into a qcow2 v2 file"}
	}
	for _, b := range top.bitmaps {
		if b.bits == nil {
			img.mu.Unlock()
			return fmt.Errorf("%w: %q in %s; remove it before committing", ErrInconsistent, b.name, top.name)
		}
	}
	if err := base.reopenWritable(); err != nil {
		img.mu.Unlock()
		return err
	}
	track, err := dirtymap.New(img.size, top.clusterSize)
	if err != nil {
		img.mu.Unlock()
		return err
	}
	img.commitTrack = track
	total := uint64(0)
	var runs []hostRange // guest ranges the top allocates
	err = img.topRuns(top, 0, img.size, func(off, n uint64) {
		runs = append(runs, hostRange{off, n})
		total += n
	})
	img.mu.Unlock()

	done := uint64(0)
	if progress != nil {
		progress(0, total)
	}
	// First pass, a chunk per hold of the lock.
	for _, r := range runs {
		if err != nil {
			break
		}
		for off := r.off; off < r.off+r.n && err == nil; off += commitChunk {
			n := min(commitChunk, r.off+r.n-off)
			img.mu.Lock()
			err = img.copyDown(top, base, off, n)
			img.mu.Unlock()
			done += n
			if progress != nil {
				progress(done, total)
			}
		}
	}
	img.mu.Lock()
	defer img.mu.Unlock()
	// Ranges written during the first pass, copied with the lock held.
	for err == nil && track.Count() > 0 {
		again := track.Clone()
		track.ClearAll()
		again.Extents(0, img.size, func(off, n uint64, dirty bool) bool {
			if dirty {
				err = img.topRuns(top, off, n, func(o, k uint64) {
					if err == nil {
						err = img.copyDown(top, base, o, k)
					}
				})
			}
			return err == nil
		})
	}
	img.commitTrack = nil
	if err == nil {
		err = mergeBitmapsDown(top, base)
	}
	if err == nil {
		err = base.w.flush()
	}
	if err != nil {
		// Back to the old chain: the base holds some of the top's data,
		// which the top still covers, so the disk reads the same.
		berr := base.w.closeClean()
		if rerr := base.reopenReadOnly(); rerr != nil {
			berr = errors.Join(berr, rerr)
		}
		return errors.Join(err, berr)
	}
	// The old top is closed cleanly and dropped from the chain.
	if err := w.closeClean(); err != nil {
		return err
	}
	top.close()
	img.layers = img.layers[1:]
	img.version.Add(1)
	return nil
}

// topRuns calls fn for the ranges of [off, off+n) that layer top
// allocates (data or zero clusters). The caller holds img.mu.
func (img *Image) topRuns(top *qcow2Layer, off, n uint64, fn func(off, n uint64)) error {
	end := off + n
	for off < end {
		r, err := top.mapRange(off, end-off)
		if err != nil {
			return err
		}
		if r.allocated() {
			fn(off, r.n)
		}
		off += r.n
	}
	return nil
}

// copyDown copies what the top allocates in [off, off+n) into the base:
// zero runs as zero clusters, data as data, marking the base's enabled
// bitmaps. The caller holds img.mu for writing.
func (img *Image) copyDown(top, base *qcow2Layer, off, n uint64) error {
	bw := base.w
	end := off + n
	buf := make([]byte, min(n, 1<<20))
	for off < end {
		r, err := top.mapRange(off, min(end-off, uint64(len(buf))))
		if err != nil {
			return err
		}
		switch r.kind {
		case runUnalloc:
		case runZero:
			bw.markBitmaps(off, r.n)
			err = bw.zero(img, off, r.n, true, false)
		default:
			if err = img.readLayer(0, buf[:r.n], off); err == nil {
				bw.markBitmaps(off, r.n)
				err = bw.write(img, buf[:r.n], off)
			}
		}
		if err != nil {
			return err
		}
		off += r.n
	}
	// The base's bitmaps changed: views of the chain must see it.
	img.version.Add(1)
	if bw.dirtyTables() > flushThreshold {
		return bw.flush()
	}
	return nil
}

// mergeBitmapsDown merges every bitmap of top into the same-named bitmap
// of base, creating it (same granularity, enabled as in top) when missing.
func mergeBitmapsDown(top, base *qcow2Layer) error {
	for _, b := range top.bitmaps {
		d := base.bitmap(b.name)
		if d == nil {
			m, err := dirtymap.New(base.h.size, b.bits.Granularity())
			if err != nil {
				return err
			}
			d = &layerBitmap{dirEntry: dirEntry{name: b.name, granBits: b.granBits, flags: bmeInUse}, bits: m, enabled: b.enabled}
			base.bitmaps = append(base.bitmaps, d)
		}
		if d.bits == nil {
			// The base's copy is inconsistent: it stays so.
			continue
		}
		d.bits.Merge(b.bits)
	}
	return nil
}
