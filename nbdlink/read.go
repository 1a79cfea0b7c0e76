package nbdlink

import (
	"io"
	"math/bits"
	"sync"
)

// read serves NBD_CMD_READ. Nothing is sent before all data is in hand:
// a failure anywhere gives a single error reply, never a torn stream.
func (c *conn) read(req *request) error {
	e := c.exp.Export
	if req.flags&cmdFlagFUA != 0 && !c.exp.ReadOnly {
		// FUA on a read is "ignorable"; qemu flushes first, and so do we.
		if err := e.Flush(); err != nil {
			return c.backendError(req, "flush", err, false)
		}
	}
	n := int(req.length)
	if c.structured && n == 0 {
		// Zero-length reads are unspecified; qemu answers with a lone
		// NONE chunk carrying DONE.
		return c.send(appendChunk(make([]byte, 0, chunkHeaderLen), replyFlagDone, replyNone, req.cookie, 0))
	}
	buf := c.srv.bufs.get(n)
	defer c.srv.bufs.put(buf)
	if !c.structured {
		if err := readFull(e, buf, req.off); err != nil {
			return c.backendError(req, "read", err, false)
		}
		return c.send(appendSimpleReply(make([]byte, 0, simpleReplyLen), 0, req.cookie), buf)
	}
	if req.flags&cmdFlagDF != 0 || !c.holes {
		// DF: "at most one content chunk (holes sent as explicit zeros)".
		if err := readFull(e, buf, req.off); err != nil {
			return c.backendError(req, "read", err, false)
		}
		h := make([]byte, 0, chunkHeaderLen+8)
		h = appendChunk(h, replyFlagDone, replyOffsetData, req.cookie, 8+n)
		h = be.AppendUint64(h, req.off)
		return c.send(h, buf)
	}
	return c.sparseRead(req, buf)
}

// segment is a piece of a structured READ: data, or a hole that reads as
// zeros. rel is relative to the request offset.
type segment struct {
	rel, n uint64
	zero   bool
}

// sparseRead answers a structured READ as qemu does (nbd/server.c
// nbd_co_send_sparse_read): ranges whose base:allocation status has
// NBD_STATE_ZERO go out as OFFSET_HOLE chunks, the rest as OFFSET_DATA.
// The chunks cover the request exactly, in order, without overlap, and
// only the last carries DONE.
func (c *conn) sparseRead(req *request, buf []byte) error {
	e := c.exp.Export
	n := uint64(len(buf))
	segs := make([]segment, 0, 4)
	var pos uint64
	err := e.BlockStatus(ContextBaseAllocation, req.off, n, func(length uint64, flags uint32) bool {
		if pos >= n {
			return false
		}
		if length == 0 {
			return true
		}
		length = min(length, n-pos)
		zero := flags&stateZero != 0
		if k := len(segs); k > 0 && segs[k-1].zero == zero {
			segs[k-1].n += length
		} else {
			if k == maxReadChunks-1 {
				return false // the rest goes out as data
			}
			segs = append(segs, segment{rel: pos, n: length, zero: zero})
		}
		pos += length
		return pos < n
	})
	if err != nil {
		return c.backendError(req, "block status", err, false)
	}
	if pos < n {
		// The export stopped early: data is always a correct answer.
		if k := len(segs); k > 0 && !segs[k-1].zero {
			segs[k-1].n += n - pos
		} else {
			segs = append(segs, segment{rel: pos, n: n - pos})
		}
	}
	for _, s := range segs {
		if s.zero {
			continue
		}
		if err := readFull(e, buf[s.rel:s.rel+s.n], req.off+s.rel); err != nil {
			return c.backendError(req, "read", err, false)
		}
	}

	// One header buffer for all chunks, sized exactly so it never moves.
	const holeHdr, dataHdr = chunkHeaderLen + 12, chunkHeaderLen + 8
	hdrs := make([]byte, 0, len(segs)*holeHdr)
	ends := make([]int, 0, len(segs))
	for i, s := range segs {
		var flags uint16
		if i == len(segs)-1 {
			flags = replyFlagDone
		}
		if s.zero {
			hdrs = appendChunk(hdrs, flags, replyOffsetHole, req.cookie, 12)
			hdrs = be.AppendUint64(hdrs, req.off+s.rel)
			hdrs = be.AppendUint32(hdrs, uint32(s.n)) // s.n <= maxPayload
		} else {
			hdrs = appendChunk(hdrs, flags, replyOffsetData, req.cookie, 8+int(s.n))
			hdrs = be.AppendUint64(hdrs, req.off+s.rel)
		}
		ends = append(ends, len(hdrs))
	}
	out := make([][]byte, 0, 2*len(segs))
	start := 0
	for i, s := range segs {
		out = append(out, hdrs[start:ends[i]])
		if !s.zero {
			out = append(out, buf[s.rel:s.rel+s.n])
		}
		start = ends[i]
	}
	return c.send(out...)
}

