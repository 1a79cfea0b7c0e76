package nbdlink_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"path/filepath"
	"slices"
	"syscall"
	"testing"
	"time"

	"github.com/cbtfs/cbtfs/nbdlink"
)

const (
	chainSize = 4 << 20
	ctxBase   = "base:allocation"
	ctxDepth  = "qemu:allocation-depth"
	ctxBitmap = "qemu:dirty-bitmap:bm0"
)

// chainExport builds, in memory, the chain of formats.md section F: a base
// with 1 MiB of data and a zero cluster at 3M, and an overlay with bitmap
// bm0 that received three writes.
func chainExport() *memExport { return chainExportW(4 << 10) }

// chainExportW is chainExport with a last write of w bytes at 2560K.
func chainExportW(w int) *memExport {
	m := newMemExport(chainSize, 64<<10, "bm0", true)
	m.baseWrite(bytes.Repeat([]byte{1}, 1<<20), 0)
	m.baseZero(3<<20, 64<<10)
	mustWrite(m, bytes.Repeat([]byte{2}, 256<<10), 512<<10)
	if err := m.WriteZeroes(2<<20, 128<<10, true); err != nil {
		panic(err)
	}
	mustWrite(m, bytes.Repeat([]byte{3}, w), 2560<<10)
	return m
}

func mustWrite(m *memExport, p []byte, off int64) {
	if _, err := m.WriteAt(p, off); err != nil {
		panic(err)
	}
}

// The extents qemu-nbd 7.2 reports for that chain (formats.md F).
var chainExtents = map[string][]extent{
	ctxBase: {{1048576, 0}, {1572864, 3}, {65536, 0}, {1507328, 3}},
	ctxDepth: {{524288, 2}, {262144, 1}, {262144, 2}, {1048576, 0}, {131072, 1},
		{393216, 0}, {65536, 1}, {458752, 0}, {65536, 2}, {983040, 0}},
	ctxBitmap: {{524288, 0}, {262144, 1}, {1310720, 0}, {131072, 1}, {393216, 0},
		{65536, 1}, {1507328, 0}},
}

func TestGreetingAndUnknownClientFlags(t *testing.T) {
	sock := serveOne(t, chainExport(), true)
	for _, flags := range []uint32{1 << 2, 1<<31 | 3, 0xffffffff} {
		t.Run(fmt.Sprintf("%#x", flags), func(t *testing.T) {
			r := dialRaw(t, sock)
			r.start(flags)
			// "the server MUST drop the TCP connection if the client sets
			// an unknown flag"
			r.expectClosed()
		})
	}
}

func TestNonFixedNewstyle(t *testing.T) {
	sock := serveOne(t, chainExport(), true)
	t.Run("list dropped", func(t *testing.T) {
		r := dialRaw(t, sock)
		r.start(0)
		r.sendOption(optList, nil)
		r.expectClosed()
	})
	t.Run("export name works", func(t *testing.T) {
		r := dialRaw(t, sock)
		r.start(0)
		r.sendOption(optExportName, nil)
		b := r.read(134)
		if got := be.Uint64(b); got != chainSize {
			t.Errorf("size %d, want %d", got, chainSize)
		}
		if !bytes.Equal(b[10:], make([]byte, 124)) {
			t.Errorf("padding not zero")
		}
	})
}

func TestExportName(t *testing.T) {
	m := chainExport()
	sock := serveOne(t, m, false)
	for _, tc := range []struct {
		name        string
		clientFlags uint32
		structured  bool
		wantFlags   uint16
		wantPad     bool
	}{
		{"zeroes", 1, false, 0x0c6d, true},
		{"no zeroes", 3, false, 0x0c6d, false},
		{"structured no zeroes", 3, true, 0x0ced, false},
		{"structured zeroes", 1, true, 0x0ced, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := dialRaw(t, sock)
			r.start(tc.clientFlags)
			if tc.structured {
				r.option(optStructured, nil)
			}
			r.sendOption(optExportName, nil)
			b := r.read(10)
			if got := be.Uint64(b); got != chainSize {
				t.Errorf("size %d, want %d", got, chainSize)
			}
			if got := be.Uint16(b[8:]); got != tc.wantFlags {
				t.Errorf("flags %#x, want %#x", got, tc.wantFlags)
			}
			if tc.wantPad {
				if pad := r.read(124); !bytes.Equal(pad, make([]byte, 124)) {
					t.Errorf("padding not zero")
				}
			}
			// The stream must be in step: a READ works.
			got := r.readData(1, 512<<10, 4096, 0)
			if want := m.contents()[512<<10 : 512<<10+4096]; !bytes.Equal(got, want) {
				t.Errorf("read after EXPORT_NAME: wrong data")
			}
		})
	}
	t.Run("unknown export", func(t *testing.T) {
		r := dialRaw(t, sock)
		r.start(3)
		r.sendOption(optExportName, []byte("nosuch"))
		// "the server MUST terminate the session"
		r.expectClosed()
	})
}

