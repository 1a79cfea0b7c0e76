package nbdlink_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/cbtfs/cbtfs/nbdlink"
)

// Wire constants, spelled out again on the client side so that the tests
// check the server against the spec, not against itself.
const (
	nbdMagic       = 0x4e42444d41474943
	ihaveopt       = 0x49484156454f5054
	repMagic       = 0x0003e889045565a9
	requestMagic   = 0x25609513
	simpleMagic    = 0x67446698
	structMagic    = 0x668e33ef
	optExportName  = 1
	optAbort       = 2
	optList        = 3
	optStartTLS    = 5
	optInfo        = 6
	optGo          = 7
	optStructured  = 8
	optListMeta    = 9
	optSetMeta     = 10
	optExtHeaders  = 11
	repAck         = 1
	repServer      = 2
	repInfo        = 3
	repMetaContext = 4
	repErrUnsup    = 1<<31 + 1
	repErrInvalid  = 1<<31 + 3
	repErrUnknown  = 1<<31 + 6
	repErrTooBig   = 1<<31 + 9

	cmdRead        = 0
	cmdWrite       = 1
	cmdDisc        = 2
	cmdFlush       = 3
	cmdTrim        = 4
	cmdCache       = 5
	cmdWriteZeroes = 6
	cmdBlockStatus = 7

	flagFUA      = 1 << 0
	flagNoHole   = 1 << 1
	flagDF       = 1 << 2
	flagReqOne   = 1 << 3
	flagFastZero = 1 << 4

	chunkNone        = 0
	chunkOffsetData  = 1
	chunkOffsetHole  = 2
	chunkBlockStatus = 5
	chunkError       = 1<<15 + 1
	flagDone         = 1

	ePERM   = 1
	eIO     = 5
	eINVAL  = 22
	eNOSPC  = 28
	eNOTSUP = 95
)

var be = binary.BigEndian

// startServer serves exports on a unix socket in a temporary directory
// until the test ends, and returns the socket path. The cleanup checks
// that Serve returned nil.
func startServer(t testing.TB, exports []nbdlink.ExportConfig, opts *nbdlink.Options) string {
	t.Helper()
	srv, err := nbdlink.NewServer(exports, opts)
	if err != nil {
		t.Fatalf("NewServer: %v", err)
	}
	sock := filepath.Join(t.TempDir(), "s")
	l, err := nbdlink.Listen(context.Background(), "unix:"+sock)
	if err != nil {
		t.Fatalf("Listen: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, l) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Serve: %v", err)
			}
		case <-time.After(30 * time.Second):
			t.Errorf("Serve did not return after cancel")
		}
	})
	return sock
}

// serveOne is startServer for a single default export.
func serveOne(t testing.TB, e nbdlink.Export, readOnly bool) string {
	t.Helper()
	return startServer(t, []nbdlink.ExportConfig{{Export: e, ReadOnly: readOnly}}, nil)
}

// rawClient speaks NBD byte by byte, to probe the server with what real
// clients never send.
type rawClient struct {
	t  testing.TB
	nc net.Conn
	br *bufio.Reader
}

func dialRaw(t testing.TB, sock string) *rawClient {
	t.Helper()
	nc, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	t.Cleanup(func() { nc.Close() })
	_ = nc.SetDeadline(time.Now().Add(60 * time.Second))
	return newRawClient(t, nc)
}

func newRawClient(t testing.TB, nc net.Conn) *rawClient {
	return &rawClient{t: t, nc: nc, br: bufio.NewReader(nc)}
}

func (r *rawClient) write(b []byte) {
	r.t.Helper()
	if _, err := r.nc.Write(b); err != nil {
		r.t.Fatalf("write: %v", err)
	}
}

func (r *rawClient) read(n int) []byte {
	r.t.Helper()
	b := make([]byte, n)
	if _, err := io.ReadFull(r.br, b); err != nil {
		r.t.Fatalf("read %d bytes: %v", n, err)
	}
	return b
}

