package fsnode

import "sync"

// byVersion holds a value computed from the image, reused until the
// image's version changes (any write, bitmap operation, snapshot or
// commit). Safe for concurrent use; a computation runs under the lock, so
// concurrent callers wait for it instead of repeating it.
type byVersion[T any] struct {
	mu  sync.Mutex
	ok  bool
	ver uint64
	v   T
}

// get returns the value for version ver, computing it if needed.
func (c *byVersion[T]) get(ver uint64, compute func() (T, error)) (T, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.ok && c.ver == ver {
		return c.v, nil
	}
	v, err := compute()
	if err != nil {
		var zero T
		return zero, err
	}
	c.v, c.ver, c.ok = v, ver, true
	return v, nil
}

// readSnapshot answers a read of data at off.
func readSnapshot(data, dest []byte, off int64) ([]byte, bool) {
	if off < 0 {
		return nil, false
	}
	if off >= int64(len(data)) {
		return nil, true
	}
	return data[off:min(int64(len(data)), off+int64(len(dest)))], true
}