func TestUnknownOptionThenList(t *testing.T) {
	sock := startServer(t, []nbdlink.ExportConfig{
		{Name: "", Description: "default disk", Export: chainExport(), ReadOnly: true},
		{Name: "other", Export: chainExport()},
	}, nil)
	r := dialRaw(t, sock)
	r.start(3)
	msg := r.expectOptError(99, []byte{1, 2, 3}, repErrUnsup)
	if msg != "unsupported option 99 (unknown-99)" {
		t.Errorf("message %q", msg)
	}
	for _, opt := range []uint32{4, optStartTLS, optExtHeaders, 1000} {
		r.expectOptError(opt, nil, repErrUnsup)
	}
	reps := r.option(optList, nil)
	var got []string
	for _, rep := range reps[:len(reps)-1] {
		if rep.typ != repServer {
			t.Fatalf("LIST reply type %#x", rep.typ)
		}
		n := be.Uint32(rep.data)
		got = append(got, fmt.Sprintf("%s|%s", rep.data[4:4+n], rep.data[4+n:]))
	}
	if want := []string{"|default disk", "other|"}; !slices.Equal(got, want) {
		t.Errorf("LIST = %q, want %q", got, want)
	}
	if reps[len(reps)-1].typ != repAck {
		t.Errorf("LIST not ended by ACK")
	}
	// "data present -> ERR_INVALID", and negotiation goes on.
	r.expectOptError(optList, []byte("x"), repErrInvalid)
	r.expectOptError(optStructured, []byte("x"), repErrInvalid)
	r.option(optStructured, nil)
	if m := r.expectOptError(optStructured, nil, repErrInvalid); m != "structured reply already negotiated" {
		t.Errorf("message %q", m)
	}
	// ABORT: ACK, then the server closes.
	if reps := r.option(optAbort, nil); reps[0].typ != repAck {
		t.Errorf("ABORT reply %#x", reps[0].typ)
	}
	r.expectClosed()
}

func TestInfoOption(t *testing.T) {
	sock := startServer(t, []nbdlink.ExportConfig{
		{Name: "disk", Description: "my disk", Export: chainExport(), ReadOnly: true},
	}, nil)
	r := dialRaw(t, sock)
	r.start(3)
	r.option(optStructured, nil)
	reps := r.option(optInfo, infoData("disk", 3, 1, 2, 77))
	var types []uint16
	for _, rep := range reps[:len(reps)-1] {
		if rep.typ != repInfo {
			t.Fatalf("INFO reply %#x", rep.typ)
		}
		it := be.Uint16(rep.data)
		types = append(types, it)
		switch it {
		case 0:
			if len(rep.data) != 12 || be.Uint64(rep.data[2:]) != chainSize || be.Uint16(rep.data[10:]) != 0x048f {
				t.Errorf("INFO_EXPORT % x", rep.data)
			}
		case 1:
			if string(rep.data[2:]) != "disk" {
				t.Errorf("INFO_NAME %q", rep.data[2:])
			}
		case 2:
			if string(rep.data[2:]) != "my disk" {
				t.Errorf("INFO_DESCRIPTION %q", rep.data[2:])
			}
		case 3:
			if len(rep.data) != 14 || be.Uint32(rep.data[2:]) != 1 || be.Uint32(rep.data[6:]) != 4096 || be.Uint32(rep.data[10:]) != 32<<20 {
				t.Errorf("INFO_BLOCK_SIZE % x", rep.data)
			}
		}
	}
	// qemu's order: NAME (requested), DESCRIPTION, BLOCK_SIZE, EXPORT.
	if want := []uint16{1, 2, 3, 0}; !slices.Equal(types, want) {
		t.Errorf("info types %v, want %v", types, want)
	}
	if reps[len(reps)-1].typ != repAck {
		t.Errorf("INFO not ended by ACK")
	}

	for _, tc := range []struct {
		name string
		data []byte
		want uint32
	}{
		{"unknown export", infoData("zzz"), repErrUnknown},
		{"name longer than payload", be.AppendUint32(nil, 10), repErrInvalid},
		{"missing count", nameData("disk"), repErrInvalid},
		{"trailing byte", append(infoData("disk"), 0), repErrInvalid},
		{"odd request list", append(nameData("disk"), 0, 2, 0, 1), repErrInvalid},
		{"NUL in name", infoData("di\x00sk"), repErrInvalid},
		{"name too long", infoData(string(make([]byte, 4097))), repErrInvalid},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r.expectOptError(optInfo, tc.data, tc.want)
		})
	}
	msg := r.expectOptError(optGo, infoData("zzz"), repErrUnknown)
	if msg != `export "zzz" not present` {
		t.Errorf("message %q", msg)
	}
	// Still negotiating: GO for the real export works.
	if size, _ := r.goExport("disk"); size != chainSize {
		t.Errorf("size %d", size)
	}
}

func TestOptionLengthCaps(t *testing.T) {
	sock := serveOne(t, chainExport(), true)
	r := dialRaw(t, sock)
	r.start(3)
	r.option(optStructured, nil)
	// Longer than we buffer: drained, ERR_TOO_BIG, negotiation goes on.
	big := append(metaData(""), make([]byte, 70<<10)...)
	r.expectOptError(optSetMeta, big, repErrTooBig)
	r.expectOptError(99, make([]byte, 1<<20), repErrUnsup)
	r.option(optList, nil)
	// Longer than any option may be: disconnect (as qemu).
	b := be.AppendUint64(nil, ihaveopt)
	b = be.AppendUint32(b, optInfo)
	b = be.AppendUint32(b, 32<<20+1)
	r.write(b)
	r.expectClosed()
}

