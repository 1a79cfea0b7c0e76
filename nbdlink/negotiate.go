package nbdlink

import (
	"bytes"
	"errors"
	"fmt"
	"io"
)

// negotiation is the state of the option haggling phase of one connection.
type negotiation struct {
	fixed      bool // client set NBD_FLAG_C_FIXED_NEWSTYLE
	noZeroes   bool // client set NBD_FLAG_C_NO_ZEROES
	structured bool // NBD_OPT_STRUCTURED_REPLY was acknowledged

	// The selection made by the last successful SET_META_CONTEXT, tied to
	// the export it named (qemu: NBDExportMetaContexts.exp).
	metaExport *ExportConfig
	meta       []metaContext
}

// negotiate runs the fixed newstyle handshake and option haggling. On
// success the connection is set up for transmission; errAbort means the
// client ended negotiation cleanly; any other error drops the connection.
func (c *conn) negotiate() error {
	var g [greetingLen]byte
	be.PutUint64(g[0:8], magicInitPasswd)
	be.PutUint64(g[8:16], magicIHaveOpt)
	be.PutUint16(g[16:18], hsFixedNewstyle|hsNoZeroes)
	if _, err := c.nc.Write(g[:]); err != nil {
		return err
	}
	var fb [4]byte
	if _, err := io.ReadFull(c.br, fb[:]); err != nil {
		return err
	}
	flags := be.Uint32(fb[:])
	// "Clients MUST NOT set any other flags; the server MUST drop the TCP
	// connection if the client sets an unknown flag, or a flag that does
	// not match something advertised by the server."
	if flags&^clientKnownFlags != 0 {
		return protoErrorf("unknown client flags %#x", flags)
	}
	n := &negotiation{
		fixed:    flags&clientFixedNewstyle != 0,
		noZeroes: flags&clientNoZeroes != 0,
	}
	for {
		var h [optHeaderLen]byte
		if _, err := io.ReadFull(c.br, h[:]); err != nil {
			if errors.Is(err, io.EOF) {
				// Hanging up between options is a clean end.
				return errAbort
			}
			return err
		}
		if m := be.Uint64(h[0:8]); m != magicIHaveOpt {
			return protoErrorf("bad option magic %#x", m)
		}
		opt := option(be.Uint32(h[8:12]))
		length := be.Uint32(h[12:16])
		if length > maxOptionDrain {
			// qemu: "len (%u) is larger than max len (%u)", disconnect.
			return protoErrorf("option %v length %d is larger than max len %d", opt, length, maxOptionDrain)
		}
		// NBD_OPT_EXPORT_NAME "is the only valid option in nonfixed
		// newstyle negotiation" (qemu drops anything else).
		if !n.fixed && opt != optExportName {
			return protoErrorf("option %v without fixed newstyle", opt)
		}
		done, err := c.handleOption(n, opt, length)
		if err != nil || done {
			return err
		}
	}
}

// handleOption handles one option whose header has been read. It reports
// done when transmission starts.
func (c *conn) handleOption(n *negotiation, opt option, length uint32) (done bool, err error) {
	switch opt {
	case optExportName:
		return true, c.exportName(n, length)

	case optAbort:
		// "The server MUST reply with NBD_REP_ACK" but "SHOULD gracefully
		// handle the client sending an NBD_OPT_ABORT and closing the
		// connection without waiting for a reply".
		_ = c.optReply(opt, repAck)
		return false, errAbort

	case optList:
		if length != 0 {
			return false, c.optDrop(opt, length, repErrInvalid, "option '%v' has unexpected length", opt)
		}
		return false, c.list()

	case optStructuredReply:
		if length != 0 {
			return false, c.optDrop(opt, length, repErrInvalid, "option '%v' has unexpected length", opt)
		}
		if n.structured {
			return false, c.optError(opt, repErrInvalid, "structured reply already negotiated")
		}
		if err := c.optReply(opt, repAck); err != nil {
			return false, err
		}
		n.structured = true
		return false, nil

	case optInfo, optGo, optListMetaContext, optSetMetaContext:
		if opt == optSetMetaContext && n.structured {
			// "Issuing this command replaces all previously-set metadata
			// contexts", also when it fails.
			n.metaExport, n.meta = nil, nil
		}
		if length > maxOptionLen {
			return false, c.optDrop(opt, length, repErrTooBig, "option '%v' is too long (%d > %d bytes)", opt, length, maxOptionLen)
		}
		data := make([]byte, length)
		if _, err := io.ReadFull(c.br, data); err != nil {
			return false, err
		}
		if opt == optInfo || opt == optGo {
			return c.info(n, opt, data)
		}
		return false, c.metaContext(n, opt, data)

	default:
		// "Unknown option: read and discard length bytes, reply ERR_UNSUP
		// and keep negotiating." STARTTLS lands here too: this server has
		// no TLS, and ERR_UNSUP is one of the answers the spec permits.
		return false, c.optDrop(opt, length, repErrUnsup, "unsupported option %d (%v)", uint32(opt), opt)
	}
}

