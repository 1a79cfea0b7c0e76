package testutil

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"syscall"
	"time"
)

// This file is a minimal NBD client that speaks the protocol byte by byte
// (formats.md D), for end-to-end tests that must send what real clients
// never send, or drive many connections from goroutines. The wire
// constants are spelled out again here, from the spec, so that the tests
// check the server against the spec and not against its own code.
//
// The client returns errors instead of failing a test, so that it can be
// used from any goroutine.

// NBD wire constants (formats.md D.1-D.7).
const (
	NBDMagic          = 0x4e42444d41474943 // "NBDMAGIC"
	NBDIHaveOpt       = 0x49484156454f5054
	NBDRepMagic       = 0x0003e889045565a9
	NBDRequestMagic   = 0x25609513
	NBDSimpleMagic    = 0x67446698
	NBDStructMagic    = 0x668e33ef
	NBDFlagFixed      = 1 << 0 // handshake flag and client flag
	NBDFlagNoZeroes   = 1 << 1 // handshake flag and client flag
	NBDOptExportName  = 1
	NBDOptAbort       = 2
	NBDOptList        = 3
	NBDOptStartTLS    = 5
	NBDOptInfo        = 6
	NBDOptGo          = 7
	NBDOptStructured  = 8
	NBDOptListMeta    = 9
	NBDOptSetMeta     = 10
	NBDRepAck         = 1
	NBDRepServer      = 2
	NBDRepInfo        = 3
	NBDRepMetaContext = 4
	NBDRepErrUnsup    = 1<<31 + 1
	NBDRepErrPolicy   = 1<<31 + 2
	NBDRepErrInvalid  = 1<<31 + 3
	NBDRepErrUnknown  = 1<<31 + 6
	NBDRepErrTooBig   = 1<<31 + 9

	NBDCmdRead        = 0
	NBDCmdWrite       = 1
	NBDCmdDisc        = 2
	NBDCmdFlush       = 3
	NBDCmdTrim        = 4
	NBDCmdCache       = 5
	NBDCmdWriteZeroes = 6
	NBDCmdBlockStatus = 7

	NBDCmdFlagFUA      = 1 << 0
	NBDCmdFlagNoHole   = 1 << 1
	NBDCmdFlagDF       = 1 << 2
	NBDCmdFlagReqOne   = 1 << 3
	NBDCmdFlagFastZero = 1 << 4

	NBDChunkNone        = 0
	NBDChunkOffsetData  = 1
	NBDChunkOffsetHole  = 2
	NBDChunkBlockStatus = 5
	NBDReplyFlagDone    = 1

	// Transmission flags (D.5).
	NBDTFlagHasFlags     = 1 << 0
	NBDTFlagReadOnly     = 1 << 1
	NBDTFlagSendFlush    = 1 << 2
	NBDTFlagSendFUA      = 1 << 3
	NBDTFlagSendTrim     = 1 << 5
	NBDTFlagSendZeroes   = 1 << 6
	NBDTFlagSendDF       = 1 << 7
	NBDTFlagMultiConn    = 1 << 8
	NBDTFlagSendCache    = 1 << 10
	NBDTFlagSendFastZero = 1 << 11

	// Errors (D.9).
	NBDEPERM     = 1
	NBDEIO       = 5
	NBDEINVAL    = 22
	NBDENOSPC    = 28
	NBDEOVERFLOW = 75
	NBDENOTSUP   = 95
)

var nbdBE = binary.BigEndian

// NBDClient is one raw NBD connection. Its methods are not safe for
// concurrent use; use one client per goroutine.
type NBDClient struct {
	Conn net.Conn
	br   *bufio.Reader

	// Set by a successful GO or EXPORT_NAME.
	Size  uint64
	Flags uint16
	// Structured is set once STRUCTURED_REPLY was acknowledged.
	Structured bool
	// Contexts maps the meta contexts selected by the last
	// SET_META_CONTEXT to their ids.
	Contexts map[string]uint32

	cookie uint64 // last cookie used by the synchronous calls
}

// DialNBD connects to addr, given as cbtfs takes it: "unix:PATH" or
// "HOST:PORT". Every read and write of the connection is bounded by a
// one-minute deadline (see [NBDClient.SetDeadline]).
func DialNBD(addr string) (*NBDClient, error) {
	network, a := "tcp", addr
	if p, ok := strings.CutPrefix(addr, "unix:"); ok {
		network, a = "unix", p
	}
	nc, err := net.Dial(network, a)
	if err != nil {
		return nil, err
	}
	_ = nc.SetDeadline(time.Now().Add(time.Minute))
	return &NBDClient{Conn: nc, br: bufio.NewReaderSize(nc, 1<<20)}, nil
}

