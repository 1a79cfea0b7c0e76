package nbdlink

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"time"
)

// Per-connection bounds on the work in flight (qemu: MAX_NBD_REQUESTS 16).
// The byte bound covers READ and WRITE buffers; a single request larger
// than it still runs, alone.
const (
	maxInFlight      = 16
	maxInFlightBytes = 64 << 20
)

// readBufferSize is the size of the connection's read buffer. A WRITE
// payload buffer is only allocated once this much of the payload (or all
// of it) has arrived, so a client that lies about a length costs little.
const readBufferSize = 64 << 10

// conn is one client connection.
//
// One goroutine (run) negotiates and then reads requests in order; each
// request is served in its own goroutine, at most maxInFlight at a time.
// Replies are written whole under wmu, so chunks of different replies never
// interleave.
type conn struct {
	// Immutable.
	srv *Server
	nc  net.Conn
	br  *bufio.Reader // owned by the run goroutine

	// Set by negotiation, read-only during transmission.
	log        *slog.Logger
	exp        *ExportConfig
	size       uint64        // export size given to the client
	structured bool          // structured replies negotiated
	selected   []metaContext // meta contexts selected for exp, qemu order
	holes      bool          // exp reports base:allocation: READ may send holes

	// wmu serializes writes to nc during transmission.
	wmu sync.Mutex

	inflight budget
	// workers counts request goroutines; run waits for them.
	workers sync.WaitGroup

	// mu guards stopping and the deadlines of nc.
	mu       sync.Mutex
	stopping bool

	// failErr is the first reply write error; nc is closed after it is
	// set. Guarded by failMu.
	failMu  sync.Mutex
	failErr error
}

func newConn(s *Server, nc net.Conn) *conn {
	c := &conn{
		srv: s,
		nc:  nc,
		br:  bufio.NewReaderSize(nc, readBufferSize),
		log: s.log.With("remote", nc.RemoteAddr().String()),
	}
	c.inflight.cond.L = &c.inflight.mu
	return c
}

// run negotiates under the handshake deadline and then serves requests
// until the client disconnects, the stream breaks or shutdown is called.
func (c *conn) run() error {
	c.setDeadline(time.Now().Add(c.srv.handshakeTimeout))
	if err := c.negotiate(); err != nil {
		return err
	}
	c.setDeadline(time.Time{})
	return c.transmit()
}

// setDeadline sets the deadline of nc unless shutdown has set its own.
func (c *conn) setDeadline(t time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.stopping {
		_ = c.nc.SetDeadline(t)
	}
}

// shutdown makes run stop reading: the pending read fails at once. Replies
// to requests in flight get shutdownGrace to go out.
func (c *conn) shutdown() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.stopping = true
	_ = c.nc.SetReadDeadline(time.Unix(1, 0))
	_ = c.nc.SetWriteDeadline(time.Now().Add(shutdownGrace))
}

// fail records the first reply write error and closes nc, which also stops
// the reading goroutine.
func (c *conn) fail(err error) {
	c.failMu.Lock()
	defer c.failMu.Unlock()
	if c.failErr == nil {
		c.failErr = err
		c.nc.Close()
	}
}

func (c *conn) failure() error {
	c.failMu.Lock()
	defer c.failMu.Unlock()
	return c.failErr
}

// enter switches to transmission with export e.
func (c *conn) enter(n *negotiation, e *ExportConfig, size uint64) {
	c.exp = e
	c.size = size
	c.structured = n.structured
	c.log = c.log.With("export", e.Name)
	// "Selection is tied to the export named in SET; if GO names a
	// different export the selection is discarded" (qemu
	// nbd_check_meta_export).
	if n.metaExport == e {
		c.selected = n.meta
	}
	c.holes = !contextsOf(e.Export)[0].synthetic
}

// transmit is the request loop: it reads requests one at a time and hands
// each to a worker goroutine. When reading stops (DISC, end of stream,
// protocol error, shutdown) it waits for the workers, so every request
// read gets its reply before the connection closes.
func (c *conn) transmit() error {
	var err error
	for err == nil {
		err = c.handleOne()
	}
	c.workers.Wait()
	if ferr := c.failure(); ferr != nil {
		return ferr
	}
	if errors.Is(err, io.EOF) {
		return nil // hung up between requests
	}
	return err
}

