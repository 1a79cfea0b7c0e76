package testutil

import (
	"os"
	"os/exec"
	"strings"
	"testing"
)

// CbtfsCmd returns a command running the cbtfs binary at path with args,
// made by [Cmd]. A cbtfs built with -race sleeps a second before it exits
// (GORACE atexit_sleep_ms, default 1000), which adds up over the many
// short commands of the offline tests: the command's environment sets it
// to 0, keeping the other GORACE options. A race still fails the command
// (exit status 66).
func CbtfsCmd(tb testing.TB, path string, args ...string) *exec.Cmd {
	tb.Helper()
	cmd := Cmd(tb, path, args...)
	if raceEnabled {
		gorace := strings.TrimSpace(os.Getenv("GORACE") + " atexit_sleep_ms=0")
		cmd.Env = append(os.Environ(), "GORACE="+gorace)
	}
	return cmd
}

// RunCbtfs runs cbtfs (see [CbtfsCmd]) in the test's directory and returns
// its stdout and stderr, and an error naming the command, with its
// stderr, when it failed.
func RunCbtfs(tb testing.TB, path string, args ...string) (stdout, stderr string, err error) {
	tb.Helper()
	return RunCmd(tb, CbtfsCmd(tb, path, args...))
}
