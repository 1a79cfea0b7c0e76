package integration

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"

	"github.com/cbtfs/cbtfs/internal/testutil"
)

// Benchmarks of the generated views (issue 3): listings and the dirty
// view, against nbdinfo and cp.

const (
	tib          = int64(1) << 40
	clusterBytes = 64 << 10
	// scatterCount is how many clusters the 1 TiB images have dirty or
	// allocated, per layer.
	scatterCount = 10000
	// sparseSize is the size of the disk of BenchmarkSparseCopy.
	sparseSize = int64(16) << 30
)

// dirtyTiB returns a shared 1 TiB image with bitmap b0 (64 KiB
// granularity) and scatterCount scattered clusters written (4 KiB at each
// cluster's start) after b0 was added: scatterCount dirty clusters.
func dirtyTiB(b *testing.B) string {
	b.Helper()
	return sharedImage(b, "dirty-1t.qcow2", func(p string) {
		testutil.Create(b, p, "1T")
		testutil.Img(b, "bitmap", "--add", p, "b0")
		writeClusters(b, p, scatterClusters(scatterCount, tib/clusterBytes, 1), 4096, 0x5a)
	})
}

// chainTiB returns a shared two-layer 1 TiB chain, top first, with
// scatterCount scattered clusters allocated in each layer.
func chainTiB(b *testing.B) []string {
	b.Helper()
	base := sharedImage(b, "chain-base-1t.qcow2", func(p string) {
		testutil.Create(b, p, "1T")
		writeClusters(b, p, scatterClusters(scatterCount, tib/clusterBytes, 2), 4096, 0x11)
	})
	top := sharedImage(b, "chain-top-1t.qcow2", func(p string) {
		testutil.Create(b, p, "", "-b", filepath.Base(base), "-F", "qcow2")
		writeClusters(b, p, scatterClusters(scatterCount, tib/clusterBytes, 3), 4096, 0x22)
	})
	return []string{top, base}
}

// benchListing compares `cat MNT/FILE` with `nbdinfo --map=CONTEXT`
// against `qemu-nbd -r ARGS...`, both on fresh mounts and servers, warm
// (the images are read once first), timing only cat and nbdinfo. Their
// outputs must be the same.
func benchListing(b *testing.B, name, cbtfs string, layers []string, file, context string, qemuArgs ...string) {
	for _, l := range layers {
		warmFile(b, l)
	}
	mnt := benchMountDir(b)
	var cout, pout bytes.Buffer
	c, p := benchRounds(b, benchRoundsLight, func(int) float64 {
		m := mountCbtfs(b, cbtfs, layers[0], mnt, true)
		defer m.unmount(b)
		cout.Reset()
		return benchExec(b, &cout, "cat", filepath.Join(mnt, file)).Seconds()
	}, func(int) float64 {
		q := serveQemu(b, layers[0], append([]string{"-r"}, qemuArgs...)...)
		defer q.stop(b)
		pout.Reset()
		return benchExec(b, &pout, "nbdinfo", "--map="+context, q.uri).Seconds()
	})
	sameOutput(b, name, cout.Bytes(), pout.Bytes())
	benchResult{name: name, unit: unitSeconds, cbtfs: c, peer: p, target: 0.5}.report(b)
}

// BenchmarkExtents: `cat MNT/bitmaps/b0/extents` on a 1 TiB image with
// 10,000 scattered dirty 64 KiB clusters, against `nbdinfo
// --map=qemu:dirty-bitmap:b0` with `qemu-nbd -r -B b0`. Warm; each round a
// fresh mount (generated files are cached per image version) and a fresh
// server; only cat and nbdinfo are timed. Target: at most half of
// nbdinfo's time.
func BenchmarkExtents(b *testing.B) {
	const name = "extents"
	cbtfs := benchPrepare(b, name, "qemu-img", "qemu-io", "qemu-nbd", "nbdinfo")
	benchListing(b, name, cbtfs, []string{dirtyTiB(b)}, "bitmaps/b0/extents", "qemu:dirty-bitmap:b0", "-B", "b0")
}

