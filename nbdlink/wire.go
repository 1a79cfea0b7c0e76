package nbdlink

import (
	"encoding/binary"
	"fmt"
)

// Magic numbers (proto.md "Values", formats.md D.1).
const (
	magicInitPasswd  uint64 = 0x4e42444d41474943 // INIT_PASSWD, "NBDMAGIC"
	magicIHaveOpt    uint64 = 0x49484156454f5054 // IHAVEOPT, "IHAVEOPT"
	magicOptReply    uint64 = 0x0003e889045565a9 // NBD_REP_MAGIC
	magicRequest     uint32 = 0x25609513         // NBD_REQUEST_MAGIC
	magicSimpleReply uint32 = 0x67446698         // NBD_SIMPLE_REPLY_MAGIC
	magicStructReply uint32 = 0x668e33ef         // NBD_STRUCTURED_REPLY_MAGIC
)

// Handshake flags, sent by the server after IHAVEOPT.
const (
	hsFixedNewstyle uint16 = 1 << 0 // NBD_FLAG_FIXED_NEWSTYLE
	hsNoZeroes      uint16 = 1 << 1 // NBD_FLAG_NO_ZEROES
)

// Client flags, sent by the client after the greeting.
const (
	clientFixedNewstyle uint32 = 1 << 0 // NBD_FLAG_C_FIXED_NEWSTYLE
	clientNoZeroes      uint32 = 1 << 1 // NBD_FLAG_C_NO_ZEROES
	clientKnownFlags           = clientFixedNewstyle | clientNoZeroes
)

// Transmission flags (formats.md D.5).
const (
	tfHasFlags       uint16 = 1 << 0  // NBD_FLAG_HAS_FLAGS
	tfReadOnly       uint16 = 1 << 1  // NBD_FLAG_READ_ONLY
	tfSendFlush      uint16 = 1 << 2  // NBD_FLAG_SEND_FLUSH
	tfSendFUA        uint16 = 1 << 3  // NBD_FLAG_SEND_FUA
	tfRotational     uint16 = 1 << 4  // NBD_FLAG_ROTATIONAL
	tfSendTrim       uint16 = 1 << 5  // NBD_FLAG_SEND_TRIM
	tfSendWriteZeros uint16 = 1 << 6  // NBD_FLAG_SEND_WRITE_ZEROES
	tfSendDF         uint16 = 1 << 7  // NBD_FLAG_SEND_DF
	tfCanMultiConn   uint16 = 1 << 8  // NBD_FLAG_CAN_MULTI_CONN
	tfSendResize     uint16 = 1 << 9  // NBD_FLAG_SEND_RESIZE
	tfSendCache      uint16 = 1 << 10 // NBD_FLAG_SEND_CACHE
	tfSendFastZero   uint16 = 1 << 11 // NBD_FLAG_SEND_FAST_ZERO
)

// Fixed message sizes.
const (
	greetingLen        = 18  // "NBDMAGIC", IHAVEOPT, u16 handshake flags
	optHeaderLen       = 16  // u64 IHAVEOPT, u32 option, u32 length
	optReplyHeaderLen  = 20  // u64 magic, u32 option, u32 type, u32 length
	exportNameReplyLen = 134 // u64 size, u16 flags, 124 zero bytes
	requestHeaderLen   = 28  // u32 magic, u16 flags, u16 type, u64 cookie, u64 offset, u32 length
	simpleReplyLen     = 16  // u32 magic, u32 error, u64 cookie
	chunkHeaderLen     = 20  // u32 magic, u16 flags, u16 type, u64 cookie, u32 length
)

