package testutil

import (
	"net"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"
)

// NBDTimeout bounds the wait for qemu-nbd's socket to accept connections.
const NBDTimeout = 30 * time.Second

// NBDOptions configure [QemuNBD].
type NBDOptions struct {
	// Format is the image format given with -f; "" is qcow2.
	Format string
	// AllocationDepth exposes qemu:allocation-depth (-A).
	AllocationDepth bool
	// Bitmaps are exposed as qemu:dirty-bitmap:NAME (-B NAME each).
	Bitmaps []string
	// ExportName is given with -x when non-empty.
	ExportName string
}

// NBD is a qemu-nbd serving one image read-only on a unix socket.
type NBD struct {
	Socket string // the unix socket
	URI    string // nbd+unix:///?socket=... (or /NAME for a named export)
	proc   *Proc
}

// QemuNBD serves image with `qemu-nbd -t -r -f qcow2 -k SOCK [-A]
// [-B NAME]... IMAGE` on a unix socket in a fresh temporary directory,
// and returns once the socket accepts connections. A cleanup stops it
// (SIGTERM, then SIGKILL) and waits for it.
func QemuNBD(tb testing.TB, image string, o NBDOptions) *NBD {
	tb.Helper()
	// A short directory of its own: unix socket paths are limited to 108
	// bytes, and t.TempDir() names can be long.
	dir, err := os.MkdirTemp("", "cbtfs-nbd-")
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, "s")
	format := o.Format
	if format == "" {
		format = "qcow2"
	}
	args := []string{"-t", "-r", "-f", format, "-k", sock}
	if o.AllocationDepth {
		args = append(args, "-A")
	}
	for _, b := range o.Bitmaps {
		args = append(args, "-B", b)
	}
	if o.ExportName != "" {
		args = append(args, "-x", o.ExportName)
	}
	p := Start(tb, "", "qemu-nbd", append(args, image)...)
	n := &NBD{Socket: sock, URI: "nbd+unix:///" + o.ExportName + "?socket=" + sock, proc: p}
	tb.Cleanup(func() {
		if p.Exited() {
			return
		}
		_ = p.Signal(syscall.SIGTERM)
		if _, ok := p.Wait(WaitDelay); !ok {
			_ = p.Cmd.Process.Kill()
			p.Wait(WaitDelay)
		}
	})
	deadline := time.Now().Add(NBDTimeout)
	delay := time.Millisecond
	for {
		c, err := net.Dial("unix", sock)
		if err == nil {
			c.Close()
			return n
		}
		if p.Exited() {
			tb.Fatalf("qemu-nbd %s exited before serving: %v; stderr: %q", image, p.Err(), p.Stderr())
		}
		if time.Now().After(deadline) {
			tb.Fatalf("qemu-nbd %s: socket not accepting after %v: %v", image, NBDTimeout, err)
		}
		time.Sleep(delay)
		delay = min(2*delay, 50*time.Millisecond)
	}
}

// NbdinfoMap returns the output of `nbdinfo --map[=CONTEXT] [--json] URI`;
// context "" is base:allocation.
func NbdinfoMap(tb testing.TB, uri, context string, json bool) string {
	tb.Helper()
	m := "--map"
	if context != "" {
		m += "=" + context
	}
	args := []string{m}
	if json {
		args = append(args, "--json")
	}
	return Run(tb, "nbdinfo", append(args, uri)...)
}