func TestNegotiationTimeout(t *testing.T) {
	sock := startServer(t, []nbdlink.ExportConfig{{Export: chainExport()}},
		&nbdlink.Options{HandshakeTimeout: 200 * time.Millisecond})
	r := dialRaw(t, sock)
	r.greeting()
	start := time.Now()
	r.expectClosed()
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("closed after %v", d)
	}
}

func TestMetaContextNeedsStructuredReplies(t *testing.T) {
	sock := serveOne(t, chainExport(), true)
	r := dialRaw(t, sock)
	r.start(3)
	for _, opt := range []uint32{optSetMeta, optListMeta} {
		msg := r.expectOptError(opt, metaData("", ctxBase), repErrInvalid)
		if want := "when structured reply is not negotiated"; !bytes.Contains([]byte(msg), []byte(want)) {
			t.Errorf("message %q", msg)
		}
	}
	s := r.handshakeRest("", false)
	// Without structured replies no context can be selected.
	r.request(0, cmdBlockStatus, 1, 0, 4096, nil)
	rep := r.expectErrno(1, eINVAL)
	if !rep.simple {
		t.Errorf("structured reply sent without negotiation")
	}
	if s.flags&(1<<7) != 0 {
		t.Errorf("SEND_DF without structured replies: %#x", s.flags)
	}
}

// handshakeRest finishes a negotiation begun with start.
func (r *rawClient) handshakeRest(export string, structured bool) session {
	r.t.Helper()
	if structured {
		r.option(optStructured, nil)
	}
	var s session
	s.size, s.flags = r.goExport(export)
	return s
}

func TestMetaContextQueries(t *testing.T) {
	sock := startServer(t, []nbdlink.ExportConfig{
		{Export: chainExport(), ReadOnly: true},
		{Name: "plain", Export: stripeExport{size: 1 << 20, stripe: 4096}},
	}, nil)
	r := dialRaw(t, sock)
	r.start(3)
	r.option(optStructured, nil)
	list := func(export string, queries ...string) []string {
		t.Helper()
		var names []string
		for _, rep := range r.option(optListMeta, metaData(export, queries...)) {
			if rep.typ == repMetaContext {
				if id := be.Uint32(rep.data); id != 0 {
					t.Errorf("LIST gave id %d", id)
				}
				names = append(names, string(rep.data[4:]))
			} else if rep.typ != repAck {
				t.Fatalf("LIST reply %#x %q", rep.typ, rep.data)
			}
		}
		return names
	}
	all := []string{ctxBase, ctxDepth, ctxBitmap}
	for _, tc := range []struct {
		queries []string
		want    []string
	}{
		{nil, all},
		{[]string{"qemu:"}, []string{ctxDepth, ctxBitmap}},
		{[]string{"qemu:dirty-bitmap:"}, []string{ctxBitmap}},
		{[]string{"base:"}, []string{ctxBase}},
		{[]string{ctxBitmap, ctxBase}, []string{ctxBase, ctxBitmap}},
		{[]string{"foo:bar", "qemu:nothing", "qemu:dirty-bitmap:zz", "base:alloc", "nons"}, nil},
		{[]string{"qemu:dirty-bitmap"}, nil},
	} {
		if got := list("", tc.queries...); !slices.Equal(got, tc.want) {
			t.Errorf("LIST %q = %q, want %q", tc.queries, got, tc.want)
		}
	}
	if got := list("plain"); !slices.Equal(got, []string{ctxBase}) {
		t.Errorf("LIST plain = %q", got)
	}

	set := func(queries ...string) map[string]uint32 {
		t.Helper()
		return r.metaReplies(r.option(optSetMeta, metaData("", queries...)))
	}
	for _, tc := range []struct {
		queries []string
		want    map[string]uint32
	}{
		{[]string{ctxBase, ctxDepth, ctxBitmap}, map[string]uint32{ctxBase: 0, ctxDepth: 1, ctxBitmap: 2}},
		{[]string{ctxBitmap}, map[string]uint32{ctxBitmap: 2}},
		{[]string{ctxDepth}, map[string]uint32{ctxDepth: 1}},
		// In SET an empty leaf selects nothing.
		{[]string{"base:", "qemu:", "qemu:dirty-bitmap:"}, map[string]uint32{}},
		{nil, map[string]uint32{}},
		{[]string{ctxBase, ctxBase}, map[string]uint32{ctxBase: 0}},
	} {
		got := set(tc.queries...)
		if fmt.Sprint(got) != fmt.Sprint(tc.want) {
			t.Errorf("SET %q = %v, want %v", tc.queries, got, tc.want)
		}
	}
	r.expectOptError(optSetMeta, metaData("zzz", ctxBase), repErrUnknown)
	r.expectOptError(optSetMeta, append(metaData("", ctxBase), 0), repErrInvalid)
	r.expectOptError(optListMeta, metaData("", "base:\x00"), repErrInvalid)
	// A query count larger than the payload.
	r.expectOptError(optSetMeta, be.AppendUint32(nameData(""), 5), repErrInvalid)
	// Queries longer than 4096 bytes are skipped, as qemu does.
	if got := set(string(make([]byte, 4097)), ctxBase); fmt.Sprint(got) != fmt.Sprint(map[string]uint32{ctxBase: 0}) {
		t.Errorf("SET with long query = %v", got)
	}
}

