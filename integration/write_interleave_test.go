package integration

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"

	"github.com/cbtfs/cbtfs/internal/testutil"
)

// TestWriteInterleaved runs parallel writers whose ranges are disjoint
// but share clusters, L2 tables and refcount blocks: writer g of n owns
// the stripes [k*stripe, (k+1)*stripe) with k%n == g. Over a backing
// file every first write to a cluster copies the rest of it from the
// backing file, so two writers allocating the same cluster at once must
// not copy over each other's data.
func TestWriteInterleaved(t *testing.T) {
	testutil.RequireFUSE(t)
	testutil.RequireTool(t, "nbdinfo")
	t.Parallel()
	kinds := []struct {
		name, opts string
		stripe     int64
	}{
		{"c64k-stripe1000", "cluster_size=64k", 1000},
		{"c4k-stripe700", "cluster_size=4k", 700},
		{"extl2-c64k-stripe3000", "extended_l2=on", 3000},
		{"c512-refcount64-stripe300", "cluster_size=512,refcount_bits=64", 300},
		{"c2M-stripe100000", "cluster_size=2M", 100000},
	}
	wRunPool(t, wWorkers, len(kinds), func(i int) (string, func(t *testing.T)) {
		k := kinds[i]
		return k.name, func(t *testing.T) {
			dir := t.TempDir()
			b := &builder{t: t, dir: filepath.Join(dir, "img")}
			base := b.qcow2("base.qcow2", "8M")
			b.io(base, "write -P 0x44 0 8M")
			img := b.overlay("a.qcow2", "base.qcow2", "qcow2", "", "-o", k.opts)
			wAddAll(t, img)
			ref := filepath.Join(dir, "model.raw")
			testutil.ConvertRaw(t, img, ref)
			model, err := os.ReadFile(ref)
			if err != nil {
				t.Fatal(err)
			}
			size := int64(len(model))
			mnt := mkdir(t, dir, "mnt")
			m := testutil.MountRW(t, cbtfs, img, mnt, testutil.MountOptions{})
			const writers = 4
			nStripes := size / k.stripe
			ops := make([][]wOp, writers)
			for g := range writers {
				rng := rand.New(rand.NewPCG(uint64(i), uint64(g)))
				for range 150 {
					s := int64(rng.IntN(int(nStripes/writers)))*writers + int64(g)
					off := s * k.stripe
					n := min(k.stripe, size-off)
					o := wOp{kind: wWrite, off: off, n: n, data: wRandom(rng, int(n))}
					if rng.IntN(5) == 0 {
						o = wOp{kind: wZero, off: off, n: n}
					}
					ops[g] = append(ops[g], o)
				}
			}
			errs := make([]error, writers)
			var wg sync.WaitGroup
			for g := range writers {
				wg.Go(func() {
					f, err := os.OpenFile(m.Disk, os.O_RDWR, 0)
					if err != nil {
						errs[g] = err
						return
					}
					defer f.Close()
					for _, o := range ops[g] {
						if err := o.do(f); err != nil {
							errs[g] = fmt.Errorf("writer %d: %w", g, err)
							return
						}
					}
				})
			}
			wg.Wait()
			for _, err := range errs {
				if err != nil {
					t.Fatal(err)
				}
			}
			var all []wOp
			for _, z := range ops {
				for _, o := range z {
					o.apply(model)
					all = append(all, wOp{kind: o.kind, off: o.off, n: o.n})
				}
			}
			if got, err := os.ReadFile(m.Disk); err != nil {
				t.Fatal(err)
			} else if !bytes.Equal(got, model) {
				t.Errorf("MNT/disk after interleaved writers differs from the model at %d", firstDiff(got, model))
			}
			m.Unmount(t)
			wRequireClean(t, img)
			if err := os.WriteFile(ref, model, 0o644); err != nil {
				t.Fatal(err)
			}
			if !testutil.Compare(t, img, ref, "-f", "qcow2", "-F", "raw") {
				t.Errorf("qemu-img compare: the image differs from the model")
			}
			bms := wImgInfo(t, img).FormatSpecific.Data.Bitmaps
			maps := wBitmapMaps(t, img, wNames(bms))
			for _, bm := range bms {
				want := make([]bool, (size+bm.Granularity-1)/bm.Granularity)
				if bm.enabled() {
					wMark(want, all, bm.Granularity)
				}
				got := wGranules(t, bm.Name, maps[bm.Name], size, bm.Granularity)
				if !slices.Equal(got, want) {
					t.Errorf("bitmap %s: %s", bm.Name, wGranuleDiff(got, want, bm.Granularity, size))
				}
			}
		}
	})
}
