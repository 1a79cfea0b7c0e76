package nbdlink

import (
	"strings"
	"unicode/utf8"
)

// Meta context IDs as qemu 7.2 assigns them (nbd/server.c
// NBD_META_ID_*): base:allocation 0, qemu:allocation-depth 1, the i-th
// dirty bitmap 2+i. Contexts qemu does not have follow the bitmaps.
const (
	idBaseAllocation  = 0
	idAllocationDepth = 1
	idFirstBitmap     = 2
)

// metaContext is one context an export offers, with the ID it gets in
// SET_META_CONTEXT replies and BLOCK_STATUS chunks.
type metaContext struct {
	id   uint32
	name string
	// synthetic marks base:allocation served for an export that does not
	// list it: every byte is reported as data (flags 0, which the spec
	// calls "always a safe answer").
	synthetic bool
}

// contextsOf returns the contexts of e in qemu's order: base:allocation,
// qemu:allocation-depth (if offered), the dirty bitmaps in e's order, then
// any other names in e's order. Names that are empty, too long, not UTF-8,
// contain NUL or repeat are dropped.
func contextsOf(e Export) []metaContext {
	names := e.MetaContexts()
	base := metaContext{id: idBaseAllocation, name: ContextBaseAllocation, synthetic: true}
	var depth *metaContext
	var bitmaps, others []string
	seen := make(map[string]bool, len(names))
	for _, n := range names {
		if n == "" || len(n) > maxString || !utf8.ValidString(n) ||
			strings.IndexByte(n, 0) >= 0 || seen[n] {
			continue
		}
		seen[n] = true
		switch {
		case n == ContextBaseAllocation:
			base.synthetic = false
		case n == ContextAllocationDepth:
			depth = &metaContext{id: idAllocationDepth, name: n}
		case strings.HasPrefix(n, ContextDirtyBitmap) && len(n) > len(ContextDirtyBitmap):
			bitmaps = append(bitmaps, n)
		default:
			others = append(others, n)
		}
	}
	out := make([]metaContext, 0, 2+len(bitmaps)+len(others))
	out = append(out, base)
	if depth != nil {
		out = append(out, *depth)
	}
	id := uint32(idFirstBitmap)
	for _, n := range bitmaps {
		out = append(out, metaContext{id: id, name: n})
		id++
	}
	for _, n := range others {
		out = append(out, metaContext{id: id, name: n})
		id++
	}
	return out
}

// matchQuery marks in sel the contexts of ctxs that query selects, with
// qemu 7.2's rules (nbd/server.c nbd_meta_base_query, nbd_meta_qemu_query):
//
//   - a full context name selects that context;
//   - for LIST only, a bare namespace ("base:", "qemu:", or any "ns:")
//     selects every context in it, and "qemu:dirty-bitmap:" every bitmap;
//     in SET an empty leaf selects nothing;
//   - anything else (unknown namespace or leaf) selects nothing and is not
//     an error.
func matchQuery(ctxs []metaContext, query string, list bool, sel []bool) {
	prefix := ""
	if list {
		if i := strings.IndexByte(query, ':'); i >= 0 && i == len(query)-1 {
			prefix = query // "ns:"
		} else if query == ContextDirtyBitmap {
			prefix = query
		}
	}
	for i, c := range ctxs {
		if c.name == query || (prefix != "" && strings.HasPrefix(c.name, prefix)) {
			sel[i] = true
		}
	}
}