func TestMetaContextSelection(t *testing.T) {
	sock := startServer(t, []nbdlink.ExportConfig{
		{Name: "a", Export: chainExport(), ReadOnly: true},
		{Name: "b", Export: chainExport(), ReadOnly: true},
	}, nil)
	t.Run("set a go b", func(t *testing.T) {
		r := dialRaw(t, sock)
		r.start(3)
		r.option(optStructured, nil)
		r.metaReplies(r.option(optSetMeta, metaData("a", ctxBase)))
		r.goExport("b")
		r.request(0, cmdBlockStatus, 7, 0, 65536, nil)
		if rep := r.expectErrno(7, eINVAL); rep.msg != "CMD_BLOCK_STATUS not negotiated" {
			t.Errorf("message %q", rep.msg)
		}
	})
	t.Run("set a go a", func(t *testing.T) {
		r := dialRaw(t, sock)
		r.start(3)
		r.option(optStructured, nil)
		r.metaReplies(r.option(optSetMeta, metaData("a", ctxBase)))
		r.goExport("a")
		got := r.blockStatus(7, 0, chainSize, 0)
		if fmt.Sprint(got[0]) != fmt.Sprint(chainExtents[ctxBase]) {
			t.Errorf("extents %v", got)
		}
	})
	t.Run("second set replaces", func(t *testing.T) {
		r := dialRaw(t, sock)
		r.start(3)
		r.option(optStructured, nil)
		r.metaReplies(r.option(optSetMeta, metaData("a", ctxBase)))
		r.metaReplies(r.option(optSetMeta, metaData("a")))
		r.goExport("a")
		r.request(0, cmdBlockStatus, 7, 0, 65536, nil)
		r.expectErrno(7, eINVAL)
	})
	t.Run("failed set clears", func(t *testing.T) {
		r := dialRaw(t, sock)
		r.start(3)
		r.option(optStructured, nil)
		r.metaReplies(r.option(optSetMeta, metaData("a", ctxBase)))
		r.expectOptError(optSetMeta, metaData("nosuch", ctxBase), repErrUnknown)
		r.goExport("a")
		r.request(0, cmdBlockStatus, 7, 0, 65536, nil)
		r.expectErrno(7, eINVAL)
	})
}

func TestTransmissionFlags(t *testing.T) {
	for _, tc := range []struct {
		readOnly, multiConn, structured bool
		want                            uint16
	}{
		{true, false, true, 0x048f}, // formats.md C.5
		{true, false, false, 0x040f},
		{false, false, false, 0x0c6d},
		{false, false, true, 0x0ced},
		{false, true, true, 0x0ded},
		{true, true, false, 0x050f},
	} {
		t.Run(fmt.Sprintf("ro=%v,mc=%v,sr=%v", tc.readOnly, tc.multiConn, tc.structured), func(t *testing.T) {
			sock := startServer(t, []nbdlink.ExportConfig{{Export: chainExport(), ReadOnly: tc.readOnly, MultiConn: tc.multiConn}}, nil)
			r := dialRaw(t, sock)
			s := r.handshake("", tc.structured)
			if s.flags != tc.want {
				t.Errorf("flags %#04x, want %#04x", s.flags, tc.want)
			}
		})
	}
}

func TestBlockStatus(t *testing.T) {
	sock := serveOne(t, chainExport(), true)
	r := dialRaw(t, sock)
	s := r.handshake("", true, ctxBase, ctxDepth, ctxBitmap)
	ids := s.contexts
	t.Run("whole export", func(t *testing.T) {
		got := r.blockStatus(1, 0, chainSize, 0)
		for name, want := range chainExtents {
			if fmt.Sprint(got[ids[name]]) != fmt.Sprint(want) {
				t.Errorf("%s: got %v, want %v", name, got[ids[name]], want)
			}
		}
	})
	t.Run("unaligned 100..1100", func(t *testing.T) {
		got := r.blockStatus(2, 100, 1000, 0)
		want := map[uint32][]extent{0: {{1000, 0}}, 1: {{1000, 2}}, 2: {{1000, 0}}}
		if fmt.Sprint(got) != fmt.Sprint(want) {
			t.Errorf("got %v, want %v", got, want)
		}
	})
	t.Run("req one", func(t *testing.T) {
		// From 600K: base data up to 1M; depth local up to 768K; dirty
		// up to 768K. One extent each, never past the request.
		got := r.blockStatus(3, 600<<10, 1<<20, flagReqOne)
		want := map[uint32][]extent{0: {{424 << 10, 0}}, 1: {{168 << 10, 1}}, 2: {{168 << 10, 1}}}
		if fmt.Sprint(got) != fmt.Sprint(want) {
			t.Errorf("got %v, want %v", got, want)
		}
		got = r.blockStatus(4, 600<<10, 100, flagReqOne)
		want = map[uint32][]extent{0: {{100, 0}}, 1: {{100, 1}}, 2: {{100, 1}}}
		if fmt.Sprint(got) != fmt.Sprint(want) {
			t.Errorf("got %v, want %v", got, want)
		}
	})
	t.Run("errors", func(t *testing.T) {
		r.request(0, cmdBlockStatus, 5, 0, 0, nil)
		if rep := r.expectErrno(5, eINVAL); rep.msg != "need non-zero length" {
			t.Errorf("message %q", rep.msg)
		}
		r.request(0, cmdBlockStatus, 6, chainSize-512, 1024, nil)
		r.expectErrno(6, eINVAL)
		r.request(flagDF, cmdBlockStatus, 7, 0, 512, nil)
		r.expectErrno(7, eINVAL)
	})
}

