package report

import (
	"strconv"
	"strings"

	"github.com/cbtfs/cbtfs/dirtymap"
	"github.com/cbtfs/cbtfs/qcow"
)

// The NBD metadata contexts whose listings cbtfs produces.
const (
	ContextAllocation   = "base:allocation"
	ContextDepth        = "qemu:allocation-depth"
	ContextBitmapPrefix = "qemu:dirty-bitmap:"
)

// Describe returns nbdinfo's description of an extent type in a context
// (libnbd info/map.c): "" when nbdinfo prints none.
func Describe(context string, typ uint32) string {
	switch {
	case context == ContextAllocation:
		switch typ {
		case 0:
			return "data"
		case 1:
			return "hole"
		case 2:
			return "zero"
		case 3:
			return "hole,zero"
		}
	case context == ContextDepth:
		switch typ {
		case 0:
			return "absent"
		case 1:
			return "local"
		}
		return "backing depth " + strconv.FormatUint(uint64(typ), 10)
	case strings.HasPrefix(context, ContextBitmapPrefix):
		switch typ {
		case 0:
			return "clean"
		case 1:
			return "dirty"
		}
	}
	return ""
}

// Listing collects the extents of one context, merging adjacent extents of
// equal type as nbdinfo does, and renders them in nbdinfo's formats.
type Listing struct {
	context string
	ext     []extent
}

type extent struct {
	off, n uint64
	typ    uint32
}

// NewListing returns an empty listing for context.
func NewListing(context string) *Listing { return &Listing{context: context} }

// Add appends the extent [off, off+n) of type typ.
func (l *Listing) Add(off, n uint64, typ uint32) {
	if n == 0 {
		return
	}
	if k := len(l.ext); k > 0 && l.ext[k-1].typ == typ && l.ext[k-1].off+l.ext[k-1].n == off {
		l.ext[k-1].n += n
		return
	}
	l.ext = append(l.ext, extent{off, n, typ})
}

// Len returns the number of (merged) extents.
func (l *Listing) Len() int { return len(l.ext) }

// Text renders the listing as `nbdinfo --map=CONTEXT` prints it:
// "%10" PRIu64 "  %10" PRIu64 "  %3" PRIu32 "  %s\n", the description and
// its two spaces left out when there is none.
func (l *Listing) Text() []byte {
	b := make([]byte, 0, len(l.ext)*40)
	for _, e := range l.ext {
		b = appendPadded(b, e.off, 10)
		b = append(b, "  "...)
		b = appendPadded(b, e.n, 10)
		b = append(b, "  "...)
		b = appendPadded(b, uint64(e.typ), 3)
		if d := Describe(l.context, e.typ); d != "" {
			b = append(b, "  "...)
			b = append(b, d...)
		}
		b = append(b, '\n')
	}
	return b
}

// JSON renders the listing as `nbdinfo --map=CONTEXT --json` prints it:
// "[", the extent objects joined by ",\n", then "\n]\n".
func (l *Listing) JSON() []byte {
	b := make([]byte, 0, 16+len(l.ext)*80)
	b = append(b, "[\n"...)
	for i, e := range l.ext {
		if i > 0 {
			b = append(b, ",\n"...)
		}
		b = append(b, `{ "offset": `...)
		b = strconv.AppendUint(b, e.off, 10)
		b = append(b, `, "length": `...)
		b = strconv.AppendUint(b, e.n, 10)
		b = append(b, `, "type": `...)
		b = strconv.AppendUint(b, uint64(e.typ), 10)
		if d := Describe(l.context, e.typ); d != "" {
			b = append(b, `, "description": "`...)
			b = append(b, d...)
			b = append(b, '"')
		}
		b = append(b, '}')
	}
	// libnbd prints "[\n", the extents joined by ",\n", then "\n]\n",
	// even when there are none.
	b = append(b, "\n]\n"...)
	return b
}

// appendPadded appends v right-aligned in a field of width w, as printf's
// "%<w>" does.
func appendPadded(b []byte, v uint64, w int) []byte {
	var tmp [20]byte
	s := strconv.AppendUint(tmp[:0], v, 10)
	for i := len(s); i < w; i++ {
		b = append(b, ' ')
	}
	return append(b, s...)
}

// Allocation lists the base:allocation extents of img: 0 "data" for data,
// 3 "hole,zero" for everything that reads as zeros without being data.
func Allocation(img *qcow.Image) (*Listing, error) {
	l := NewListing(ContextAllocation)
	err := img.Extents(0, img.Size(), func(e qcow.Extent) bool {
		typ := uint32(0)
		if e.Zero {
			typ = 3
		}
		l.Add(e.Off, e.Len, typ)
		return true
	})
	return l, err
}

// Depth lists the qemu:allocation-depth extents of img.
func Depth(img *qcow.Image) (*Listing, error) {
	l := NewListing(ContextDepth)
	err := img.Extents(0, img.Size(), func(e qcow.Extent) bool {
		l.Add(e.Off, e.Len, uint32(e.Depth))
		return true
	})
	return l, err
}

// Bitmap lists the qemu:dirty-bitmap:NAME extents of m.
func Bitmap(name string, m *dirtymap.Map) *Listing {
	l := NewListing(ContextBitmapPrefix + name)
	m.Extents(0, m.Size(), func(off, n uint64, dirty bool) bool {
		typ := uint32(0)
		if dirty {
			typ = 1
		}
		l.Add(off, n, typ)
		return true
	})
	return l
}
