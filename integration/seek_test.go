package integration

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/cbtfs/cbtfs/internal/testutil"
)

// span is a byte range [Off, Off+Len).
type span struct{ Off, Len int64 }

// seekImages are images whose every allocated host cluster is fully
// written (whole-cluster or whole-subcluster writes only), so that qemu's
// base:allocation, which also asks the host file for holes, has no reason
// to say "zero" inside data (the design allows cbtfs to say "data" there).
func seekImages() []imageCase {
	var cs []imageCase
	add := func(name string, f func(b *builder) string) {
		cs = append(cs, imageCase{name: name, build: top(f)})
	}
	add("v3-c64k", func(b *builder) string {
		img := b.qcow2("a.qcow2", "4M")
		b.io(img,
			"write -P 0x01 0 128k",
			"write -P 0x02 1M 128k", "write -z 1M 64k", // ZERO_ALLOC
			"write -P 0x03 2M 192k", "write -z -u 2112k 64k", // ZERO_PLAIN
			"write -z 3M 64k", // ZERO_PLAIN on unallocated
			"write -c -P 0x04 3584k 64k",
			"write -P 0x05 4032k 64k", // the last cluster
		)
		return img
	})
	add("v2-c512", func(b *builder) string {
		img := b.qcow2("a.qcow2", "2M", "-o", "compat=0.10,cluster_size=512")
		b.io(img, "write -P 0x06 0 4k", "write -P 0x07 1M 512", "write -P 0x08 1536k 1536", "discard 1536k 512")
		return img
	})
	add("v3-c2M", func(b *builder) string {
		img := b.qcow2("a.qcow2", "8M", "-o", "cluster_size=2M")
		b.io(img, "write -P 0x09 0 2M", "write -P 0x0a 4M 2M", "write -z 4M 2M", "write -P 0x1a 6M 2M")
		return img
	})
	add("chain", func(b *builder) string {
		base := b.qcow2("base.qcow2", "4M")
		b.io(base, "write -P 0x0b 0 2M", "write -z 3M 64k", "write -P 0x0c 3584k 128k")
		img := b.overlay("top.qcow2", "base.qcow2", "qcow2", "")
		b.io(img, "write -z -u 512k 128k", "write -P 0x0d 3M 64k", "write -z 1M 64k", "write -P 0x0e 2560k 64k", "discard 3584k 64k")
		return img
	})
	add("extl2-over-base", func(b *builder) string {
		base := b.qcow2("base.qcow2", "4M")
		b.io(base, "write -P 0x0f 0 1M")
		img := b.overlay("top.qcow2", "base.qcow2", "qcow2", "", "-o", "extended_l2=on")
		b.io(img, "write -P 0x10 8k 4k", "write -z 64k 2k", "write -z 128k 64k", "write -P 0x11 2M 6k", "write -P 0x12 3M 64k", "write -z 3M 2k")
		return img
	})
	add("raw-base-shorter", func(b *builder) string {
		b.raw("base.raw", 2<<20, pattern(0x13))
		img := b.overlay("top.qcow2", "base.raw", "raw", "4M")
		b.io(img, "write -z 64k 64k", "write -P 0x14 3M 64k")
		return img
	})
	return cs
}