func TestBlockStatusManyExtents(t *testing.T) {
	// 64 MiB in 512-byte stripes: 131072 extents, more than one chunk
	// may hold; the server stops at the cap and the client re-asks.
	e := stripeExport{size: 64<<20 + 1024, stripe: 512}
	sock := serveOne(t, e, true)
	r := dialRaw(t, sock)
	r.handshake("", true, ctxBase)
	var off uint64
	var total int
	for off < e.size {
		n := uint32(min(e.size-off, 1<<32-512))
		got := r.blockStatus(uint64(total), off, n, 0)[0]
		if len(got) > 1<<17 {
			t.Fatalf("%d extents in one chunk", len(got))
		}
		for i, x := range got {
			wantFlags := uint32(0)
			if ((off/512)+uint64(i))%2 == 1 {
				wantFlags = 3
			}
			if x.length != 512 || x.flags != wantFlags {
				t.Fatalf("extent %d at %d: %v", i, off, x)
			}
		}
		off += uint64(len(got)) * 512
		total += len(got)
	}
	if want := int(e.size / 512); total != want {
		t.Errorf("%d extents, want %d", total, want)
	}
}

func TestRangeChecks(t *testing.T) {
	m := chainExport()
	sock := serveOne(t, m, false)
	for _, structured := range []bool{false, true} {
		t.Run(fmt.Sprintf("structured=%v", structured), func(t *testing.T) {
			r := dialRaw(t, sock)
			r.handshake("", structured)
			huge := uint64(1<<64 - 512)
			cases := []struct {
				typ     uint16
				off     uint64
				n       uint32
				payload bool
				want    uint32
			}{
				{cmdRead, chainSize - 512, 1024, false, eINVAL},
				{cmdRead, huge, 1024, false, eINVAL},
				{cmdRead, chainSize + 1, 0, false, eINVAL},
				{cmdRead, 0, 40 << 20, false, eINVAL}, // over 32 MiB
				{cmdWrite, chainSize - 512, 1024, true, eNOSPC},
				{cmdWrite, huge, 1024, true, eNOSPC},
				{cmdWriteZeroes, huge, 1024, false, eNOSPC},
				{cmdTrim, huge, 1024, false, eINVAL},
				{cmdCache, huge, 1024, false, eINVAL},
				{cmdBlockStatus, huge, 1024, false, eINVAL},
			}
			for i, tc := range cases {
				var payload []byte
				if tc.payload {
					payload = pattern(9, int(tc.n))
				}
				cookie := uint64(100 + i)
				r.request(0, tc.typ, cookie, tc.off, tc.n, payload)
				r.expectErrno(cookie, tc.want)
				// Still in step.
				got := r.readData(1, 0, 512, 0)
				if !bytes.Equal(got, m.contents()[:512]) {
					t.Fatalf("case %d: read after error: wrong data", i)
				}
			}
			if w := m.writes.Load(); w != 2 {
				t.Errorf("%d writes reached the export, want the 2 of chainExport", w)
			}
		})
	}
}

func TestWriteOver32MiB(t *testing.T) {
	m := chainExport()
	sock := serveOne(t, m, false)
	r := dialRaw(t, sock)
	r.handshake("", true)
	n := 33 << 20
	done := make(chan struct{})
	go func() {
		// The payload is written concurrently: the server reads and
		// discards it.
		defer close(done)
		b := be.AppendUint32(nil, requestMagic)
		b = be.AppendUint16(b, 0)
		b = be.AppendUint16(b, cmdWrite)
		b = be.AppendUint64(b, 1)
		b = be.AppendUint64(b, 0)
		b = be.AppendUint32(b, uint32(n))
		r.nc.Write(b)
		r.nc.Write(make([]byte, n))
	}()
	rep := r.expectErrno(1, eINVAL)
	<-done
	if !bytes.Contains([]byte(rep.msg), []byte("larger than max len")) {
		t.Errorf("message %q", rep.msg)
	}
	if got := r.readData(2, 0, 4096, 0); !bytes.Equal(got, m.contents()[:4096]) {
		t.Errorf("read after refused write: wrong data")
	}
}

func TestReadOnlyExport(t *testing.T) {
	m := chainExport()
	sock := serveOne(t, m, true)
	r := dialRaw(t, sock)
	r.handshake("", true)
	before := m.contents()
	r.request(0, cmdWrite, 1, 0, 65536, pattern(5, 65536))
	if rep := r.expectErrno(1, ePERM); rep.msg != "export is read-only" {
		t.Errorf("message %q", rep.msg)
	}
	if got := r.readData(2, 0, 65536, 0); !bytes.Equal(got, before[:65536]) {
		t.Errorf("read after refused write: wrong data")
	}
	r.request(0, cmdTrim, 3, 0, 65536, nil)
	r.expectErrno(3, ePERM)
	r.request(0, cmdWriteZeroes, 4, 0, 65536, nil)
	r.expectErrno(4, ePERM)
	r.request(flagFastZero, cmdWriteZeroes, 5, 0, 65536, nil)
	r.expectErrno(5, eINVAL) // FAST_ZERO is not advertised here
	r.request(0, cmdFlush, 6, 0, 0, nil)
	r.expectOK(6)
	r.request(0, cmdCache, 7, 0, 65536, nil)
	r.expectOK(7)
	if !bytes.Equal(m.contents(), before) {
		t.Errorf("read-only export changed")
	}
	if f := m.flushes.Load(); f != 0 {
		t.Errorf("Flush called %d times on a read-only export", f)
	}
}

