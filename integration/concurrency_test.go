package integration

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"testing"

	"github.com/cbtfs/cbtfs/internal/testutil"
)

// TestParallelReads reads MNT/disk from 8 goroutines at once, each with its
// own file opened O_DIRECT (so that the reads reach cbtfs rather than the
// page cache), at random offsets and lengths, while 2 dd processes read it
// too; every byte must equal `qemu-img convert -O raw`. The chain mixes a
// zstd-compressed base, an extended-L2 middle layer and a top with zero
// clusters, so that parallel reads cross every path of the engine. A
// cbtfs built with -race exits non-zero on a data race, which the mount's
// cleanup reports.
func TestParallelReads(t *testing.T) {
	testutil.RequireFUSE(t)
	dir := t.TempDir()
	b := &builder{t: t, dir: filepath.Join(dir, "img")}
	src := b.raw("src.raw", 16<<20, mixed(48<<10, 4))
	b.convert(src, "base.qcow2", "-f", "raw", "-c", "-o", "compression_type=zstd")
	mid := b.overlay("mid.qcow2", "base.qcow2", "qcow2", "", "-o", "extended_l2=on")
	rng := rand.New(rand.NewPCG(5, 6))
	var cmds []string
	for i := range 40 {
		off, n := rng.Int64N(16<<20-70000), 1+rng.Int64N(70000)
		cmds = append(cmds, fmt.Sprintf("write -P %d %d %d", 0x90+i%16, off, n))
	}
	b.io(mid, cmds...)
	img := b.overlay("top.qcow2", "mid.qcow2", "qcow2", "", "-o", "cluster_size=4k")
	b.io(img, "write -z 1M 1M", "write -z -u 5M 64k", "write -P 0xa5 7000001 300000", "discard 9M 2M")
	ref := filepath.Join(dir, "ref.raw")
	testutil.ConvertRaw(t, img, ref)
	want, err := os.ReadFile(ref)
	if err != nil {
		t.Fatal(err)
	}
	mnt := mkdir(t, dir, "mnt")
	m := testutil.Mount(t, cbtfs, img, mnt)

	// Two dd processes read the whole disk with direct I/O meanwhile.
	var dds []*testutil.Proc
	for i := range 2 {
		out := filepath.Join(dir, "dd"+strconv.Itoa(i))
		dds = append(dds, testutil.Start(t, "", "dd", "if="+m.Disk, "of="+out, "bs="+strconv.Itoa(64<<10+i*4096), "iflag=direct", "status=none"))
	}

	const readers, reads = 8, 200
	var wg sync.WaitGroup
	errs := make(chan error, readers)
	for r := range readers {
		wg.Go(func() {
			f, err := os.OpenFile(m.Disk, os.O_RDONLY|syscall.O_DIRECT, 0)
			if err != nil {
				errs <- err
				return
			}
			defer f.Close()
			rng := rand.New(rand.NewPCG(uint64(r), 99))
			buf := make([]byte, 512<<10)
			for i := range reads {
				off := rng.Int64N(int64(len(want)))
				n := 1 + rng.IntN(len(buf))
				if i%4 == 0 { // some aligned, cluster-sized reads
					off &^= 64<<10 - 1
					n = 64 << 10
				}
				got := buf[:min(n, len(want)-int(off))]
				if _, err := f.ReadAt(got, off); err != nil {
					errs <- fmt.Errorf("reader %d: read %d bytes at %d: %v", r, len(got), off, err)
					return
				}
				if w := want[off : off+int64(len(got))]; !bytes.Equal(got, w) {
					errs <- fmt.Errorf("reader %d: %d bytes at %d differ from qemu-img convert -O raw (first difference at %d)", r, len(got), off, off+int64(firstDiff(got, w)))
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	for i, p := range dds {
		if _, ok := p.Wait(testutil.CommandTimeout); !ok {
			t.Fatalf("dd %d did not finish", i)
		}
		if err := p.Err(); err != nil {
			t.Errorf("dd %d: %v; stderr: %s", i, err, p.Stderr())
			continue
		}
		if out, _, err := testutil.RunErr(t, "cmp", filepath.Join(dir, "dd"+strconv.Itoa(i)), ref); err != nil {
			t.Errorf("dd %d read a disk that differs from qemu-img convert -O raw: %s %v", i, out, err)
		}
	}
	m.Unmount(t)
}

// firstDiff returns the index of the first byte where a and b differ.
func firstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}