// Close closes the connection.
func (c *NBDClient) Close() error { return c.Conn.Close() }

// SetDeadline sets the deadline of the connection's reads and writes.
func (c *NBDClient) SetDeadline(t time.Time) error { return c.Conn.SetDeadline(t) }

// WriteRaw writes b to the connection as it is.
func (c *NBDClient) WriteRaw(b []byte) error {
	_, err := c.Conn.Write(b)
	return err
}

// ReadRaw reads exactly n bytes from the connection.
func (c *NBDClient) ReadRaw(n int) ([]byte, error) {
	b := make([]byte, n)
	_, err := io.ReadFull(c.br, b)
	return b, err
}

// ReadEOF waits at most d for the server to close the connection and
// reports an error if it sends anything instead.
func (c *NBDClient) ReadEOF(d time.Duration) error {
	_ = c.Conn.SetReadDeadline(time.Now().Add(d))
	b, err := c.br.ReadByte()
	if err == nil {
		return fmt.Errorf("connection still open: got byte %#x", b)
	}
	if errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET) {
		return nil
	}
	return fmt.Errorf("want the connection closed, got %w", err)
}

// Greeting reads the 18-byte server greeting and returns the handshake
// flags.
func (c *NBDClient) Greeting() (uint16, error) {
	g, err := c.ReadRaw(18)
	if err != nil {
		return 0, fmt.Errorf("greeting: %w", err)
	}
	if nbdBE.Uint64(g) != NBDMagic || nbdBE.Uint64(g[8:]) != NBDIHaveOpt {
		return 0, fmt.Errorf("bad greeting % x", g)
	}
	return nbdBE.Uint16(g[16:]), nil
}

// Start reads the greeting, requires the handshake flags FIXED_NEWSTYLE
// and NO_ZEROES, and sends clientFlags.
func (c *NBDClient) Start(clientFlags uint32) error {
	hf, err := c.Greeting()
	if err != nil {
		return err
	}
	if hf != NBDFlagFixed|NBDFlagNoZeroes {
		return fmt.Errorf("handshake flags %#x, want %#x", hf, NBDFlagFixed|NBDFlagNoZeroes)
	}
	return c.WriteRaw(nbdBE.AppendUint32(nil, clientFlags))
}

// SendOption sends one option request.
func (c *NBDClient) SendOption(opt uint32, data []byte) error {
	b := nbdBE.AppendUint64(nil, NBDIHaveOpt)
	b = nbdBE.AppendUint32(b, opt)
	b = nbdBE.AppendUint32(b, uint32(len(data)))
	return c.WriteRaw(append(b, data...))
}

// NBDOptReply is one option reply.
type NBDOptReply struct {
	Opt, Type uint32
	Data      []byte
}

// IsError reports whether the reply is an NBD_REP_ERR_*.
func (r NBDOptReply) IsError() bool { return r.Type&(1<<31) != 0 }

func (r NBDOptReply) String() string {
	return fmt.Sprintf("{opt %d type %#x %q}", r.Opt, r.Type, r.Data)
}

// ReadOptReply reads one option reply.
func (c *NBDClient) ReadOptReply() (NBDOptReply, error) {
	h, err := c.ReadRaw(20)
	if err != nil {
		return NBDOptReply{}, fmt.Errorf("option reply: %w", err)
	}
	if m := nbdBE.Uint64(h); m != NBDRepMagic {
		return NBDOptReply{}, fmt.Errorf("option reply magic %#x", m)
	}
	n := nbdBE.Uint32(h[16:])
	if n > 1<<20 {
		return NBDOptReply{}, fmt.Errorf("option reply length %d", n)
	}
	data, err := c.ReadRaw(int(n))
	if err != nil {
		return NBDOptReply{}, fmt.Errorf("option reply data: %w", err)
	}
	return NBDOptReply{Opt: nbdBE.Uint32(h[8:]), Type: nbdBE.Uint32(h[12:]), Data: data}, nil
}

