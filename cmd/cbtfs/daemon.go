package main

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
)

// A daemonized mount re-executes cbtfs in a new session with this
// variable naming the pipe on which the child reports readiness; the
// parent returns once the child has written "ready" (exit 0) or an error
// (printed, exit 1), or has died.
const daemonEnv = "CBTFS_DAEMON_READY_FD"

// daemonize starts the child and waits for its report.
func daemonize(args []string) error {
	exe, err := os.Executable()
	if err != nil {
		return err
	}
	r, w, err := os.Pipe()
	if err != nil {
		return err
	}
	defer r.Close()
	null, err := os.OpenFile(os.DevNull, os.O_RDWR, 0)
	if err != nil {
		w.Close()
		return err
	}
	defer null.Close()
	cmd := exec.Command(exe, args...)
	cmd.Env = append(os.Environ(), daemonEnv+"=3")
	cmd.ExtraFiles = []*os.File{w}
	cmd.Stdin, cmd.Stdout, cmd.Stderr = null, null, null
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	err = cmd.Start()
	w.Close()
	if err != nil {
		return err
	}
	msg, _ := io.ReadAll(io.LimitReader(r, 64<<10))
	msg = bytes.TrimSpace(msg)
	if string(msg) == "ready" {
		return cmd.Process.Release()
	}
	// The child failed (and reported why) or died: reap it.
	werr := cmd.Wait()
	if len(msg) > 0 {
		return errors.New(strings.TrimPrefix(string(msg), "error "))
	}
	return fmt.Errorf("mount process failed before it was ready: %v", werr)
}

// reporter is the child's end of the readiness pipe.
type reporter struct{ f *os.File }

// takeDaemonReporter returns the readiness pipe when running as a daemon
// child, or nil. It is called once per process: the variable is cleared
// and the descriptor made close-on-exec so that programs the mount runs
// (fusermount3) do not inherit it and keep the parent waiting.
func takeDaemonReporter() *reporter {
	v := os.Getenv(daemonEnv)
	if v == "" {
		return nil
	}
	os.Unsetenv(daemonEnv)
	fd, err := strconv.Atoi(v)
	if err != nil || fd < 3 {
		return nil
	}
	syscall.CloseOnExec(fd)
	return &reporter{f: os.NewFile(uintptr(fd), "ready")}
}

// ready tells the parent that the mount is ready. Calls on a nil
// reporter do nothing.
func (r *reporter) ready() {
	if r != nil {
		fmt.Fprintln(r.f, "ready")
		r.f.Close()
	}
}

// fail hands the parent the error line to print.
func (r *reporter) fail(msg string) {
	if r != nil {
		fmt.Fprintln(r.f, "error "+msg)
		r.f.Close()
	}
}
