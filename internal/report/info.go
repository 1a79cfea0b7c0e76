// Package report renders what the engine knows for people and scripts:
// image summaries in the shape of `qemu-img info` and extent listings in
// the exact format of `nbdinfo --map`. The CLI and the mount both use it,
// so `cbtfs info` and MNT/info, `cbtfs map` and MNT/allocation, agree byte
// for byte.
package report

import (
	"bytes"
	"encoding/json"
	"fmt"
	"strings"

	"github.com/dustin/go-humanize"

	"github.com/cbtfs/cbtfs/qcow"
)

// ImageJSON is one image in the shape of `qemu-img info --output=json`.
// Field names and nesting follow qemu's, so a script can read either.
type ImageJSON struct {
	Snapshots           []SnapshotJSON  `json:"snapshots,omitempty"`
	BackingFormat       string          `json:"backing-filename-format,omitempty"`
	VirtualSize         uint64          `json:"virtual-size"`
	Filename            string          `json:"filename"`
	ClusterSize         uint64          `json:"cluster-size,omitempty"`
	Format              string          `json:"format"`
	ActualSize          int64           `json:"actual-size"`
	FormatSpecific      *FormatSpecific `json:"format-specific,omitempty"`
	FullBackingFilename string          `json:"full-backing-filename,omitempty"`
	BackingFilename     string          `json:"backing-filename,omitempty"`
	DirtyFlag           bool            `json:"dirty-flag"`
}

// FormatSpecific is qemu's "format-specific" object for qcow2.
type FormatSpecific struct {
	Type string    `json:"type"`
	Data Qcow2Data `json:"data"`
}

// Qcow2Data is the qcow2 part of "format-specific". v2 images carry only
// compat, compression-type and refcount-bits, as in qemu.
type Qcow2Data struct {
	Compat          string       `json:"compat"`
	CompressionType string       `json:"compression-type"`
	LazyRefcounts   *bool        `json:"lazy-refcounts,omitempty"`
	Bitmaps         []BitmapJSON `json:"bitmaps,omitempty"`
	RefcountBits    int          `json:"refcount-bits"`
	Corrupt         *bool        `json:"corrupt,omitempty"`
	ExtendedL2      *bool        `json:"extended-l2,omitempty"`
}

// BitmapJSON is a bitmap in "format-specific"/"data"/"bitmaps".
type BitmapJSON struct {
	Flags       []string `json:"flags"`
	Name        string   `json:"name"`
	Granularity uint64   `json:"granularity"`
}

// SnapshotJSON is an internal snapshot as qemu-img lists it.
type SnapshotJSON struct {
	ICount      *int64 `json:"icount,omitempty"`
	VMClockNsec uint64 `json:"vm-clock-nsec"`
	Name        string `json:"name"`
	DateSec     uint32 `json:"date-sec"`
	DateNsec    uint32 `json:"date-nsec"`
	VMClockSec  uint64 `json:"vm-clock-sec"`
	ID          string `json:"id"`
	VMStateSize uint64 `json:"vm-state-size"`
}

// InfoJSON is the output of `cbtfs info --json` and MNT/info.json: the top
// image exactly as `qemu-img info --output=json` describes it, plus
// "chain", every layer top first as `qemu-img info --backing-chain
// --output=json` lists them, and "bitmaps", the chain's bitmaps as the
// mount shows them (the union of same-named bitmaps across layers).
type InfoJSON struct {
	ImageJSON
	Chain   []ImageJSON       `json:"chain"`
	Bitmaps []ChainBitmapJSON `json:"bitmaps"`
}

// ChainBitmapJSON is one bitmap name of a chain.
type ChainBitmapJSON struct {
	Name        string `json:"name"`
	Granularity uint64 `json:"granularity"`
	Enabled     bool   `json:"enabled"`
	InUse       bool   `json:"in-use"`
	Layers      []int  `json:"layers"`
	DirtyBytes  uint64 `json:"dirty-bytes"`
}

// Image converts one layer to qemu's JSON shape.
func Image(li qcow.LayerInfo) ImageJSON {
	j := ImageJSON{
		VirtualSize:         li.VirtualSize,
		Filename:            li.Filename,
		ClusterSize:         li.ClusterSize,
		Format:              li.Format,
		ActualSize:          li.ActualSize,
		FullBackingFilename: li.FullBackingFilename,
		BackingFilename:     li.BackingFilename,
		BackingFormat:       li.BackingFormat,
		DirtyFlag:           li.DirtyFlag,
	}
	if li.Format != "qcow2" {
		return j
	}
	d := Qcow2Data{Compat: li.Compat, CompressionType: li.CompressionType, RefcountBits: li.RefcountBits}
	if li.Compat != "0.10" {
		lazy, corrupt, ext := li.LazyRefcounts, false, li.ExtendedL2
		d.LazyRefcounts, d.Corrupt, d.ExtendedL2 = &lazy, &corrupt, &ext
	}
	for _, b := range li.Bitmaps {
		d.Bitmaps = append(d.Bitmaps, BitmapJSON{Flags: b.Flags(), Name: b.Name, Granularity: b.Granularity})
	}
	j.FormatSpecific = &FormatSpecific{Type: "qcow2", Data: d}
	for _, s := range li.Snapshots {
		sj := SnapshotJSON{
			VMClockNsec: s.VMClockNsec % 1e9,
			VMClockSec:  s.VMClockNsec / 1e9,
			Name:        s.Name,
			DateSec:     s.DateSec,
			DateNsec:    s.DateNsec,
			ID:          s.ID,
			VMStateSize: s.VMStateSize,
		}
		if s.ICount != -1 {
			ic := s.ICount
			sj.ICount = &ic
		}
		j.Snapshots = append(j.Snapshots, sj)
	}
	return j
}

