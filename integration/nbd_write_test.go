package integration

import (
	"math/rand/v2"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/cbtfs/cbtfs/internal/testutil"
)

// TestNBDWrites writes to a chain served by `cbtfs serve` with qemu-io
// (write -P, write -z, write -z -u, discard, write -f for FUA, flush),
// qemu-img bench -w and nbdcopy, and checks the image against a model:
// over NBD while cbtfs runs, and after it exits on SIGTERM with status 0,
// with qemu-img check, qemu-img compare and the bitmaps as qemu-nbd -B
// shows them. The backing file must not change.
func TestNBDWrites(t *testing.T) {
	for _, tool := range []string{"qemu-img", "qemu-io", "qemu-nbd", "nbdinfo", "nbdcopy"} {
		testutil.RequireTool(t, tool)
	}
	b := &builder{t: t, dir: t.TempDir()}
	base := b.qcow2("base.qcow2", "8M")
	b.io(base, "write -P 0x11 0 4M")
	img := b.overlay("top.qcow2", "base.qcow2", "qcow2", "")
	nbdAddBitmap(t, img, "cbt")
	nbdAddBitmap(t, img, "fine", "-g", "512")
	nbdAddBitmap(t, img, "off", "--disable")
	baseSum := fileSum(t, base)
	m := newNBDModel(t, img, map[string]int64{"cbt": 64 << 10, "fine": 512, "off": 64 << 10}, "cbt", "fine")

	s := testutil.ServeNBD(t, cbtfs, img, testutil.ServeOptions{})
	qio := func(cmds ...string) {
		t.Helper()
		args := []string{"-f", "raw"}
		for _, c := range cmds {
			args = append(args, "-c", c)
		}
		testutil.Run(t, "qemu-io", append(args, s.URI)...)
	}

	qio("write -P 0x21 100000 50000") // over backing data: copy-on-write
	m.fill(100000, 50000, 0x21)
	qio("write -z 1M 128k") // WRITE_ZEROES with NO_HOLE
	m.zero(1<<20, 128<<10, 1<<20, 128<<10)
	qio("write -z -u 2M 192k") // WRITE_ZEROES that may unmap
	m.zero(2<<20, 192<<10, 2<<20, 192<<10)
	// TRIM. Its content is unspecified by the protocol until rewritten;
	// cbtfs releases the whole clusters inside the range, which then read
	// as zeros on a v3 image (qcow.Image.Discard), and marks the whole
	// range, as qemu's block layer does.
	qio("discard 3M 256k")
	m.zero(3<<20, 256<<10, 3<<20, 256<<10)
	qio("discard 3669016 67536") // one whole cluster, 3.5M..+64k, inside
	m.zero(3584<<10, 64<<10, 3669016, 67536)
	qio("write -f -P 0x22 5M 64k", "flush", "write -P 0x23 8388000 608", "write -f -z 5M 4k")
	m.fill(5<<20, 64<<10, 0x22)
	m.fill(8388000, 608, 0x23)
	m.zero(5<<20, 4<<10, 5<<20, 4<<10)

	// qemu-img bench: 32 writes of 4 KiB of 0x33 at 6M + i*64k, 16 in
	// flight at a time.
	testutil.Run(t, "qemu-img", "bench", "-w", "-t", "none", "-f", "raw", "-c", "32", "-d", "16",
		"-s", "4k", "-S", "64k", "-o", "6M", "--pattern=0x33", s.URI)
	for i := range int64(32) {
		m.fill(6<<20+i*64<<10, 4<<10, 0x33)
	}

	// nbdcopy from a 1 MiB file (random data with a zero run, which
	// nbdcopy sends as a zero request) to the start of the disk.
	src := make([]byte, 1<<20)
	rng := rand.New(rand.NewPCG(6, 6))
	for i := range src {
		src[i] = byte(rng.Uint32())
	}
	clear(src[256<<10 : 384<<10])
	srcFile := filepath.Join(t.TempDir(), "src.raw")
	if err := os.WriteFile(srcFile, src, 0o644); err != nil {
		t.Fatal(err)
	}
	testutil.Run(t, "nbdcopy", srcFile, s.URI)
	m.write(0, src)

	// One more writer on a raw connection, for the flags qemu-io cannot
	// send: WRITE_ZEROES with FAST_ZERO (whole clusters: accepted) and
	// TRIM with FUA.
	c, err := testutil.DialNBDExport(s.Addr, "")
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Do(testutil.NBDCmdWriteZeroes, testutil.NBDCmdFlagFastZero, 7<<20, 128<<10); err != nil {
		t.Errorf("FAST_ZERO of whole clusters: %v", err)
	}
	m.zero(7<<20, 128<<10, 7<<20, 128<<10)
	if err := c.Do(testutil.NBDCmdWriteZeroes, testutil.NBDCmdFlagFastZero, 7<<20+1000, 4096); testutil.ErrnoOf(err) != testutil.NBDENOTSUP {
		// "fail quickly with ENOTSUP unless faster than a write, and
		// then leave the data unchanged"
		t.Errorf("FAST_ZERO of a partial cluster: %v, want ENOTSUP", err)
	}
	if err := c.Do(testutil.NBDCmdTrim, testutil.NBDCmdFlagFUA, 7<<20+256<<10, 64<<10); err != nil {
		t.Errorf("TRIM with FUA: %v", err)
	}
	m.zero(7<<20+256<<10, 64<<10, 7<<20+256<<10, 64<<10)
	if err := c.Disconnect(); err != nil {
		t.Error(err)
	}

	m.checkServed(t, "cbtfs serve", s.URI)
	s.Stop(t, syscall.SIGTERM)
	m.checkClosed(t, img)
	if fileSum(t, base) != baseSum {
		t.Errorf("%s changed: cbtfs wrote to a backing file", base)
	}
}
