// Package nbdlink is an NBD (Network Block Device) server. It serves any
// [Export] — a sized byte range with optional block status contexts — to
// NBD clients such as nbdinfo, nbdcopy, qemu-img, qemu-io and the Linux
// kernel, and behaves as qemu-nbd 7.2 does except where qemu departs from
// the protocol specification (then it follows the spec; each such place
// says so in a comment). It uses only the standard library and knows
// nothing of qcow2 or FUSE.
//
// A [Server] is built with [NewServer] from [ExportConfig] values and runs
// with [Server.Serve] on a listener from [Listen] (or any [net.Listener]),
// or with [Server.ServeConn] on one connection.
//
// # Protocol coverage
//
// Handshake: fixed newstyle only (no oldstyle), with NBD_FLAG_NO_ZEROES.
// Unknown client flags drop the connection. A client without
// NBD_FLAG_C_FIXED_NEWSTYLE may only send NBD_OPT_EXPORT_NAME.
//
// Options: EXPORT_NAME, ABORT, LIST, INFO, GO (replying NBD_INFO_NAME when
// asked, NBD_INFO_DESCRIPTION when set, NBD_INFO_BLOCK_SIZE always with
// minimum 1, preferred 4096 and maximum 32 MiB, and NBD_INFO_EXPORT),
// STRUCTURED_REPLY, LIST_META_CONTEXT and SET_META_CONTEXT. Every other
// option (STARTTLS and EXTENDED_HEADERS included) has its payload
// discarded and gets NBD_REP_ERR_UNSUP; negotiation goes on.
//
// Meta contexts: "base:allocation" always, plus whatever the export lists
// in [Export.MetaContexts], normally "qemu:allocation-depth" and
// "qemu:dirty-bitmap:NAME". IDs and query rules are qemu's: base:allocation
// is 0, qemu:allocation-depth 1, the i-th bitmap 2+i; LIST with no query
// lists all, "base:", "qemu:" and "qemu:dirty-bitmap:" list their
// namespace; in SET only full names select. A selection belongs to the
// export named in SET: GO or EXPORT_NAME for another export drops it.
//
// Commands: READ (simple, or structured with OFFSET_DATA and OFFSET_HOLE
// chunks chosen from base:allocation's NBD_STATE_ZERO, and one data chunk
// with DF), WRITE, FLUSH, TRIM, WRITE_ZEROES (NO_HOLE, FAST_ZERO through
// [FastZeroer]), CACHE (through [Cacher]), BLOCK_STATUS (REQ_ONE) and
// DISC, with FUA on every command. Transmission flags are computed per
// connection as qemu-nbd 7.2 computes them: SEND_DF only after structured
// replies, CAN_MULTI_CONN only when [ExportConfig.MultiConn] is set.
//
// Errors: a malformed request gets an errno reply and the connection goes
// on — unknown commands and flags EINVAL, writes to a read-only export
// EPERM, ranges past the end EINVAL (ENOSPC for writes), READ and WRITE
// over 32 MiB EINVAL (a refused WRITE's payload is read and discarded).
// A malformed option gets an NBD_REP_ERR_* reply and negotiation goes on.
// The connection is dropped only where the protocol leaves no other way:
// unknown client flags, a bad option or request magic, an option longer
// than 32 MiB, EXPORT_NAME for an unknown export, any option but
// EXPORT_NAME from a client without fixed newstyle, the negotiation
// deadline, or a failed write to the client. Backend errors are mapped as
// described at [ErrReadOnly].
//
// Sizes are served as [Export.Size] reports them (qemu-nbd rounds down to
// a multiple of 512; with a minimum block size of 1 there is no need).
//
// Not supported: TLS, oldstyle negotiation, the experimental extended
// headers and RESIZE extensions, and export sizes above math.MaxInt64.
//
// # Concurrency
//
// Each connection has one goroutine that negotiates and then reads
// requests in order; every request is served in its own goroutine, with at
// most 16 requests and 64 MiB of buffers in flight per connection (the
// reader waits, so TCP flow control pushes back on the client). Replies
// are written whole under one mutex, so the chunks of different replies
// never interleave, though replies may come in any order, as the protocol
// allows. Export methods are therefore called concurrently.
//
// NBD_CMD_FLUSH calls [Export.Flush], which covers every write already
// replied to; FUA flushes after the write and before the reply.
//
// NBD_CMD_DISC, end of stream and shutdown all stop the reader first; the
// requests already read still run and get their replies before the
// connection closes. [Server.Serve] waits for every connection.
//
// # Limits
//
//	option payload (INFO, GO, meta contexts)  64 KiB buffered; longer: ERR_TOO_BIG
//	any option payload                        32 MiB; longer: disconnect
//	names, queries, messages                  4096 bytes (NBD strings)
//	READ / WRITE length                       32 MiB (advertised maximum)
//	extents per BLOCK_STATUS chunk            131072 (qemu; spec: at most 2^20)
//	chunks per structured READ                65536 (then the rest is data)
//	negotiation                               Options.HandshakeTimeout (30 s)
package nbdlink