func TestUnknownCommandsAndFlags(t *testing.T) {
	m := chainExport()
	sock := serveOne(t, m, false)
	for _, structured := range []bool{false, true} {
		t.Run(fmt.Sprintf("structured=%v", structured), func(t *testing.T) {
			r := dialRaw(t, sock)
			r.handshake("", structured)
			cases := []struct {
				flags, typ uint16
				n          uint32
				payload    bool
				msg        string
			}{
				{0, 42, 0, false, "invalid request type (42) received"},
				{0, 8, 4096, false, "invalid request type (8) received"}, // RESIZE: not offered
				{flagReqOne, cmdRead, 4096, false, "unsupported flags for command read (got 0x8)"},
				{1 << 15, cmdRead, 4096, false, "unsupported flags for command read (got 0x8000)"},
				{flagDF, cmdWrite, 512, true, "unsupported flags for command write (got 0x4)"},
				{flagNoHole, cmdFlush, 0, false, "unsupported flags for command flush (got 0x2)"},
				{flagFastZero, cmdTrim, 512, false, "unsupported flags for command trim (got 0x10)"},
				{flagReqOne, cmdWriteZeroes, 512, false, "unsupported flags for command write zeroes (got 0x8)"},
			}
			if !structured {
				// SEND_DF is only advertised with structured replies.
				cases = append(cases, struct {
					flags, typ uint16
					n          uint32
					payload    bool
					msg        string
				}{flagDF, cmdRead, 4096, false, "unsupported flags for command read (got 0x4)"})
			}
			for i, tc := range cases {
				var payload []byte
				if tc.payload {
					payload = pattern(1, int(tc.n))
				}
				cookie := uint64(10 + i)
				r.request(tc.flags, tc.typ, cookie, 0, tc.n, payload)
				rep := r.expectErrno(cookie, eINVAL)
				if structured && rep.msg != tc.msg {
					t.Errorf("case %d: message %q, want %q", i, rep.msg, tc.msg)
				}
				if got := r.readData(1, 0, 512, 0); !bytes.Equal(got, m.contents()[:512]) {
					t.Fatalf("case %d: read after error: wrong data", i)
				}
			}
		})
	}
}

func TestZeroLengthRequests(t *testing.T) {
	m := chainExport()
	sock := serveOne(t, m, false)
	for _, structured := range []bool{false, true} {
		t.Run(fmt.Sprintf("structured=%v", structured), func(t *testing.T) {
			r := dialRaw(t, sock)
			r.handshake("", structured, func() []string {
				if structured {
					return []string{ctxBase}
				}
				return nil
			}()...)
			r.request(0, cmdRead, 1, 4096, 0, nil)
			rep := r.readReply(0)
			if rep.errno != 0 || rep.cookie != 1 {
				t.Fatalf("zero read: %+v", rep)
			}
			if structured && (len(rep.chunks) != 1 || rep.chunks[0].typ != chunkNone || rep.chunks[0].flags != flagDone) {
				t.Errorf("zero read chunks %+v, want one NONE+DONE", rep.chunks)
			}
			for i, typ := range []uint16{cmdWrite, cmdTrim, cmdWriteZeroes, cmdCache, cmdFlush} {
				cookie := uint64(10 + i)
				r.request(0, typ, cookie, 4096, 0, nil)
				r.expectOK(cookie)
			}
			r.request(0, cmdBlockStatus, 20, 4096, 0, nil)
			r.expectErrno(20, eINVAL)
			r.readData(21, chainSize, 0, 0) // at the very end: fine
		})
	}
}

func TestStructuredRead(t *testing.T) {
	m := chainExport()
	sock := serveOne(t, m, true)
	r := dialRaw(t, sock)
	r.handshake("", true)
	want := m.contents()
	// 2M..2624K: zero clusters and unallocated space (one hole), then
	// 64K of data.
	off, n := uint64(2<<20), uint32(576<<10)
	r.request(0, cmdRead, 1, off, n, nil)
	rep := r.readReply(0)
	got, err := assembleRead(rep, off, n)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want[off:off+uint64(n)]) {
		t.Errorf("wrong data")
	}
	var types []uint16
	for _, c := range rep.chunks {
		types = append(types, c.typ)
	}
	if w := []uint16{chunkOffsetHole, chunkOffsetData}; !slices.Equal(types, w) {
		t.Errorf("chunk types %v, want %v", types, w)
	}
	// DF: a single data chunk, zeros included.
	r.request(flagDF, cmdRead, 2, off, n, nil)
	rep = r.readReply(0)
	if len(rep.chunks) != 1 || rep.chunks[0].typ != chunkOffsetData {
		t.Fatalf("DF read: %d chunks", len(rep.chunks))
	}
	if got, _ := assembleRead(rep, off, n); !bytes.Equal(got, want[off:off+uint64(n)]) {
		t.Errorf("DF read: wrong data")
	}
	// The whole export, every way.
	if got := r.readData(3, 0, chainSize, 0); !bytes.Equal(got, want) {
		t.Errorf("whole read: wrong data")
	}
	// Unaligned, inside a hole and across a boundary.
	for _, rg := range [][2]uint64{{100, 1000}, {(3 << 20) - 10, 20}, {(2560 << 10) + 1, 65535}} {
		if got := r.readData(4, rg[0], uint32(rg[1]), 0); !bytes.Equal(got, want[rg[0]:rg[0]+rg[1]]) {
			t.Errorf("read %v: wrong data", rg)
		}
	}
}

