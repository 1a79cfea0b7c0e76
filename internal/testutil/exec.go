package testutil

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

const (
	// CommandTimeout bounds each command run through [Cmd]; a tighter test
	// deadline (go test -timeout) wins.
	CommandTimeout = 3 * time.Minute

	// WaitDelay is how long a canceled command has to exit after SIGQUIT,
	// and how long its output pipes may stay open after it exited, before
	// it is killed.
	WaitDelay = 10 * time.Second

	// deadlineGrace is left between a command's deadline and the test's,
	// so that the test can still report what happened.
	deadlineGrace = 15 * time.Second
)

// deadline returns when commands started by tb must be done: the test's
// deadline less a grace period, or ok=false when the test has none.
func deadline(tb testing.TB) (time.Time, bool) {
	d, ok := tb.(interface{ Deadline() (time.Time, bool) })
	if !ok {
		return time.Time{}, false
	}
	t, ok := d.Deadline()
	if !ok {
		return time.Time{}, false
	}
	return t.Add(-deadlineGrace), true
}

// lookup resolves name like exec.LookPath, through [RequireTool] so that a
// missing tool skips (or fails) the test. A name containing a slash is
// used as is.
func lookup(tb testing.TB, name string) string {
	tb.Helper()
	if strings.Contains(name, "/") {
		return name
	}
	return RequireTool(tb, name)
}

// Cmd returns a command running name with args, tied to tb.Context() (or,
// when made by a cleanup, after that context has ended, to nothing but its
// deadline) and bounded by [CommandTimeout] and the test's deadline. When it overstays
// it gets SIGQUIT, then SIGKILL after [WaitDelay]. A cleanup fails the test
// if the command was started but never waited for.
func Cmd(tb testing.TB, name string, args ...string) *exec.Cmd {
	tb.Helper()
	path := lookup(tb, name)
	limit := time.Now().Add(CommandTimeout)
	if d, ok := deadline(tb); ok && d.Before(limit) {
		limit = d
	}
	parent := tb.Context()
	if parent.Err() != nil {
		// tb.Context() is canceled just before the cleanups run: a command
		// a cleanup runs (an unmount) must not be canceled before it
		// starts.
		parent = context.WithoutCancel(parent)
	}
	ctx, cancel := context.WithDeadline(parent, limit)
	cmd := exec.CommandContext(ctx, path, args...)
	cmd.Cancel = func() error { return cmd.Process.Signal(syscall.SIGQUIT) }
	cmd.WaitDelay = WaitDelay
	tb.Cleanup(func() {
		defer cancel()
		if cmd.Process != nil && cmd.ProcessState == nil {
			tb.Errorf("%s was started but never waited for", cmd)
			_ = cmd.Process.Kill()
			_ = cmd.Wait()
		}
	})
	return cmd
}

// RunCmd runs cmd (made by [Cmd]) to completion and returns what it wrote.
// A non-nil error names the command and carries its stderr.
func RunCmd(tb testing.TB, cmd *exec.Cmd) (stdout, stderr string, err error) {
	tb.Helper()
	var o, e bytes.Buffer
	cmd.Stdout, cmd.Stderr = &o, &e
	err = cmd.Run()
	if err != nil {
		err = fmt.Errorf("%s: %w; stderr: %q", cmd, err, e.String())
	}
	return o.String(), e.String(), err
}

// RunErr runs name with args (see [Cmd]) and returns its stdout and stderr
// and an error naming the command, with its stderr, when it failed.
func RunErr(tb testing.TB, name string, args ...string) (stdout, stderr string, err error) {
	tb.Helper()
	return RunCmd(tb, Cmd(tb, name, args...))
}

// Run runs name with args (see [Cmd]) and returns its stdout; the test
// fails at once if the command fails.
func Run(tb testing.TB, name string, args ...string) string {
	tb.Helper()
	out, _, err := RunErr(tb, name, args...)
	if err != nil {
		tb.Fatal(err)
	}
	return out
}