// greeting reads the server greeting and returns the handshake flags.
func (r *rawClient) greeting() uint16 {
	r.t.Helper()
	g := r.read(18)
	if be.Uint64(g[0:]) != nbdMagic || be.Uint64(g[8:]) != ihaveopt {
		r.t.Fatalf("bad greeting % x", g)
	}
	return be.Uint16(g[16:])
}

// start reads the greeting and sends client flags.
func (r *rawClient) start(clientFlags uint32) {
	r.t.Helper()
	if got := r.greeting(); got != 3 {
		r.t.Fatalf("handshake flags = %#x, want 0x3", got)
	}
	r.write(be.AppendUint32(nil, clientFlags))
}

func (r *rawClient) sendOption(opt uint32, data []byte) {
	r.t.Helper()
	b := be.AppendUint64(nil, ihaveopt)
	b = be.AppendUint32(b, opt)
	b = be.AppendUint32(b, uint32(len(data)))
	r.write(append(b, data...))
}

type optReply struct {
	opt, typ uint32
	data     []byte
}

func (r *rawClient) readOptReply() optReply {
	r.t.Helper()
	h := r.read(20)
	if m := be.Uint64(h); m != repMagic {
		r.t.Fatalf("option reply magic %#x", m)
	}
	n := be.Uint32(h[16:])
	if n > 1<<20 {
		r.t.Fatalf("option reply length %d", n)
	}
	return optReply{opt: be.Uint32(h[8:]), typ: be.Uint32(h[12:]), data: r.read(int(n))}
}

// optReplies reads replies to opt up to the final ACK or error.
func (r *rawClient) optReplies(opt uint32) []optReply {
	r.t.Helper()
	var out []optReply
	for {
		rep := r.readOptReply()
		if rep.opt != opt {
			r.t.Fatalf("reply for option %d, want %d", rep.opt, opt)
		}
		out = append(out, rep)
		if rep.typ == repAck || rep.typ&(1<<31) != 0 {
			return out
		}
	}
}

// option sends an option and returns its replies.
func (r *rawClient) option(opt uint32, data []byte) []optReply {
	r.t.Helper()
	r.sendOption(opt, data)
	return r.optReplies(opt)
}

// expectOptError sends an option and checks that the only reply is the
// error typ.
func (r *rawClient) expectOptError(opt uint32, data []byte, typ uint32) string {
	r.t.Helper()
	reps := r.option(opt, data)
	if len(reps) != 1 || reps[0].typ != typ {
		r.t.Fatalf("option %d: got replies %v, want one %#x", opt, reps, typ)
	}
	return string(reps[0].data)
}

func nameData(name string) []byte {
	return append(be.AppendUint32(nil, uint32(len(name))), name...)
}

// infoData encodes an INFO/GO payload.
func infoData(name string, infos ...uint16) []byte {
	b := nameData(name)
	b = be.AppendUint16(b, uint16(len(infos)))
	for _, i := range infos {
		b = be.AppendUint16(b, i)
	}
	return b
}

// metaData encodes a LIST/SET_META_CONTEXT payload.
func metaData(name string, queries ...string) []byte {
	b := nameData(name)
	b = be.AppendUint32(b, uint32(len(queries)))
	for _, q := range queries {
		b = append(be.AppendUint32(b, uint32(len(q))), q...)
	}
	return b
}

// metaReplies turns META_CONTEXT replies into name -> id.
func (r *rawClient) metaReplies(reps []optReply) map[string]uint32 {
	r.t.Helper()
	m := map[string]uint32{}
	for _, rep := range reps {
		switch rep.typ {
		case repMetaContext:
			m[string(rep.data[4:])] = be.Uint32(rep.data)
		case repAck:
		default:
			r.t.Fatalf("meta context reply type %#x %q", rep.typ, rep.data)
		}
	}
	return m
}

