package integration

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/cbtfs/cbtfs/internal/testutil"
)

// nbdSmallImage makes a 4 MiB image with an enabled bitmap cbt, data,
// zero clusters and dirty clusters.
func nbdSmallImage(t *testing.T, dir, name string) string {
	t.Helper()
	b := &builder{t: t, dir: dir}
	img := b.qcow2(name, "4M")
	b.io(img, "write -P 0x5a 0 1M")
	nbdAddBitmap(t, img, "cbt")
	b.io(img, "write -P 0x5b 512k 64k", "write -z 2M 128k", "write -P 0x5c 3M 64k")
	return img
}

// TestNBDAddresses covers cbtfs serve's listening options: a TCP address
// on 127.0.0.1, --export-name, --read-only, and a clean stop on SIGTERM
// and SIGINT with requests in flight and idle connections open.
func TestNBDAddresses(t *testing.T) {
	for _, tool := range []string{"qemu-img", "qemu-io", "qemu-nbd", "nbdinfo"} {
		testutil.RequireTool(t, tool)
	}
	contexts := []string{nbdCtxBase, nbdCtxDepth, nbdCtxBitmap + "cbt"}

	t.Run("tcp", func(t *testing.T) {
		img := nbdSmallImage(t, t.TempDir(), "tcp.qcow2")
		cb := testutil.ServeNBD(t, cbtfs, img, testutil.ServeOptions{ReadOnly: true, TCP: true})
		if !strings.HasPrefix(cb.URI, "nbd://127.0.0.1:") {
			t.Fatalf("URI %s", cb.URI)
		}
		q := testutil.StartQemuNBD(t, img, "-r", "-e", "2", "-f", "qcow2", "-A", "-B", "cbt")
		nbdSameJSON(t, cb.URI, q.URI, "--list", "--json")
		nbdSameMaps(t, cb.URI, q.URI, contexts...)
		if !testutil.Compare(t, cb.URI, img, "-f", "raw", "-F", "qcow2") {
			t.Errorf("qemu-img compare: %s differs from %s", cb.URI, img)
		}
		c, err := testutil.DialNBDExport(cb.Addr, "")
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if got, err := c.Read(512<<10, 4096, 0); err != nil || !bytes.Equal(got, bytes.Repeat([]byte{0x5b}, 4096)) {
			t.Errorf("READ over TCP: %v", err)
		}
		cb.Stop(t, syscall.SIGTERM)
	})

	t.Run("export name", func(t *testing.T) {
		img := nbdSmallImage(t, t.TempDir(), "named.qcow2")
		cb := testutil.ServeNBD(t, cbtfs, img, testutil.ServeOptions{ReadOnly: true, ExportName: "disk1"})
		q := testutil.StartQemuNBD(t, img, "-r", "-e", "2", "-f", "qcow2", "-A", "-B", "cbt", "-x", "disk1")
		out := testutil.Run(t, "nbdinfo", "--list", "--json", cb.URI)
		if !strings.Contains(out, `"export-name": "disk1"`) {
			t.Errorf("nbdinfo --list --json does not show the export name:\n%s", out)
		}
		nbdSameJSON(t, cb.URI, q.URI, "--list", "--json")
		nbdSameMaps(t, cb.URI, q.URI, contexts...)
		// Any other name, the default "" included, is refused as qemu-nbd
		// refuses it: NBD_REP_ERR_UNKNOWN, which libnbd reports as
		// ENOENT.
		for _, name := range []string{"wrong", ""} {
			_, cerr, err := testutil.RunErr(t, "nbdinfo", testutil.NBDURI(cb.Addr, name))
			_, qerr, qe := testutil.RunErr(t, "nbdinfo", testutil.NBDURI("unix:"+q.Socket, name))
			if err == nil || testutil.ExitCode(err) != testutil.ExitCode(qe) {
				t.Errorf("nbdinfo export %q: %v, qemu-nbd: %v", name, err, qe)
			}
			if !strings.Contains(cerr, "No such file or directory") || cerr != qerr {
				t.Errorf("nbdinfo export %q: stderr %q, qemu-nbd: %q", name, cerr, qerr)
			}
		}
		c, err := testutil.DialNBD(cb.Addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		nbdMust(t, "start", c.Start(testutil.NBDFlagFixed|testutil.NBDFlagNoZeroes))
		var oe *testutil.NBDOptError
		if err := c.Go("wrong"); !errors.As(err, &oe) || oe.Type != testutil.NBDRepErrUnknown {
			t.Errorf("GO wrong: %v, want NBD_REP_ERR_UNKNOWN", err)
		}
		nbdMust(t, "GO disk1", c.Go("disk1"))
		cb.Stop(t, syscall.SIGTERM)
	})

	t.Run("read-only", func(t *testing.T) {
		dir := t.TempDir()
		img := nbdSmallImage(t, dir, "ro.qcow2")
		qimg := filepath.Join(dir, "q.qcow2")
		testutil.CopyFile(t, img, qimg)
		sum := fileSum(t, img)
		cb := testutil.ServeNBD(t, cbtfs, img, testutil.ServeOptions{ReadOnly: true})
		q := testutil.StartQemuNBD(t, qimg, "-r", "-f", "qcow2", "-e", "2")

		var info struct {
			Exports []map[string]any `json:"exports"`
		}
		if err := json.Unmarshal([]byte(testutil.Run(t, "nbdinfo", "--json", cb.URI)), &info); err != nil {
			t.Fatal(err)
		}
		if e := info.Exports[0]; e["is_read_only"] != true || e["can_trim"] != false || e["can_zero"] != false || e["can_fast_zero"] != false {
			t.Errorf("nbdinfo --json: %v", e)
		}
		// Writes get EPERM (the spec's SHOULD; qemu-nbd 7.2 answers
		// EINVAL, formats.md D.11) and the connection goes on.
		c, err := testutil.DialNBDExport(cb.Addr, "")
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if err := c.Write(bytes.Repeat([]byte{1}, 4096), 0, 0); testutil.ErrnoOf(err) != testutil.NBDEPERM {
			t.Errorf("WRITE: %v, want EPERM", err)
		}
		if err := c.Do(testutil.NBDCmdTrim, 0, 0, 65536); testutil.ErrnoOf(err) != testutil.NBDEPERM {
			t.Errorf("TRIM: %v, want EPERM", err)
		}
		if err := c.Do(testutil.NBDCmdWriteZeroes, testutil.NBDCmdFlagFUA, 0, 65536); testutil.ErrnoOf(err) != testutil.NBDEPERM {
			t.Errorf("WRITE_ZEROES: %v, want EPERM", err)
		}
		if got, err := c.Read(0, 4096, 0); err != nil || !bytes.Equal(got, bytes.Repeat([]byte{0x5a}, 4096)) {
			t.Errorf("READ after refused writes: %v", err)
		}
		// qemu-io fails to open a read-only export for writing, exactly
		// as against qemu-nbd -r; it reads with -r.
		for _, s := range []struct{ name, sock, uri string }{{"cbtfs", cb.Socket, cb.URI}, {"qemu-nbd", q.Socket, q.URI}} {
			_, stderr, err := testutil.RunErr(t, "qemu-io", "-f", "raw", "-c", "write -P 1 0 4k", s.uri)
			if err == nil || !strings.Contains(stderr, "Permission denied") {
				t.Errorf("%s: qemu-io write: %v, stderr %q; want it refused", s.name, err, stderr)
			}
			out := testutil.Run(t, "qemu-io", "-r", "-f", "raw", "-c", "read -P 0x5c 3M 64k", s.uri)
			if strings.Contains(out, "Pattern verification failed") {
				t.Errorf("%s: qemu-io read: %s", s.name, out)
			}
		}
		cb.Stop(t, syscall.SIGTERM)
		if fileSum(t, img) != sum {
			t.Errorf("%s changed while served read-only", img)
		}
	})

	// A socket left behind by a killed server is replaced; a live one is
	// not taken over.
	t.Run("stale socket", func(t *testing.T) {
		dir := t.TempDir()
		img := nbdSmallImage(t, dir, "stale.qcow2")
		other := filepath.Join(dir, "other.qcow2")
		testutil.CopyFile(t, img, other)
		addr := testutil.NBDSocketAddr(t)
		s1 := testutil.ServeNBD(t, cbtfs, img, testutil.ServeOptions{ReadOnly: true, Addr: addr})
		s1.Kill(t)
		if _, err := os.Lstat(s1.Socket); err != nil {
			t.Fatalf("no socket left behind by the killed server: %v", err)
		}
		s2 := testutil.ServeNBD(t, cbtfs, img, testutil.ServeOptions{ReadOnly: true, Addr: addr})
		p := testutil.Start(t, "", cbtfs, "serve", "--read-only", "--listen", addr, other)
		if _, ok := p.Wait(testutil.ExitTimeout); !ok {
			_ = p.Cmd.Process.Kill()
			p.Wait(testutil.WaitDelay)
			t.Fatalf("a second cbtfs serve on the address of a live one is still running")
		}
		if stderr := p.Stderr(); p.Err() == nil || strings.Count(stderr, "\n") != 1 || !strings.Contains(stderr, "already listening") {
			t.Errorf("second cbtfs serve on %s: %v, stderr %q; want one line saying a server listens there", addr, p.Err(), stderr)
		}
		if out := testutil.Run(t, "nbdinfo", "--size", s2.URI); out != "4194304\n" {
			t.Errorf("nbdinfo --size: %q", out)
		}
		s2.Stop(t, syscall.SIGTERM)
		if _, err := os.Lstat(s2.Socket); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("socket after a clean stop: %v, want it removed", err)
		}
	})

	// cbtfs mount --read-only --nbd: a read-only export, with a name.
	t.Run("mount read-only", func(t *testing.T) {
		dir := t.TempDir()
		img := nbdSmallImage(t, dir, "mro.qcow2")
		sum := fileSum(t, img)
		addr := testutil.NBDSocketAddr(t)
		m := testutil.Mount(t, cbtfs, img, mkdir(t, dir, "mnt"), "--nbd", addr, "--export-name", "ro")
		testutil.WaitAccept(t, addr, nil, "cbtfs mount --nbd")
		q := testutil.StartQemuNBD(t, img, "-r", "-e", "2", "-f", "qcow2", "-A", "-B", "cbt", "-x", "ro")
		uri := testutil.NBDURI(addr, "ro")
		nbdSameJSON(t, uri, q.URI, "--list", "--json")
		nbdSameMaps(t, uri, q.URI, contexts...)
		c, err := testutil.DialNBDExport(addr, "ro")
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if err := c.Write([]byte{1}, 0, 0); testutil.ErrnoOf(err) != testutil.NBDEPERM {
			t.Errorf("WRITE: %v, want EPERM", err)
		}
		nbdMust(t, "disconnect", c.Disconnect())
		q.Stop(t)
		m.Unmount(t)
		if fileSum(t, img) != sum {
			t.Errorf("%s changed under a read-only mount", img)
		}
	})

	for _, sig := range []syscall.Signal{syscall.SIGTERM, syscall.SIGINT} {
		t.Run("stop on "+sig.String(), func(t *testing.T) { nbdStopWithRequestsInFlight(t, sig) })
	}
}