// Option sends an option and reads its replies up to the final ACK or
// error, which is the last element.
func (c *NBDClient) Option(opt uint32, data []byte) ([]NBDOptReply, error) {
	if err := c.SendOption(opt, data); err != nil {
		return nil, err
	}
	var out []NBDOptReply
	for {
		r, err := c.ReadOptReply()
		if err != nil {
			return out, err
		}
		if r.Opt != opt {
			return out, fmt.Errorf("reply for option %d, want %d", r.Opt, opt)
		}
		out = append(out, r)
		if r.Type == NBDRepAck || r.IsError() {
			return out, nil
		}
	}
}

// NBDOptError is an option answered with an NBD_REP_ERR_*.
type NBDOptError struct {
	Opt, Type uint32
	Msg       string
}

func (e *NBDOptError) Error() string {
	return fmt.Sprintf("option %d: error reply %#x: %s", e.Opt, e.Type, e.Msg)
}

// optFinal returns the error carried by the final reply of reps, if any.
func optFinal(opt uint32, reps []NBDOptReply) error {
	if len(reps) == 0 {
		return fmt.Errorf("option %d: no reply", opt)
	}
	if last := reps[len(reps)-1]; last.IsError() {
		return &NBDOptError{Opt: opt, Type: last.Type, Msg: string(last.Data)}
	}
	return nil
}

// NBDNameData encodes "u32 length, name".
func NBDNameData(name string) []byte {
	return append(nbdBE.AppendUint32(nil, uint32(len(name))), name...)
}

// NBDInfoData encodes an INFO or GO payload requesting infos.
func NBDInfoData(name string, infos ...uint16) []byte {
	b := NBDNameData(name)
	b = nbdBE.AppendUint16(b, uint16(len(infos)))
	for _, i := range infos {
		b = nbdBE.AppendUint16(b, i)
	}
	return b
}

// NBDMetaData encodes a LIST or SET_META_CONTEXT payload.
func NBDMetaData(name string, queries ...string) []byte {
	b := NBDNameData(name)
	b = nbdBE.AppendUint32(b, uint32(len(queries)))
	for _, q := range queries {
		b = append(nbdBE.AppendUint32(b, uint32(len(q))), q...)
	}
	return b
}

// StructuredReplies negotiates NBD_OPT_STRUCTURED_REPLY.
func (c *NBDClient) StructuredReplies() error {
	reps, err := c.Option(NBDOptStructured, nil)
	if err != nil {
		return err
	}
	if err := optFinal(NBDOptStructured, reps); err != nil {
		return err
	}
	c.Structured = true
	return nil
}

// SetMetaContext selects the meta contexts matching queries for export
// and records the selection in c.Contexts.
func (c *NBDClient) SetMetaContext(export string, queries ...string) error {
	reps, err := c.Option(NBDOptSetMeta, NBDMetaData(export, queries...))
	if err != nil {
		return err
	}
	if err := optFinal(NBDOptSetMeta, reps); err != nil {
		return err
	}
	c.Contexts = map[string]uint32{}
	for _, r := range reps[:len(reps)-1] {
		if r.Type != NBDRepMetaContext || len(r.Data) < 5 {
			return fmt.Errorf("SET_META_CONTEXT: unexpected reply %v", r)
		}
		c.Contexts[string(r.Data[4:])] = nbdBE.Uint32(r.Data)
	}
	return nil
}

// Go sends NBD_OPT_GO for export and, on success, records the export's
// size and transmission flags. A refusal is an [*NBDOptError].
func (c *NBDClient) Go(export string) error {
	reps, err := c.Option(NBDOptGo, NBDInfoData(export))
	if err != nil {
		return err
	}
	if err := optFinal(NBDOptGo, reps); err != nil {
		return err
	}
	seen := false
	for _, r := range reps[:len(reps)-1] {
		if r.Type != NBDRepInfo || len(r.Data) < 2 {
			return fmt.Errorf("GO: unexpected reply %v", r)
		}
		if nbdBE.Uint16(r.Data) == 0 { // NBD_INFO_EXPORT
			if len(r.Data) != 12 {
				return fmt.Errorf("GO: NBD_INFO_EXPORT of %d bytes", len(r.Data))
			}
			c.Size, c.Flags = nbdBE.Uint64(r.Data[2:]), nbdBE.Uint16(r.Data[10:])
			seen = true
		}
	}
	if !seen {
		return errors.New("GO: no NBD_INFO_EXPORT before the ACK")
	}
	return nil
}