// handleOne reads one request and dispatches it.
func (c *conn) handleOne() error {
	var h [requestHeaderLen]byte
	if _, err := io.ReadFull(c.br, h[:]); err != nil {
		return err
	}
	req, ok := decodeRequest(&h)
	if !ok {
		// "Parse the 28-byte header fully before acting; bad magic ->
		// hard disconnect."
		return protoErrorf("bad request magic %#x", be.Uint32(h[0:4]))
	}
	if req.typ == cmdDisc {
		// "The server MUST handle all outstanding requests ... and close
		// the connection", without replying to DISC.
		return errDisconnect
	}
	e, msg := c.check(&req)
	var weight int64
	switch {
	case req.typ == cmdWrite && e != 0:
		// "For WRITE always consume the payload before replying, even on
		// errors; otherwise the stream desynchronises." Discarding needs
		// no buffer, so this holds for any length.
		if _, err := io.CopyN(io.Discard, c.br, int64(req.length)); err != nil {
			return err
		}
	case req.typ == cmdWrite:
		weight = int64(req.length)
		c.inflight.acquire(weight)
		// Allocate only once a good part of the payload is here.
		if _, err := c.br.Peek(min(int(req.length), readBufferSize)); err != nil {
			c.inflight.release(weight)
			return err
		}
		req.data = c.srv.bufs.get(int(req.length))
		if _, err := io.ReadFull(c.br, req.data); err != nil {
			c.srv.bufs.put(req.data)
			c.inflight.release(weight)
			return err
		}
		c.dispatch(req, 0, "", weight)
		return nil
	case req.typ == cmdRead && e == 0:
		weight = int64(req.length)
	}
	c.inflight.acquire(weight)
	c.dispatch(req, e, msg, weight)
	return nil
}

// dispatch serves req in a worker goroutine; weight has been acquired.
func (c *conn) dispatch(req request, e errno, msg string, weight int64) {
	c.workers.Go(func() {
		defer c.inflight.release(weight)
		var err error
		if e != 0 {
			c.log.Debug("nbd request refused", "cmd", req.typ.String(), "off", req.off, "len", req.length, "flags", req.flags, "errno", e.String(), "msg", msg)
			err = c.sendError(&req, e, msg)
		} else {
			err = c.serve(&req)
		}
		if err != nil {
			c.fail(fmt.Errorf("nbdlink: send reply: %w", err))
		}
	})
}

