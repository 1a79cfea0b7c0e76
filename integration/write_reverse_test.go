package integration

import (
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"syscall"
	"testing"

	"github.com/cbtfs/cbtfs/internal/testutil"
)

// This file checks images that cbtfs wrote and qemu then wrote again, and
// the state a clean unmount leaves.

// wReverseKinds are the images of TestWriteReverse. None of them has
// data in the top layer's last MiB, which cbtfs's first workload leaves
// alone, so that qemu-io can write compressed clusters there.
var wReverseKinds = []struct {
	name   string
	bitmap bool // v3: bitmaps are added
	build  func(b *builder) string
}{
	{"v3-c64k", true, func(b *builder) string {
		img := b.qcow2("a.qcow2", "16M")
		b.io(img, "write -P 0x11 0 3M")
		return img
	}},
	{"c512-refcount64", true, func(b *builder) string {
		return b.qcow2("a.qcow2", "8M", "-o", "cluster_size=512,refcount_bits=64")
	}},
	{"extl2-over-qcow2", true, func(b *builder) string {
		base := b.qcow2("base.qcow2", "16M")
		b.io(base, "write -P 0x12 0 16M")
		return b.overlay("a.qcow2", "base.qcow2", "qcow2", "", "-o", "extended_l2=on")
	}},
	{"v2-c4k-over-raw", false, func(b *builder) string {
		b.raw("base.raw", 12<<20, pattern(0x13))
		return b.overlay("a.qcow2", "base.raw", "raw", "16M", "-o", "compat=0.10,cluster_size=4k")
	}},
	{"zstd-compressed", true, func(b *builder) string {
		src := b.raw("src.raw", 16<<20, mixed(24<<10, 9))
		img := b.convert(src, "a.qcow2", "-f", "raw", "-c", "-o", "compression_type=zstd")
		b.io(img, "discard 15M 1M")
		return img
	}},
}

// TestWriteReverse checks that cbtfs reads what qemu wrote into an image
// cbtfs wrote: a cbtfs workload (checked as in TestWriteMatrix), then
// qemu-io writes over it (write -P at unaligned offsets, write -z,
// write -z -u, discard, compressed write -c) and qemu-img bitmap changes
// (a new bitmap, one disabled). A read-only mount must then read
// `qemu-img convert -O raw`, and list every bitmap, the allocation and
// the allocation depth byte for byte as nbdinfo does against qemu-nbd; a
// second cbtfs workload over everything, qemu's compressed clusters
// included, must check out as the first.
func TestWriteReverse(t *testing.T) {
	testutil.RequireFUSE(t)
	testutil.RequireTool(t, "nbdinfo")
	t.Parallel()
	wRunPool(t, wWorkers, len(wReverseKinds), func(i int) (string, func(t *testing.T)) {
		k := wReverseKinds[i]
		return k.name, func(t *testing.T) {
			dir := t.TempDir()
			b := &builder{t: t, dir: filepath.Join(dir, "img")}
			img := k.build(b)
			if k.bitmap {
				wAddAll(t, img)
			}
			info := wImgInfo(t, img)
			size, cl := info.VirtualSize, info.ClusterSize
			w := wWorkload{seed: uint64(100 + i), serial: 10, zones: 2, perZone: 4, limit: size - 1<<20}
			writeRound(t, img, "", dir, w)

			// qemu writes over cbtfs's clusters, and compressed clusters in
			// the last MiB.
			last := size - 1<<20
			cmds := []string{
				"write -P 0x61 100001 77777",
				"write -P 0x62 " + strconv.FormatInt(size/3, 10) + " 1M",
				"write -z 3000000 200000",
				"write -z -u " + strconv.FormatInt(2*cl*8, 10) + " " + strconv.FormatInt(4*cl, 10),
				"discard " + strconv.FormatInt(4<<20, 10) + " 1M",
				"write -c -P 0x63 " + strconv.FormatInt(last, 10) + " " + strconv.FormatInt(max(cl, 64<<10), 10),
				"write -c -P 0x64 " + strconv.FormatInt(last+256<<10, 10) + " " + strconv.FormatInt(max(cl, 128<<10), 10),
				"write -P 0x65 " + strconv.FormatInt(size-1, 10) + " 1",
			}
			b.io(img, cmds...)
			if k.bitmap {
				testutil.Img(t, "bitmap", "--add", "-g", "4k", img, "q-new")
				testutil.Img(t, "bitmap", "--disable", img, "w-default")
				b.io(img, "write -P 0x66 "+strconv.FormatInt(size/2+1, 10)+" 5000", "write -z "+strconv.FormatInt(size/4, 10)+" 64k")
			}
			wRequireClean(t, img)
			if r, _ := testutil.Check(t, img); r.CompressedCluster == 0 {
				t.Errorf("qemu-io write -c left no compressed cluster: %+v", r)
			}
			wReadAsQemu(t, img, dir)

			w = wWorkload{seed: uint64(200 + i), serial: 10, zones: 2, perZone: 4, dd: true}
			writeRound(t, img, "", dir, w)
			wReadAsQemu(t, img, dir)
		}
	})
}

