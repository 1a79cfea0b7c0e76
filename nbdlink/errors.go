package nbdlink

import (
	"errors"
	"fmt"
	"syscall"
)

// Errors an [Export] may return (wrapped or not) to choose the NBD error a
// client sees. Any [syscall.Errno] in the chain is honoured too; everything
// else is reported as EIO. The mapping is done in one place, errnoOf.
var (
	// ErrReadOnly reports a write to something that cannot be written;
	// clients see EPERM.
	ErrReadOnly = errors.New("nbdlink: read-only")
	// ErrNoSpace reports that a write needs space the export does not
	// have; clients see ENOSPC.
	ErrNoSpace = errors.New("nbdlink: no space")
	// ErrOutOfRange reports an offset or length outside the export;
	// clients see EINVAL.
	ErrOutOfRange = errors.New("nbdlink: out of range")
)

// Errors returned by the server itself.
var (
	// errDisconnect ends transmission after NBD_CMD_DISC.
	errDisconnect = errors.New("nbdlink: client disconnected")
	// errAbort ends negotiation after NBD_OPT_ABORT.
	errAbort = errors.New("nbdlink: client aborted negotiation")
)

// protocolError is a connection error: the client broke the protocol in a
// way that leaves the stream unusable, so the connection is dropped (the
// http2 ConnectionError class). Per-request failures are errno replies
// instead.
type protocolError struct{ msg string }

func (e *protocolError) Error() string { return "nbdlink: protocol error: " + e.msg }

func protoErrorf(format string, args ...any) error {
	return &protocolError{msg: fmt.Sprintf(format, args...)}
}

// errno is an NBD error value (formats.md D.9). The numbers are the Linux
// ones, but they are protocol constants, not the host's.
type errno uint32

const (
	ePERM     errno = 1   // NBD_EPERM
	eIO       errno = 5   // NBD_EIO
	eNOMEM    errno = 12  // NBD_ENOMEM
	eINVAL    errno = 22  // NBD_EINVAL
	eNOSPC    errno = 28  // NBD_ENOSPC
	eOVERFLOW errno = 75  // NBD_EOVERFLOW
	eNOTSUP   errno = 95  // NBD_ENOTSUP
	eSHUTDOWN errno = 108 // NBD_ESHUTDOWN
)

func (e errno) String() string {
	switch e {
	case 0:
		return "success"
	case ePERM:
		return "EPERM"
	case eIO:
		return "EIO"
	case eNOMEM:
		return "ENOMEM"
	case eINVAL:
		return "EINVAL"
	case eNOSPC:
		return "ENOSPC"
	case eOVERFLOW:
		return "EOVERFLOW"
	case eNOTSUP:
		return "ENOTSUP"
	case eSHUTDOWN:
		return "ESHUTDOWN"
	}
	return fmt.Sprintf("unknown-%d", uint32(e))
}

// errnoOf maps an error from an [Export] to the NBD error sent to the
// client. It is the only place where backend errors change form.
//
// fastZero says whether the request was WRITE_ZEROES with FAST_ZERO: the
// spec allows ENOTSUP only there ("The server SHOULD NOT return NBD_ENOTSUP
// except as documented in response to NBD_CMD_WRITE_ZEROES when
// NBD_CMD_FLAG_FAST_ZERO is supported"); elsewhere "not supported" becomes
// EINVAL, which is also what clients make of unknown values.
func errnoOf(err error, fastZero bool) errno {
	if err == nil {
		return 0
	}
	notsup := eINVAL
	if fastZero {
		notsup = eNOTSUP
	}
	switch {
	case errors.Is(err, ErrReadOnly):
		return ePERM
	case errors.Is(err, ErrNoSpace):
		return eNOSPC
	case errors.Is(err, ErrOutOfRange):
		return eINVAL
	case errors.Is(err, errors.ErrUnsupported):
		return notsup
	}
	if se, ok := errors.AsType[syscall.Errno](err); ok {
		switch se {
		case syscall.EPERM, syscall.EROFS, syscall.EACCES:
			return ePERM
		// "It also SHOULD map the EDQUOT and EFBIG errors to NBD_ENOSPC."
		case syscall.ENOSPC, syscall.EDQUOT, syscall.EFBIG:
			return eNOSPC
		case syscall.EINVAL:
			return eINVAL
		case syscall.ENOTSUP: // == EOPNOTSUPP on Linux
			return notsup
		case syscall.ESHUTDOWN:
			return eSHUTDOWN
		}
		// ENOMEM and EOVERFLOW have narrow meanings in NBD ("SHOULD NOT
		// return NBD_ENOMEM"; EOVERFLOW only for DF), so they fall
		// through to EIO like every other errno.
	}
	return eIO
}