// check validates a request against the protocol and the export, before
// anything touches the backend. It returns the errno to reply with, or 0.
func (c *conn) check(req *request) (errno, string) {
	writes := false
	switch req.typ {
	case cmdWrite, cmdTrim, cmdWriteZeroes:
		writes = true
	case cmdRead, cmdFlush, cmdCache, cmdBlockStatus:
	default:
		// "The server SHOULD return NBD_EINVAL if it receives an unknown
		// command."
		return eINVAL, fmt.Sprintf("invalid request type (%d) received", uint16(req.typ))
	}
	// FUA is valid on every command since SEND_FUA is always advertised
	// ("ignorable on non-writes"); DF only where SEND_DF was sent.
	valid := cmdFlagFUA
	switch req.typ {
	case cmdRead:
		if c.structured {
			valid |= cmdFlagDF
		}
	case cmdWriteZeroes:
		valid |= cmdFlagNoHole
		if !c.exp.ReadOnly {
			valid |= cmdFlagFastZero
		}
	case cmdBlockStatus:
		valid |= cmdFlagReqOne
	}
	// "The server SHOULD return NBD_EINVAL if it receives an unknown
	// command flag. It also SHOULD return NBD_EINVAL if it receives a
	// request with a flag not explicitly documented as applicable to the
	// given request."
	if req.flags&^valid != 0 {
		return eINVAL, fmt.Sprintf("unsupported flags for command %v (got %#x)", req.typ, req.flags)
	}
	// "Finally, it SHOULD return NBD_EPERM if it receives a write or trim
	// request on a read-only export." qemu-nbd 7.2 answers EINVAL here
	// (formats.md D.11); we follow the spec.
	if writes && c.exp.ReadOnly {
		return ePERM, "export is read-only"
	}
	// "For commands that require a payload in either direction and where
	// the client controls the payload length (NBD_CMD_WRITE, or
	// NBD_CMD_READ without structured replies), the client MUST NOT use a
	// length larger than the maximum block size"; the server "SHOULD
	// report an NBD_EINVAL error". (qemu caps structured READs the same
	// way.) Commands without payload may be longer.
	if (req.typ == cmdRead || req.typ == cmdWrite) && req.length > maxPayload {
		return eINVAL, fmt.Sprintf("len (%d) is larger than max len (%d)", req.length, maxPayload)
	}
	if req.typ == cmdFlush {
		return 0, "" // offset and length carry nothing
	}
	// Range check without overflow: [off, off+len) within size.
	if req.off > c.size || uint64(req.length) > c.size-req.off {
		msg := fmt.Sprintf("operation past EOF; from %d, len %d, size %d", req.off, req.length, c.size)
		// "The server SHOULD return NBD_ENOSPC if it receives a write
		// request including one or more sectors beyond the size of the
		// device." qemu-nbd 7.2 answers EINVAL for WRITE and
		// WRITE_ZEROES (formats.md D.11); we follow the spec.
		if req.typ == cmdWrite || req.typ == cmdWriteZeroes {
			return eNOSPC, msg
		}
		return eINVAL, msg
	}
	if req.typ == cmdBlockStatus {
		if req.length == 0 {
			return eINVAL, "need non-zero length"
		}
		// "A client MUST NOT use NBD_CMD_BLOCK_STATUS unless it selected
		// a nonzero number of metadata contexts during negotiation.
		// Servers SHOULD reply to clients doing so anyway with EINVAL."
		if len(c.selected) == 0 {
			return eINVAL, "CMD_BLOCK_STATUS not negotiated"
		}
	}
	return 0, ""
}

// serve runs a valid request and sends its reply. It returns only errors
// writing to the client.
func (c *conn) serve(req *request) error {
	switch req.typ {
	case cmdRead:
		return c.read(req)
	case cmdWrite:
		return c.write(req)
	case cmdFlush:
		return c.flushCmd(req)
	case cmdTrim:
		return c.trim(req)
	case cmdCache:
		return c.cache(req)
	case cmdWriteZeroes:
		return c.writeZeroes(req)
	case cmdBlockStatus:
		return c.blockStatus(req)
	}
	panic("nbdlink: serve called with unchecked request type " + req.typ.String())
}

// send writes one whole reply.
func (c *conn) send(bufs ...[]byte) error {
	nb := net.Buffers(bufs)
	c.wmu.Lock()
	defer c.wmu.Unlock()
	_, err := nb.WriteTo(c.nc)
	return err
}

// sendOK sends a successful reply without payload. After structured
// replies were negotiated a simple reply is still allowed for commands
// without payload, and qemu sends one.
func (c *conn) sendOK(req *request) error {
	return c.send(appendSimpleReply(make([]byte, 0, simpleReplyLen), 0, req.cookie))
}

// sendError sends an error reply: an NBD_REPLY_TYPE_ERROR chunk when
// structured replies are on ("READ must use structured chunks (even for an
// early EINVAL)"), else a simple reply.
func (c *conn) sendError(req *request, e errno, msg string) error {
	if !c.structured {
		return c.send(appendSimpleReply(make([]byte, 0, simpleReplyLen), e, req.cookie))
	}
	if len(msg) > maxString {
		msg = msg[:maxString]
	}
	b := make([]byte, 0, chunkHeaderLen+6+len(msg))
	b = appendChunk(b, replyFlagDone, replyError, req.cookie, 6+len(msg))
	b = be.AppendUint32(b, uint32(e))
	b = be.AppendUint16(b, uint16(len(msg)))
	b = append(b, msg...)
	return c.send(b)
}