// ExportName ends negotiation with NBD_OPT_EXPORT_NAME and reads the
// export's size and flags, followed by 124 zero bytes unless noZeroes
// (the client must then have sent NBD_FLAG_C_NO_ZEROES).
func (c *NBDClient) ExportName(name string, noZeroes bool) error {
	if err := c.SendOption(NBDOptExportName, []byte(name)); err != nil {
		return err
	}
	n := 10
	if !noZeroes {
		n += 124
	}
	b, err := c.ReadRaw(n)
	if err != nil {
		return fmt.Errorf("EXPORT_NAME reply: %w", err)
	}
	if z := b[10:]; !bytes.Equal(z, make([]byte, len(z))) {
		return fmt.Errorf("EXPORT_NAME padding not zero: % x", z)
	}
	c.Size, c.Flags = nbdBE.Uint64(b), nbdBE.Uint16(b[8:])
	return nil
}

// Handshake negotiates the way qemu and libnbd do: fixed newstyle with
// NO_ZEROES, structured replies when asked, SET_META_CONTEXT when queries
// are given, then GO for export.
func (c *NBDClient) Handshake(export string, structured bool, queries ...string) error {
	if err := c.Start(NBDFlagFixed | NBDFlagNoZeroes); err != nil {
		return err
	}
	if structured {
		if err := c.StructuredReplies(); err != nil {
			return err
		}
	}
	if len(queries) > 0 {
		if err := c.SetMetaContext(export, queries...); err != nil {
			return err
		}
	}
	return c.Go(export)
}

