package testutil

import (
	"encoding/binary"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"testing"
)

// QemuBitmap is one persistent bitmap as `qemu-img info --output=json`
// lists it under format-specific.data.bitmaps.
type QemuBitmap struct {
	Name        string   `json:"name"`
	Granularity uint64   `json:"granularity"`
	Flags       []string `json:"flags"` // sorted by NormalizeBitmaps
}

// InUse reports whether the bitmap carries the in-use flag.
func (b QemuBitmap) InUse() bool { return slices.Contains(b.Flags, "in-use") }

// Enabled reports whether the bitmap carries the auto flag.
func (b QemuBitmap) Enabled() bool { return slices.Contains(b.Flags, "auto") }

func (b QemuBitmap) String() string {
	return fmt.Sprintf("%s(g=%d %s)", b.Name, b.Granularity, strings.Join(b.Flags, ","))
}

// NormalizeBitmaps sorts bms by name and each one's flags, so that two
// lists compare as sets.
func NormalizeBitmaps(bms []QemuBitmap) []QemuBitmap {
	out := sortFlags(bms)
	slices.SortFunc(out, func(a, b QemuBitmap) int { return strings.Compare(a.Name, b.Name) })
	return out
}

// sortFlags returns a copy of bms with each one's flags sorted (never nil).
func sortFlags(bms []QemuBitmap) []QemuBitmap {
	out := slices.Clone(bms)
	for i := range out {
		out[i].Flags = slices.Clone(out[i].Flags)
		if out[i].Flags == nil {
			out[i].Flags = []string{}
		}
		slices.Sort(out[i].Flags)
	}
	return out
}

// BitmapsOfInfo extracts the bitmaps from `qemu-img info --output=json`
// output (or anything of its shape, such as MNT/info.json), in the order
// listed (the image's bitmap directory), each one's flags sorted.
func BitmapsOfInfo(tb testing.TB, what string, info []byte) []QemuBitmap {
	tb.Helper()
	var v struct {
		FormatSpecific struct {
			Data struct {
				Bitmaps []QemuBitmap `json:"bitmaps"`
			} `json:"data"`
		} `json:"format-specific"`
	}
	if err := json.Unmarshal(info, &v); err != nil {
		tb.Fatalf("decode %s: %v\n%s", what, err, info)
	}
	return sortFlags(v.FormatSpecific.Data.Bitmaps)
}

// QemuBitmapsInOrder returns the bitmaps `qemu-img info` lists for img
// (its own, not its backing files'), in the order of its bitmap
// directory. With shared, -U is given, so that an image open for writing
// elsewhere (a mount) can be read.
func QemuBitmapsInOrder(tb testing.TB, img string, shared bool) []QemuBitmap {
	tb.Helper()
	args := []string{"info", "--output=json"}
	if shared {
		args = append(args, "-U")
	}
	return BitmapsOfInfo(tb, "qemu-img info "+img, []byte(Run(tb, "qemu-img", append(args, img)...)))
}

// QemuBitmaps is [QemuBitmapsInOrder] sorted by name (see
// [NormalizeBitmaps]).
func QemuBitmaps(tb testing.TB, img string, shared bool) []QemuBitmap {
	tb.Helper()
	return NormalizeBitmaps(QemuBitmapsInOrder(tb, img, shared))
}

// BitmapMaps serves img read-only with qemu-nbd, exporting every bitmap
// of names (-B each), and returns `nbdinfo --map=qemu:dirty-bitmap:NAME`
// for each. With unlocked, the image is opened with file.locking=off, so
// that an image a mount holds for writing can be read (the caller makes
// sure it is flushed and not changing). qemu-nbd refuses to start when a
// bitmap is inconsistent (in use), which fails the test.
func BitmapMaps(tb testing.TB, img string, unlocked bool, names ...string) map[string]string {
	tb.Helper()
	out := map[string]string{}
	if len(names) == 0 {
		return out
	}
	target := img
	if unlocked {
		file, err := json.Marshal(img)
		if err != nil {
			tb.Fatal(err)
		}
		target = `json:{"driver":"qcow2","file":{"driver":"file","locking":"off","filename":` + string(file) + `}}`
	}
	n := QemuNBD(tb, target, NBDOptions{Bitmaps: names})
	for _, name := range names {
		out[name] = NbdinfoMap(tb, n.URI, "qemu:dirty-bitmap:"+name, false)
	}
	n.Stop(tb)
	return out
}

// Qcow2 header fields and the bitmaps extension, formats.md A.1, A.3, B.1.
const (
	qcow2AutoclearOff   = 88
	qcow2HeaderLenOff   = 100
	qcow2ExtBitmaps     = 0x23852875
	qcow2AutoclearBit0  = 1
	qcow2MaxHeaderBytes = 64 << 10
)

// Qcow2Header is what the bitmap tests read from a v3 header: the
// autoclear features and the types of the header extensions, in order.
type Qcow2Header struct {
	Autoclear  uint64
	Extensions []uint32
}

// BitmapsExtension reports whether the bitmaps extension is present.
func (h Qcow2Header) BitmapsExtension() bool {
	return slices.Contains(h.Extensions, qcow2ExtBitmaps)
}

// BitmapsAutoclear reports whether autoclear bit 0 (bitmaps consistent)
// is set.
func (h Qcow2Header) BitmapsAutoclear() bool { return h.Autoclear&qcow2AutoclearBit0 != 0 }

// ReadQcow2Header reads the autoclear bits and the header extensions of
// the qcow2 v3 image at path.
func ReadQcow2Header(tb testing.TB, path string) Qcow2Header {
	tb.Helper()
	b := ReadAtFile(tb, path, 0, 104)
	if string(b[:4]) != "QFI\xfb" || binary.BigEndian.Uint32(b[4:]) < 3 {
		tb.Fatalf("%s: not a qcow2 v3 image", path)
	}
	h := Qcow2Header{Autoclear: binary.BigEndian.Uint64(b[qcow2AutoclearOff:])}
	off := int64(binary.BigEndian.Uint32(b[qcow2HeaderLenOff:]))
	for off+8 <= qcow2MaxHeaderBytes {
		e := ReadAtFile(tb, path, off, 8)
		typ, n := binary.BigEndian.Uint32(e), binary.BigEndian.Uint32(e[4:])
		if typ == 0 {
			return h
		}
		h.Extensions = append(h.Extensions, typ)
		off += 8 + (int64(n)+7)&^7
	}
	tb.Fatalf("%s: header extensions run past %d bytes", path, qcow2MaxHeaderBytes)
	return h
}