// wReadAsQemu mounts img read-only and requires MNT/disk to be `qemu-img
// convert -O raw`, and MNT/allocation, MNT/depth and every
// MNT/bitmaps/NAME/extents (and their .json) to be what nbdinfo prints
// against qemu-nbd -A -B NAME... serving img.
func wReadAsQemu(t *testing.T, img, dir string) {
	t.Helper()
	ref := filepath.Join(dir, "qemu.raw")
	testutil.ConvertRaw(t, img, ref)
	names := wNames(wImgInfo(t, img).FormatSpecific.Data.Bitmaps)
	n := testutil.QemuNBD(t, img, testutil.NBDOptions{AllocationDepth: true, Bitmaps: names})
	want := map[string]string{}
	for _, js := range []bool{false, true} {
		suffix := ""
		if js {
			suffix = ".json"
		}
		want["allocation"+suffix] = testutil.NbdinfoMap(t, n.URI, "", js)
		want["depth"+suffix] = testutil.NbdinfoMap(t, n.URI, "qemu:allocation-depth", js)
		for _, name := range names {
			want[filepath.Join("bitmaps", name, "extents"+suffix)] = testutil.NbdinfoMap(t, n.URI, "qemu:dirty-bitmap:"+name, js)
		}
	}
	n.Stop(t)

	mnt := filepath.Join(dir, "mnt-ro")
	if err := os.MkdirAll(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	m := testutil.Mount(t, cbtfs, img, mnt)
	if out, _, err := testutil.RunErr(t, "cmp", m.Disk, ref); err != nil {
		t.Errorf("MNT/disk differs from qemu-img convert -O raw: %s %v", out, err)
	}
	disk, err := os.ReadFile(ref)
	if err != nil {
		t.Fatal(err)
	}
	for name, w := range want {
		got, err := os.ReadFile(filepath.Join(mnt, name))
		if err != nil {
			t.Errorf("MNT/%s: %v", name, err)
			continue
		}
		if string(got) == w {
			continue
		}
		if name != "allocation" && name != "allocation.json" {
			t.Errorf("MNT/%s differs from nbdinfo against qemu-nbd:\n--- MNT/%s\n%s\n--- nbdinfo\n%s", name, name, got, w)
			continue
		}
		// design.md: where qemu reports "zero" inside an allocated
		// cluster (a hole in the host file), cbtfs may report "data".
		ge, we := parseNbdinfoMap(t, string(got)), parseNbdinfoMap(t, w)
		if gn, wn := extentsEnd(ge), extentsEnd(we); gn != wn || gn != int64(len(disk)) {
			t.Errorf("MNT/%s covers %d bytes, qemu's listing %d; want the disk's %d", name, gn, wn, len(disk))
		}
		for _, d := range typeDiffs(ge, we) {
			if d.got != 0 || d.want != 2 {
				t.Errorf("MNT/%s: %v has type %d where qemu says %d; the only difference allowed is 0 (data) where qemu says 2 (zero)\n--- MNT/%s\n%s--- nbdinfo\n%s", name, d.span, d.got, d.want, name, got, w)
				break
			}
			if slices.ContainsFunc(disk[d.Off:d.Off+d.Len], func(c byte) bool { return c != 0 }) {
				t.Errorf("MNT/disk: %v, which qemu reports as zero, does not read as zeros", d.span)
			}
		}
	}
	m.Unmount(t)
}

// TestWriteCleanClose checks what a clean end of a read-write mount
// leaves: bitmaps made and dirtied by qemu (qemu-img bitmap --add, of
// several granularities, one disabled, then qemu-io writes) read back
// through the mount exactly as qemu-nbd shows them; during the mount
// qemu-img info -U shows every bitmap in use; after fusermount3 -u, and
// after SIGTERM and SIGINT, no bitmap is in use, the bitmaps hold what
// they held plus, for the enabled ones, the mount's writes, their flags
// and granularities are unchanged, and qemu-img check is clean.
func TestWriteCleanClose(t *testing.T) {
	testutil.RequireFUSE(t)
	testutil.RequireTool(t, "nbdinfo")
	dir := t.TempDir()
	b := &builder{t: t, dir: filepath.Join(dir, "img")}
	img := b.qcow2("a.qcow2", "8M")
	b.io(img, "write -P 0x31 0 1M")
	testutil.Img(t, "bitmap", "--add", img, "q-default")
	testutil.Img(t, "bitmap", "--add", "-g", "512", img, "q-512")
	testutil.Img(t, "bitmap", "--add", "-g", "2M", img, "q-2M")
	testutil.Img(t, "bitmap", "--add", "--disable", "-g", "128k", img, "q-off")
	b.io(img, "write -P 0x32 100001 7777", "write -z 3M 100000", "discard 5M 1M")
	testutil.Img(t, "bitmap", "--disable", img, "q-2M")
	testutil.Img(t, "bitmap", "--enable", img, "q-2M")
	testutil.Img(t, "bitmap", "--add", "--disable", img, "q-off2")
	b.io(img, "write -P 0x33 6M 1")
	wRequireClean(t, img)

	for _, end := range []string{"fusermount3", "SIGTERM", "SIGINT", "fusermount3-no-writes"} {
		t.Run(end, func(t *testing.T) {
			info := wImgInfo(t, img)
			bitmaps := info.FormatSpecific.Data.Bitmaps
			names := wNames(bitmaps)
			maps := wBitmapMaps(t, img, names)
			mnt := filepath.Join(dir, "mnt")
			if err := os.MkdirAll(mnt, 0o755); err != nil {
				t.Fatal(err)
			}
			m := testutil.MountRW(t, cbtfs, img, mnt, testutil.MountOptions{})
			for _, name := range names {
				got, err := os.ReadFile(filepath.Join(mnt, "bitmaps", name, "extents"))
				if err != nil || string(got) != maps[name] {
					t.Errorf("MNT/bitmaps/%s/extents (%v):\n%s\nwant (nbdinfo against qemu-nbd):\n%s", name, err, got, maps[name])
				}
			}
			for _, bm := range wImgInfo(t, img).FormatSpecific.Data.Bitmaps {
				if !bm.inUse() {
					t.Errorf("qemu-img info -U during a read-write mount: %+v, want in-use", bm)
				}
			}
			var ops []wOp
			if end != "fusermount3-no-writes" {
				f, err := os.OpenFile(m.Disk, os.O_RDWR, 0)
				if err != nil {
					t.Fatal(err)
				}
				ops = []wOp{
					{kind: wWrite, off: 2<<20 + 1, n: 3, data: []byte("abc")},
					{kind: wZero, off: 4 << 20, n: 65536},
					{kind: wPunch, off: 7<<20 - 5, n: 10},
				}
				for _, o := range ops {
					if err := o.do(f); err != nil {
						t.Error(err)
					}
				}
				f.Close()
			}
			switch end {
			case "SIGTERM", "SIGINT":
				sig := syscall.SIGTERM
				if end == "SIGINT" {
					sig = syscall.SIGINT
				}
				if err := m.Signal(sig); err != nil {
					t.Fatal(err)
				}
				m.RequireExit(t, 0)
				testutil.RequireNoMount(t, mnt)
			default:
				m.Unmount(t)
			}
			wRequireClean(t, img)
			after := wImgInfo(t, img).FormatSpecific.Data.Bitmaps
			if len(after) != len(bitmaps) {
				t.Fatalf("bitmaps after the mount: %+v, want %+v", after, bitmaps)
			}
			got := wBitmapMaps(t, img, names)
			for i, bm := range bitmaps {
				a := after[i]
				if a.Name != bm.Name || a.Granularity != bm.Granularity || a.enabled() != bm.enabled() || a.inUse() {
					t.Errorf("bitmap after the mount: %+v, want %+v without in-use", a, bm)
				}
				want := wGranules(t, bm.Name, maps[bm.Name], info.VirtualSize, bm.Granularity)
				if bm.enabled() {
					wMark(want, ops, bm.Granularity)
				}
				if g := wGranules(t, bm.Name, got[bm.Name], info.VirtualSize, bm.Granularity); !slices.Equal(g, want) {
					t.Errorf("bitmap %s after the mount: %s", bm.Name, wGranuleDiff(g, want, bm.Granularity, info.VirtualSize))
				}
			}
		})
	}
}
