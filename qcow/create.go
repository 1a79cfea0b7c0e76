package qcow

import (
	"encoding/binary"
	"fmt"
	"math/bits"
	"os"
)

// CreateOptions describe a new image for [Create].
type CreateOptions struct {
	// Size is the virtual size in bytes, rounded up to 512 as qemu-img
	// does. 0 with a backing file means the backing file's size.
	Size uint64
	// ClusterSize is a power of two from 512 B to 2 MiB; 0 means 64 KiB.
	ClusterSize uint64
	// BackingFile is stored as given; a relative name is resolved
	// against the new image's directory, as qemu does.
	BackingFile string
	// BackingFormat is "qcow2" or "raw"; "" probes the backing file.
	BackingFormat string
}

// Create makes a new qcow2 v3 image at path laid out as qemu-img create
// lays it out (header, refcount table, refcount block, L1 table; 16-bit
// refcounts, zlib compression type). It refuses to overwrite a file.
func Create(path string, o CreateOptions) error {
	if o.BackingFile != "" {
		bsize, format, err := backingInfo(backingPath(path, o.BackingFile), o.BackingFormat)
		if err != nil {
			return fmt.Errorf("qcow: %s: backing file: %w", path, err)
		}
		o.BackingFormat = format
		if o.Size == 0 {
			o.Size = bsize
		}
	}
	return create(path, o)
}

// create writes the new image; a backing file's format must be resolved.
func create(path string, o CreateOptions) error {
	cs := o.ClusterSize
	if cs == 0 {
		cs = 64 << 10
	}
	if cs < 1<<minClusterBits || cs > 1<<maxClusterBits || bits.OnesCount64(cs) != 1 {
		return fmt.Errorf("%w: cluster size %d: must be a power of two from 512 B to 2 MiB", ErrInvalid, cs)
	}
	if o.BackingFile != "" && o.BackingFormat != "qcow2" && o.BackingFormat != "raw" {
		return fmt.Errorf("%w: backing format %q (qcow2 or raw)", ErrInvalid, o.BackingFormat)
	}
	size := (o.Size + 511) &^ 511
	if size > maxVirtualSize {
		return fmt.Errorf("%w: size %d too large", ErrInvalid, size)
	}
	if len(o.BackingFile) > maxBackingNameLen {
		return fmt.Errorf("%w: backing file name longer than %d bytes", ErrInvalid, maxBackingNameLen)
	}

	cb := uint32(bits.TrailingZeros64(cs))
	h := &header{
		version:         3,
		clusterBits:     cb,
		size:            size,
		refcountOrder:   4,
		headerLen:       headerV3Len,
		compressionType: compressionZlib,
		backingFile:     o.BackingFile,
		backingFormat:   o.BackingFormat,
	}
	l1n, ok := l1EntriesFor(size, cb, cs/8)
	if !ok || l1n*8 > maxL1Bytes {
		return fmt.Errorf("%w: size %d too large for %d-byte clusters", ErrInvalid, size, cs)
	}
	// An empty disk has no L1 table, as qemu-img makes it: a cluster for
	// it would be allocated but referenced by nothing (a leak).
	l1Cls := (l1n*8 + cs - 1) / cs
	perBlock := cs * 8 / 16
	rt, rb := uint64(1), uint64(1)
	for {
		total := 1 + rt + rb + l1Cls
		nrb := (total + perBlock - 1) / perBlock
		nrt := (nrb*8 + cs - 1) / cs
		if nrb == rb && nrt == rt {
			break
		}
		rb, rt = nrb, nrt
	}
	total := 1 + rt + rb + l1Cls
	h.reftableOff = cs
	h.reftableClusters = uint32(rt)
	h.l1Size = uint32(l1n)
	if l1n > 0 {
		h.l1Off = (1 + rt + rb) * cs
	}
	hdr, err := h.encode()
	if err != nil {
		return err
	}
	if _, err := parseHeader(path, append(hdr, make([]byte, cs-uint64(len(hdr)))...)); err != nil {
		return fmt.Errorf("qcow: %s: created header does not validate: %w", path, err)
	}

	buf := make([]byte, total*cs)
	copy(buf, hdr)
	for i := uint64(0); i < rb; i++ {
		binary.BigEndian.PutUint64(buf[cs+i*8:], (1+rt+i)*cs)
	}
	for c := uint64(0); c < total; c++ {
		blk := 1 + rt + c/perBlock
		binary.BigEndian.PutUint16(buf[blk*cs+(c%perBlock)*2:], 1)
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return fmt.Errorf("qcow: %w", err)
	}
	_, err = f.WriteAt(buf, 0)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(path)
		return fmt.Errorf("qcow: %s: %w", path, err)
	}
	return nil
}

// backingInfo opens a prospective backing file (its whole chain, for a
// qcow2 one) and returns its virtual size and format, probing the format
// when none is given.
func backingInfo(path, format string) (uint64, string, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, "", err
	}
	if format == "" {
		format, err = probeFormat(f)
	}
	if err != nil {
		f.Close()
		return 0, "", err
	}
	switch format {
	case "raw":
		r, err := openRaw(path, f)
		f.Close()
		if err != nil {
			return 0, "", err
		}
		return r.virtualSize(), format, nil
	case "qcow2":
		f.Close()
		img, err := Open(path, nil)
		if err != nil {
			return 0, "", err
		}
		defer img.Close()
		return img.Size(), format, nil
	}
	f.Close()
	return 0, "", fmt.Errorf("%w: backing format %q (qcow2 or raw)", ErrInvalid, format)
}
