// Package testutil holds the helpers that cbtfs's end-to-end tests share:
// finding the external tools (qemu-img, qemu-io, qemu-nbd, nbdinfo,
// fusermount3) and deciding between skip and fail, running commands tied to
// the test, building the cbtfs binary once per test binary, mounting a chain
// with a separate cbtfs process, and serving an image with qemu-nbd.
//
// No production code imports this package.
//
// # Skip or fail
//
// A missing tool skips the test, unless the environment variable
// CBTFS_REQUIRE_TOOLS is non-empty (CI sets it), in which case the test
// fails: CI can never go green by skipping.
//
// # Processes
//
// Every command runs through [Cmd], in the manner of Go's
// internal/testenv.CommandContext: it is bounded by a timeout and by the
// test's deadline, a command that overstays gets SIGQUIT (a Go program
// prints its goroutines) and then SIGKILL after [WaitDelay], and a cleanup
// fails the test if a command was started but never waited for.
// Long-lived processes (a mount, qemu-nbd) run through [Start], which keeps
// them alive until the test's own cleanup has stopped them gracefully.
//
// Readiness is always polled for (a mount in /proc/self/mountinfo, a unix
// socket that accepts), never slept for.
//
// # The FUSE server is a separate process
//
// go-fuse documents that a process serving a mount and fork/exec'ing a child
// that touches the mount can deadlock, so mounts are always served by a
// cbtfs process started from the test, never by the test process itself.
package testutil
