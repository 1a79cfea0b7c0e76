package nbdlink

// Export is the block device a [Server] serves. nbdlink knows nothing of the
// storage behind it.
//
// All methods may be called concurrently, from several requests of one
// connection and from several connections. Offsets and lengths passed in
// have already been checked against the size the connection was given at
// negotiation (Size's value then), without overflow.
//
// Errors are reported to clients through the mapping described at
// [ErrReadOnly]: wrap [ErrReadOnly], [ErrNoSpace], [ErrOutOfRange],
// [errors.ErrUnsupported] or a [syscall.Errno] to choose the NBD error;
// anything else becomes EIO.
type Export interface {
	// Size is the export size in bytes. It is read once per INFO, GO or
	// EXPORT_NAME; sizes beyond math.MaxInt64 are cut to it.
	Size() uint64
	// ReadAt follows [io.ReaderAt]; a short read is an error.
	ReadAt(p []byte, off int64) (int, error)
	// WriteAt follows [io.WriterAt]. Only called on writable exports.
	WriteAt(p []byte, off int64) (int, error)
	// Flush makes every completed write durable. It serves NBD_CMD_FLUSH
	// and the FUA flag. Only called on writable exports.
	Flush() error
	// Trim is a discard hint for [off, off+n): afterwards the range may
	// read as anything until rewritten. Only called on writable exports
	// and with n > 0. An export that cannot trim returns nil.
	Trim(off, n uint64) error
	// WriteZeroes makes [off, off+n) read as zeros. mayUnmap is false when
	// the client asked for NO_HOLE (space must stay allocated). Only
	// called on writable exports and with n > 0.
	WriteZeroes(off, n uint64, mayUnmap bool) error
	// BlockStatus reports the extents of one meta context (a name from
	// MetaContexts) over [off, off+n), in order from off, by calling
	// fn(length, flags) until fn returns false. It may stop early at any
	// extent boundary; extents may end past off+n (the server clips them).
	// fn must not be called after BlockStatus returns, nor concurrently.
	BlockStatus(context string, off, n uint64, fn func(length uint64, flags uint32) bool) error
	// MetaContexts names the meta contexts the export can report, e.g.
	// "base:allocation", "qemu:allocation-depth" and
	// "qemu:dirty-bitmap:NAME". The list is read at each LIST or SET
	// META_CONTEXT; the server offers "base:allocation" even when it is
	// missing here, answering it as all data.
	MetaContexts() []string
}

// FastZeroer is implemented by exports that can sometimes zero a range much
// faster than by writing zeros (NBD_CMD_FLAG_FAST_ZERO). Without it every
// FAST_ZERO request fails with ENOTSUP and the client falls back to
// ordinary writes, as the spec intends.
type FastZeroer interface {
	// WriteZeroesFast behaves like [Export.WriteZeroes] when it can zero
	// [off, off+n) quickly; otherwise it changes nothing and returns an
	// error matching [errors.ErrUnsupported].
	WriteZeroesFast(off, n uint64, mayUnmap bool) error
}

// Cacher is implemented by exports that can prefetch (NBD_CMD_CACHE).
// Without it CACHE succeeds without doing anything, which the spec allows
// for a hint.
type Cacher interface {
	// Cache hints that [off, off+n) will be read soon. n > 0.
	Cache(off, n uint64) error
}

// Names of the meta contexts the server knows the meaning of (formats.md
// C.1). Other names are served as opaque contexts.
const (
	ContextBaseAllocation  = "base:allocation"
	ContextAllocationDepth = "qemu:allocation-depth"
	ContextDirtyBitmap     = "qemu:dirty-bitmap:" // + bitmap name
)
