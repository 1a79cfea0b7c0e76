package integration

import (
	"bytes"
	"fmt"
	"math"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/cbtfs/cbtfs/internal/testutil"
)

// This file is the harness of the benchmarks (`make bench`). Each
// benchmark compares cbtfs with the qemu tool chain doing the same job in
// the same run — qemu-nbd + nbdfuse, nbdinfo, nbdcopy, qemu-img bench, or
// a plain cp — and prints one line:
//
//	BENCH <name> cbtfs=<figure> peer=<figure> ratio=<cbtfs/peer> target=<op><x> <PASS|MISS>
//
// The figures are medians over several rounds. In each round both sides
// run once, alternately first, so that the load of the shared machine
// weighs on both alike. Absolute figures are noise on these machines; the
// ratio is what counts. Every side of every round starts from a fresh
// mount or server (nothing cached in cbtfs or qemu), and either
//
//   - cold: the page cache is dropped (echo 3 > /proc/sys/vm/drop_caches)
//     just before the timed part, for both sides, or
//   - warm: both sides read files already in the page cache (a warm-up
//     pass runs first),
//
// as each benchmark's comment says. Only the measured operation is timed:
// mounts, servers and image creation are not.
//
// cbtfs is built without -race (testutil.CbtfsNoRace), whatever the test
// binary was built with. Benchmarks need root (to drop caches, and for
// FUSE), and the tools; a missing one prints "BENCH <name> SKIP ..." and
// skips the benchmark (fails it with CBTFS_REQUIRE_TOOLS set).
//
// Each benchmark runs its own rounds and ignores b.N: run them with
// -benchtime 1x, as make bench does.

const (
	// benchRoundsHeavy is the number of rounds of benchmarks that move
	// gigabytes; benchRoundsLight of the others.
	benchRoundsHeavy = 3
	benchRoundsLight = 5
)

// benchSkip prints the skip line of benchmark name and skips it (or fails
// it when CBTFS_REQUIRE_TOOLS is set).
func benchSkip(b *testing.B, name, format string, args ...any) {
	b.Helper()
	msg := fmt.Sprintf(format, args...)
	fmt.Printf("BENCH %s SKIP %s\n", name, msg)
	if os.Getenv(testutil.RequireToolsEnv) != "" {
		b.Fatalf("%s (required: %s is set)", msg, testutil.RequireToolsEnv)
	}
	b.Skip(msg)
}

// benchPrepare checks what benchmark name needs — root (to drop caches),
// FUSE and tools — and returns the cbtfs binary to run, built without
// -race.
func benchPrepare(b *testing.B, name string, tools ...string) string {
	b.Helper()
	if os.Geteuid() != 0 {
		benchSkip(b, name, "needs root (drop_caches, FUSE)")
	}
	if _, err := os.Stat("/dev/fuse"); err != nil {
		benchSkip(b, name, "FUSE not available: %v", err)
	}
	for _, t := range append([]string{"fusermount3"}, tools...) {
		if _, err := exec.LookPath(t); err != nil {
			benchSkip(b, name, "%s not installed", t)
		}
	}
	cbtfs := testutil.CbtfsNoRace(b)
	b.Logf("cbtfs under test: %s (built without -race)", cbtfs)
	return cbtfs
}

// dropCaches writes dirty pages back and drops the page cache, dentries
// and inodes, so that the next read comes from the disk.
func dropCaches(b *testing.B) {
	b.Helper()
	syscall.Sync()
	if err := os.WriteFile("/proc/sys/vm/drop_caches", []byte("3\n"), 0); err != nil {
		b.Fatalf("drop caches: %v", err)
	}
}

// warmFile reads the file at path once, so that it is in the page cache.
func warmFile(b *testing.B, path string) {
	b.Helper()
	dd(b, fileSize(b, path), "if="+path, "of=/dev/null", "bs=1M")
}

// ddCopied matches the byte count in dd's closing line.
var ddCopied = regexp.MustCompile(`(?m)^([0-9]+) bytes`)