// session describes a negotiated connection.
type session struct {
	size     uint64
	flags    uint16
	contexts map[string]uint32
}

// handshake negotiates with fixed newstyle and NO_ZEROES: structured
// replies if asked, SET_META_CONTEXT with queries if any, then GO.
func (r *rawClient) handshake(export string, structured bool, queries ...string) session {
	r.t.Helper()
	r.start(3)
	var s session
	if structured {
		if reps := r.option(optStructured, nil); reps[0].typ != repAck {
			r.t.Fatalf("structured reply refused: %v", reps)
		}
	}
	if len(queries) > 0 {
		s.contexts = r.metaReplies(r.option(optSetMeta, metaData(export, queries...)))
	}
	s.size, s.flags = r.goExport(export)
	return s
}

// goExport sends GO and returns size and transmission flags.
func (r *rawClient) goExport(export string) (uint64, uint16) {
	r.t.Helper()
	var size uint64
	var flags uint16
	sawExport := false
	for _, rep := range r.option(optGo, infoData(export)) {
		switch rep.typ {
		case repInfo:
			if be.Uint16(rep.data) == 0 {
				if len(rep.data) != 12 {
					r.t.Fatalf("INFO_EXPORT length %d", len(rep.data))
				}
				size, flags = be.Uint64(rep.data[2:]), be.Uint16(rep.data[10:])
				sawExport = true
			}
		case repAck:
		default:
			r.t.Fatalf("GO: reply %#x %q", rep.typ, rep.data)
		}
	}
	if !sawExport {
		r.t.Fatalf("GO without INFO_EXPORT")
	}
	return size, flags
}

func (r *rawClient) request(flags, typ uint16, cookie, off uint64, length uint32, payload []byte) {
	r.t.Helper()
	b := make([]byte, 0, 28+len(payload))
	b = be.AppendUint32(b, requestMagic)
	b = be.AppendUint16(b, flags)
	b = be.AppendUint16(b, typ)
	b = be.AppendUint64(b, cookie)
	b = be.AppendUint64(b, off)
	b = be.AppendUint32(b, length)
	r.write(append(b, payload...))
}

type chunk struct {
	flags, typ uint16
	payload    []byte
}

// reply is a reply to one request: simple, or the chunks of a structured
// one, in order.
type reply struct {
	cookie uint64
	simple bool
	errno  uint32 // simple error, or the error of an error chunk
	msg    string
	data   []byte // simple READ data
	chunks []chunk
}

// readReply reads the next reply; readLen is the data length that follows
// a successful simple reply (a READ's length, else 0). It reads chunks of
// one structured reply until DONE and fails if another cookie interleaves.
func (r *rawClient) readReply(readLen int) reply {
	r.t.Helper()
	rep, err := r.tryReadReply(func(uint64) int { return readLen })
	if err != nil {
		r.t.Fatalf("read reply: %v", err)
	}
	return rep
}