// nbdStopWithRequestsInFlight sends cbtfs serve sig while a client has
// writes in flight and two more connections sit idle (one negotiated,
// one in the middle of negotiation). Every request the server took must
// be answered (and its data stored), every connection closed cleanly
// between replies, the exit status 0, the image clean and its bitmaps
// not in use.
func nbdStopWithRequestsInFlight(t *testing.T, sig syscall.Signal) {
	dir := t.TempDir()
	img := nbdSmallImage(t, dir, "stop.qcow2")
	before := filepath.Join(dir, "before.raw")
	testutil.ConvertRaw(t, img, before)
	old, err := os.ReadFile(before)
	if err != nil {
		t.Fatal(err)
	}
	s := testutil.ServeNBD(t, cbtfs, img, testutil.ServeOptions{})
	idle, err := testutil.DialNBDExport(s.Addr, "")
	if err != nil {
		t.Fatal(err)
	}
	defer idle.Close()
	negotiating, err := testutil.DialNBD(s.Addr)
	if err != nil {
		t.Fatal(err)
	}
	defer negotiating.Close()
	nbdMust(t, "start", negotiating.Start(testutil.NBDFlagFixed|testutil.NBDFlagNoZeroes))
	c, err := testutil.DialNBDExport(s.Addr, "")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()

	const n, size = 16, 256 << 10
	payload := func(i int) []byte { return bytes.Repeat([]byte{byte(0xa0 + i)}, size) }
	for i := range n {
		flags := uint16(0)
		if i%4 == 3 {
			flags = testutil.NBDCmdFlagFUA
		}
		nbdMust(t, "send", c.Send(flags, testutil.NBDCmdWrite, uint64(i+1), uint64(i*size), size, payload(i)))
	}
	replied := map[uint64]bool{}
	first, err := c.ReadReply(nil)
	nbdMust(t, "first reply", err)
	if err := s.Proc.Signal(sig); err != nil {
		t.Fatal(err)
	}
	for rep := first; ; {
		if rep.Errno != 0 || rep.Cookie < 1 || rep.Cookie > n || replied[rep.Cookie] {
			t.Errorf("reply cookie %d errno %d (%q)", rep.Cookie, rep.Errno, rep.Msg)
		}
		replied[rep.Cookie] = true
		rep, err = c.ReadReply(nil)
		if err != nil {
			break
		}
	}
	// The connection ends between replies: a clean EOF (or a reset, on a
	// unix socket closed with requests left unread), never a torn reply.
	if errors.Is(err, io.ErrUnexpectedEOF) || !errors.Is(err, io.EOF) && !errors.Is(err, syscall.ECONNRESET) {
		t.Errorf("after %d replies: %v, want the connection closed between replies", len(replied), err)
	}
	t.Logf("%d of %d writes answered", len(replied), n)
	for _, ic := range []*testutil.NBDClient{idle, negotiating} {
		if err := ic.ReadEOF(testutil.ExitTimeout); err != nil {
			t.Errorf("idle connection: %v", err)
		}
	}
	s.RequireExit(t)
	if r, code := testutil.Check(t, img); code != 0 {
		t.Errorf("qemu-img check %s: exit status %d: %+v", img, code, r)
	}
	nbdRequireNotInUse(t, img)
	after := filepath.Join(dir, "after.raw")
	testutil.ConvertRaw(t, img, after)
	got, err := os.ReadFile(after)
	if err != nil {
		t.Fatal(err)
	}
	for i := range n {
		off := i * size
		region := got[off : off+size]
		switch {
		case bytes.Equal(region, payload(i)):
		case replied[uint64(i+1)]:
			t.Errorf("write %d was answered but its data is not in the image", i+1)
		case !bytes.Equal(region, old[off:off+size]):
			t.Errorf("write %d (not answered) left a region that is neither old nor new", i+1)
		}
	}
	if !bytes.Equal(got[n*size:], old[n*size:]) {
		t.Errorf("data past the writes changed")
	}
}
