package qcow

import (
	"fmt"
	"syscall"
)

// LayerInfo describes one file of a chain, with the facts `qemu-img info`
// reports about it.
type LayerInfo struct {
	Filename    string // as the chain refers to it
	Format      string // "qcow2" or "raw"
	VirtualSize uint64
	ActualSize  int64 // host bytes allocated to the file

	// Set for qcow2 layers only.
	ClusterSize     uint64
	Compat          string // "0.10" (v2) or "1.1" (v3)
	CompressionType string // "zlib" or "zstd"
	RefcountBits    int
	LazyRefcounts   bool
	ExtendedL2      bool
	DirtyFlag       bool // incompatible bit 0: refcounts may be stale

	BackingFilename     string // as stored in the header
	FullBackingFilename string // resolved against this file's directory
	BackingFormat       string // from the header extension; "" when absent

	Bitmaps   []LayerBitmap
	Snapshots []Snapshot

	// StaleBitmaps is set when the file carries a bitmaps extension that a
	// program without bitmap support invalidated (formats.md B.5); such
	// bitmaps are ignored, as qemu ignores them.
	StaleBitmaps bool
}

// LayerBitmap is a persistent bitmap as stored in one layer.
type LayerBitmap struct {
	Name        string
	Granularity uint64
	InUse       bool // found in use: inconsistent, never used as data
	Auto        bool // enabled: writes mark it
}

// Flags returns the bitmap's flags as `qemu-img info` names them.
func (b LayerBitmap) Flags() []string {
	f := []string{}
	if b.InUse {
		f = append(f, "in-use")
	}
	if b.Auto {
		f = append(f, "auto")
	}
	return f
}

// Layers describes every layer of the chain, top first.
func (img *Image) Layers() ([]LayerInfo, error) {
	out := make([]LayerInfo, 0, len(img.layers))
	for _, l := range img.layers {
		li, err := layerInfo(l)
		if err != nil {
			return nil, err
		}
		out = append(out, li)
	}
	return out, nil
}

func layerInfo(l layer) (LayerInfo, error) {
	li := LayerInfo{Filename: l.path(), Format: l.format(), VirtualSize: l.virtualSize()}
	var f File
	switch l := l.(type) {
	case *rawLayer:
		f = l.f
	case *qcow2Layer:
		f = l.f
		h := l.h
		li.ClusterSize = l.clusterSize
		li.Compat = "1.1"
		if h.version == 2 {
			li.Compat = "0.10"
		}
		li.CompressionType = "zlib"
		if h.compressionType == compressionZstd {
			li.CompressionType = "zstd"
		}
		li.RefcountBits = 1 << h.refcountOrder
		li.LazyRefcounts = h.compat&compatLazyRefcounts != 0
		li.ExtendedL2 = h.extL2()
		li.DirtyFlag = h.incompat&incompatDirty != 0
		li.BackingFilename = h.backingFile
		if h.backingFile != "" {
			li.FullBackingFilename = backingPath(l.name, h.backingFile)
		}
		li.BackingFormat = h.backingFormat
		li.StaleBitmaps = h.staleBitmaps
		for _, b := range l.bitmaps {
			li.Bitmaps = append(li.Bitmaps, LayerBitmap{
				Name: b.name, Granularity: 1 << b.granBits, InUse: b.bits == nil, Auto: b.enabled,
			})
		}
		li.Snapshots = l.snapshots
	default:
		return li, fmt.Errorf("qcow: unknown layer type %T", l)
	}
	fi, err := f.Stat()
	if err != nil {
		return li, fmt.Errorf("qcow: %s: %w", l.path(), err)
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		li.ActualSize = st.Blocks * 512
	} else {
		li.ActualSize = fi.Size()
	}
	return li, nil
}