func (r *rawClient) tryReadReply(readLen func(cookie uint64) int) (reply, error) {
	var rep reply
	for first := true; ; first = false {
		var m [4]byte
		if _, err := io.ReadFull(r.br, m[:]); err != nil {
			return rep, err
		}
		switch be.Uint32(m[:]) {
		case simpleMagic:
			if !first {
				return rep, errors.New("simple reply inside a structured one")
			}
			var h [12]byte
			if _, err := io.ReadFull(r.br, h[:]); err != nil {
				return rep, err
			}
			rep.simple, rep.errno, rep.cookie = true, be.Uint32(h[:]), be.Uint64(h[4:])
			if rep.errno == 0 {
				rep.data = make([]byte, readLen(rep.cookie))
				if _, err := io.ReadFull(r.br, rep.data); err != nil {
					return rep, err
				}
			}
			return rep, nil
		case structMagic:
			var h [16]byte
			if _, err := io.ReadFull(r.br, h[:]); err != nil {
				return rep, err
			}
			c := chunk{flags: be.Uint16(h[:]), typ: be.Uint16(h[2:])}
			cookie := be.Uint64(h[4:])
			if !first && cookie != rep.cookie {
				return rep, fmt.Errorf("chunk for cookie %d inside reply %d", cookie, rep.cookie)
			}
			rep.cookie = cookie
			n := be.Uint32(h[12:])
			if n > 64<<20 {
				return rep, fmt.Errorf("chunk length %d", n)
			}
			c.payload = make([]byte, n)
			if _, err := io.ReadFull(r.br, c.payload); err != nil {
				return rep, err
			}
			if c.flags&^flagDone != 0 {
				return rep, fmt.Errorf("chunk flags %#x", c.flags)
			}
			if c.typ&(1<<15) != 0 {
				if len(c.payload) < 6 || int(be.Uint16(c.payload[4:]))+6 > len(c.payload) {
					return rep, fmt.Errorf("bad error chunk % x", c.payload)
				}
				rep.errno = be.Uint32(c.payload)
				rep.msg = string(c.payload[6 : 6+be.Uint16(c.payload[4:])])
			}
			rep.chunks = append(rep.chunks, c)
			if c.flags&flagDone != 0 {
				return rep, nil
			}
		default:
			return rep, fmt.Errorf("reply magic % x", m)
		}
	}
}

// expectErrno reads a reply and checks that it is an error e.
func (r *rawClient) expectErrno(cookie uint64, e uint32) reply {
	r.t.Helper()
	rep := r.readReply(0)
	if rep.cookie != cookie || rep.errno != e {
		r.t.Fatalf("reply cookie %d errno %d (%q), want cookie %d errno %d", rep.cookie, rep.errno, rep.msg, cookie, e)
	}
	if !rep.simple && len(rep.chunks) != 1 {
		r.t.Fatalf("error reply with %d chunks", len(rep.chunks))
	}
	return rep
}

// expectOK reads a reply and checks that it is a success without data.
func (r *rawClient) expectOK(cookie uint64) {
	r.t.Helper()
	rep := r.readReply(0)
	if rep.cookie != cookie || rep.errno != 0 || !rep.simple {
		r.t.Fatalf("reply cookie %d errno %d (%q) simple %v, want cookie %d OK", rep.cookie, rep.errno, rep.msg, rep.simple, cookie)
	}
}

// readData issues a READ and returns the data, checking the structured
// reply rules when chunks are used.
func (r *rawClient) readData(cookie, off uint64, n uint32, flags uint16) []byte {
	r.t.Helper()
	r.request(flags, cmdRead, cookie, off, n, nil)
	rep := r.readReply(int(n))
	if rep.cookie != cookie || rep.errno != 0 {
		r.t.Fatalf("read %d at %d: cookie %d errno %d %q", n, off, rep.cookie, rep.errno, rep.msg)
	}
	if rep.simple {
		return rep.data
	}
	data, err := assembleRead(rep, off, n)
	if err != nil {
		r.t.Fatalf("read %d at %d: %v", n, off, err)
	}
	return data
}

