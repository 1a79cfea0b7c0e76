package qcow

// Limits enforced on every image before anything is allocated. They mirror
// qemu's own (block/qcow2.h, block/qcow2-bitmap.c, block/qcow2-snapshot.c),
// so an image qemu opens is one we open, and a hostile header cannot make the
// process allocate more than a bounded amount.
const (
	minClusterBits = 9  // 512 B; qemu MIN_CLUSTER_BITS
	maxClusterBits = 21 // 2 MiB; qemu MAX_CLUSTER_BITS

	// minExtL2ClusterBits is the smallest cluster size with extended L2
	// entries: "Extended L2 entries are only supported with cluster sizes of
	// at least 16384 bytes" (qcow2_do_open).
	minExtL2ClusterBits = 14

	maxL1Bytes       = 32 << 20 // QCOW_MAX_L1_SIZE
	maxReftableBytes = 8 << 20  // QCOW_MAX_REFTABLE_SIZE
	maxRefcountOrder = 6

	maxBackingNameLen   = 1023 // "Backing file name too long"
	maxBackingFormatLen = 15   // ext_backing_format: len >= 16 refused

	maxSnapshots        = 65536    // QCOW_MAX_SNAPSHOTS
	maxSnapshotTable    = 64 << 20 // QCOW_MAX_SNAPSHOTS_SIZE
	maxSnapshotExtra    = 1024     // QCOW_MAX_SNAPSHOT_EXTRA_DATA
	maxSnapshotIDLen    = 1 << 16
	maxSnapshotNameLen  = 1 << 16
	minSnapshotExtraV3  = 16 // v3 requires vm_state_size_large and disk_size
	snapshotHeaderBytes = 40

	maxBitmaps          = 65535          // QCOW2_MAX_BITMAPS
	maxBitmapDirSize    = 1024 * 65535   // QCOW2_MAX_BITMAP_DIRECTORY_SIZE
	maxBitmapTableSize  = 0x8000000      // BME_MAX_TABLE_SIZE
	maxBitmapPhysSize   = 0x20000000     // BME_MAX_PHYS_SIZE
	minBitmapGranBits   = 9              // BME_MIN_GRANULARITY_BITS
	maxBitmapGranBits   = 31             // BME_MAX_GRANULARITY_BITS
	maxBitmapNameLen    = 1023           // BME_MAX_NAME_SIZE
	bitmapEntryHdrBytes = 24             // fixed part of a directory entry
	maxHostOffset       = 1<<56 - 1      // offsets are 56-bit in L1/L2 entries
	maxVirtualSize      = 1<<63 - 1      // qemu keeps sizes in int64
	maxL1Entries        = maxL1Bytes / 8 // 4 Mi entries

	// MaxChainDepth bounds the number of layers in a backing chain. qemu
	// has no small limit; a bound keeps a hostile or looping chain from
	// exhausting file descriptors.
	MaxChainDepth = 256
)