// blockStatus serves NBD_CMD_BLOCK_STATUS: one BLOCK_STATUS chunk per
// selected context, in qemu's order, DONE on the last. All chunks are
// computed before anything is sent, so a failing context gives a single
// error reply.
func (c *conn) blockStatus(req *request) error {
	limit := maxExtents
	if req.flags&cmdFlagReqOne != 0 {
		// "with REQ_ONE exactly one extent, not exceeding the request"
		limit = 1
	}
	n := uint64(req.length)
	chunks := make([][]byte, 0, len(c.selected))
	for i, mc := range c.selected {
		b := make([]byte, chunkHeaderLen+4, chunkHeaderLen+4+8*4)
		var err error
		b, err = c.appendExtents(b, mc, req.off, n, limit)
		if err != nil {
			return c.backendError(req, "block status", err, false)
		}
		if len(b) == chunkHeaderLen+4 {
			// "at least one extent each": an export that reports nothing
			// is broken; no answer would be true for every context.
			return c.backendError(req, "block status", errNoExtents{mc.name}, false)
		}
		var flags uint16
		if i == len(c.selected)-1 {
			flags = replyFlagDone
		}
		appendChunk(b[:0], flags, replyBlockStatus, req.cookie, len(b)-chunkHeaderLen)
		be.PutUint32(b[chunkHeaderLen:], mc.id)
		chunks = append(chunks, b)
	}
	return c.send(chunks...)
}

type errNoExtents struct{ context string }

func (e errNoExtents) Error() string {
	return "nbdlink: export reported no extents for " + e.context
}

// appendExtents appends the extents of mc over [off, off+n) to b as
// (u32 length, u32 flags) pairs: clipped to the request (the server "never
// lets an extent run past the request"), without zero lengths, with equal
// neighbours merged ("SHOULD alternate statuses"), and at most limit of
// them. Merged lengths stay below 2^32 because n does.
func (c *conn) appendExtents(b []byte, mc metaContext, off, n uint64, limit int) ([]byte, error) {
	if mc.synthetic {
		b = be.AppendUint32(b, uint32(n))
		return be.AppendUint32(b, 0), nil
	}
	count := 0
	var pos uint64
	var last uint32
	err := c.exp.Export.BlockStatus(mc.name, off, n, func(length uint64, flags uint32) bool {
		if pos >= n {
			return false
		}
		if length == 0 {
			return true
		}
		length = min(length, n-pos)
		if count > 0 && flags == last {
			k := len(b) - 8
			be.PutUint32(b[k:], be.Uint32(b[k:])+uint32(length))
		} else {
			if count == limit {
				return false
			}
			b = be.AppendUint32(b, uint32(length))
			b = be.AppendUint32(b, flags)
			count++
			last = flags
		}
		pos += length
		return pos < n
	})
	return b, err
}

// readFull reads len(p) bytes at off; a short read is an error even when
// the export reports none. io.ReaderAt may return io.EOF with a full read.
func readFull(e Export, p []byte, off uint64) error {
	n, err := e.ReadAt(p, int64(off))
	if n == len(p) {
		return nil
	}
	if err == nil || err == io.EOF {
		err = io.ErrUnexpectedEOF
	}
	return err
}

// bufPool recycles READ and WRITE payload buffers by power-of-two size
// class, from 4 KiB to maxPayload. Each Server has its own.
type bufPool struct {
	classes [maxBufShift - minBufShift + 1]sync.Pool
}

const (
	minBufShift = 12
	maxBufShift = 25 // maxPayload == 1<<25
)

func bufClass(n int) int {
	if n <= 1<<minBufShift {
		return 0
	}
	return bits.Len(uint(n-1)) - minBufShift
}

// get returns a buffer of length n (n <= maxPayload), possibly reused and
// holding old data.
func (bp *bufPool) get(n int) []byte {
	if n == 0 {
		return nil
	}
	cl := bufClass(n)
	if p, ok := bp.classes[cl].Get().(*[]byte); ok {
		return (*p)[:n]
	}
	return make([]byte, n, 1<<(cl+minBufShift))
}

// put returns a buffer from get to the pool.
func (bp *bufPool) put(b []byte) {
	if cap(b) == 0 {
		return
	}
	cl := bufClass(cap(b))
	if cl >= len(bp.classes) || cap(b) != 1<<(cl+minBufShift) {
		return
	}
	bp.classes[cl].Put(&b)
}