func TestWritesAndFUA(t *testing.T) {
	m := chainExport()
	sock := serveOne(t, m, false)
	r := dialRaw(t, sock)
	r.handshake("", true, ctxBitmap)
	data := pattern(42, 100000)
	r.request(flagFUA, cmdWrite, 1, 3<<20, uint32(len(data)), data)
	r.expectOK(1)
	// "FUA means durable before reply"
	if f := m.flushes.Load(); f != 1 {
		t.Errorf("%d flushes after FUA write, want 1", f)
	}
	if got := r.readData(2, 3<<20, uint32(len(data)), 0); !bytes.Equal(got, data) {
		t.Errorf("read back: wrong data")
	}
	r.request(0, cmdFlush, 3, 0, 0, nil)
	r.expectOK(3)
	if f := m.flushes.Load(); f != 2 {
		t.Errorf("%d flushes after FLUSH, want 2", f)
	}
	r.request(flagFUA|flagNoHole, cmdWriteZeroes, 4, 3<<20, 65536, nil)
	r.expectOK(4)
	if got := r.readData(5, 3<<20, 65536, 0); !bytes.Equal(got, make([]byte, 65536)) {
		t.Errorf("zeroed range not zero")
	}
	r.request(flagFUA, cmdTrim, 6, 3<<20, 1<<20, nil)
	r.expectOK(6)
	if f := m.flushes.Load(); f != 4 {
		t.Errorf("%d flushes, want 4", f)
	}
	// The bitmap saw it all: 3M..4M is dirty now.
	got := r.blockStatus(7, 3<<20, 1<<20, 0)
	if fmt.Sprint(got[2]) != fmt.Sprint([]extent{{1 << 20, 1}}) {
		t.Errorf("bitmap after writes: %v", got)
	}
}

func TestFastZero(t *testing.T) {
	t.Run("not supported", func(t *testing.T) {
		m := chainExport()
		sock := serveOne(t, m, false)
		r := dialRaw(t, sock)
		r.handshake("", true)
		before := m.contents()
		r.request(flagFastZero, cmdWriteZeroes, 1, 0, 65536, nil)
		r.expectErrno(1, eNOTSUP)
		if !bytes.Equal(m.contents(), before) {
			t.Errorf("refused fast zero changed data")
		}
	})
	t.Run("export decides", func(t *testing.T) {
		m := chainExport()
		sock := serveOne(t, fastZeroExport{m}, false)
		r := dialRaw(t, sock)
		r.handshake("", false)
		before := m.contents()
		r.request(flagFastZero, cmdWriteZeroes, 1, 100, 65536, nil)
		r.expectErrno(1, eNOTSUP)
		if !bytes.Equal(m.contents(), before) {
			t.Errorf("refused fast zero changed data")
		}
		r.request(flagFastZero, cmdWriteZeroes, 2, 0, 128<<10, nil)
		r.expectOK(2)
		if got := r.readData(3, 0, 128<<10, 0); !bytes.Equal(got, make([]byte, 128<<10)) {
			t.Errorf("fast zero did not zero")
		}
	})
}

func TestBackendErrors(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want uint32
	}{
		{fmt.Errorf("wrapped: %w", nbdlink.ErrReadOnly), ePERM},
		{fmt.Errorf("wrapped: %w", nbdlink.ErrNoSpace), eNOSPC},
		{fmt.Errorf("wrapped: %w", nbdlink.ErrOutOfRange), eINVAL},
		{&net.OpError{Op: "x", Err: syscall.EDQUOT}, eNOSPC},
		{fmt.Errorf("x: %w", syscall.EROFS), ePERM},
		{errors.ErrUnsupported, eINVAL},
		{io.ErrUnexpectedEOF, eIO},
		{errors.New("disk on fire"), eIO},
	} {
		t.Run(tc.err.Error(), func(t *testing.T) {
			sock := serveOne(t, failExport{chainExport(), tc.err}, false)
			r := dialRaw(t, sock)
			r.handshake("", true)
			r.request(0, cmdRead, 1, 0, 4096, nil)
			r.expectErrno(1, tc.want)
			r.request(0, cmdWrite, 2, 0, 4096, pattern(1, 4096))
			r.expectErrno(2, tc.want)
			r.request(0, cmdFlush, 3, 0, 0, nil)
			r.expectErrno(3, tc.want)
		})
	}
}

