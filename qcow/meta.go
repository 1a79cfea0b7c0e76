package qcow

import (
	"container/list"
	"encoding/binary"
	"sync"
)

// table is one cluster of metadata (an L2 table or a refcount block) as
// its bytes on disk. Its bytes change only under the image's write lock.
type table struct {
	off   uint64 // host offset
	b     []byte // cluster_size bytes, big-endian on-disk layout
	dirty bool   // changed since it was last written
}

func (t *table) u64(i uint64) uint64       { return binary.BigEndian.Uint64(t.b[i*8:]) }
func (t *table) setU64(i uint64, v uint64) { binary.BigEndian.PutUint64(t.b[i*8:], v) }

// metaCache is a bounded cache of metadata tables keyed by host offset.
// Clean tables are evicted least recently used first; dirty tables stay
// until they are written (see Image.flush), so eviction never writes and
// never has to respect write ordering. Safe for concurrent use.
type metaCache struct {
	mu       sync.Mutex
	maxBytes int
	bytes    int
	ll       *list.List // of *table; front = most recently used
	m        map[uint64]*list.Element
}

func newMetaCache(maxBytes int) *metaCache {
	return &metaCache{maxBytes: maxBytes, ll: list.New(), m: make(map[uint64]*list.Element)}
}

// get returns the cached table at off, or nil.
func (c *metaCache) get(off uint64) *table {
	c.mu.Lock()
	defer c.mu.Unlock()
	e, ok := c.m[off]
	if !ok {
		return nil
	}
	c.ll.MoveToFront(e)
	return e.Value.(*table)
}

// put inserts t, replacing any table at the same offset, and evicts clean
// tables beyond the size bound. It returns the cached table: t, or the
// one another reader inserted first.
func (c *metaCache) put(t *table) *table {
	c.mu.Lock()
	defer c.mu.Unlock()
	if e, ok := c.m[t.off]; ok {
		old := e.Value.(*table)
		if !old.dirty && !t.dirty {
			c.ll.MoveToFront(e)
			return old
		}
		c.bytes -= len(old.b)
		c.ll.Remove(e)
	}
	c.m[t.off] = c.ll.PushFront(t)
	c.bytes += len(t.b)
	for e := c.ll.Back(); c.bytes > c.maxBytes && e != nil; {
		prev := e.Prev()
		if ct := e.Value.(*table); !ct.dirty && ct != t {
			c.ll.Remove(e)
			delete(c.m, ct.off)
			c.bytes -= len(ct.b)
		}
		e = prev
	}
	return t
}

// drop forgets the table at off (its cluster was freed).
func (c *metaCache) drop(off uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if e, ok := c.m[off]; ok {
		c.bytes -= len(e.Value.(*table).b)
		c.ll.Remove(e)
		delete(c.m, off)
	}
}