// dd runs dd with args and returns how long it took. It fails the
// benchmark unless dd copied exactly want bytes: a short read would pass
// for a fast one.
func dd(b *testing.B, want int64, args ...string) time.Duration {
	b.Helper()
	cmd := testutil.Cmd(b, "dd", args...)
	cmd.Env = append(os.Environ(), "LC_ALL=C")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	start := time.Now()
	err := cmd.Run()
	d := time.Since(start)
	if err != nil {
		b.Fatalf("%s: %v; stderr: %q", cmd, err, stderr.String())
	}
	if m := ddCopied.FindSubmatch(stderr.Bytes()); m == nil || string(m[1]) != strconv.FormatInt(want, 10) {
		b.Fatalf("%s: did not copy %d bytes; stderr: %q", cmd, want, stderr.String())
	}
	return d
}

// benchExec runs name with args to completion, its stdout going to out
// (nil: discarded), and returns how long it took from start to exit. The
// benchmark fails if the command fails.
func benchExec(b *testing.B, out *bytes.Buffer, name string, args ...string) time.Duration {
	b.Helper()
	cmd := testutil.Cmd(b, name, args...)
	var stderr bytes.Buffer
	if out != nil {
		cmd.Stdout = out
	}
	cmd.Stderr = &stderr
	start := time.Now()
	err := cmd.Run()
	d := time.Since(start)
	if err != nil {
		b.Fatalf("%s: %v; stderr: %q", cmd, err, stderr.String())
	}
	return d
}

// timed returns how long fn took.
func timed(fn func()) time.Duration {
	start := time.Now()
	fn()
	return time.Since(start)
}

// benchRounds runs cbtfs and peer alternately, rounds times, the first to
// go swapping every round, and returns the figure each returned per
// round.
func benchRounds(b *testing.B, rounds int, cbtfs, peer func(round int) float64) (c, p []float64) {
	b.Helper()
	for i := range rounds {
		if i%2 == 0 {
			c = append(c, cbtfs(i))
			p = append(p, peer(i))
		} else {
			p = append(p, peer(i))
			c = append(c, cbtfs(i))
		}
	}
	return c, p
}

// median returns the median of v (the mean of the middle two for an even
// count).
func median(v []float64) float64 {
	s := slices.Clone(v)
	slices.Sort(s)
	n := len(s)
	if n == 0 {
		return math.NaN()
	}
	if n%2 == 1 {
		return s[n/2]
	}
	return (s[n/2-1] + s[n/2]) / 2
}

// Units of the figures.
const (
	unitSeconds = "s"
	unitMBps    = "MB/s" // 10^6 bytes per second
	unitIOPS    = "IOPS"
)

// benchResult is the outcome of one comparison.
type benchResult struct {
	name string
	unit string
	// cbtfs and peer hold one figure per round.
	cbtfs, peer []float64
	// atLeast: the ratio cbtfs/peer must be at least target (a
	// throughput); otherwise at most target (a time).
	atLeast bool
	target  float64
}

// formatFigure renders a figure with its unit.
func formatFigure(v float64, unit string) string {
	switch unit {
	case unitSeconds:
		return strconv.FormatFloat(v, 'g', 3, 64) + unit
	default:
		return strconv.FormatFloat(v, 'f', 0, 64) + unit
	}
}

// report prints the result line of r, logs every round's figures, and
// records the ratio as the benchmark's metric.
func (r benchResult) report(b *testing.B) {
	b.Helper()
	c, p := median(r.cbtfs), median(r.peer)
	ratio := c / p
	op, ok := "<=", ratio <= r.target
	if r.atLeast {
		op, ok = ">=", ratio >= r.target
	}
	verdict := "MISS"
	if ok {
		verdict = "PASS"
	}
	fmt.Printf("BENCH %s cbtfs=%s peer=%s ratio=%.2f target=%s%.2f %s\n",
		r.name, formatFigure(c, r.unit), formatFigure(p, r.unit), ratio, op, r.target, verdict)
	b.Logf("%s rounds: cbtfs %v, peer %v (%s)", r.name, r.cbtfs, r.peer, r.unit)
	b.ReportMetric(ratio, "ratio")
	b.ReportMetric(c, "cbtfs-"+r.unit)
	b.ReportMetric(p, "peer-"+r.unit)
}

// mbps returns n bytes in d as 10^6 bytes per second.
func mbps(n int64, d time.Duration) float64 { return float64(n) / d.Seconds() / 1e6 }

// benchDir returns a fresh directory for the benchmark's files, on the
// same file system as the shared images (so that every copy stays on one
// disk).
func benchDir(b *testing.B) string {
	b.Helper()
	d, err := os.MkdirTemp(testutil.SharedDir(b), "run-")
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { os.RemoveAll(d) })
	return d
}