// Limits (formats.md D.1, D.4, D.10, C.1; style.md rule 5).
const (
	// maxString is the NBD string limit: names, contexts and messages
	// "MUST be <= 4096 bytes".
	maxString = 4096
	// maxPayload is qemu's NBD_MAX_BUFFER_SIZE, the de-facto request limit
	// and the maximum block size we advertise.
	maxPayload = 32 << 20
	// maxOptionLen caps the options we buffer and parse (INFO, GO and the
	// meta context options); longer ones are drained and refused with
	// ERR_TOO_BIG. It leaves room for 15 queries of maximal length.
	maxOptionLen = 64 << 10
	// maxOptionDrain is the longest option we read at all; like qemu we
	// drop a client that declares more.
	maxOptionDrain = maxPayload
	// maxExtents is qemu's NBD_MAX_BLOCK_STATUS_EXTENTS (1 MiB of extents
	// per chunk); the spec's SHOULD is at most 2^20.
	maxExtents = 1 << 17
	// maxReadChunks bounds the OFFSET_DATA/OFFSET_HOLE chunks of one
	// structured READ; past it the rest of the request goes out as data.
	maxReadChunks = 1 << 16
)

// Block sizes advertised in NBD_INFO_BLOCK_SIZE, as qemu-nbd 7.2 does for a
// qcow2 node (formats.md C.5).
const (
	blockSizeMin       = 1
	blockSizePreferred = 4096
	blockSizeMax       = maxPayload
)

// option is an NBD_OPT_* value.
type option uint32

const (
	optExportName      option = 1  // NBD_OPT_EXPORT_NAME
	optAbort           option = 2  // NBD_OPT_ABORT
	optList            option = 3  // NBD_OPT_LIST
	optPeekExport      option = 4  // NBD_OPT_PEEK_EXPORT (withdrawn)
	optStartTLS        option = 5  // NBD_OPT_STARTTLS
	optInfo            option = 6  // NBD_OPT_INFO
	optGo              option = 7  // NBD_OPT_GO
	optStructuredReply option = 8  // NBD_OPT_STRUCTURED_REPLY
	optListMetaContext option = 9  // NBD_OPT_LIST_META_CONTEXT
	optSetMetaContext  option = 10 // NBD_OPT_SET_META_CONTEXT
	optExtendedHeaders option = 11 // NBD_OPT_EXTENDED_HEADERS
)

var optionNames = map[option]string{
	optExportName:      "export name",
	optAbort:           "abort",
	optList:            "list",
	optPeekExport:      "peek export",
	optStartTLS:        "starttls",
	optInfo:            "info",
	optGo:              "go",
	optStructuredReply: "structured reply",
	optListMetaContext: "list meta context",
	optSetMetaContext:  "set meta context",
	optExtendedHeaders: "extended headers",
}

func (o option) String() string {
	if s, ok := optionNames[o]; ok {
		return s
	}
	return fmt.Sprintf("unknown-%d", uint32(o))
}

// repType is an option reply type (NBD_REP_*).
type repType uint32

const (
	repAck              repType = 1          // NBD_REP_ACK
	repServer           repType = 2          // NBD_REP_SERVER
	repInfo             repType = 3          // NBD_REP_INFO
	repMetaContext      repType = 4          // NBD_REP_META_CONTEXT
	repErrUnsup         repType = 1<<31 + 1  // NBD_REP_ERR_UNSUP
	repErrPolicy        repType = 1<<31 + 2  // NBD_REP_ERR_POLICY
	repErrInvalid       repType = 1<<31 + 3  // NBD_REP_ERR_INVALID
	repErrPlatform      repType = 1<<31 + 4  // NBD_REP_ERR_PLATFORM
	repErrTLSReqd       repType = 1<<31 + 5  // NBD_REP_ERR_TLS_REQD
	repErrUnknown       repType = 1<<31 + 6  // NBD_REP_ERR_UNKNOWN
	repErrShutdown      repType = 1<<31 + 7  // NBD_REP_ERR_SHUTDOWN
	repErrBlockSizeReqd repType = 1<<31 + 8  // NBD_REP_ERR_BLOCK_SIZE_REQD
	repErrTooBig        repType = 1<<31 + 9  // NBD_REP_ERR_TOO_BIG
	repErrExtHeaderReqd repType = 1<<31 + 10 // NBD_REP_ERR_EXT_HEADER_REQD
)

