package dirtymap

import "errors"

// Errors returned by [New]. Both are wrapped with details, so compare them
// with [errors.Is].
var (
	// ErrGranularity means the granularity is not a power of two in
	// [MinGranularity, MaxGranularity].
	ErrGranularity = errors.New("dirtymap: bad granularity")

	// ErrOutOfRange means the bitmap for the requested size and granularity
	// would need more than [MaxBitmapBytes] bytes.
	ErrOutOfRange = errors.New("dirtymap: out of range")
)
