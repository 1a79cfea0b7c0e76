package testutil

import (
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// ServeOptions configure [ServeNBD].
type ServeOptions struct {
	// ReadOnly passes --read-only.
	ReadOnly bool
	// ExportName is passed with --export-name when non-empty.
	ExportName string
	// TCP listens on 127.0.0.1 on a free port instead of a unix socket.
	TCP bool
	// Addr, when set, is where to listen (unix:PATH or HOST:PORT),
	// instead of a fresh socket or port.
	Addr string
	// Args are extra arguments before the image.
	Args []string
}

// NBDServer is a cbtfs process serving NBD: `cbtfs serve`, started by
// [ServeNBD]. A cleanup stops it with SIGTERM unless the test did, and
// requires exit status 0 (a cbtfs built with -race exits 66 on a race).
type NBDServer struct {
	Addr   string // as given to --listen: unix:PATH or 127.0.0.1:PORT
	Socket string // the unix socket; "" for TCP
	URI    string // nbd+unix:///NAME?socket=PATH or nbd://127.0.0.1:PORT/NAME
	Proc   *Proc

	image   string
	stopped bool // Stop has checked the exit
}

// shortTempDir returns a fresh directory with a short name, removed at
// the end of the test: unix socket paths are limited to 108 bytes, and
// t.TempDir() names of subtests can be long.
func shortTempDir(tb testing.TB) string {
	tb.Helper()
	dir, err := os.MkdirTemp("", "cbtfs-nbd-")
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// NBDSocketAddr returns a fresh unix socket address "unix:PATH" in a
// short temporary directory.
func NBDSocketAddr(tb testing.TB) string {
	tb.Helper()
	return "unix:" + filepath.Join(shortTempDir(tb), "s")
}

// FreeTCPAddr returns "127.0.0.1:PORT" for a port that was free a moment
// ago (the kernel picked it; another process could take it before the
// server binds, which is unlikely on a test machine).
func FreeTCPAddr(tb testing.TB) string {
	tb.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	return addr
}

// NBDURI returns the NBD URI of export at addr (unix:PATH or HOST:PORT).
func NBDURI(addr, export string) string {
	if p, ok := strings.CutPrefix(addr, "unix:"); ok {
		return "nbd+unix:///" + export + "?socket=" + p
	}
	return "nbd://" + addr + "/" + export
}

// ServeNBD runs `cbtfs serve [--read-only] [--export-name NAME] --listen
// ADDR image` and returns once ADDR accepts connections.
func ServeNBD(tb testing.TB, cbtfs, image string, o ServeOptions) *NBDServer {
	tb.Helper()
	addr := o.Addr
	switch {
	case addr != "":
	case o.TCP:
		addr = FreeTCPAddr(tb)
	default:
		addr = NBDSocketAddr(tb)
	}
	args := []string{"serve", "--listen", addr}
	if o.ReadOnly {
		args = append(args, "--read-only")
	}
	if o.ExportName != "" {
		args = append(args, "--export-name", o.ExportName)
	}
	args = append(append(args, o.Args...), image)
	p := Start(tb, "", cbtfs, args...)
	s := &NBDServer{Addr: addr, URI: NBDURI(addr, o.ExportName), Proc: p, image: image}
	if p, ok := strings.CutPrefix(addr, "unix:"); ok {
		s.Socket = p
	}
	tb.Cleanup(func() {
		if !p.Exited() {
			s.Stop(tb, syscall.SIGTERM)
			return
		}
		if err := p.Err(); err != nil && !s.stopped {
			tb.Errorf("cbtfs serve %s: %v; stderr: %q", image, err, p.Stderr())
		}
	})
	WaitAccept(tb, addr, p, "cbtfs serve "+image)
	return s
}

// Stop sends sig to the server and requires it to exit with status 0
// within [ExitTimeout].
func (s *NBDServer) Stop(tb testing.TB, sig syscall.Signal) {
	tb.Helper()
	if err := s.Proc.Signal(sig); err != nil && !s.Proc.Exited() {
		tb.Fatalf("signal cbtfs serve: %v", err)
	}
	s.RequireExit(tb)
}

// Kill kills the server with SIGKILL, as a crash would, and waits for
// it; the cleanup then expects nothing more of it.
func (s *NBDServer) Kill(tb testing.TB) {
	tb.Helper()
	s.stopped = true
	_ = s.Proc.Cmd.Process.Kill()
	if _, ok := s.Proc.Wait(ExitTimeout); !ok {
		tb.Fatalf("cbtfs serve %s still running %v after SIGKILL", s.image, ExitTimeout)
	}
}

// RequireExit waits for the server, stopped by the test, and requires
// exit status 0 within [ExitTimeout].
func (s *NBDServer) RequireExit(tb testing.TB) {
	tb.Helper()
	s.stopped = true
	RequireProcExit(tb, s.Proc, "cbtfs serve "+s.image)
}

// RequireProcExit waits at most [ExitTimeout] for p and requires exit
// status 0; a process still running gets SIGQUIT (a Go program prints its
// goroutines) and then SIGKILL.
func RequireProcExit(tb testing.TB, p *Proc, what string) {
	tb.Helper()
	if _, ok := p.Wait(ExitTimeout); !ok {
		_ = p.Signal(syscall.SIGQUIT)
		if _, ok := p.Wait(WaitDelay); !ok {
			_ = p.Cmd.Process.Kill()
			p.Wait(WaitDelay)
		}
		tb.Errorf("%s did not exit within %v; stderr: %s", what, ExitTimeout, p.Stderr())
		return
	}
	if err := p.Err(); err != nil {
		tb.Errorf("%s: %v, want exit status 0; stderr: %q", what, err, p.Stderr())
	}
}

// WaitAccept polls until addr (unix:PATH or HOST:PORT) accepts a
// connection, failing the test if p exits first or [NBDTimeout] passes.
// The probe connection is closed at once.
func WaitAccept(tb testing.TB, addr string, p *Proc, what string) {
	tb.Helper()
	network, a := "tcp", addr
	if path, ok := strings.CutPrefix(addr, "unix:"); ok {
		network, a = "unix", path
	}
	deadline := time.Now().Add(NBDTimeout)
	delay := time.Millisecond
	for {
		c, err := net.Dial(network, a)
		if err == nil {
			c.Close()
			return
		}
		if p != nil && p.Exited() {
			tb.Fatalf("%s exited before accepting on %s: %v; stderr: %q", what, addr, p.Err(), p.Stderr())
		}
		if time.Now().After(deadline) {
			tb.Fatalf("%s: %s not accepting after %v: %v", what, addr, NBDTimeout, err)
		}
		time.Sleep(delay)
		delay = min(2*delay, 50*time.Millisecond)
	}
}

// StartQemuNBD runs `qemu-nbd -t -k SOCK ARGS... image` (args are any
// qemu-nbd options, e.g. "-r", "-f", "qcow2", "-A", "-B", "bm0", "-e",
// "2") and returns once the socket accepts. Unlike [QemuNBD] nothing is
// implied: the caller chooses read-only or not. A cleanup stops it with
// SIGTERM and waits for it, so that the image is closed when the test
// goes on to check it.
func StartQemuNBD(tb testing.TB, image string, args ...string) *NBD {
	tb.Helper()
	sock := filepath.Join(shortTempDir(tb), "q")
	p := Start(tb, "", "qemu-nbd", append(append([]string{"-t", "-k", sock}, args...), image)...)
	n := &NBD{Socket: sock, URI: "nbd+unix:///?socket=" + sock, proc: p}
	for i, a := range args {
		if a == "-x" && i+1 < len(args) {
			n.URI = NBDURI("unix:"+sock, args[i+1])
		}
	}
	tb.Cleanup(func() { n.Stop(tb) })
	WaitAccept(tb, "unix:"+sock, p, "qemu-nbd "+image)
	return n
}