// benchMountDir returns a fresh empty directory to mount on. Mountpoints
// live in a short directory of their own: no image is ever written into
// one.
func benchMountDir(b *testing.B) string {
	b.Helper()
	d, err := os.MkdirTemp("", "cbtfs-bench-mnt-")
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { os.Remove(d) })
	return d
}

// benchMount is a cbtfs mount started by a benchmark, read-only or
// read-write.
type benchMount struct {
	dir  string
	proc *testutil.Proc
	done bool
}

// mountCbtfs mounts image at mnt with `cbtfs mount [--read-only]` in the
// foreground and waits until it serves; a cleanup unmounts it if the
// benchmark did not.
func mountCbtfs(b *testing.B, cbtfs, image, mnt string, readOnly bool) *benchMount {
	b.Helper()
	args := []string{"mount"}
	if readOnly {
		args = append(args, "--read-only")
	}
	m := &benchMount{dir: mnt, proc: testutil.Start(b, "", cbtfs, append(args, image, mnt)...)}
	b.Cleanup(func() { m.unmount(b) })
	waitFuse(b, mnt, filepath.Join(mnt, "disk"), testutil.FSType, m.proc, "cbtfs mount "+image)
	return m
}

// unmount ends the mount and requires cbtfs to exit with status 0.
func (m *benchMount) unmount(b *testing.B) {
	b.Helper()
	if m.done {
		return
	}
	m.done = true
	fuseUnmount(b, m.dir, m.proc, "cbtfs")
}

// disk returns MNT/disk.
func (m *benchMount) disk() string { return filepath.Join(m.dir, "disk") }

// nbdfuseMount is an nbdfuse mount of an NBD server: MNT/nbd.
type nbdfuseMount struct {
	dir  string
	proc *testutil.Proc
	done bool
}

// mountNbdfuse runs `nbdfuse [-r] MNT --unix SOCKET` in the foreground
// and waits until MNT/nbd is there.
func mountNbdfuse(b *testing.B, mnt, socket string, readOnly bool) *nbdfuseMount {
	b.Helper()
	var args []string
	if readOnly {
		args = append(args, "-r")
	}
	args = append(args, mnt, "--unix", socket)
	m := &nbdfuseMount{dir: mnt, proc: testutil.Start(b, "", "nbdfuse", args...)}
	b.Cleanup(func() { m.unmount(b) })
	waitFuse(b, mnt, filepath.Join(mnt, "nbd"), "fuse", m.proc, "nbdfuse "+socket)
	return m
}

func (m *nbdfuseMount) unmount(b *testing.B) {
	b.Helper()
	if m.done {
		return
	}
	m.done = true
	fuseUnmount(b, m.dir, m.proc, "nbdfuse")
}

// file returns MNT/nbd.
func (m *nbdfuseMount) file() string { return filepath.Join(m.dir, "nbd") }

// waitFuse polls until a mount of type fstype is at mnt and file can be
// stat'ed, failing if p exits first or testutil.MountTimeout passes.
func waitFuse(b *testing.B, mnt, file, fstype string, p *testutil.Proc, what string) {
	b.Helper()
	deadline := time.Now().Add(testutil.MountTimeout)
	delay := time.Millisecond
	for {
		es := testutil.MountsAt(b, mnt)
		if len(es) > 0 && es[len(es)-1].FSType == fstype {
			if _, err := os.Stat(file); err == nil {
				return
			}
		}
		if p.Exited() {
			b.Fatalf("%s exited before its mount was ready: %v; stderr: %q", what, p.Err(), p.Stderr())
		}
		if time.Now().After(deadline) {
			b.Fatalf("%s: mount at %s not ready after %v", what, mnt, testutil.MountTimeout)
		}
		time.Sleep(delay)
		delay = min(2*delay, 20*time.Millisecond)
	}
}

// fuseUnmount unmounts mnt with fusermount3 -u, retrying while it is busy,
// and requires the server process p to exit with status 0.
func fuseUnmount(b *testing.B, mnt string, p *testutil.Proc, what string) {
	b.Helper()
	if !p.Exited() {
		var err error
		delay := 10 * time.Millisecond
		for range 20 {
			if _, _, err = testutil.RunErr(b, "fusermount3", "-u", mnt); err == nil {
				break
			}
			time.Sleep(delay)
			delay = min(2*delay, 200*time.Millisecond)
		}
		if err != nil {
			b.Errorf("unmount %s: %v; detaching", mnt, err)
			_, _, _ = testutil.RunErr(b, "fusermount3", "-u", "-z", mnt)
		}
	}
	waitExit(b, p, what)
}