// ExitCode returns the exit status carried by err (from a command run with
// [RunErr] or [RunCmd]): 0 for nil, -1 when the command did not exit
// normally (killed by a signal, never started).
func ExitCode(err error) int {
	if err == nil {
		return 0
	}
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return ee.ExitCode()
	}
	return -1
}

// lockedBuffer is a bytes.Buffer safe for one writer (exec's copying
// goroutine) and concurrent readers.
type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// Proc is a long-lived process (a mount, a server) started by [Start]. It
// is waited for by a goroutine it owns, so its exit can be observed with a
// deadline.
type Proc struct {
	// Cmd is the running command; do not call its Wait.
	Cmd *exec.Cmd

	stdout, stderr lockedBuffer
	done           chan struct{} // closed once Wait has returned
	waitErr        error         // Wait's result; read only after done
}

// Start starts name with args in directory dir ("" for the test's own) and
// returns at once. Unlike [Cmd], the process is not canceled when the test
// function returns: its owner stops it in a cleanup (registered after
// Start, so it runs first). Start's own cleanup only catches a process
// still running at the very end, fails the test, and kills it. The
// process is bounded by the test's deadline.
func Start(tb testing.TB, dir, name string, args ...string) *Proc {
	tb.Helper()
	path := lookup(tb, name)
	ctx := context.WithoutCancel(tb.Context())
	cancel := context.CancelFunc(func() {})
	if d, ok := deadline(tb); ok {
		ctx, cancel = context.WithDeadline(ctx, d)
	}
	p := &Proc{done: make(chan struct{})}
	p.Cmd = exec.CommandContext(ctx, path, args...)
	p.Cmd.Dir = dir
	p.Cmd.Cancel = func() error { return p.Cmd.Process.Signal(syscall.SIGQUIT) }
	p.Cmd.WaitDelay = WaitDelay
	p.Cmd.Stdout, p.Cmd.Stderr = &p.stdout, &p.stderr
	if err := p.Cmd.Start(); err != nil {
		cancel()
		tb.Fatalf("start %s: %v", p.Cmd, err)
	}
	go func() {
		p.waitErr = p.Cmd.Wait()
		cancel()
		close(p.done)
	}()
	tb.Cleanup(func() {
		select {
		case <-p.done:
			return
		default:
		}
		tb.Errorf("%s (pid %d) still running at the end of the test; killing it", p.Cmd, p.Pid())
		_ = p.Cmd.Process.Signal(syscall.SIGQUIT)
		select {
		case <-p.done:
		case <-time.After(WaitDelay):
			_ = p.Cmd.Process.Kill()
			<-p.done
		}
		tb.Logf("stderr of %s:\n%s", p.Cmd, p.Stderr())
	})
	return p
}

// Pid returns the process id.
func (p *Proc) Pid() int { return p.Cmd.Process.Pid }

// Done is closed once the process has exited and been waited for.
func (p *Proc) Done() <-chan struct{} { return p.done }

// Exited reports whether the process has exited.
func (p *Proc) Exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// Signal sends sig to the process.
func (p *Proc) Signal(sig os.Signal) error { return p.Cmd.Process.Signal(sig) }

// Wait waits at most timeout for the process to exit and returns its
// status; ok is false when it was still running at the deadline. The
// status describes a normal exit, or how it was killed
// (state.ExitCode() is -1 then).
func (p *Proc) Wait(timeout time.Duration) (state *os.ProcessState, ok bool) {
	select {
	case <-p.done:
		return p.Cmd.ProcessState, true
	case <-time.After(timeout):
		return nil, false
	}
}

// Err returns the error of the finished process's Wait: nil for exit
// status 0. Call it only after [Proc.Done] is closed.
func (p *Proc) Err() error { return p.waitErr }

// Stdout returns what the process has written to stdout so far.
func (p *Proc) Stdout() string { return p.stdout.String() }

// Stderr returns what the process has written to stderr so far.
func (p *Proc) Stderr() string { return p.stderr.String() }
