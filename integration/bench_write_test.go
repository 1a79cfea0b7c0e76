package integration

import (
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/cbtfs/cbtfs/internal/testutil"
)

// Benchmarks of writes through MNT/disk of a read-write mount (issue 4),
// against qemu-nbd (read-write) + nbdfuse on the same kind of image: a
// fresh qcow2 image with an enabled persistent bitmap b0, so that both
// mark the bitmap as they write. Each round writes into fresh images.

const (
	// writeDisk is the virtual size of the images written.
	writeDisk = int64(2) << 30
	// seqBytes is how much the sequential benchmark writes.
	seqBytes = int64(1) << 30
	// randOps is how many 4 KiB writes the random benchmark makes.
	randOps = 10000
)

// freshImage creates, in dir, a new empty qcow2 image of writeDisk bytes
// with the enabled bitmap b0, and returns its path.
func freshImage(b *testing.B, dir, name string) string {
	b.Helper()
	p := filepath.Join(dir, name)
	os.Remove(p)
	testutil.Create(b, p, strconv.FormatInt(writeDisk, 10))
	testutil.Img(b, "bitmap", "--add", p, "b0")
	return p
}

// benchWrites runs write(file) against MNT/disk of a read-write cbtfs
// mount and against MNT/nbd of nbdfuse over a read-write qemu-nbd, each
// round on fresh images, and returns the figures write returned. After
// the first round both images must pass qemu-img check.
func benchWrites(b *testing.B, name string, write func(file string) float64) (c, p []float64) {
	b.Helper()
	cbtfs := benchPrepare(b, name, "qemu-img", "qemu-nbd", "nbdfuse", "dd")
	dir := benchDir(b)
	mnt := benchMountDir(b)
	check := func(round int, img string) {
		if round == 0 {
			if r, code := testutil.Check(b, img); code != 0 {
				b.Fatalf("qemu-img check %s after the writes: exit %d, %+v", img, code, r)
			}
		}
		os.Remove(img)
	}
	return benchRounds(b, benchRoundsHeavy, func(round int) float64 {
		img := freshImage(b, dir, "c.qcow2")
		m := mountCbtfs(b, cbtfs, img, mnt, false)
		v := write(m.disk())
		m.unmount(b)
		check(round, img)
		return v
	}, func(round int) float64 {
		img := freshImage(b, dir, "q.qcow2")
		q := serveQemu(b, img)
		m := mountNbdfuse(b, mnt, q.socket, false)
		v := write(m.file())
		m.unmount(b)
		q.stop(b)
		check(round, img)
		return v
	})
}

// BenchmarkWriteSeq writes 1 GiB sequentially with `dd bs=1M
// oflag=direct conv=notrunc,fsync` (the source file is in the page cache)
// through a cbtfs read-write mount and through qemu-nbd + nbdfuse, fresh
// images with an enabled bitmap. Target: at least 1.0x qemu's throughput.
func BenchmarkWriteSeq(b *testing.B) {
	const name = "write-seq"
	benchPrepare(b, name, "dd")
	src := sharedImage(b, "pattern-1g.bin", func(p string) { writePatternFile(b, p, seqBytes, 6) })
	warmFile(b, src)
	c, p := benchWrites(b, name, func(file string) float64 {
		d := dd(b, seqBytes, "if="+src, "of="+file, "bs=1M", "count="+strconv.FormatInt(seqBytes>>20, 10),
			"oflag=direct", "conv=notrunc,fsync")
		return mbps(seqBytes, d)
	})
	benchResult{name: name, unit: unitMBps, cbtfs: c, peer: p, atLeast: true, target: 1}.report(b)
}

// BenchmarkWriteRand makes 10,000 random 4 KiB-aligned 4 KiB writes (the
// same offsets on both sides), one at a time with O_DIRECT pwrite, then
// fsync, through a cbtfs read-write mount and through qemu-nbd + nbdfuse,
// fresh images with an enabled bitmap. Target: at least 1.0x qemu's IOPS.
func BenchmarkWriteRand(b *testing.B) {
	const name = "write-rand"
	c, p := benchWrites(b, name, func(file string) float64 {
		return randWrites(b, file, randOps, 7)
	})
	benchResult{name: name, unit: unitIOPS, cbtfs: c, peer: p, atLeast: true, target: 1}.report(b)
}

// randWrites makes ops 4 KiB O_DIRECT writes at random 4 KiB-aligned
// offsets of file (chosen by seed), then fsyncs it, and returns the
// writes per second, the fsync included.
func randWrites(b *testing.B, file string, ops int, seed uint64) float64 {
	b.Helper()
	const bs = 4096
	r := rand.New(rand.NewPCG(seed, 0x77726974))
	offs := make([]int64, ops)
	for i := range offs {
		offs[i] = r.Int64N(writeDisk/bs) * bs
	}
	// O_DIRECT needs an aligned buffer: a page of its own.
	buf, err := unix.Mmap(-1, 0, bs, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
	if err != nil {
		b.Fatal(err)
	}
	defer unix.Munmap(buf)
	for i := range buf {
		buf[i] = byte(i*7 + 1)
	}
	fd, err := unix.Open(file, unix.O_RDWR|unix.O_DIRECT, 0)
	if err != nil {
		b.Fatalf("open %s O_DIRECT: %v", file, err)
	}
	defer unix.Close(fd)
	start := time.Now()
	for i, off := range offs {
		buf[0] = byte(i)
		if n, err := unix.Pwrite(fd, buf, off); err != nil || n != bs {
			b.Fatalf("pwrite %s at %d: %d, %v", file, off, n, err)
		}
	}
	if err := unix.Fsync(fd); err != nil {
		b.Fatalf("fsync %s: %v", file, err)
	}
	return float64(ops) / time.Since(start).Seconds()
}
