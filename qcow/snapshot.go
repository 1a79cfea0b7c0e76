package qcow

import (
	"encoding/binary"
	"fmt"
)

// Snapshot describes one internal snapshot of a qcow2 image. The engine
// reads and preserves snapshots; it serves only the active state.
type Snapshot struct {
	ID          string
	Name        string
	DateSec     uint32
	DateNsec    uint32
	VMClockNsec uint64
	VMStateSize uint64
	DiskSize    uint64 // 0 when the entry does not record it (v2)
	ICount      int64  // -1 when the entry does not record it
	l1Off       uint64
	l1Size      uint32
}

// readSnapshots decodes the snapshot table (formats.md A.9) within qemu's
// limits: at most 65536 entries, a table of at most 64 MiB, at most 1 KiB
// of extra data per entry.
func (l *qcow2Layer) readSnapshots() ([]Snapshot, error) {
	h := l.h
	if h.nbSnapshots == 0 {
		return nil, nil
	}
	fsz, err := fileSize(l.f)
	if err != nil {
		return nil, err
	}
	if h.snapshotsOff >= uint64(fsz) {
		return nil, l.corrupt(64, "snapshots_offset (past end of file)", h.snapshotsOff)
	}
	// Read the table in one piece, bounded by the 64 MiB limit and by the
	// file: a table cannot be longer than what the file holds.
	n := min(uint64(fsz)-h.snapshotsOff, maxSnapshotTable)
	buf := make([]byte, n)
	if err := readFull(l.f, buf, int64(h.snapshotsOff)); err != nil {
		return nil, fmt.Errorf("qcow: %s: read snapshot table: %w", l.name, err)
	}
	be := binary.BigEndian
	snaps := make([]Snapshot, 0, min(h.nbSnapshots, uint32(n/snapshotHeaderBytes)))
	pos := uint64(0)
	for i := uint32(0); i < h.nbSnapshots; i++ {
		at := int64(h.snapshotsOff + pos)
		if pos > n || n-pos < snapshotHeaderBytes {
			return nil, l.corrupt(at, "snapshot table (truncated)", i)
		}
		e := buf[pos:]
		s := Snapshot{
			l1Off:       be.Uint64(e[0:]),
			l1Size:      be.Uint32(e[8:]),
			DateSec:     be.Uint32(e[16:]),
			DateNsec:    be.Uint32(e[20:]),
			VMClockNsec: be.Uint64(e[24:]),
			VMStateSize: uint64(be.Uint32(e[32:])),
			ICount:      -1,
		}
		idLen := uint64(be.Uint16(e[12:]))
		nameLen := uint64(be.Uint16(e[14:]))
		extra := uint64(be.Uint32(e[36:]))
		if extra > maxSnapshotExtra {
			return nil, l.corrupt(at+36, "snapshot extra data size", extra)
		}
		if h.version >= 3 && extra < minSnapshotExtraV3 {
			return nil, l.corrupt(at+36, "snapshot extra data size (v3 needs 16)", extra)
		}
		entLen := snapshotHeaderBytes + extra + idLen + nameLen
		if entLen > n-pos {
			return nil, l.corrupt(at, "snapshot table entry (truncated)", i)
		}
		x := e[snapshotHeaderBytes : snapshotHeaderBytes+extra]
		if len(x) >= 8 {
			s.VMStateSize = be.Uint64(x[0:])
		}
		if len(x) >= 16 {
			s.DiskSize = be.Uint64(x[8:])
		}
		if len(x) >= 24 {
			s.ICount = int64(be.Uint64(x[16:]))
		}
		p := snapshotHeaderBytes + extra
		s.ID = string(e[p : p+idLen])
		s.Name = string(e[p+idLen : p+idLen+nameLen])
		if uint64(s.l1Size)*8 > maxL1Bytes {
			return nil, l.corrupt(at+8, "snapshot L1 size", s.l1Size)
		}
		if s.l1Size > 0 && !validTable(s.l1Off, uint64(s.l1Size)*8, l.clusterSize) {
			return nil, l.corrupt(at, "snapshot L1 table offset", s.l1Off)
		}
		snaps = append(snaps, s)
		pos += (entLen + 7) &^ 7
	}
	return snaps, nil
}
