package nbdlink

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"net"
	"strings"
	"sync"
	"syscall"
	"time"
	"unicode/utf8"
)

// ExportConfig describes one export offered by a [Server].
type ExportConfig struct {
	// Name is what clients ask for; "" is the default export (qemu-nbd's
	// default too).
	Name string
	// Description is sent in NBD_INFO_DESCRIPTION and NBD_REP_SERVER when
	// not empty.
	Description string
	// ReadOnly refuses writes, trims and write-zeroes with EPERM and
	// advertises NBD_FLAG_READ_ONLY.
	ReadOnly bool
	// MultiConn advertises NBD_FLAG_CAN_MULTI_CONN: set it only when a
	// flush on one connection makes the writes of every connection
	// durable and visible, which holds when all connections share one
	// engine and Flush flushes it.
	MultiConn bool
	// Export serves the data.
	Export Export
}

// Options configures a [Server]. The zero value (or nil) gives the
// defaults.
type Options struct {
	// Logger receives per-request errors that are sent to a client as an
	// errno and connection teardowns. nil discards.
	Logger *slog.Logger
	// HandshakeTimeout bounds the whole negotiation phase of a
	// connection. Zero means 30 seconds.
	HandshakeTimeout time.Duration
}

const (
	defaultHandshakeTimeout = 30 * time.Second
	// shutdownGrace bounds how long replies to in-flight requests may take
	// to reach a client once the server is shutting down.
	shutdownGrace = 10 * time.Second
)

// Server serves NBD exports. Create it with [NewServer]; it is safe for
// concurrent use and may serve several listeners.
type Server struct {
	// Immutable after NewServer.
	exports          []*ExportConfig
	byName           map[string]*ExportConfig
	log              *slog.Logger
	handshakeTimeout time.Duration

	bufs bufPool // safe for concurrent use
}

// NewServer returns a server for exports. Names must be unique, and names
// and descriptions valid NBD strings (UTF-8, no NUL, at most 4096 bytes).
func NewServer(exports []ExportConfig, opts *Options) (*Server, error) {
	var o Options
	if opts != nil {
		o = *opts
	}
	s := &Server{
		byName:           make(map[string]*ExportConfig, len(exports)),
		log:              o.Logger,
		handshakeTimeout: o.HandshakeTimeout,
	}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	if s.handshakeTimeout <= 0 {
		s.handshakeTimeout = defaultHandshakeTimeout
	}
	for i := range exports {
		e := exports[i] // copy: never keep the caller's struct
		if e.Export == nil {
			return nil, fmt.Errorf("nbdlink: export %q has no Export", e.Name)
		}
		if !validString(e.Name) {
			return nil, fmt.Errorf("nbdlink: invalid export name %q", e.Name)
		}
		if !validString(e.Description) {
			return nil, fmt.Errorf("nbdlink: invalid description for export %q", e.Name)
		}
		if _, dup := s.byName[e.Name]; dup {
			return nil, fmt.Errorf("nbdlink: duplicate export name %q", e.Name)
		}
		s.exports = append(s.exports, &e)
		s.byName[e.Name] = &e
	}
	return s, nil
}

// validString reports whether s may be sent as an NBD string: "UTF-8, not
// NUL-terminated, must not contain NUL, ... MUST be <= 4096 bytes".
func validString(s string) bool {
	return len(s) <= maxString && utf8.ValidString(s) && strings.IndexByte(s, 0) < 0
}

// exportSize returns the size to announce for e. io.ReaderAt offsets are
// int64, so larger sizes are cut.
func exportSize(e *ExportConfig) uint64 {
	return min(e.Export.Size(), math.MaxInt64)
}