// BenchmarkDepth: `cat MNT/depth` on a 1 TiB two-layer chain with 10,000
// scattered allocated clusters in each layer, against `nbdinfo
// --map=qemu:allocation-depth` with `qemu-nbd -r -A`. Warm, fresh mount
// and server each round, as BenchmarkExtents. Target: at most half of
// nbdinfo's time.
func BenchmarkDepth(b *testing.B) {
	const name = "depth"
	cbtfs := benchPrepare(b, name, "qemu-img", "qemu-io", "qemu-nbd", "nbdinfo")
	benchListing(b, name, cbtfs, chainTiB(b), "depth", "qemu:allocation-depth", "-A")
}

// sparseDisk returns a shared 16 GiB image, every cluster allocated
// (preallocation=falloc: reads of the untouched clusters cost no disk
// I/O, which makes a full copy as cheap as it can be), with bitmap b0 and
// 1% of its clusters, scattered, rewritten with data after b0 was added.
// It also returns the dirty bytes.
func sparseDisk(b *testing.B) (string, int64) {
	b.Helper()
	n := sparseSize / clusterBytes / 100
	img := sharedImage(b, "sparse-16g.qcow2", func(p string) {
		testutil.Create(b, p, strconv.FormatInt(sparseSize, 10), "-o", "preallocation=falloc")
		testutil.Img(b, "bitmap", "--add", p, "b0")
		writeClusters(b, p, scatterClusters(n, sparseSize/clusterBytes, 4), clusterBytes, 0x6b)
	})
	return img, n * clusterBytes
}

// allocatedBytes returns the bytes the file at path has allocated.
func allocatedBytes(b *testing.B, path string) int64 {
	b.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		b.Fatal(err)
	}
	return fi.Sys().(*syscall.Stat_t).Blocks * 512
}

// BenchmarkSparseCopy: `cp --sparse=always MNT/bitmaps/b0/dirty OUT` on a
// 16 GiB disk with 1% scattered dirty 64 KiB clusters (160 MiB), against
// (plain-cp) `cp` of a plain file of the same 160 MiB on the same file
// system — target: at most 3x its time — and against (full-disk) reading
// the whole disk, `dd if=MNT/disk bs=1M of=/dev/null` — target: at least
// 20x faster (ratio at most 0.05); reading alone is less than a full copy
// costs, and the untouched clusters are preallocated, so this errs
// against cbtfs. Cold: caches dropped before each copy, fresh mounts.
func BenchmarkSparseCopy(b *testing.B) {
	cbtfs := benchPrepare(b, "sparse-copy", "qemu-img", "qemu-io", "cp", "dd")
	img, dirty := sparseDisk(b)
	plain := sharedImage(b, fmt.Sprintf("plain-%d.bin", dirty), func(p string) { writePatternFile(b, p, dirty, 5) })
	dir := benchDir(b)
	mnt := benchMountDir(b)
	out := filepath.Join(dir, "out")

	// copyDirty is cbtfs's side, the same in both comparisons.
	copyDirty := func(b *testing.B, round int) float64 {
		m := mountCbtfs(b, cbtfs, img, mnt, true)
		defer m.unmount(b)
		dropCaches(b)
		d := benchExec(b, nil, "cp", "--sparse=always", filepath.Join(mnt, "bitmaps/b0/dirty"), out)
		if round == 0 {
			if got := allocatedBytes(b, out); got > 2*dirty {
				b.Fatalf("cp --sparse=always of dirty: %d bytes allocated, want about %d", got, dirty)
			}
		}
		os.Remove(out)
		return d.Seconds()
	}
	b.Run("plain-cp", func(b *testing.B) {
		c, p := benchRounds(b, benchRoundsLight, func(r int) float64 { return copyDirty(b, r) }, func(int) float64 {
			dropCaches(b)
			d := benchExec(b, nil, "cp", plain, out)
			os.Remove(out)
			return d.Seconds()
		})
		benchResult{name: "sparse-copy/plain-cp", unit: unitSeconds, cbtfs: c, peer: p, target: 3}.report(b)
	})
	b.Run("full-disk", func(b *testing.B) {
		c, p := benchRounds(b, benchRoundsHeavy, func(r int) float64 { return copyDirty(b, r) }, func(int) float64 {
			m := mountCbtfs(b, cbtfs, img, mnt, true)
			defer m.unmount(b)
			dropCaches(b)
			return dd(b, sparseSize, "if="+m.disk(), "of=/dev/null", "bs=1M").Seconds()
		})
		benchResult{name: "sparse-copy/full-disk", unit: unitSeconds, cbtfs: c, peer: p, target: 0.05}.report(b)
	})
}