// assembleRead checks that the chunks of a structured READ lie inside the
// request, do not overlap, cover it, and carry DONE only last; and returns
// the data.
func assembleRead(rep reply, off uint64, n uint32) ([]byte, error) {
	data := make([]byte, n)
	covered := make([]bool, n)
	for i, c := range rep.chunks {
		last := i == len(rep.chunks)-1
		if (c.flags&flagDone != 0) != last {
			return nil, fmt.Errorf("chunk %d flags %#x", i, c.flags)
		}
		var start, length uint64
		switch c.typ {
		case chunkOffsetData:
			if len(c.payload) < 9 {
				return nil, fmt.Errorf("short OFFSET_DATA")
			}
			start, length = be.Uint64(c.payload), uint64(len(c.payload)-8)
		case chunkOffsetHole:
			if len(c.payload) != 12 || be.Uint32(c.payload[8:]) == 0 {
				return nil, fmt.Errorf("bad OFFSET_HOLE % x", c.payload)
			}
			start, length = be.Uint64(c.payload), uint64(be.Uint32(c.payload[8:]))
		case chunkNone:
			if !last || len(rep.chunks) != 1 || n != 0 {
				return nil, fmt.Errorf("NONE chunk in a read of %d", n)
			}
			continue
		default:
			return nil, fmt.Errorf("chunk type %d", c.typ)
		}
		if start < off || start-off > uint64(n) || length > uint64(n)-(start-off) {
			return nil, fmt.Errorf("chunk [%d,+%d) outside request", start, length)
		}
		rel := start - off
		for i := rel; i < rel+length; i++ {
			if covered[i] {
				return nil, fmt.Errorf("chunks overlap at %d", start+i-rel)
			}
			covered[i] = true
		}
		if c.typ == chunkOffsetData {
			copy(data[rel:], c.payload[8:])
		}
	}
	if i := bytes.IndexByte(boolBytes(covered), 0); i >= 0 {
		return nil, fmt.Errorf("byte %d not covered", off+uint64(i))
	}
	return data, nil
}

func boolBytes(b []bool) []byte {
	out := make([]byte, len(b))
	for i, v := range b {
		if v {
			out[i] = 1
		}
	}
	return out
}

type extent struct{ length, flags uint32 }

// blockStatus issues BLOCK_STATUS and returns the extents by context id,
// checking that each chunk is well formed.
func (r *rawClient) blockStatus(cookie, off uint64, n uint32, flags uint16) map[uint32][]extent {
	r.t.Helper()
	r.request(flags, cmdBlockStatus, cookie, off, n, nil)
	rep := r.readReply(0)
	if rep.cookie != cookie || rep.errno != 0 || rep.simple {
		r.t.Fatalf("block status: cookie %d errno %d %q simple %v", rep.cookie, rep.errno, rep.msg, rep.simple)
	}
	out := map[uint32][]extent{}
	for i, c := range rep.chunks {
		if c.typ != chunkBlockStatus || len(c.payload) < 12 || (len(c.payload)-4)%8 != 0 {
			r.t.Fatalf("block status chunk type %d len %d", c.typ, len(c.payload))
		}
		if (c.flags&flagDone != 0) != (i == len(rep.chunks)-1) {
			r.t.Fatalf("chunk %d flags %#x", i, c.flags)
		}
		id := be.Uint32(c.payload)
		if _, dup := out[id]; dup {
			r.t.Fatalf("two chunks for context %d", id)
		}
		var sum uint64
		var ex []extent
		for p := c.payload[4:]; len(p) > 0; p = p[8:] {
			e := extent{be.Uint32(p), be.Uint32(p[4:])}
			if e.length == 0 {
				r.t.Fatalf("zero-length extent")
			}
			sum += uint64(e.length)
			ex = append(ex, e)
		}
		if sum > uint64(n) {
			r.t.Fatalf("extents of context %d run past the request: %d > %d", id, sum, n)
		}
		out[id] = ex
	}
	return out
}

// expectClosed checks that the server closes the connection without
// sending anything more.
func (r *rawClient) expectClosed() {
	r.t.Helper()
	_ = r.nc.SetReadDeadline(time.Now().Add(10 * time.Second))
	b, err := r.br.ReadByte()
	if err == nil {
		r.t.Fatalf("connection still open, got byte %#x", b)
	}
	if !errors.Is(err, io.EOF) && !errors.Is(err, syscall.ECONNRESET) {
		r.t.Fatalf("expected EOF, got %v", err)
	}
}

// pattern returns n bytes derived from seed.
func pattern(seed byte, n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = seed + byte(i*7+i/511)
	}
	return b
}
