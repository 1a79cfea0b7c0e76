package integration

import (
	"bytes"
	"path/filepath"
	"regexp"
	"strconv"
	"testing"

	"github.com/cbtfs/cbtfs/internal/testutil"
)

// Benchmarks of the NBD server (issue 6): `cbtfs serve` against qemu-nbd
// on the same image, driven by nbdcopy and qemu-img bench.

// BenchmarkNBDCopy copies a 4 GiB image whose every cluster holds data to
// null: with `nbdcopy nbd+unix:///?socket=S null:` (its defaults: four
// connections when the server allows multi-conn, many requests in
// flight), from `cbtfs serve --read-only` and from `qemu-nbd -r -e 8`
// (enough connections for nbdcopy). Warm: the image is in the page cache
// (cold, both servers just wait for the same disk), a fresh server each
// round. Target: at least 1.0x qemu-nbd's throughput.
func BenchmarkNBDCopy(b *testing.B) {
	const name = "nbd-copy"
	cbtfs := benchPrepare(b, name, "qemu-img", "qemu-io", "qemu-nbd", "nbdcopy")
	const size = 4 << 30
	img := fullImage(b, size)
	warmFile(b, img)
	nbdcopy := func(s *benchServer) float64 {
		defer s.stop(b)
		return mbps(size, benchExec(b, nil, "nbdcopy", s.uri, "null:"))
	}
	c, p := benchRounds(b, benchRoundsHeavy, func(int) float64 {
		return nbdcopy(serveCbtfs(b, cbtfs, img, true))
	}, func(int) float64 {
		return nbdcopy(serveQemu(b, img, "-r", "-e", "8"))
	})
	benchResult{name: name, unit: unitMBps, cbtfs: c, peer: p, atLeast: true, target: 1}.report(b)
}

const (
	// benchOps is the number of requests of each qemu-img bench run.
	benchOps = 200000
	// benchStep is qemu-img bench's step between requests: an odd number
	// of 4 KiB blocks, so that the offsets (taken modulo the image size)
	// visit the blocks of the image in a scattered order.
	benchStep = 4096 * 104729
)

// benchCompleted matches qemu-img bench's closing line.
var benchCompleted = regexp.MustCompile(`Run completed in ([0-9.]+) seconds`)

// qemuImgBench runs `qemu-img bench -f raw -t none -c benchOps -s 4096
// -S benchStep [-w] URI` (queue depth: its default, 64) and returns the
// requests per second, from the run time qemu-img reports.
func qemuImgBench(b *testing.B, uri string, write bool) float64 {
	b.Helper()
	args := []string{"bench", "-f", "raw", "-t", "none", "-c", strconv.Itoa(benchOps), "-s", "4096", "-S", strconv.Itoa(benchStep)}
	if write {
		args = append(args, "-w")
	}
	var out bytes.Buffer
	benchExec(b, &out, "qemu-img", append(args, uri)...)
	m := benchCompleted.FindSubmatch(out.Bytes())
	if m == nil {
		b.Fatalf("qemu-img bench: no run time in %q", out.String())
	}
	s, err := strconv.ParseFloat(string(m[1]), 64)
	if err != nil || s <= 0 {
		b.Fatalf("qemu-img bench: run time %q", m[1])
	}
	return benchOps / s
}

// BenchmarkNBDBench runs qemu-img bench, scattered 4 KiB requests at queue
// depth 64, against `cbtfs serve` and qemu-nbd serving a 1 GiB image whose
// every cluster holds data. read: read-only servers, warm (the image is
// in the page cache). write (-w): read-write servers on fresh copies of
// the image with an enabled bitmap b0; the writes overwrite allocated
// clusters. Targets: at least 1.0x qemu-nbd's IOPS.
func BenchmarkNBDBench(b *testing.B) {
	cbtfs := benchPrepare(b, "nbd-bench", "qemu-img", "qemu-io", "qemu-nbd")
	const size = 1 << 30
	img := fullImage(b, size)
	b.Run("read", func(b *testing.B) {
		warmFile(b, img)
		c, p := benchRounds(b, benchRoundsLight, func(int) float64 {
			s := serveCbtfs(b, cbtfs, img, true)
			defer s.stop(b)
			return qemuImgBench(b, s.uri, false)
		}, func(int) float64 {
			s := serveQemu(b, img, "-r")
			defer s.stop(b)
			return qemuImgBench(b, s.uri, false)
		})
		benchResult{name: "nbd-bench/read", unit: unitIOPS, cbtfs: c, peer: p, atLeast: true, target: 1}.report(b)
	})
	b.Run("write", func(b *testing.B) {
		dir := benchDir(b)
		fresh := func(name string) string {
			p := filepath.Join(dir, name)
			testutil.CopyFile(b, img, p)
			testutil.Img(b, "bitmap", "--add", p, "b0")
			return p
		}
		c, p := benchRounds(b, benchRoundsLight, func(int) float64 {
			s := serveCbtfs(b, cbtfs, fresh("c.qcow2"), false)
			defer s.stop(b)
			return qemuImgBench(b, s.uri, true)
		}, func(int) float64 {
			s := serveQemu(b, fresh("q.qcow2"))
			defer s.stop(b)
			return qemuImgBench(b, s.uri, true)
		})
		benchResult{name: "nbd-bench/write", unit: unitIOPS, cbtfs: c, peer: p, atLeast: true, target: 1}.report(b)
	})
}