// DialNBDExport dials addr and negotiates export with structured replies
// and the meta contexts queries.
func DialNBDExport(addr, export string, queries ...string) (*NBDClient, error) {
	c, err := DialNBD(addr)
	if err != nil {
		return nil, err
	}
	if err := c.Handshake(export, true, queries...); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

// Send sends one request, with payload after the header (a WRITE's data,
// or anything a test wants to send).
func (c *NBDClient) Send(flags, typ uint16, cookie, off uint64, length uint32, payload []byte) error {
	b := make([]byte, 0, 28+len(payload))
	b = nbdBE.AppendUint32(b, NBDRequestMagic)
	b = nbdBE.AppendUint16(b, flags)
	b = nbdBE.AppendUint16(b, typ)
	b = nbdBE.AppendUint64(b, cookie)
	b = nbdBE.AppendUint64(b, off)
	b = nbdBE.AppendUint32(b, length)
	return c.WriteRaw(append(b, payload...))
}

// NBDChunk is one chunk of a structured reply.
type NBDChunk struct {
	Flags, Type uint16
	Payload     []byte
}

// NBDReply is the reply to one request: simple, or every chunk of a
// structured one, in order.
type NBDReply struct {
	Cookie uint64
	Simple bool
	Errno  uint32 // of a simple reply, or of the error chunk
	Msg    string // of the error chunk
	Data   []byte // of a successful simple READ reply
	Chunks []NBDChunk
}

// Err returns the reply's error as an [*NBDError], or nil.
func (r NBDReply) Err() error {
	if r.Errno == 0 {
		return nil
	}
	return &NBDError{Errno: r.Errno, Msg: r.Msg}
}

// NBDError is a request answered with an error.
type NBDError struct {
	Errno uint32
	Msg   string
}

func (e *NBDError) Error() string { return fmt.Sprintf("nbd errno %d: %s", e.Errno, e.Msg) }

// ErrnoOf returns the NBD errno of err (an [*NBDError]), or 0.
func ErrnoOf(err error) uint32 {
	var e *NBDError
	if errors.As(err, &e) {
		return e.Errno
	}
	return 0
}

// ReadReply reads the next reply. readLen gives the data length that
// follows a successful simple reply to cookie (the READ's length, else
// 0). The chunks of a structured reply are read up to DONE; a chunk of
// another cookie in between is an error (a torn reply).
func (c *NBDClient) ReadReply(readLen func(cookie uint64) int) (NBDReply, error) {
	var rep NBDReply
	for first := true; ; first = false {
		m, err := c.ReadRaw(4)
		if err != nil {
			return rep, err
		}
		switch nbdBE.Uint32(m) {
		case NBDSimpleMagic:
			if !first {
				return rep, errors.New("simple reply inside a structured one")
			}
			h, err := c.ReadRaw(12)
			if err != nil {
				return rep, err
			}
			rep.Simple, rep.Errno, rep.Cookie = true, nbdBE.Uint32(h), nbdBE.Uint64(h[4:])
			if rep.Errno == 0 && readLen != nil {
				if rep.Data, err = c.ReadRaw(readLen(rep.Cookie)); err != nil {
					return rep, err
				}
			}
			return rep, nil
		case NBDStructMagic:
			h, err := c.ReadRaw(16)
			if err != nil {
				return rep, err
			}
			ch := NBDChunk{Flags: nbdBE.Uint16(h), Type: nbdBE.Uint16(h[2:])}
			cookie := nbdBE.Uint64(h[4:])
			if !first && cookie != rep.Cookie {
				return rep, fmt.Errorf("chunk for cookie %d inside the reply to %d", cookie, rep.Cookie)
			}
			rep.Cookie = cookie
			n := nbdBE.Uint32(h[12:])
			if n > 64<<20 {
				return rep, fmt.Errorf("chunk length %d", n)
			}
			if ch.Payload, err = c.ReadRaw(int(n)); err != nil {
				return rep, err
			}
			if ch.Flags&^NBDReplyFlagDone != 0 {
				return rep, fmt.Errorf("chunk flags %#x", ch.Flags)
			}
			if ch.Type&(1<<15) != 0 {
				p := ch.Payload
				if len(p) < 6 || int(nbdBE.Uint16(p[4:]))+6 > len(p) || nbdBE.Uint32(p) == 0 {
					return rep, fmt.Errorf("bad error chunk % x", p)
				}
				rep.Errno, rep.Msg = nbdBE.Uint32(p), string(p[6:6+nbdBE.Uint16(p[4:])])
			}
			rep.Chunks = append(rep.Chunks, ch)
			if ch.Flags&NBDReplyFlagDone != 0 {
				return rep, nil
			}
		default:
			return rep, fmt.Errorf("reply magic % x", m)
		}
	}
}

// ReadData returns the data of a successful READ reply for [off, off+n):
// a simple reply's data, or the assembled chunks of a structured one,
// which must lie inside the request, not overlap, cover it, and carry
// DONE only on the last.
func (r NBDReply) ReadData(off uint64, n uint32) ([]byte, error) {
	if err := r.Err(); err != nil {
		return nil, err
	}
	if r.Simple {
		if len(r.Data) != int(n) {
			return nil, fmt.Errorf("simple READ reply of %d bytes, want %d", len(r.Data), n)
		}
		return r.Data, nil
	}
	data := make([]byte, n)
	covered := make([]bool, n)
	for i, c := range r.Chunks {
		last := i == len(r.Chunks)-1
		if (c.Flags&NBDReplyFlagDone != 0) != last {
			return nil, fmt.Errorf("chunk %d of %d has flags %#x", i, len(r.Chunks), c.Flags)
		}
		var start, length uint64
		switch c.Type {
		case NBDChunkOffsetData:
			if len(c.Payload) < 9 {
				return nil, errors.New("short OFFSET_DATA chunk")
			}
			start, length = nbdBE.Uint64(c.Payload), uint64(len(c.Payload)-8)
		case NBDChunkOffsetHole:
			if len(c.Payload) != 12 || nbdBE.Uint32(c.Payload[8:]) == 0 {
				return nil, fmt.Errorf("bad OFFSET_HOLE chunk % x", c.Payload)
			}
			start, length = nbdBE.Uint64(c.Payload), uint64(nbdBE.Uint32(c.Payload[8:]))
		case NBDChunkNone:
			if !last || len(r.Chunks) != 1 || n != 0 {
				return nil, fmt.Errorf("NONE chunk in a READ of %d bytes", n)
			}
			continue
		default:
			return nil, fmt.Errorf("chunk type %d in a READ reply", c.Type)
		}
		if start < off || start-off > uint64(n) || length > uint64(n)-(start-off) {
			return nil, fmt.Errorf("chunk [%d, +%d) outside the request [%d, +%d)", start, length, off, n)
		}
		rel := start - off
		for i := rel; i < rel+length; i++ {
			if covered[i] {
				return nil, fmt.Errorf("chunks overlap at %d", off+i)
			}
			covered[i] = true
		}
		if c.Type == NBDChunkOffsetData {
			copy(data[rel:], c.Payload[8:])
		}
	}
	for i, ok := range covered {
		if !ok {
			return nil, fmt.Errorf("byte %d of the READ not covered by any chunk", off+uint64(i))
		}
	}
	return data, nil
}

// next returns a fresh cookie for a synchronous call.
func (c *NBDClient) next() uint64 {
	c.cookie++
	return c.cookie
}

// roundTrip sends one request and reads its reply, which must carry the
// same cookie.
func (c *NBDClient) roundTrip(flags, typ uint16, off uint64, length uint32, payload []byte, readLen int) (NBDReply, error) {
	cookie := c.next()
	if err := c.Send(flags, typ, cookie, off, length, payload); err != nil {
		return NBDReply{}, err
	}
	rep, err := c.ReadReply(func(uint64) int { return readLen })
	if err != nil {
		return rep, err
	}
	if rep.Cookie != cookie {
		return rep, fmt.Errorf("reply cookie %d, want %d", rep.Cookie, cookie)
	}
	return rep, nil
}

// Read reads n bytes at off with command flags (0 or DF). A server error
// is an [*NBDError].
func (c *NBDClient) Read(off uint64, n uint32, flags uint16) ([]byte, error) {
	rep, err := c.roundTrip(flags, NBDCmdRead, off, n, nil, int(n))
	if err != nil {
		return nil, err
	}
	return rep.ReadData(off, n)
}

// Write writes p at off with command flags (0 or FUA).
func (c *NBDClient) Write(p []byte, off uint64, flags uint16) error {
	rep, err := c.roundTrip(flags, NBDCmdWrite, off, uint32(len(p)), p, 0)
	if err != nil {
		return err
	}
	return c.noData(rep)
}

// Do runs a command without payload in either direction (FLUSH, TRIM,
// WRITE_ZEROES, CACHE, an unknown command) and returns its outcome.
func (c *NBDClient) Do(typ, flags uint16, off uint64, length uint32) error {
	rep, err := c.roundTrip(flags, typ, off, length, nil, 0)
	if err != nil {
		return err
	}
	return c.noData(rep)
}

// noData checks that a reply to a command without reply payload is a
// plain success or a single error.
func (c *NBDClient) noData(rep NBDReply) error {
	if rep.Errno != 0 {
		if !rep.Simple && len(rep.Chunks) != 1 {
			return fmt.Errorf("error reply in %d chunks", len(rep.Chunks))
		}
		return rep.Err()
	}
	if !rep.Simple && (len(rep.Chunks) != 1 || rep.Chunks[0].Type != NBDChunkNone) {
		return fmt.Errorf("success reply with chunks %v", rep.Chunks)
	}
	return nil
}

// NBDExtent is one BLOCK_STATUS extent.
type NBDExtent struct{ Length, Flags uint32 }

// BlockStatus returns the extents of [off, off+n) of every selected
// context, by context id, checking that each chunk is well formed.
func (c *NBDClient) BlockStatus(off uint64, n uint32, flags uint16) (map[uint32][]NBDExtent, error) {
	rep, err := c.roundTrip(flags, NBDCmdBlockStatus, off, n, nil, 0)
	if err != nil {
		return nil, err
	}
	if err := rep.Err(); err != nil {
		return nil, err
	}
	if rep.Simple {
		return nil, errors.New("simple reply to BLOCK_STATUS")
	}
	out := map[uint32][]NBDExtent{}
	for i, ch := range rep.Chunks {
		if ch.Type != NBDChunkBlockStatus || len(ch.Payload) < 12 || (len(ch.Payload)-4)%8 != 0 {
			return nil, fmt.Errorf("BLOCK_STATUS chunk type %d of %d bytes", ch.Type, len(ch.Payload))
		}
		if (ch.Flags&NBDReplyFlagDone != 0) != (i == len(rep.Chunks)-1) {
			return nil, fmt.Errorf("BLOCK_STATUS chunk %d flags %#x", i, ch.Flags)
		}
		id := nbdBE.Uint32(ch.Payload)
		if _, dup := out[id]; dup {
			return nil, fmt.Errorf("two chunks for context %d", id)
		}
		var ex []NBDExtent
		for p := ch.Payload[4:]; len(p) > 0; p = p[8:] {
			e := NBDExtent{nbdBE.Uint32(p), nbdBE.Uint32(p[4:])}
			if e.Length == 0 {
				return nil, errors.New("zero-length extent")
			}
			ex = append(ex, e)
		}
		out[id] = ex
	}
	return out, nil
}

// Disconnect sends NBD_CMD_DISC and closes the connection.
func (c *NBDClient) Disconnect() error {
	err := c.Send(0, NBDCmdDisc, c.next(), 0, 0, nil)
	return errors.Join(err, c.Close())
}
