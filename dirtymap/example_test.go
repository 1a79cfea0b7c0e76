package dirtymap_test

import (
	"errors"
	"fmt"

	"github.com/cbtfs/cbtfs/dirtymap"
)

// Guest writes mark granules dirty; Extents reports the alternating clean
// and dirty ranges, clipped to the request.
func Example_extents() {
	m, err := dirtymap.New(1<<20, 64<<10) // 1 MiB disk, 64 KiB granules
	if err != nil {
		panic(err)
	}
	m.Set(0x30000, 4096)  // dirties granule 3
	m.Set(0x4ffff, 2)     // straddles granules 4 and 5
	m.Set(0x90000, 1<<16) // granule 9

	m.Extents(0x10000, 0xa0000, func(off, n uint64, dirty bool) bool {
		fmt.Printf("%#x +%#x dirty=%v\n", off, n, dirty)
		return true
	})
	fmt.Println("dirty granules:", m.Count(), "bytes:", m.DirtyBytes())
	// Output:
	// 0x10000 +0x20000 dirty=false
	// 0x30000 +0x30000 dirty=true
	// 0x60000 +0x30000 dirty=false
	// 0x90000 +0x10000 dirty=true
	// 0xa0000 +0x10000 dirty=false
	// dirty granules: 4 bytes: 262144
}

// The serialized form is qemu's qcow2 bitmap data: granule b is bit b%8 of
// byte b/8, least significant bit first.
func ExampleMap_MarshalRange() {
	m, _ := dirtymap.New(1<<20, 64<<10)
	m.Set(3<<16, 1) // guest cluster 3
	m.Set(9<<16, 1) // guest cluster 9
	buf := make([]byte, m.SerializedSize())
	m.MarshalRange(0, buf)
	fmt.Printf("% x\n", buf)
	// Output: 08 02
}

// UnmarshalRange loads bitmap data, for example one qcow2 bitmap cluster at
// a time; bits are ORed in.
func ExampleMap_UnmarshalRange() {
	m, _ := dirtymap.New(32<<10, 4<<10)
	m.UnmarshalRange(0, []byte{0x05})
	for off, ok := m.NextDirty(0); ok; off, ok = m.NextDirty(m.NextClean(off)) {
		fmt.Println("dirty from", off, "to", m.NextClean(off))
	}
	// Output:
	// dirty from 0 to 4096
	// dirty from 8192 to 12288
}

// Merging a fine bitmap into a coarse one dirties every coarse granule the
// fine dirty granules touch, as qemu's block-dirty-bitmap-merge does.
func ExampleMap_Merge() {
	fine, _ := dirtymap.New(1<<20, 4<<10)
	coarse, _ := dirtymap.New(1<<20, 64<<10)
	fine.Set(124<<10, 8<<10) // 4 KiB granules 31 and 32
	coarse.Merge(fine)
	coarse.Extents(0, coarse.Size(), func(off, n uint64, dirty bool) bool {
		if dirty {
			fmt.Printf("dirty %#x+%#x\n", off, n)
		}
		return true
	})
	// Output: dirty 0x10000+0x20000
}

func ExampleNew_limits() {
	_, err := dirtymap.New(1<<30, 1000)
	fmt.Println(errors.Is(err, dirtymap.ErrGranularity), err)
	_, err = dirtymap.New(4<<40, 512) // 4 TiB at 512 B needs a 1 GiB bitmap
	fmt.Println(errors.Is(err, dirtymap.ErrOutOfRange))
	// Output:
	// true dirtymap: bad granularity: 1000 is not a power of two in [512, 2147483648]
	// true
}
