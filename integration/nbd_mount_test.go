package integration

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/cbtfs/cbtfs/internal/testutil"
)

// nbdMount mounts img writable with --nbd on a fresh unix socket and
// returns the mount and the NBD address, once both are ready.
func nbdMount(t *testing.T, img string) (*testutil.Mounted, string) {
	t.Helper()
	addr := testutil.NBDSocketAddr(t)
	mnt := filepath.Join(t.TempDir(), "mnt")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	m := testutil.MountRW(t, cbtfs, img, mnt, testutil.MountOptions{Args: []string{"--nbd", addr}})
	testutil.WaitAccept(t, addr, nil, "cbtfs mount --nbd")
	return m, addr
}

// nbdReadFile returns the content of a file of the mount.
func nbdReadFile(t *testing.T, p string) string {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// TestNBDSharedEngine mounts a chain with `cbtfs mount --nbd`: a write
// over NBD is visible in MNT/disk at once, through a file opened before
// the write and read before it too (no stale page cache), and marks the
// bitmaps MNT/bitmaps/NAME/extents shows; a write through MNT/disk is
// visible over NBD at once and marks the bitmaps NBD shows. The listings
// of the mount and nbdinfo's over NBD are the same bytes. The mount ends
// with SIGTERM while an NBD client is still connected: exit status 0,
// and the image is clean and as the model says.
func TestNBDSharedEngine(t *testing.T) {
	testutil.RequireFUSE(t)
	for _, tool := range []string{"qemu-img", "qemu-io", "qemu-nbd", "nbdinfo"} {
		testutil.RequireTool(t, tool)
	}
	b := &builder{t: t, dir: t.TempDir()}
	base := b.qcow2("base.qcow2", "4M")
	b.io(base, "write -P 0x11 0 2M")
	img := b.overlay("top.qcow2", "base.qcow2", "qcow2", "")
	nbdAddBitmap(t, img, "cbt")
	nbdAddBitmap(t, img, "fine", "-g", "4k")
	md := newNBDModel(t, img, map[string]int64{"cbt": 64 << 10, "fine": 4 << 10}, "cbt", "fine")
	m, addr := nbdMount(t, img)
	uri := testutil.NBDURI(addr, "")

	f, err := os.OpenFile(m.Disk, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	readDisk := func(f *os.File, off, n int64) []byte {
		t.Helper()
		p := make([]byte, n)
		if _, err := f.ReadAt(p, off); err != nil {
			t.Fatalf("read %d bytes at %d of %s: %v", n, off, m.Disk, err)
		}
		return p
	}
	// Read first, so that a page cache, if any, holds the old bytes.
	if got := readDisk(f, 1<<20, 64<<10); !bytes.Equal(got, md.data[1<<20:1<<20+64<<10]) {
		t.Fatal("MNT/disk: wrong content before any write")
	}

	c, err := testutil.DialNBDExport(addr, "", nbdCtxBitmap+"cbt")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	p := bytes.Repeat([]byte{0x44}, 8192)
	nbdMust(t, "NBD write", c.Write(p, 1<<20+4096, 0))
	md.write(1<<20+4096, p)
	if got := readDisk(f, 1<<20, 64<<10); !bytes.Equal(got, md.data[1<<20:1<<20+64<<10]) {
		t.Error("MNT/disk (file opened before): NBD write not visible at once")
	}
	g, err := os.Open(m.Disk)
	if err != nil {
		t.Fatal(err)
	}
	if got := readDisk(g, 1<<20, 64<<10); !bytes.Equal(got, md.data[1<<20:1<<20+64<<10]) {
		t.Error("MNT/disk (new open): NBD write not visible at once")
	}
	g.Close()
	checkListings := func(when string) {
		t.Helper()
		for _, name := range md.names() {
			want := md.bitmaps[name].mapText(int64(len(md.data)))
			if got := nbdReadFile(t, filepath.Join(m.Dir, "bitmaps", name, "extents")); got != want {
				t.Errorf("%s: MNT/bitmaps/%s/extents:\n%s\nwant:\n%s", when, name, got, want)
			}
			if got := testutil.NbdinfoMap(t, uri, nbdCtxBitmap+name, false); got != want {
				t.Errorf("%s: nbdinfo --map=%s%s:\n%s\nwant:\n%s", when, nbdCtxBitmap, name, got, want)
			}
			got := nbdReadFile(t, filepath.Join(m.Dir, "bitmaps", name, "extents.json"))
			if want := testutil.NbdinfoMap(t, uri, nbdCtxBitmap+name, true); got != want {
				t.Errorf("%s: MNT/bitmaps/%s/extents.json:\n%s\nnbdinfo --json:\n%s", when, name, got, want)
			}
		}
	}
	checkListings("after an NBD write")

	// The other way: a write through MNT/disk, seen over NBD at once.
	q := bytes.Repeat([]byte{0x55}, 5000)
	if _, err := f.WriteAt(q, 3<<20+100); err != nil {
		t.Fatal(err)
	}
	md.write(3<<20+100, q)
	got, err := c.Read(3<<20, 64<<10, 0)
	if err != nil || !bytes.Equal(got, md.data[3<<20:3<<20+64<<10]) {
		t.Errorf("NBD READ right after a write through MNT/disk: %v, same data %v", err, bytes.Equal(got, md.data[3<<20:3<<20+64<<10]))
	}
	ex, err := c.BlockStatus(3<<20, 64<<10, testutil.NBDCmdFlagReqOne)
	nbdMust(t, "BLOCK_STATUS", err)
	if e := ex[c.Contexts[nbdCtxBitmap+"cbt"]]; len(e) != 1 || e[0] != (testutil.NBDExtent{Length: 64 << 10, Flags: 1}) {
		t.Errorf("BLOCK_STATUS of cbt after a write through MNT/disk: %v, want one dirty 64 KiB extent", e)
	}
	out := testutil.Run(t, "qemu-io", "-r", "-f", "raw", "-c", "read -P 0x55 3145828 5000", uri)
	if strings.Contains(out, "Pattern verification failed") {
		t.Errorf("qemu-io over NBD: %s", out)
	}
	// Zeroing through the mount and over NBD.
	if err := unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_ZERO_RANGE, 2<<20, 64<<10); err != nil {
		t.Fatal(err)
	}
	md.zero(2<<20, 64<<10, 2<<20, 64<<10)
	nbdMust(t, "NBD write zeroes", c.Do(testutil.NBDCmdWriteZeroes, 0, 500000, 10000))
	md.zero(500000, 10000, 500000, 10000)
	if got := readDisk(f, 0, int64(len(md.data))); !bytes.Equal(got, md.data) {
		t.Error("MNT/disk differs from the model after zeroing")
	}
	checkListings("after writes both ways")
	md.checkServed(t, "cbtfs mount --nbd", uri)

	// SIGTERM with the NBD client still connected.
	f.Close()
	if err := m.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := c.ReadEOF(testutil.ExitTimeout); err != nil {
		t.Errorf("NBD client after SIGTERM: %v", err)
	}
	m.RequireExit(t, 0)
	md.checkClosed(t, img)
}