func TestDiscWithRequestsInFlight(t *testing.T) {
	g := newGatedExport(chainExport())
	sock := serveOne(t, g, true)
	r := dialRaw(t, sock)
	r.handshake("", false) // simple replies: every READ calls ReadAt
	const n = 4
	for i := range n {
		r.request(0, cmdRead, uint64(i), uint64(i)<<20, 65536, nil)
	}
	for range n {
		<-g.entered // all four are being served
	}
	r.request(0, cmdDisc, 99, 0, 0, nil)
	close(g.release)
	want := g.contents()
	seen := map[uint64]bool{}
	for range n {
		rep := r.readReply(65536)
		off := rep.cookie << 20
		if rep.errno != 0 || !bytes.Equal(rep.data, want[off:off+65536]) {
			t.Errorf("reply %d: errno %d or wrong data", rep.cookie, rep.errno)
		}
		seen[rep.cookie] = true
	}
	if len(seen) != n {
		t.Errorf("replies for %v", seen)
	}
	// No reply to DISC, then the server closes.
	r.expectClosed()
}

func TestBadRequestMagic(t *testing.T) {
	sock := serveOne(t, chainExport(), true)
	r := dialRaw(t, sock)
	r.handshake("", true)
	r.write(make([]byte, 28))
	r.expectClosed()
}

func TestServeShutdownFinishesRequests(t *testing.T) {
	g := newGatedExport(chainExport())
	srv, err := nbdlink.NewServer([]nbdlink.ExportConfig{{Export: g, ReadOnly: true}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(t.TempDir(), "s")
	l, err := nbdlink.Listen(t.Context(), "unix:"+sock)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, l) }()

	r := dialRaw(t, sock)
	r.handshake("", false)
	r.request(0, cmdRead, 1, 0, 4096, nil)
	<-g.entered
	cancel()
	// Serve waits for the request in flight. (A weak check: it cannot
	// prove Serve would not return later, but the reply check below can.)
	select {
	case err := <-done:
		t.Fatalf("Serve returned %v with a request in flight", err)
	default:
	}
	close(g.release)
	rep := r.readReply(4096)
	if rep.errno != 0 || !bytes.Equal(rep.data, g.contents()[:4096]) {
		t.Errorf("reply after shutdown: errno %d", rep.errno)
	}
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("Serve: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("Serve did not return")
	}
	r.expectClosed()
	if c, err := net.Dial("unix", sock); err == nil {
		c.Close()
		t.Errorf("listener still accepting after Serve returned")
	}
}

func TestListenTCP(t *testing.T) {
	m := chainExport()
	srv, err := nbdlink.NewServer([]nbdlink.ExportConfig{{Export: m, ReadOnly: true}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	l, err := nbdlink.Listen(t.Context(), "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, l) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	}()
	nc, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	r := newRawClient(t, nc)
	r.handshake("", true)
	if got := r.readData(1, 0, 65536, 0); !bytes.Equal(got, m.contents()[:65536]) {
		t.Errorf("wrong data over TCP")
	}
	if _, err := nbdlink.Listen(t.Context(), "unix:"); err == nil {
		t.Errorf("Listen(unix:) succeeded")
	}
}

func TestNewServerValidation(t *testing.T) {
	e := chainExport()
	for _, tc := range []struct {
		name    string
		exports []nbdlink.ExportConfig
	}{
		{"nil export", []nbdlink.ExportConfig{{}}},
		{"duplicate", []nbdlink.ExportConfig{{Export: e}, {Export: e}}},
		{"NUL", []nbdlink.ExportConfig{{Name: "a\x00", Export: e}}},
		{"long name", []nbdlink.ExportConfig{{Name: string(make([]byte, 4097)), Export: e}}},
		{"bad description", []nbdlink.ExportConfig{{Description: "\xff", Export: e}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := nbdlink.NewServer(tc.exports, nil); err == nil {
				t.Errorf("NewServer succeeded")
			}
		})
	}
}

// TestSyntheticBaseAllocation serves an export without meta contexts:
// base:allocation is still offered and reports all data, and structured
// reads never ask the export for block status.
func TestSyntheticBaseAllocation(t *testing.T) {
	d := &ramDisk{data: pattern(3, 1<<20)}
	sock := serveOne(t, d, false)
	r := dialRaw(t, sock)
	r.start(3)
	r.option(optStructured, nil)
	if got := r.metaReplies(r.option(optListMeta, metaData(""))); fmt.Sprint(got) != "map[base:allocation:0]" {
		t.Errorf("LIST = %v", got)
	}
	s := r.handshakeRestWith("", ctxBase, ctxDepth)
	if fmt.Sprint(s.contexts) != "map[base:allocation:0]" {
		t.Errorf("SET = %v", s.contexts)
	}
	got := r.blockStatus(1, 100, 5000, 0)
	if fmt.Sprint(got) != fmt.Sprint(map[uint32][]extent{0: {{5000, 0}}}) {
		t.Errorf("block status = %v", got)
	}
	r.request(0, cmdRead, 2, 0, 1<<20, nil)
	rep := r.readReply(0)
	if len(rep.chunks) != 1 || rep.chunks[0].typ != chunkOffsetData {
		t.Fatalf("read: %d chunks", len(rep.chunks))
	}
	if data, err := assembleRead(rep, 0, 1<<20); err != nil || !bytes.Equal(data, d.data) {
		t.Errorf("read: %v", err)
	}
}

// handshakeRestWith selects contexts and sends GO, after structured
// replies were negotiated.
func (r *rawClient) handshakeRestWith(export string, queries ...string) session {
	r.t.Helper()
	var s session
	s.contexts = r.metaReplies(r.option(optSetMeta, metaData(export, queries...)))
	s.size, s.flags = r.goExport(export)
	return s
}