// waitExit waits for p and requires exit status 0; a process still running
// after testutil.ExitTimeout is killed.
func waitExit(b *testing.B, p *testutil.Proc, what string) {
	b.Helper()
	if _, ok := p.Wait(testutil.ExitTimeout); !ok {
		_ = p.Signal(syscall.SIGKILL)
		p.Wait(testutil.WaitDelay)
		b.Errorf("%s did not exit within %v; stderr: %q", what, testutil.ExitTimeout, p.Stderr())
		return
	}
	if err := p.Err(); err != nil {
		b.Errorf("%s: %v; stderr: %q", what, err, p.Stderr())
	}
}

// benchServer is an NBD server on a unix socket: `cbtfs serve` or
// qemu-nbd.
type benchServer struct {
	socket string
	uri    string
	proc   *testutil.Proc
	what   string
	done   bool
}

// shortDir returns a fresh directory with a short name for a unix socket
// (their paths are limited to 108 bytes).
func shortDir(b *testing.B) string {
	b.Helper()
	d, err := os.MkdirTemp("", "cbtfs-bench-")
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { os.RemoveAll(d) })
	return d
}

// startServer starts name with args (which name the socket) and waits
// until socket accepts connections.
func startServer(b *testing.B, socket, name string, args ...string) *benchServer {
	b.Helper()
	s := &benchServer{socket: socket, uri: "nbd+unix:///?socket=" + socket, what: name}
	s.proc = testutil.Start(b, "", name, args...)
	b.Cleanup(func() { s.stop(b) })
	deadline := time.Now().Add(testutil.NBDTimeout)
	delay := time.Millisecond
	for {
		if c, err := net.Dial("unix", socket); err == nil {
			c.Close()
			return s
		}
		if s.proc.Exited() {
			b.Fatalf("%s exited before serving: %v; stderr: %q", name, s.proc.Err(), s.proc.Stderr())
		}
		if time.Now().After(deadline) {
			b.Fatalf("%s: %s not accepting after %v", name, socket, testutil.NBDTimeout)
		}
		time.Sleep(delay)
		delay = min(2*delay, 20*time.Millisecond)
	}
}

// serveCbtfs runs `cbtfs serve [--read-only] --listen unix:SOCK image`.
func serveCbtfs(b *testing.B, cbtfs, image string, readOnly bool) *benchServer {
	b.Helper()
	sock := filepath.Join(shortDir(b), "s")
	args := []string{"serve", "--listen", "unix:" + sock}
	if readOnly {
		args = append(args, "--read-only")
	}
	return startServer(b, sock, cbtfs, append(args, image)...)
}

// serveQemu runs `qemu-nbd -t -f qcow2 -k SOCK ARGS... image` (args such as
// "-r", "-A", "-B", "NAME").
func serveQemu(b *testing.B, image string, args ...string) *benchServer {
	b.Helper()
	sock := filepath.Join(shortDir(b), "q")
	all := append([]string{"-t", "-f", "qcow2", "-k", sock}, args...)
	return startServer(b, sock, "qemu-nbd", append(all, image)...)
}

// stop ends the server with SIGTERM (both finish their requests, store
// bitmaps and close the image) and requires exit status 0.
func (s *benchServer) stop(b *testing.B) {
	b.Helper()
	if s.done {
		return
	}
	s.done = true
	if !s.proc.Exited() {
		_ = s.proc.Signal(syscall.SIGTERM)
	}
	waitExit(b, s.proc, s.what)
}

// The images. Large ones are made once per test binary and shared by the
// benchmarks (testutil.SharedDir); none of them is ever modified, and a
// benchmark that writes works on a copy or a fresh image.

var benchImages struct {
	mu    sync.Mutex
	paths map[string]string
}