var repTypeNames = map[repType]string{
	repAck:              "ACK",
	repServer:           "SERVER",
	repInfo:             "INFO",
	repMetaContext:      "META_CONTEXT",
	repErrUnsup:         "ERR_UNSUP",
	repErrPolicy:        "ERR_POLICY",
	repErrInvalid:       "ERR_INVALID",
	repErrPlatform:      "ERR_PLATFORM",
	repErrTLSReqd:       "ERR_TLS_REQD",
	repErrUnknown:       "ERR_UNKNOWN",
	repErrShutdown:      "ERR_SHUTDOWN",
	repErrBlockSizeReqd: "ERR_BLOCK_SIZE_REQD",
	repErrTooBig:        "ERR_TOO_BIG",
	repErrExtHeaderReqd: "ERR_EXT_HEADER_REQD",
}

func (r repType) String() string {
	if s, ok := repTypeNames[r]; ok {
		return s
	}
	return fmt.Sprintf("unknown-%d", uint32(r))
}

// infoType is an NBD_INFO_* value, requested in INFO/GO and sent in REP_INFO.
type infoType uint16

const (
	infoExport      infoType = 0 // NBD_INFO_EXPORT
	infoName        infoType = 1 // NBD_INFO_NAME
	infoDescription infoType = 2 // NBD_INFO_DESCRIPTION
	infoBlockSize   infoType = 3 // NBD_INFO_BLOCK_SIZE
)

func (i infoType) String() string {
	switch i {
	case infoExport:
		return "export"
	case infoName:
		return "name"
	case infoDescription:
		return "description"
	case infoBlockSize:
		return "block size"
	}
	return fmt.Sprintf("unknown-%d", uint16(i))
}

// command is an NBD_CMD_* request type.
type command uint16

const (
	cmdRead        command = 0 // NBD_CMD_READ
	cmdWrite       command = 1 // NBD_CMD_WRITE
	cmdDisc        command = 2 // NBD_CMD_DISC
	cmdFlush       command = 3 // NBD_CMD_FLUSH
	cmdTrim        command = 4 // NBD_CMD_TRIM
	cmdCache       command = 5 // NBD_CMD_CACHE
	cmdWriteZeroes command = 6 // NBD_CMD_WRITE_ZEROES
	cmdBlockStatus command = 7 // NBD_CMD_BLOCK_STATUS
)

func (c command) String() string {
	switch c {
	case cmdRead:
		return "read"
	case cmdWrite:
		return "write"
	case cmdDisc:
		return "disconnect"
	case cmdFlush:
		return "flush"
	case cmdTrim:
		return "trim"
	case cmdCache:
		return "cache"
	case cmdWriteZeroes:
		return "write zeroes"
	case cmdBlockStatus:
		return "block status"
	}
	return fmt.Sprintf("unknown-%d", uint16(c))
}

// Command flags (formats.md D.6).
const (
	cmdFlagFUA      uint16 = 1 << 0 // NBD_CMD_FLAG_FUA
	cmdFlagNoHole   uint16 = 1 << 1 // NBD_CMD_FLAG_NO_HOLE
	cmdFlagDF       uint16 = 1 << 2 // NBD_CMD_FLAG_DF
	cmdFlagReqOne   uint16 = 1 << 3 // NBD_CMD_FLAG_REQ_ONE
	cmdFlagFastZero uint16 = 1 << 4 // NBD_CMD_FLAG_FAST_ZERO
)

// replyType is a structured reply chunk type (NBD_REPLY_TYPE_*).
type replyType uint16