// TestSeekDataHole walks MNT/disk with lseek(SEEK_DATA/SEEK_HOLE) and
// compares the data ranges with the extents `nbdinfo --map` reports
// against qemu-nbd serving the same image: everything but "hole,zero" is
// data. It also checks lseek's edge cases at and past the end, and that du
// (st_blocks) counts the bytes of the data ranges.
func TestSeekDataHole(t *testing.T) {
	testutil.RequireFUSE(t)
	testutil.RequireTool(t, "qemu-nbd")
	testutil.RequireTool(t, "nbdinfo")
	for _, c := range seekImages() {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			b := &builder{t: t, dir: filepath.Join(dir, "img")}
			img, _ := c.build(b)

			nbd := testutil.QemuNBD(t, img, testutil.NBDOptions{})
			mapOut := testutil.NbdinfoMap(t, nbd.URI, "", false)
			want := dataSpans(t, mapOut)
			if len(want) < 2 {
				t.Fatalf("qemu-nbd reports %v as data: the image was meant to have holes between data\n%s", want, mapOut)
			}

			mnt := mkdir(t, dir, "mnt")
			m := testutil.Mount(t, cbtfs, img, mnt)
			f, err := os.Open(m.Disk)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			fi, err := f.Stat()
			if err != nil {
				t.Fatal(err)
			}
			size := fi.Size()
			got, err := seekSpans(int(f.Fd()), size)
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("data ranges: %v", got)
			if fmt.Sprint(got) != fmt.Sprint(want) {
				t.Errorf("SEEK_DATA/SEEK_HOLE data ranges of MNT/disk:\n got %v\nwant %v (from nbdinfo --map against qemu-nbd:\n%s)", got, want, mapOut)
			}
			checkSeekEdges(t, int(f.Fd()), size)

			// du shows the allocated bytes: the data ranges.
			var data int64
			for _, sp := range want {
				data += sp.Len
			}
			if st, ok := fi.Sys().(*syscall.Stat_t); !ok {
				t.Errorf("stat MNT/disk: no Stat_t")
			} else if st.Blocks*512 != data {
				t.Errorf("stat MNT/disk: st_blocks*512 = %d, want %d (the bytes of the data ranges)", st.Blocks*512, data)
			}
			f.Close()
			m.Unmount(t)
		})
	}
}

// dataSpans parses `nbdinfo --map` output and returns the merged ranges
// whose type is not 3 (hole,zero).
func dataSpans(t *testing.T, out string) []span {
	t.Helper()
	var spans []span
	for _, e := range parseNbdinfoMap(t, out) {
		if e.Type != 3 {
			spans = addSpan(spans, span{e.Off, e.Len})
		}
	}
	return spans
}

// seekSpans returns the data ranges of the file fd of size bytes, found
// with lseek(SEEK_DATA) and lseek(SEEK_HOLE).
func seekSpans(fd int, size int64) ([]span, error) {
	var spans []span
	for off := int64(0); off < size; {
		d, err := unix.Seek(fd, off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("lseek(%d, SEEK_DATA): %v", off, err)
		}
		if d < off || d >= size {
			return nil, fmt.Errorf("lseek(%d, SEEK_DATA) = %d, outside [%d, %d)", off, d, off, size)
		}
		h, err := unix.Seek(fd, d, unix.SEEK_HOLE)
		if err != nil {
			return nil, fmt.Errorf("lseek(%d, SEEK_HOLE): %v", d, err)
		}
		if h <= d || h > size {
			return nil, fmt.Errorf("lseek(%d, SEEK_HOLE) = %d, outside (%d, %d]", d, h, d, size)
		}
		spans = append(spans, span{d, h - d})
		off = h
	}
	return spans, nil
}

// checkSeekEdges checks lseek(2)'s rules at the end of the file: SEEK_DATA
// and SEEK_HOLE at or past EOF fail with ENXIO, and SEEK_HOLE inside the
// file never goes past EOF (EOF counts as a hole).
func checkSeekEdges(t *testing.T, fd int, size int64) {
	t.Helper()
	for _, off := range []int64{size, size + 1, size + 1<<20} {
		for _, w := range []struct {
			name   string
			whence int
		}{{"SEEK_DATA", unix.SEEK_DATA}, {"SEEK_HOLE", unix.SEEK_HOLE}} {
			if pos, err := unix.Seek(fd, off, w.whence); !errors.Is(err, unix.ENXIO) {
				t.Errorf("lseek(%d, %s) on a file of %d bytes = %d, %v; want ENXIO", off, w.name, size, pos, err)
			}
		}
	}
	if pos, err := unix.Seek(fd, size-1, unix.SEEK_HOLE); err != nil || pos > size || pos < size-1 {
		t.Errorf("lseek(%d, SEEK_HOLE) on a file of %d bytes = %d, %v; want %d or %d", size-1, size, pos, err, size-1, size)
	}
}