// exportName handles NBD_OPT_EXPORT_NAME, which "cannot fail gracefully":
// an unknown export closes the connection.
func (c *conn) exportName(n *negotiation, length uint32) error {
	if length > maxString {
		return protoErrorf("export name length %d is larger than %d", length, maxString)
	}
	name := make([]byte, length)
	if _, err := io.ReadFull(c.br, name); err != nil {
		return err
	}
	e := c.srv.byName[string(name)]
	if e == nil {
		return protoErrorf("export %s not present", truncName(name))
	}
	size := exportSize(e)
	b := make([]byte, exportNameReplyLen)
	be.PutUint64(b[0:8], size)
	be.PutUint16(b[8:10], transmissionFlags(e, n.structured))
	// "124 bytes of zero ... unless both sides set NO_ZEROES" (we always
	// offer NBD_FLAG_NO_ZEROES).
	if n.noZeroes {
		b = b[:10]
	}
	if _, err := c.nc.Write(b); err != nil {
		return err
	}
	c.enter(n, e, size)
	return nil
}

// list handles NBD_OPT_LIST: one NBD_REP_SERVER per export, then ACK.
func (c *conn) list() error {
	var b []byte
	for _, e := range c.srv.exports {
		b = appendOptReply(b, optList, repServer, 4+len(e.Name)+len(e.Description))
		b = be.AppendUint32(b, uint32(len(e.Name)))
		b = append(b, e.Name...)
		b = append(b, e.Description...)
	}
	b = appendOptReply(b, optList, repAck, 0)
	_, err := c.nc.Write(b)
	return err
}

// readName reads the "u32 length, name" prefix shared by INFO, GO and the
// meta context options. On failure it returns the error reply to send.
func readName(cur *cursor, opt option) (string, repType, string) {
	var nl uint32
	if !cur.u32(&nl) {
		return "", repErrInvalid, fmt.Sprintf("inconsistent lengths in option %v", opt)
	}
	if nl > maxString {
		return "", repErrInvalid, fmt.Sprintf("invalid name length: %d", nl)
	}
	var name []byte
	if !cur.bytes(nl, &name) {
		return "", repErrInvalid, fmt.Sprintf("inconsistent lengths in option %v", opt)
	}
	if bytes.IndexByte(name, 0) >= 0 {
		return "", repErrInvalid, fmt.Sprintf("unexpected embedded NUL in option %v", opt)
	}
	return string(name), 0, ""
}

// info handles NBD_OPT_INFO and NBD_OPT_GO (payload: u32 namelen, name,
// u16 n, n × u16 info type). qemu's reply order: NAME (only if requested),
// DESCRIPTION (if set), BLOCK_SIZE (always), EXPORT (always), then ACK.
func (c *conn) info(n *negotiation, opt option, data []byte) (done bool, err error) {
	cur := cursor(data)
	name, rt, msg := readName(&cur, opt)
	if rt != 0 {
		return false, c.optError(opt, rt, "%s", msg)
	}
	var nreq uint16
	if !cur.u16(&nreq) {
		return false, c.optError(opt, repErrInvalid, "inconsistent lengths in option %v", opt)
	}
	sendName := false
	for range nreq {
		var r uint16
		if !cur.u16(&r) {
			return false, c.optError(opt, repErrInvalid, "inconsistent lengths in option %v", opt)
		}
		// The server "ignores unknown info requests" and may send infos
		// it was not asked for.
		if infoType(r) == infoName {
			sendName = true
		}
	}
	if len(cur) != 0 {
		return false, c.optError(opt, repErrInvalid, "option '%v' has unexpected length", opt)
	}
	e := c.srv.byName[name]
	if e == nil {
		// "ERR_UNKNOWN should come without REP_INFO."
		return false, c.optError(opt, repErrUnknown, "export %s not present", truncName([]byte(name)))
	}
	size := exportSize(e)
	var b []byte
	if sendName {
		b = appendOptReply(b, opt, repInfo, 2+len(name))
		b = be.AppendUint16(b, uint16(infoName))
		b = append(b, name...)
	}
	if e.Description != "" {
		b = appendOptReply(b, opt, repInfo, 2+len(e.Description))
		b = be.AppendUint16(b, uint16(infoDescription))
		b = append(b, e.Description...)
	}
	b = appendOptReply(b, opt, repInfo, 14)
	b = be.AppendUint16(b, uint16(infoBlockSize))
	b = be.AppendUint32(b, blockSizeMin)
	b = be.AppendUint32(b, blockSizePreferred)
	b = be.AppendUint32(b, blockSizeMax)
	// The server "must send NBD_INFO_EXPORT before ACK".
	b = appendOptReply(b, opt, repInfo, 12)
	b = be.AppendUint16(b, uint16(infoExport))
	b = be.AppendUint64(b, size)
	b = be.AppendUint16(b, transmissionFlags(e, n.structured))
	b = appendOptReply(b, opt, repAck, 0)
	if _, err := c.nc.Write(b); err != nil {
		return false, err
	}
	if opt != optGo {
		return false, nil
	}
	// "no zero padding ever after GO": transmission starts right after
	// the ACK.
	c.enter(n, e, size)
	return true, nil
}