// Info builds the `cbtfs info --json` document for a chain.
func Info(layers []qcow.LayerInfo, bitmaps []qcow.BitmapInfo) InfoJSON {
	out := InfoJSON{Bitmaps: []ChainBitmapJSON{}}
	for i, li := range layers {
		j := Image(li)
		if i == 0 {
			out.ImageJSON = j
		}
		out.Chain = append(out.Chain, j)
	}
	for _, b := range bitmaps {
		out.Bitmaps = append(out.Bitmaps, ChainBitmapJSON{
			Name: b.Name, Granularity: b.Granularity, Enabled: b.Enabled,
			InUse: b.InUse, Layers: b.Layers, DirtyBytes: b.DirtyBytes,
		})
	}
	return out
}

// BitmapStatus says in words whether a chain bitmap is usable.
func BitmapStatus(b qcow.BitmapInfo) string {
	switch {
	case b.InUse:
		return "inconsistent (found in use; it can only be removed)"
	case b.Enabled:
		return "enabled"
	case len(b.Layers) > 0 && b.Layers[0] != 1:
		return "backing layers only (writes do not mark it)"
	}
	return "disabled"
}

// BitmapText renders MNT/bitmaps/NAME/info.
func BitmapText(b qcow.BitmapInfo, layers []qcow.LayerInfo) []byte {
	var s strings.Builder
	fmt.Fprintf(&s, "name: %s\n", b.Name)
	fmt.Fprintf(&s, "granularity: %d\n", b.Granularity)
	fmt.Fprintf(&s, "status: %s\n", BitmapStatus(b))
	fmt.Fprintf(&s, "in use: %v\n", b.InUse)
	s.WriteString("layers:")
	for _, d := range b.Layers {
		name := ""
		if d-1 < len(layers) {
			name = " (" + layers[d-1].Filename + ")"
		}
		fmt.Fprintf(&s, " %d%s", d, name)
	}
	s.WriteString("\n")
	if !b.InUse {
		fmt.Fprintf(&s, "dirty: %s (%d bytes)\n", humanize.IBytes(b.DirtyBytes), b.DirtyBytes)
	}
	return []byte(s.String())
}

// JSON renders v indented as qemu-img does, with a trailing newline.
func JSON(v any) []byte {
	b, err := json.MarshalIndent(v, "", "    ")
	if err != nil {
		// Only plain data types are rendered here; a failure is a bug.
		panic(fmt.Sprintf("report: %v", err))
	}
	return append(b, '\n')
}

// InfoText renders the readable summary of `cbtfs info` and MNT/info.
func InfoText(layers []qcow.LayerInfo, bitmaps []qcow.BitmapInfo) []byte {
	var b bytes.Buffer
	top := layers[0]
	fmt.Fprintf(&b, "image: %s\n", top.Filename)
	fmt.Fprintf(&b, "file format: %s\n", top.Format)
	fmt.Fprintf(&b, "virtual size: %s (%d bytes)\n", humanize.IBytes(top.VirtualSize), top.VirtualSize)
	fmt.Fprintf(&b, "disk size: %s\n", humanize.IBytes(uint64(max(top.ActualSize, 0))))
	fmt.Fprintf(&b, "cluster size: %d\n", top.ClusterSize)
	fmt.Fprintf(&b, "compat: %s\n", top.Compat)
	fmt.Fprintf(&b, "compression type: %s\n", top.CompressionType)
	if top.ExtendedL2 {
		b.WriteString("extended l2: true\n")
	}
	fmt.Fprintf(&b, "chain:\n")
	for i, li := range layers {
		extra := ""
		if li.Format == "qcow2" {
			extra = fmt.Sprintf(", cluster size %d", li.ClusterSize)
		}
		fmt.Fprintf(&b, "  %d: %s (%s, %s%s)\n", i+1, li.Filename, li.Format, humanize.IBytes(li.VirtualSize), extra)
	}
	if len(bitmaps) > 0 {
		b.WriteString("bitmaps:\n")
	}
	for _, bm := range bitmaps {
		var per []string
		for _, d := range bm.Layers {
			for _, lb := range layers[d-1].Bitmaps {
				if lb.Name == bm.Name {
					flags := strings.Join(lb.Flags(), ",")
					if flags == "" {
						flags = "-"
					}
					per = append(per, fmt.Sprintf("layer %d [%s]", d, flags))
				}
			}
		}
		dirty := ""
		if !bm.InUse {
			dirty = fmt.Sprintf(", dirty %s (%d bytes)", humanize.IBytes(bm.DirtyBytes), bm.DirtyBytes)
		}
		fmt.Fprintf(&b, "  %s: %s, granularity %d%s; %s\n", bm.Name, BitmapStatus(bm), bm.Granularity, dirty, strings.Join(per, ", "))
	}
	for i, li := range layers {
		if li.StaleBitmaps {
			fmt.Fprintf(&b, "  (layer %d: bitmaps invalidated by a program without bitmap support; ignored)\n", i+1)
		}
	}
	for i, li := range layers {
		if len(li.Snapshots) == 0 {
			continue
		}
		fmt.Fprintf(&b, "internal snapshots (layer %d):\n", i+1)
		for _, s := range li.Snapshots {
			fmt.Fprintf(&b, "  %s %s\n", s.ID, s.Name)
		}
	}
	return b.Bytes()
}
