package qcow

import (
	"container/list"
	"sync"
)

// tableCache is a bounded LRU cache of decoded metadata tables (L2 tables,
// refcount blocks) keyed by host offset. Safe for concurrent use.
type tableCache struct {
	mu       sync.Mutex
	maxBytes int
	bytes    int
	ll       *list.List // front = most recently used; values are *cacheEntry
	m        map[uint64]*list.Element
}

type cacheEntry struct {
	off uint64
	tbl []uint64
}

func newTableCache(maxBytes int) *tableCache {
	return &tableCache{maxBytes: maxBytes, ll: list.New(), m: make(map[uint64]*list.Element)}
}

// get returns the cached table at off, or nil.
func (c *tableCache) get(off uint64) []uint64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	e, ok := c.m[off]
	if !ok {
		return nil
	}
	c.ll.MoveToFront(e)
	return e.Value.(*cacheEntry).tbl
}

// put inserts (or replaces) the table at off and evicts the least recently
// used tables beyond the size bound. The most recent table always stays.
func (c *tableCache) put(off uint64, tbl []uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if e, ok := c.m[off]; ok {
		ce := e.Value.(*cacheEntry)
		c.bytes += 8 * (len(tbl) - len(ce.tbl))
		ce.tbl = tbl
		c.ll.MoveToFront(e)
	} else {
		c.m[off] = c.ll.PushFront(&cacheEntry{off: off, tbl: tbl})
		c.bytes += 8 * len(tbl)
	}
	for c.bytes > c.maxBytes && c.ll.Len() > 1 {
		e := c.ll.Back()
		ce := e.Value.(*cacheEntry)
		c.ll.Remove(e)
		delete(c.m, ce.off)
		c.bytes -= 8 * len(ce.tbl)
	}
}

// drop forgets the table at off.
func (c *tableCache) drop(off uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if e, ok := c.m[off]; ok {
		c.bytes -= 8 * len(e.Value.(*cacheEntry).tbl)
		c.ll.Remove(e)
		delete(c.m, off)
	}
}