// sharedImage returns the shared file name, making it with mk(path) the
// first time.
func sharedImage(b *testing.B, name string, mk func(path string)) string {
	b.Helper()
	benchImages.mu.Lock()
	defer benchImages.mu.Unlock()
	if p, ok := benchImages.paths[name]; ok {
		return p
	}
	p := filepath.Join(testutil.SharedDir(b), name)
	tmp := p + ".tmp"
	mk(tmp)
	if err := os.Rename(tmp, p); err != nil {
		b.Fatal(err)
	}
	if benchImages.paths == nil {
		benchImages.paths = map[string]string{}
	}
	benchImages.paths[name] = p
	return p
}

// qemuIO runs qemu-io commands on the qcow2 image img, read from stdin, in
// cache mode unsafe (no flushes: image creation only). Any complaint on
// stderr fails the benchmark.
func qemuIO(b *testing.B, img string, cmds []string) {
	b.Helper()
	cmd := testutil.Cmd(b, "qemu-io", "-t", "unsafe", "-f", "qcow2", img)
	cmd.Stdin = strings.NewReader(strings.Join(cmds, "\n") + "\n")
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil || stderr.Len() > 0 || strings.Contains(stdout.String(), "failed") {
		b.Fatalf("qemu-io %s: %v; stderr: %q; stdout: %.500q", img, err, stderr.String(), stdout.String())
	}
}

// makeFull creates at path a qcow2 image of size bytes (a multiple of 256
// MiB) whose every cluster holds data: 256 MiB runs of bytes 1, 2, 3...
func makeFull(b *testing.B, path string, size int64) {
	b.Helper()
	testutil.Create(b, path, strconv.FormatInt(size, 10))
	const chunk = 256 << 20
	var cmds []string
	for off := int64(0); off < size; off += chunk {
		cmds = append(cmds, fmt.Sprintf("write -P %d %d %d", 1+off/chunk%255, off, chunk))
	}
	qemuIO(b, path, cmds)
}

// fullImage returns a shared qcow2 image of size bytes with data in every
// cluster.
func fullImage(b *testing.B, size int64) string {
	b.Helper()
	return sharedImage(b, fmt.Sprintf("full-%d.qcow2", size), func(p string) { makeFull(b, p, size) })
}

// scatterClusters returns n distinct cluster indexes out of total, sorted,
// chosen by seed.
func scatterClusters(n, total int64, seed uint64) []int64 {
	r := rand.New(rand.NewPCG(seed, 0x63627466))
	seen := make(map[int64]bool, n)
	out := make([]int64, 0, n)
	for int64(len(out)) < n {
		c := r.Int64N(total)
		if !seen[c] {
			seen[c] = true
			out = append(out, c)
		}
	}
	slices.Sort(out)
	return out
}

// writeClusters writes length bytes of pattern at the start of each of the
// given 64 KiB clusters of img.
func writeClusters(b *testing.B, img string, clusters []int64, length int, pattern byte) {
	b.Helper()
	cmds := make([]string, len(clusters))
	for i, c := range clusters {
		cmds[i] = fmt.Sprintf("write -P %d %d %d", pattern, c<<16, length)
	}
	qemuIO(b, img, cmds)
}

// writePatternFile writes n pseudo-random bytes (seeded) to path.
func writePatternFile(b *testing.B, path string, n int64, seed uint64) {
	b.Helper()
	f, err := os.Create(path)
	if err != nil {
		b.Fatal(err)
	}
	r := rand.NewChaCha8([32]byte{byte(seed), byte(seed >> 8), 'c', 'b', 't', 'f', 's'})
	buf := make([]byte, 1<<20)
	for n > 0 {
		k := min(n, int64(len(buf)))
		_, _ = r.Read(buf[:k])
		if _, err := f.Write(buf[:k]); err != nil {
			f.Close()
			b.Fatal(err)
		}
		n -= k
	}
	if err := f.Close(); err != nil {
		b.Fatal(err)
	}
}

// fileSize returns the size of the file at path.
func fileSize(b *testing.B, path string) int64 {
	b.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		b.Fatal(err)
	}
	return fi.Size()
}

// sameOutput fails the benchmark when cbtfs and its peer did not produce
// the same bytes: the comparison would not be of the same work.
func sameOutput(b *testing.B, what string, cbtfs, peer []byte) {
	b.Helper()
	if !bytes.Equal(cbtfs, peer) {
		n := min(len(cbtfs), len(peer), 300)
		b.Fatalf("%s: cbtfs and its peer differ (%d and %d bytes); starts %q vs %q", what, len(cbtfs), len(peer), cbtfs[:n], peer[:n])
	}
}
