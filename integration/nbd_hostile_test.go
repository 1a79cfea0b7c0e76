package integration

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"syscall"
	"testing"
	"time"

	"github.com/cbtfs/cbtfs/internal/testutil"
)

// nbdTarget is an NBD server under a hostile test: cbtfs serve, or
// qemu-nbd as the reference.
type nbdTarget struct {
	name     string
	addr     string // unix:PATH
	qemu     bool
	readOnly bool
}

// nbdHostileCase is a request a well-behaved client does not send, with
// the errno the server must answer. Where qemu-nbd 7.2 departs from the
// spec (formats.md D.11), cbtfs follows the spec: want is the spec's
// answer and qemu qemu-nbd's.
type nbdHostileCase struct {
	name    string
	flags   uint16
	typ     uint16
	off     uint64
	n       uint32
	payload bool   // send n bytes of payload (a WRITE's data)
	want    uint32 // the errno, NBD_EINVAL unless said otherwise
	qemu    uint32 // qemu-nbd 7.2's errno when it differs from want
	// cbtfsOnly marks cases qemu-nbd answers by dropping the connection.
	cbtfsOnly bool
	// structured limits the case to connections with (1) or without (2)
	// structured replies; 0 runs it on both.
	structured int
}

// hostileData is the payload of a hostile WRITE: never all zeros, so that
// a write that got through would show.
func hostileData(n uint32) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i*7) | 1
	}
	return b
}

// TestNBDHostile probes `cbtfs serve` (writable and read-only) with a
// raw-socket client for the mistakes of formats.md E.3: unknown options
// with payloads, EXPORT_NAME with and without NO_ZEROES, bad client
// flags, out-of-range and overflowing offsets, oversized requests, writes
// to a read-only export, unknown commands and flags. Each gets the
// spec's answer, and the connection stays usable where the spec says so
// (a READ right after returns the right data). qemu-nbd serving a copy of
// the same image gets the same probes, as the reference: where its
// answers differ, the case says so and why. Afterwards cbtfs still serves
// (no panic killed it), exits with status 0 on SIGTERM, and the images
// have not changed.
func TestNBDHostile(t *testing.T) {
	for _, tool := range []string{"qemu-img", "qemu-io", "qemu-nbd", "nbdinfo"} {
		testutil.RequireTool(t, tool)
	}
	b := &builder{t: t, dir: t.TempDir()}
	src := b.qcow2("src.qcow2", "4M")
	nbdAddBitmap(t, src, "cbt")
	b.io(src, "write -P 0x5a 0 1M", "write -z 2M 64k")
	raw := b.path("src.raw")
	testutil.ConvertRaw(t, src, raw)
	data, err := os.ReadFile(raw)
	if err != nil {
		t.Fatal(err)
	}
	copyOf := func(name string) string {
		p := b.path(name)
		testutil.CopyFile(t, src, p)
		return p
	}
	cbW, cbR := copyOf("cbtfs-rw.qcow2"), copyOf("cbtfs-ro.qcow2")
	qW, qR := copyOf("qemu-rw.qcow2"), copyOf("qemu-ro.qcow2")
	roSum := fileSum(t, cbR)

	sW := testutil.ServeNBD(t, cbtfs, cbW, testutil.ServeOptions{})
	sR := testutil.ServeNBD(t, cbtfs, cbR, testutil.ServeOptions{ReadOnly: true})
	// -e 8: qemu-nbd serves one client at a time by default, and a probe
	// connection may still be closing when the next one comes.
	nW := testutil.StartQemuNBD(t, qW, "-f", "qcow2", "-e", "8", "-A", "-B", "cbt")
	nR := testutil.StartQemuNBD(t, qR, "-r", "-f", "qcow2", "-e", "8", "-A", "-B", "cbt")
	targets := []nbdTarget{
		{"cbtfs", sW.Addr, false, false},
		{"cbtfs-read-only", sR.Addr, false, true},
		{"qemu-nbd", "unix:" + nW.Socket, true, false},
		{"qemu-nbd-read-only", "unix:" + nR.Socket, true, true},
	}
	for _, tg := range targets {
		t.Run(tg.name, func(t *testing.T) {
			t.Run("negotiation", func(t *testing.T) { nbdHostileNegotiation(t, tg, data) })
			t.Run("requests", func(t *testing.T) {
				for _, structured := range []bool{false, true} {
					t.Run(fmt.Sprintf("structured=%v", structured), func(t *testing.T) {
						nbdHostileRequests(t, tg, data, structured)
					})
				}
			})
		})
	}

	// cbtfs survived all of it: it still answers, stops cleanly, and
	// nothing reached the images.
	for _, s := range []*testutil.NBDServer{sW, sR} {
		if out := testutil.Run(t, "nbdinfo", "--size", s.URI); out != "4194304\n" {
			t.Errorf("nbdinfo --size after the probes: %q", out)
		}
		s.Stop(t, syscall.SIGTERM)
	}
	if r, code := testutil.Check(t, cbW); code != 0 {
		t.Errorf("qemu-img check %s: exit status %d: %+v", cbW, code, r)
	}
	nbdRequireNotInUse(t, cbW)
	if !testutil.Compare(t, raw, cbW, "-f", "raw", "-F", "qcow2") {
		t.Errorf("%s changed", cbW)
	}
	if fileSum(t, cbR) != roSum {
		t.Errorf("%s changed while served read-only", cbR)
	}
}

