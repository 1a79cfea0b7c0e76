package qcow

import (
	"errors"
	"fmt"
)

// These errors are returned when an image or chain is opened.
var (
	// ErrNotQcow2 is returned when a file that must be qcow2 does not start
	// with the qcow2 magic.
	ErrNotQcow2 = errors.New("qcow: not a qcow2 image")

	// ErrCorrupt is matched by every error caused by inconsistent or
	// out-of-range metadata: a bad header field, an unaligned table offset,
	// an L2 entry that points nowhere sensible. See [FormatError].
	ErrCorrupt = errors.New("qcow: image is corrupt")

	// ErrUnsupported is matched by errors for images using a feature the
	// engine cannot serve correctly (encryption, an external data file, an
	// unknown incompatible feature bit, the corrupt bit). See [FeatureError].
	ErrUnsupported = errors.New("qcow: unsupported feature")

	// ErrBackingLoop is returned when a backing chain refers back to one of
	// its own layers or is deeper than [MaxChainDepth].
	ErrBackingLoop = errors.New("qcow: backing chain loops or is too deep")
)

// These errors are returned by operations on an open image.
var (
	// ErrReadOnly is returned by modifying operations on an image opened
	// read-only.
	ErrReadOnly = errors.New("qcow: image is read-only")

	// ErrNoSpace is returned when a write cannot be stored: the host file
	// system is full, or the image reached a format limit.
	ErrNoSpace = errors.New("qcow: no space left")

	// ErrOutOfRange is returned for a guest range that does not lie within
	// the virtual disk.
	ErrOutOfRange = errors.New("qcow: range outside the virtual disk")

	// ErrNoBitmap is returned when a named bitmap does not exist.
	ErrNoBitmap = errors.New("qcow: no such bitmap")

	// ErrInconsistent is returned for a bitmap that was found in use (a
	// process died while tracking with it, formats.md B.6): its bits are
	// stale and it can only be removed, never used for a backup.
	ErrInconsistent = errors.New("qcow: bitmap is inconsistent (found in use); it can only be removed")
)

// FormatError reports metadata that violates the qcow2 format or qemu's
// limits. It records the file, the byte offset of the bad field (or -1 when
// the field has no single location) and the value found.
type FormatError struct {
	File  string
	Off   int64
	Field string
	Val   any
}

func (e *FormatError) Error() string {
	where := ""
	if e.Off >= 0 {
		where = fmt.Sprintf(" at offset %#x", e.Off)
	}
	val := ""
	if e.Val != nil {
		val = fmt.Sprintf(" %v", e.Val)
	}
	return fmt.Sprintf("qcow: %s: bad %s%s%s", e.File, e.Field, val, where)
}

// Unwrap makes a FormatError match [ErrCorrupt].
func (e *FormatError) Unwrap() error { return ErrCorrupt }

// FeatureError reports a feature of an image that the engine refuses to
// serve because it cannot do so correctly.
type FeatureError struct {
	File    string
	Feature string
}

func (e *FeatureError) Error() string {
	return fmt.Sprintf("qcow: %s: unsupported feature: %s", e.File, e.Feature)
}

// Unwrap makes a FeatureError match [ErrUnsupported].
func (e *FeatureError) Unwrap() error { return ErrUnsupported }
