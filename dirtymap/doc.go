// Package dirtymap implements the in-memory dirty bitmaps behind cbtfs's
// change block tracking: one bit per granule of a disk, set when the granule
// is written, in the same layout as qemu's persistent dirty bitmaps in
// qcow2 images.
//
// A [Map] covers a disk of [Map.Size] bytes in granules of
// [Map.Granularity] bytes (a power of two from 512 bytes to 2 GiB). Guest
// writes mark granules with [Map.Set]; readers walk the result with
// [Map.Extents], [Map.NextDirty] and [Map.NextClean], which answer
// SEEK_DATA/SEEK_HOLE on a bitmap file and NBD's qemu:dirty-bitmap:NAME
// metadata context. All offsets and lengths in the API are guest byte
// offsets, except in the serialization methods, which take byte offsets into
// the serialized bitmap.
//
// # Byte ranges
//
// Every range argument is clipped to the map, never rejected: a range that
// starts at or past Size does nothing, and one that runs past Size (or would
// overflow uint64) stops at Size. Set and Clear affect every granule the
// range touches, even partly, as qemu does for writes. The last granule may
// extend past Size; extents and [Map.DirtyBytes] are clipped to Size.
//
// # Serialization
//
// The serialized form is the bitmap data of a qcow2 bitmap (qemu's
// docs/interop/qcow2.txt, "Bitmaps"): granule b is bit b%8 (least
// significant first) of byte b/8, and the bitmap is ceil(Bits/8) bytes long, with unused bits of
// the last byte zero. [Map.MarshalRange] and [Map.UnmarshalRange] work on
// any byte window, so the qcow package can write and load a bitmap one data
// cluster at a time; [Map.SetSerializedRange] loads an "all ones" bitmap
// table entry. Splitting the bytes into clusters and the bitmap table
// belong to the qcow package.
//
// Merging follows qemu's hbitmap_merge: [Map.Merge] ORs the source into the
// target, and when the granularities differ every target granule touched by
// a dirty source granule becomes dirty.
//
// # Concurrency
//
// A Map is safe for concurrent use; each holds a [sync.RWMutex]. Queries
// take the read lock, updates the write lock. No lock is held while
// user code runs: the [Map.Extents] callback may call any method of the
// same map. [Map.Merge] and [Map.Equal] never lock two maps at once, so
// calls in opposite directions cannot deadlock; in exchange they are not
// atomic with respect to concurrent updates (see their docs). [Map.Clone]
// is one consistent snapshot.
//
// # Limits
//
//   - Granularity: a power of two in [[MinGranularity], [MaxGranularity]]
//     (qemu: at least 512, granularity_bits <= 31); otherwise [New] fails
//     with [ErrGranularity].
//   - Bitmap size: at most [MaxBitmapBytes] (0x20000000, qemu's
//     BME_MAX_PHYS_SIZE) serialized bytes, that is 2^32 granules: 2 TiB at
//     512 bytes, 256 TiB at 64 KiB. Larger maps fail with [ErrOutOfRange]
//     before anything is allocated.
//   - Memory: one bit per granule, plus two summaries (one bit per 64-bit
//     word that is non-zero, one per word that is not all ones, each with
//     its own upper levels) of about 1/63 of that each. A 1 TiB disk at
//     64 KiB granularity needs 2 MiB; at 512 bytes, 256 MiB plus 8 MiB.
//   - Speed: Set and Clear of a range write whole words inside the range;
//     Extents, NextDirty and NextClean cost O(log64(Bits)) per extent found,
//     independent of how far apart the extents are; serialization copies
//     whole words where the byte offset is 8-aligned; Count is O(1).
package dirtymap