// nbdDial dials a target, failing the test on error.
func nbdDial(t *testing.T, tg nbdTarget) *testutil.NBDClient {
	t.Helper()
	c, err := testutil.DialNBD(tg.addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// nbdCheckRead reads the first 4 KiB and compares them with want: the
// connection is still in step.
func nbdCheckRead(t *testing.T, c *testutil.NBDClient, want []byte, after string) {
	t.Helper()
	got, err := c.Read(0, 4096, 0)
	if err != nil {
		t.Fatalf("READ after %s: %v", after, err)
	}
	if !bytes.Equal(got, want[:4096]) {
		t.Fatalf("READ after %s: wrong data", after)
	}
}

// nbdOptErr expects the option to be refused with one of types.
func nbdOptErr(t *testing.T, c *testutil.NBDClient, opt uint32, data []byte, types ...uint32) {
	t.Helper()
	reps, err := c.Option(opt, data)
	nbdMust(t, fmt.Sprintf("option %d", opt), err)
	if len(reps) != 1 || !reps[0].IsError() {
		t.Fatalf("option %d: replies %v, want one error of %#x", opt, reps, types)
	}
	for _, ty := range types {
		if reps[0].Type == ty {
			return
		}
	}
	t.Fatalf("option %d: error %#x (%q), want one of %#x", opt, reps[0].Type, reps[0].Data, types)
}

// nbdList runs NBD_OPT_LIST and checks that it names the default export.
func nbdList(t *testing.T, c *testutil.NBDClient) {
	t.Helper()
	reps, err := c.Option(testutil.NBDOptList, nil)
	nbdMust(t, "LIST", err)
	if len(reps) != 2 || reps[0].Type != testutil.NBDRepServer || !bytes.HasPrefix(reps[0].Data, []byte{0, 0, 0, 0}) || reps[1].Type != testutil.NBDRepAck {
		t.Fatalf("LIST: replies %v, want one SERVER for \"\" and ACK", reps)
	}
}

func nbdHostileNegotiation(t *testing.T, tg nbdTarget, data []byte) {
	fixedNZ := uint32(testutil.NBDFlagFixed | testutil.NBDFlagNoZeroes)
	// E.3 1: "raw client sending option 99 with 3 bytes of data, then
	// OPT_LIST must still work"; then a 1 MiB unknown option, which must
	// be drained too.
	t.Run("unknown options", func(t *testing.T) {
		c := nbdDial(t, tg)
		nbdMust(t, "start", c.Start(fixedNZ))
		nbdOptErr(t, c, 99, []byte{1, 2, 3}, testutil.NBDRepErrUnsup)
		nbdList(t, c)
		nbdOptErr(t, c, 1234, hostileData(1<<20), testutil.NBDRepErrUnsup)
		// PEEK_EXPORT was withdrawn; STARTTLS without TLS may be
		// refused as unsupported (cbtfs) or by policy (qemu-nbd).
		nbdOptErr(t, c, 4, nil, testutil.NBDRepErrUnsup)
		nbdOptErr(t, c, testutil.NBDOptStartTLS, nil, testutil.NBDRepErrUnsup, testutil.NBDRepErrPolicy)
		nbdMust(t, "structured replies", c.StructuredReplies())
		nbdMust(t, "GO", c.Go(""))
		nbdCheckRead(t, c, data, "unknown options")
	})
	t.Run("bad options", func(t *testing.T) {
		c := nbdDial(t, tg)
		nbdMust(t, "start", c.Start(fixedNZ))
		nbdOptErr(t, c, testutil.NBDOptList, []byte("x"), testutil.NBDRepErrInvalid)
		// Meta contexts before structured replies.
		nbdOptErr(t, c, testutil.NBDOptSetMeta, testutil.NBDMetaData("", nbdCtxBase), testutil.NBDRepErrInvalid)
		// For LIST the spec leaves the choice ("MAY"): cbtfs refuses it
		// like SET, qemu-nbd 7.2 lists.
		if tg.qemu {
			reps, err := c.Option(testutil.NBDOptListMeta, testutil.NBDMetaData(""))
			nbdMust(t, "LIST_META_CONTEXT", err)
			if len(reps) != 4 || reps[3].Type != testutil.NBDRepAck {
				t.Errorf("LIST_META_CONTEXT without structured replies: %v", reps)
			}
		} else {
			nbdOptErr(t, c, testutil.NBDOptListMeta, testutil.NBDMetaData(""), testutil.NBDRepErrInvalid)
		}
		nbdMust(t, "structured replies", c.StructuredReplies())
		nbdOptErr(t, c, testutil.NBDOptStructured, nil, testutil.NBDRepErrInvalid)
		// A name length past the end of the option.
		bad := append(testutil.NBDInfoData(""), 0, 0)
		bad[3] = 100
		nbdOptErr(t, c, testutil.NBDOptGo, bad, testutil.NBDRepErrInvalid)
		nbdOptErr(t, c, testutil.NBDOptInfo, testutil.NBDInfoData("nosuch"), testutil.NBDRepErrUnknown)
		nbdOptErr(t, c, testutil.NBDOptGo, testutil.NBDInfoData("nosuch"), testutil.NBDRepErrUnknown)
		nbdList(t, c)
		nbdMust(t, "SET_META_CONTEXT", c.SetMetaContext("", nbdCtxBase))
		nbdMust(t, "GO", c.Go(""))
		nbdCheckRead(t, c, data, "bad options")
		if _, err := c.BlockStatus(0, 4096, 0); err != nil {
			t.Errorf("BLOCK_STATUS after bad options: %v", err)
		}
	})
	// E.3 2: EXPORT_NAME is answered with size and flags, then 124 zero
	// bytes unless both sides set NO_ZEROES; transmission then works.
	for _, tc := range []struct {
		name     string
		flags    uint32
		noZeroes bool
	}{
		{"export name", testutil.NBDFlagFixed, false},
		{"export name no zeroes", fixedNZ, true},
		{"export name not fixed", 0, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := nbdDial(t, tg)
			nbdMust(t, "start", c.Start(tc.flags))
			nbdMust(t, "EXPORT_NAME", c.ExportName("", tc.noZeroes))
			if c.Size != uint64(len(data)) || c.Flags&testutil.NBDTFlagHasFlags == 0 || (c.Flags&testutil.NBDTFlagReadOnly != 0) != tg.readOnly {
				t.Errorf("EXPORT_NAME: size %d flags %#x", c.Size, c.Flags)
			}
			// Without structured replies DF must not be offered.
			if c.Flags&testutil.NBDTFlagSendDF != 0 {
				t.Errorf("EXPORT_NAME: flags %#x offer DF without structured replies", c.Flags)
			}
			nbdCheckRead(t, c, data, "EXPORT_NAME")
			nbdMust(t, "disconnect", c.Disconnect())
		})
	}
	// Where the protocol leaves no way to answer, the server closes the
	// connection: EXPORT_NAME for an unknown export, unknown client
	// flags, a bad option magic, any option but EXPORT_NAME without fixed
	// newstyle.
	for _, tc := range []struct {
		name string
		run  func(c *testutil.NBDClient) error
	}{
		{"unknown export name", func(c *testutil.NBDClient) error {
			if err := c.Start(fixedNZ); err != nil {
				return err
			}
			return c.SendOption(testutil.NBDOptExportName, []byte("nosuch"))
		}},
		{"unknown client flags", func(c *testutil.NBDClient) error {
			if err := c.Start(testutil.NBDFlagFixed | 1<<5); err != nil {
				return err
			}
			return c.SendOption(testutil.NBDOptList, nil)
		}},
		{"bad option magic", func(c *testutil.NBDClient) error {
			if err := c.Start(fixedNZ); err != nil {
				return err
			}
			return c.WriteRaw(bytes.Repeat([]byte{0xee}, 16))
		}},
		{"list without fixed newstyle", func(c *testutil.NBDClient) error {
			if err := c.Start(0); err != nil {
				return err
			}
			return c.SendOption(testutil.NBDOptList, nil)
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := nbdDial(t, tg)
			if err := tc.run(c); err != nil && !errors.Is(err, syscall.EPIPE) && !errors.Is(err, syscall.ECONNRESET) {
				t.Fatal(err)
			}
			if err := c.ReadEOF(10 * time.Second); err != nil {
				t.Error(err)
			}
		})
	}
	t.Run("abort", func(t *testing.T) {
		c := nbdDial(t, tg)
		nbdMust(t, "start", c.Start(fixedNZ))
		reps, err := c.Option(testutil.NBDOptAbort, nil)
		nbdMust(t, "ABORT", err)
		if len(reps) != 1 || reps[0].Type != testutil.NBDRepAck {
			t.Errorf("ABORT: replies %v, want ACK", reps)
		}
		if err := c.ReadEOF(10 * time.Second); err != nil {
			t.Error(err)
		}
	})
	// Clients that hang up at awkward moments: in the middle of an
	// option's payload, and in the middle of a WRITE's.
	t.Run("hang ups", func(t *testing.T) {
		c := nbdDial(t, tg)
		nbdMust(t, "start", c.Start(fixedNZ))
		b := testutil.NBDInfoData("")
		nbdMust(t, "send", c.WriteRaw(append([]byte{0x49, 0x48, 0x41, 0x56, 0x45, 0x4f, 0x50, 0x54, 0, 0, 0, 7, 0, 0, 1, 0}, b...)))
		c.Close()
		if !tg.readOnly {
			c = nbdDial(t, tg)
			nbdMust(t, "handshake", c.Handshake("", true))
			nbdMust(t, "send", c.Send(0, testutil.NBDCmdWrite, 1, 0, 65536, hostileData(1000)))
			c.Close()
		}
		c = nbdDial(t, tg)
		nbdMust(t, "handshake", c.Handshake("", true))
		nbdCheckRead(t, c, data, "other clients hung up")
	})
}

func nbdHostileRequests(t *testing.T, tg nbdTarget, data []byte, structured bool) {
	size := uint64(len(data))
	huge := uint64(1<<64 - 512) // off+len wraps around 2^64
	const (
		einval = testutil.NBDEINVAL
		enospc = testutil.NBDENOSPC
		eperm  = testutil.NBDEPERM
	)
	cases := []nbdHostileCase{
		{name: "read past the end", typ: testutil.NBDCmdRead, off: size - 512, n: 1024, want: einval},
		{name: "read overflowing", typ: testutil.NBDCmdRead, off: huge, n: 1024, want: einval},
		{name: "empty read past the end", typ: testutil.NBDCmdRead, off: size + 1, want: einval},
		// "READ >32 MiB in qemu -> EINVAL ..., connection kept".
		{name: "read over 32 MiB", typ: testutil.NBDCmdRead, n: 40 << 20, want: einval},
		{name: "cache overflowing", typ: testutil.NBDCmdCache, off: huge, n: 1024, want: einval},
		{name: "block status overflowing", typ: testutil.NBDCmdBlockStatus, off: huge, n: 1024, want: einval},
		{name: "block status of nothing", typ: testutil.NBDCmdBlockStatus, want: einval},
		{name: "unknown command", typ: 42, want: einval},
		{name: "resize (not offered)", typ: 8, n: 4096, want: einval},
		{name: "read with REQ_ONE", flags: testutil.NBDCmdFlagReqOne, typ: testutil.NBDCmdRead, n: 4096, want: einval},
		{name: "read with an unknown flag", flags: 1 << 15, typ: testutil.NBDCmdRead, n: 4096, want: einval},
		{name: "flush with NO_HOLE", flags: testutil.NBDCmdFlagNoHole, typ: testutil.NBDCmdFlush, want: einval},
		{name: "trim with FAST_ZERO", flags: testutil.NBDCmdFlagFastZero, typ: testutil.NBDCmdTrim, n: 512, want: einval},
		{name: "write zeroes with REQ_ONE", flags: testutil.NBDCmdFlagReqOne, typ: testutil.NBDCmdWriteZeroes, n: 512, want: einval},
		// SEND_DF is offered only with structured replies.
		{name: "read with DF", flags: testutil.NBDCmdFlagDF, typ: testutil.NBDCmdRead, n: 4096, want: einval, structured: 2},
	}
	if tg.readOnly {
		cases = append(cases,
			// "it SHOULD return NBD_EPERM if it receives a write or trim
			// request on a read-only export"; qemu-nbd 7.2 answers
			// EINVAL "Export is read-only" (formats.md D.11).
			nbdHostileCase{name: "write", typ: testutil.NBDCmdWrite, n: 65536, payload: true, want: eperm, qemu: einval},
			// The spec does not order the checks: cbtfs refuses a write
			// to a read-only export before looking at its range.
			nbdHostileCase{name: "trim overflowing", typ: testutil.NBDCmdTrim, off: huge, n: 1024, want: eperm, qemu: einval},
			nbdHostileCase{name: "write past the end", typ: testutil.NBDCmdWrite, off: size - 512, n: 1024, payload: true, want: eperm, qemu: einval},
			nbdHostileCase{name: "trim", typ: testutil.NBDCmdTrim, n: 65536, want: eperm, qemu: einval},
			nbdHostileCase{name: "write zeroes", typ: testutil.NBDCmdWriteZeroes, n: 65536, want: eperm, qemu: einval},
			// FAST_ZERO is not offered on a read-only export.
			nbdHostileCase{name: "write zeroes with FAST_ZERO", flags: testutil.NBDCmdFlagFastZero, typ: testutil.NBDCmdWriteZeroes, n: 65536, want: einval},
		)
	} else {
		cases = append(cases,
			// "The server SHOULD return NBD_ENOSPC if it receives a write
			// request including one or more sectors beyond the size of
			// the device"; qemu-nbd 7.2 answers EINVAL (D.11).
			nbdHostileCase{name: "trim overflowing", typ: testutil.NBDCmdTrim, off: huge, n: 1024, want: einval},
			nbdHostileCase{name: "write past the end", typ: testutil.NBDCmdWrite, off: size - 512, n: 1024, payload: true, want: enospc, qemu: einval},
			nbdHostileCase{name: "write overflowing", typ: testutil.NBDCmdWrite, off: huge, n: 1024, payload: true, want: enospc, qemu: einval},
			nbdHostileCase{name: "write zeroes past the end", typ: testutil.NBDCmdWriteZeroes, off: size - 512, n: 1024, want: enospc, qemu: einval},
			nbdHostileCase{name: "write zeroes overflowing", typ: testutil.NBDCmdWriteZeroes, off: huge, n: 1024, want: enospc, qemu: einval},
			nbdHostileCase{name: "write with DF", flags: testutil.NBDCmdFlagDF, typ: testutil.NBDCmdWrite, n: 512, payload: true, want: einval},
			// A WRITE over the 32 MiB maximum: cbtfs reads and discards
			// the payload and stays in step; qemu-nbd replies EINVAL and
			// drops the connection without reading it (formats.md D.10),
			// so it is not probed.
			nbdHostileCase{name: "write over 32 MiB", typ: testutil.NBDCmdWrite, n: 33 << 20, payload: true, want: einval, cbtfsOnly: true},
		)
	}
	c := nbdDial(t, tg)
	var queries []string
	if structured {
		queries = []string{nbdCtxBase}
	}
	nbdMust(t, "handshake", c.Handshake("", structured, queries...))
	if tg.readOnly != (c.Flags&testutil.NBDTFlagReadOnly != 0) {
		t.Fatalf("transmission flags %#x", c.Flags)
	}
	for i, tc := range cases {
		if tc.cbtfsOnly && tg.qemu || tc.structured == 1 && !structured || tc.structured == 2 && structured {
			continue
		}
		want := tc.want
		if tg.qemu && tc.qemu != 0 {
			want = tc.qemu
		}
		var payload []byte
		if tc.payload {
			payload = hostileData(tc.n)
		}
		cookie := uint64(1000 + i)
		nbdMust(t, tc.name, c.Send(tc.flags, tc.typ, cookie, tc.off, tc.n, payload))
		rep, err := c.ReadReply(nil)
		nbdMust(t, tc.name+": reply", err)
		if rep.Cookie != cookie || rep.Errno != want {
			t.Errorf("%s: reply cookie %d errno %d (%q), want cookie %d errno %d", tc.name, rep.Cookie, rep.Errno, rep.Msg, cookie, want)
		}
		if structured && tc.typ == testutil.NBDCmdRead && rep.Simple {
			// "Once structured replies are negotiated, READ must use
			// structured chunks (even for an early EINVAL)."
			t.Errorf("%s: simple reply to a READ after structured replies", tc.name)
		}
		nbdCheckRead(t, c, data, tc.name)
	}
	// Requests that are valid, between the hostile ones.
	if structured {
		got, err := c.Read(0, 65536, testutil.NBDCmdFlagDF)
		if err != nil || !bytes.Equal(got, data[:65536]) {
			t.Errorf("READ with DF: %v", err)
		}
	}
	nbdMust(t, "FLUSH", c.Do(testutil.NBDCmdFlush, 0, 0, 0))
	// CACHE is a hint that "must not change semantics", on a read-only
	// export too.
	if err := c.Do(testutil.NBDCmdCache, 0, 0, 65536); err != nil {
		t.Errorf("CACHE: %v", err)
	}
	nbdCheckRead(t, c, data, "valid requests")
	nbdMust(t, "disconnect", c.Disconnect())
}