// metaContext handles NBD_OPT_LIST_META_CONTEXT and
// NBD_OPT_SET_META_CONTEXT (payload: u32 namelen, export name, u32 n,
// n × (u32 len, query)), with qemu 7.2's rules (formats.md C.1).
func (c *conn) metaContext(n *negotiation, opt option, data []byte) error {
	// "This option MUST NOT be requested unless structured replies have
	// been negotiated first. If a client attempts to do so, a server
	// SHOULD send NBD_REP_ERR_INVALID." (Both options, as in qemu 7.2.)
	if !n.structured {
		return c.optError(opt, repErrInvalid, "request option '%v' when structured reply is not negotiated", opt)
	}
	list := opt == optListMetaContext
	cur := cursor(data)
	name, rt, msg := readName(&cur, opt)
	if rt != 0 {
		return c.optError(opt, rt, "%s", msg)
	}
	e := c.srv.byName[name]
	if e == nil {
		return c.optError(opt, repErrUnknown, "export %s not present", truncName([]byte(name)))
	}
	var nq uint32
	if !cur.u32(&nq) {
		return c.optError(opt, repErrInvalid, "inconsistent lengths in option %v", opt)
	}
	ctxs := contextsOf(e.Export)
	sel := make([]bool, len(ctxs))
	if list && nq == 0 {
		// "If this is not specified ... the server MUST send all the
		// metadata contexts it knows about."
		for i := range sel {
			sel[i] = true
		}
	}
	// Every query consumes at least 4 bytes, so a lying nq ends with the
	// payload.
	for range nq {
		var ql uint32
		var q []byte
		if !cur.u32(&ql) || !cur.bytes(ql, &q) {
			return c.optError(opt, repErrInvalid, "inconsistent lengths in option %v", opt)
		}
		if ql > maxString {
			continue // qemu skips over-long queries
		}
		if bytes.IndexByte(q, 0) >= 0 {
			return c.optError(opt, repErrInvalid, "unexpected embedded NUL in option %v", opt)
		}
		matchQuery(ctxs, string(q), list, sel)
	}
	if len(cur) != 0 {
		return c.optError(opt, repErrInvalid, "option '%v' has unexpected length", opt)
	}
	var b []byte
	var chosen []metaContext
	for i, mc := range ctxs {
		if !sel[i] {
			continue
		}
		// "The metadata context ID in these replies is reserved and
		// SHOULD be set to zero" for LIST; SET gives each "a unique
		// metadata context ID".
		id := mc.id
		if list {
			id = 0
		}
		b = appendOptReply(b, opt, repMetaContext, 4+len(mc.name))
		b = be.AppendUint32(b, id)
		b = append(b, mc.name...)
		chosen = append(chosen, mc)
	}
	b = appendOptReply(b, opt, repAck, 0)
	if _, err := c.nc.Write(b); err != nil {
		return err
	}
	if !list {
		n.metaExport, n.meta = e, chosen
	}
	return nil
}

// optReply sends an option reply without payload.
func (c *conn) optReply(opt option, typ repType) error {
	_, err := c.nc.Write(appendOptReply(nil, opt, typ, 0))
	return err
}

// optError sends an error reply with a message.
func (c *conn) optError(opt option, typ repType, format string, args ...any) error {
	msg := fmt.Sprintf(format, args...)
	if len(msg) > maxString {
		msg = msg[:maxString]
	}
	b := appendOptReply(nil, opt, typ, len(msg))
	b = append(b, msg...)
	_, err := c.nc.Write(b)
	return err
}

// optDrop discards the length bytes of the current option, then sends an
// error reply, so the stream stays in step.
func (c *conn) optDrop(opt option, length uint32, typ repType, format string, args ...any) error {
	if _, err := io.CopyN(io.Discard, c.br, int64(length)); err != nil {
		return err
	}
	return c.optError(opt, typ, format, args...)
}

// truncName shortens a client-supplied name for error messages, like qemu's
// nbd_sanitize_name, and quotes it so that it is printable.
func truncName(name []byte) string {
	if len(name) > 80 {
		return fmt.Sprintf("%q...", name[:80])
	}
	return fmt.Sprintf("%q", name)
}