const (
	replyNone        replyType = 0         // NBD_REPLY_TYPE_NONE
	replyOffsetData  replyType = 1         // NBD_REPLY_TYPE_OFFSET_DATA
	replyOffsetHole  replyType = 2         // NBD_REPLY_TYPE_OFFSET_HOLE
	replyBlockStatus replyType = 5         // NBD_REPLY_TYPE_BLOCK_STATUS
	replyError       replyType = 1<<15 + 1 // NBD_REPLY_TYPE_ERROR
	replyErrorOffset replyType = 1<<15 + 2 // NBD_REPLY_TYPE_ERROR_OFFSET
)

func (r replyType) String() string {
	switch r {
	case replyNone:
		return "NONE"
	case replyOffsetData:
		return "OFFSET_DATA"
	case replyOffsetHole:
		return "OFFSET_HOLE"
	case replyBlockStatus:
		return "BLOCK_STATUS"
	case replyError:
		return "ERROR"
	case replyErrorOffset:
		return "ERROR_OFFSET"
	}
	return fmt.Sprintf("unknown-%d", uint16(r))
}

// replyFlagDone marks the last chunk of a structured reply
// (NBD_REPLY_FLAG_DONE).
const replyFlagDone uint16 = 1 << 0

// Block status flags of the contexts the server itself interprets.
const (
	stateHole uint32 = 1 << 0 // NBD_STATE_HOLE (base:allocation)
	stateZero uint32 = 1 << 1 // NBD_STATE_ZERO (base:allocation)
)

var be = binary.BigEndian

// request is one decoded transmission request header, plus the WRITE
// payload once it has been read.
type request struct {
	flags  uint16
	typ    command
	cookie uint64
	off    uint64
	length uint32
	data   []byte // WRITE payload, nil for other commands
}

// decodeRequest decodes a request header. It reports false on bad magic,
// after which the stream cannot be trusted.
func decodeRequest(b *[requestHeaderLen]byte) (request, bool) {
	req := request{
		flags:  be.Uint16(b[4:6]),
		typ:    command(be.Uint16(b[6:8])),
		cookie: be.Uint64(b[8:16]),
		off:    be.Uint64(b[16:24]),
		length: be.Uint32(b[24:28]),
	}
	return req, be.Uint32(b[0:4]) == magicRequest
}

// appendOptReply appends an option reply header for a payload of n bytes.
func appendOptReply(b []byte, opt option, typ repType, n int) []byte {
	b = be.AppendUint64(b, magicOptReply)
	b = be.AppendUint32(b, uint32(opt))
	b = be.AppendUint32(b, uint32(typ))
	return be.AppendUint32(b, uint32(n))
}

// appendSimpleReply appends a simple reply header.
func appendSimpleReply(b []byte, e errno, cookie uint64) []byte {
	b = be.AppendUint32(b, magicSimpleReply)
	b = be.AppendUint32(b, uint32(e))
	return be.AppendUint64(b, cookie)
}

// appendChunk appends a structured reply chunk header for a payload of n
// bytes.
func appendChunk(b []byte, flags uint16, typ replyType, cookie uint64, n int) []byte {
	b = be.AppendUint32(b, magicStructReply)
	b = be.AppendUint16(b, flags)
	b = be.AppendUint16(b, uint16(typ))
	b = be.AppendUint64(b, cookie)
	return be.AppendUint32(b, uint32(n))
}

// cursor reads big-endian fields from an option payload. Every read reports
// whether enough bytes were left, so a short or lying payload cannot cause a
// panic (cryptobyte.String style).
type cursor []byte

func (c *cursor) u16(v *uint16) bool {
	if len(*c) < 2 {
		return false
	}
	*v = be.Uint16(*c)
	*c = (*c)[2:]
	return true
}

func (c *cursor) u32(v *uint32) bool {
	if len(*c) < 4 {
		return false
	}
	*v = be.Uint32(*c)
	*c = (*c)[4:]
	return true
}

// bytes consumes n bytes.
func (c *cursor) bytes(n uint32, v *[]byte) bool {
	if uint64(len(*c)) < uint64(n) {
		return false
	}
	*v = (*c)[:n:n]
	*c = (*c)[n:]
	return true
}
