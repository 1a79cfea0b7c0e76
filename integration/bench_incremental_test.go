package integration

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/cbtfs/cbtfs/internal/testutil"
)

// incDisk returns a shared 4 GiB image whose every cluster holds data,
// with bitmap b0 and 1% of its clusters, scattered, rewritten after b0
// was added; and the dirty bytes.
func incDisk(b *testing.B) (string, int64) {
	b.Helper()
	const size = int64(4) << 30
	n := size / clusterBytes / 100
	full := fullImage(b, size)
	img := sharedImage(b, "inc-4g.qcow2", func(p string) {
		testutil.CopyFile(b, full, p)
		testutil.Img(b, "bitmap", "--add", p, "b0")
		writeClusters(b, p, scatterClusters(n, size/clusterBytes, 8), clusterBytes, 0xee)
	})
	return img, n * clusterBytes
}

// BenchmarkIncremental copies the incremental backup of a 4 GiB disk
// (every cluster data) with 1% scattered dirty 64 KiB clusters: `cp
// MNT/bitmaps/b0/incremental.qcow2 OUT` from a read-only cbtfs mount,
// against
//
//   - copy.sh: the loop of the talk, with `qemu-nbd -r -B b0`: `qemu-img
//     create -f qcow2 -b NBD-URI -F raw inc.qcow2`, then for each dirty
//     extent of `nbdinfo --map=qemu:dirty-bitmap:b0 --json NBD-URI`, `qemu-io
//     -C -c "r OFF LEN" -f qcow2 inc.qcow2` (copy-on-read pulls the extent
//     into inc.qcow2); the whole loop is timed; target: faster (ratio at
//     most 1.0);
//   - nbdcopy: a full copy, `nbdcopy NBD-URI OUT.raw` from `qemu-nbd -r`;
//     the incremental should cost in proportion to the dirty bytes (1%);
//     target: at least 10x faster (ratio at most 0.1).
//
// Cold: fresh mounts and servers, caches dropped before each copy.
func BenchmarkIncremental(b *testing.B) {
	cbtfs := benchPrepare(b, "incremental", "qemu-img", "qemu-io", "qemu-nbd", "nbdinfo", "nbdcopy", "cp")
	img, dirty := incDisk(b)
	mnt := benchMountDir(b)

	copyInc := func(b *testing.B, dir string, round int) float64 {
		out := filepath.Join(dir, "cbtfs-inc.qcow2")
		m := mountCbtfs(b, cbtfs, img, mnt, true)
		defer m.unmount(b)
		dropCaches(b)
		d := benchExec(b, nil, "cp", filepath.Join(mnt, "bitmaps/b0/incremental.qcow2"), out)
		if round == 0 {
			// The copy is a valid qcow2 image holding the dirty data.
			if r, code := testutil.Check(b, out); code != 0 || r.AllocatedClusters*clusterBytes < dirty {
				b.Fatalf("incremental.qcow2: qemu-img check exit %d, %+v; want at least %d bytes allocated", code, r, dirty)
			}
		}
		os.Remove(out)
		return d.Seconds()
	}
	b.Run("copy.sh", func(b *testing.B) {
		dir := benchDir(b)
		c, p := benchRounds(b, benchRoundsHeavy, func(r int) float64 { return copyInc(b, dir, r) }, func(round int) float64 {
			q := serveQemu(b, img, "-r", "-B", "b0")
			defer q.stop(b)
			inc := filepath.Join(dir, "inc.qcow2")
			dropCaches(b)
			d := timed(func() { copySh(b, q.uri, inc) })
			if round == 0 {
				if r, code := testutil.Check(b, inc); code != 0 || r.AllocatedClusters*clusterBytes < dirty {
					b.Fatalf("copy.sh inc.qcow2: qemu-img check exit %d, %+v; want at least %d bytes allocated", code, r, dirty)
				}
			}
			os.Remove(inc)
			return d.Seconds()
		})
		benchResult{name: "incremental/copy.sh", unit: unitSeconds, cbtfs: c, peer: p, target: 1}.report(b)
	})
	b.Run("nbdcopy", func(b *testing.B) {
		dir := benchDir(b)
		c, p := benchRounds(b, benchRoundsHeavy, func(r int) float64 { return copyInc(b, dir, r) }, func(int) float64 {
			q := serveQemu(b, img, "-r")
			defer q.stop(b)
			out := filepath.Join(dir, "full.raw")
			dropCaches(b)
			d := benchExec(b, nil, "nbdcopy", q.uri, out)
			os.Remove(out)
			return d.Seconds()
		})
		benchResult{name: "incremental/nbdcopy", unit: unitSeconds, cbtfs: c, peer: p, target: 0.1}.report(b)
	})
}

// copySh is the talk's copy.sh: an overlay over the NBD export, then one
// copy-on-read qemu-io per dirty extent.
func copySh(b *testing.B, uri, inc string) {
	b.Helper()
	benchExec(b, nil, "qemu-img", "create", "-q", "-f", "qcow2", "-b", uri, "-F", "raw", inc)
	var out bytes.Buffer
	benchExec(b, &out, "nbdinfo", "--map=qemu:dirty-bitmap:b0", "--json", uri)
	var extents []struct {
		Offset int64 `json:"offset"`
		Length int64 `json:"length"`
		Type   int   `json:"type"`
	}
	if err := json.Unmarshal(out.Bytes(), &extents); err != nil {
		b.Fatalf("nbdinfo --json: %v\n%.300s", err, out.String())
	}
	for _, e := range extents {
		if e.Type&1 == 0 {
			continue
		}
		benchExec(b, nil, "qemu-io", "-C", "-c", fmt.Sprintf("r %d %d", e.Offset, e.Length), "-f", "qcow2", inc)
	}
}