// backendError reports a failed export call to the client and logs it:
// this is where a backend error turns into an errno and would otherwise be
// lost.
func (c *conn) backendError(req *request, op string, err error, fastZero bool) error {
	e := errnoOf(err, fastZero)
	level := slog.LevelWarn
	if e == eNOTSUP {
		level = slog.LevelDebug // an expected FAST_ZERO refusal
	}
	c.log.Log(context.Background(), level, "nbd request failed", "cmd", req.typ.String(), "off", req.off, "len", req.length, "op", op, "errno", e.String(), "err", err)
	return c.sendError(req, e, op+" failed")
}

// fua flushes after a write-type command that carried NBD_CMD_FLAG_FUA.
func (c *conn) fua(req *request) error {
	if req.flags&cmdFlagFUA == 0 {
		return nil
	}
	return c.exp.Export.Flush()
}

func (c *conn) write(req *request) error {
	defer c.srv.bufs.put(req.data)
	if len(req.data) > 0 {
		n, err := c.exp.Export.WriteAt(req.data, int64(req.off))
		if err == nil && n < len(req.data) {
			err = io.ErrShortWrite
		}
		if err != nil {
			return c.backendError(req, "write", err, false)
		}
	}
	if err := c.fua(req); err != nil {
		return c.backendError(req, "flush", err, false)
	}
	return c.sendOK(req)
}

// flushCmd serves NBD_CMD_FLUSH: every write replied to so far has
// returned from WriteAt, so one Flush covers them. A read-only export has
// nothing to flush.
func (c *conn) flushCmd(req *request) error {
	if !c.exp.ReadOnly {
		if err := c.exp.Export.Flush(); err != nil {
			return c.backendError(req, "flush", err, false)
		}
	}
	return c.sendOK(req)
}

func (c *conn) trim(req *request) error {
	if req.length > 0 {
		if err := c.exp.Export.Trim(req.off, uint64(req.length)); err != nil {
			return c.backendError(req, "trim", err, false)
		}
	}
	if err := c.fua(req); err != nil {
		return c.backendError(req, "flush", err, false)
	}
	return c.sendOK(req)
}

func (c *conn) writeZeroes(req *request) error {
	mayUnmap := req.flags&cmdFlagNoHole == 0
	if req.length > 0 {
		var err error
		fast := req.flags&cmdFlagFastZero != 0
		switch fz, ok := c.exp.Export.(FastZeroer); {
		case !fast:
			err = c.exp.Export.WriteZeroes(req.off, uint64(req.length), mayUnmap)
		case ok:
			err = fz.WriteZeroesFast(req.off, uint64(req.length), mayUnmap)
		default:
			// FAST_ZERO: "fail quickly with ENOTSUP unless faster than a
			// write, and then leave the data unchanged".
			err = errors.ErrUnsupported
		}
		if err != nil {
			return c.backendError(req, "write zeroes", err, fast)
		}
	}
	if err := c.fua(req); err != nil {
		return c.backendError(req, "flush", err, false)
	}
	return c.sendOK(req)
}

// cache serves NBD_CMD_CACHE, a prefetch hint that "must not change
// semantics". qemu-nbd 7.2 fails it with EPERM on read-only exports
// (formats.md D.11); the spec gives no reason to, so we do not.
func (c *conn) cache(req *request) error {
	if ca, ok := c.exp.Export.(Cacher); ok && req.length > 0 {
		if err := ca.Cache(req.off, uint64(req.length)); err != nil {
			return c.backendError(req, "cache", err, false)
		}
	}
	return c.sendOK(req)
}

// budget bounds the requests of one connection in flight and the bytes of
// their buffers.
type budget struct {
	mu    sync.Mutex
	cond  sync.Cond // L is &mu
	n     int       // requests in flight
	bytes int64     // buffer bytes in flight
}

// acquire waits until one more request of weight bytes fits. A request
// heavier than the whole budget runs when nothing else does.
func (b *budget) acquire(weight int64) {
	b.mu.Lock()
	defer b.mu.Unlock()
	for b.n >= maxInFlight || (b.n > 0 && b.bytes+weight > maxInFlightBytes) {
		b.cond.Wait()
	}
	b.n++
	b.bytes += weight
}

func (b *budget) release(weight int64) {
	b.mu.Lock()
	b.n--
	b.bytes -= weight
	b.mu.Unlock()
	b.cond.Broadcast()
}