// transmissionFlags computes the flags for e the way qemu-nbd 7.2 does
// (nbd/server.c nbd_export_create, plus SEND_DF per connection; formats.md
// C.5): HAS_FLAGS, SEND_FLUSH, SEND_FUA and SEND_CACHE always; READ_ONLY or
// else SEND_TRIM, SEND_WRITE_ZEROES and SEND_FAST_ZERO; CAN_MULTI_CONN when
// configured; SEND_DF only with structured replies, because "[the server]
// MUST leave this flag clear if structured replies have not been
// negotiated".
func transmissionFlags(e *ExportConfig, structured bool) uint16 {
	f := tfHasFlags | tfSendFlush | tfSendFUA | tfSendCache
	if e.MultiConn {
		f |= tfCanMultiConn
	}
	if e.ReadOnly {
		f |= tfReadOnly
	} else {
		f |= tfSendTrim | tfSendWriteZeros | tfSendFastZero
	}
	if structured {
		f |= tfSendDF
	}
	return f
}

// Serve accepts connections on l and serves each in its own goroutine until
// ctx ends. Then it closes l, stops reading new requests, lets requests in
// flight finish and their replies go out, and returns once every
// connection is closed. It returns nil when l was closed (by ctx or by the
// caller) and the accept error otherwise.
func (s *Server) Serve(ctx context.Context, l net.Listener) error {
	stop := context.AfterFunc(ctx, func() { l.Close() })
	defer stop()
	var wg sync.WaitGroup
	defer wg.Wait()
	var backoff time.Duration
	for {
		nc, err := l.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return nil
			}
			if isTemporary(err) {
				// Out of file descriptors and the like: wait and retry,
				// as net/http does.
				backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
				t := time.NewTimer(backoff)
				select {
				case <-ctx.Done():
					t.Stop()
				case <-t.C:
				}
				continue
			}
			return fmt.Errorf("nbdlink: accept: %w", err)
		}
		backoff = 0
		wg.Go(func() {
			err := s.ServeConn(ctx, nc)
			if err != nil {
				s.log.Info("nbd connection closed", "remote", nc.RemoteAddr().String(), "err", err)
			} else {
				s.log.Debug("nbd connection closed", "remote", nc.RemoteAddr().String())
			}
		})
	}
}

func isTemporary(err error) bool {
	return errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) ||
		errors.Is(err, syscall.ENOBUFS) || errors.Is(err, syscall.ENOMEM) ||
		errors.Is(err, syscall.ECONNABORTED)
}

// ServeConn serves one client on nc and closes it. When ctx ends it stops
// reading requests, finishes those in flight and returns. It returns nil
// when the client disconnected cleanly (NBD_OPT_ABORT, NBD_CMD_DISC, or
// hanging up between requests) or ctx ended, and otherwise the reason the
// connection was dropped.
func (s *Server) ServeConn(ctx context.Context, nc net.Conn) error {
	if tc, ok := nc.(*net.TCPConn); ok {
		// "Set TCP_NODELAY on TCP sockets" (Go does by default; say so).
		_ = tc.SetNoDelay(true)
	}
	c := newConn(s, nc)
	defer nc.Close()
	stop := context.AfterFunc(ctx, c.shutdown)
	defer stop()
	err := c.run()
	if ctx.Err() != nil && !errors.Is(err, errDisconnect) {
		// Deadline errors caused by the shutdown are not the client's.
		return nil
	}
	if errors.Is(err, errDisconnect) || errors.Is(err, errAbort) {
		return nil
	}
	return err
}

// Listen listens on addr, which is "unix:PATH" for a unix socket or
// "HOST:PORT" for TCP (connections then get TCP_NODELAY in ServeConn).
func Listen(ctx context.Context, addr string) (net.Listener, error) {
	var lc net.ListenConfig
	if path, ok := strings.CutPrefix(addr, "unix:"); ok {
		if path == "" {
			return nil, fmt.Errorf("nbdlink: listen %q: empty socket path", addr)
		}
		l, err := lc.Listen(ctx, "unix", path)
		if err != nil {
			return nil, fmt.Errorf("nbdlink: %w", err)
		}
		return l, nil
	}
	l, err := lc.Listen(ctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("nbdlink: %w", err)
	}
	return l, nil
}
