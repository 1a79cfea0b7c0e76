package testutil

import (
	"os"
	"os/exec"
	"testing"
)

// RequireToolsEnv names the environment variable that turns a missing tool
// from a skip into a failure.
const RequireToolsEnv = "CBTFS_REQUIRE_TOOLS"

// missing skips tb, or fails it when RequireToolsEnv is set.
func missing(tb testing.TB, format string, args ...any) {
	tb.Helper()
	if os.Getenv(RequireToolsEnv) != "" {
		tb.Fatalf(format+" (required: "+RequireToolsEnv+" is set)", args...)
	}
	tb.Skipf(format, args...)
}

// RequireTool returns the path of the executable name. When it is not
// installed the test is skipped, or fails if CBTFS_REQUIRE_TOOLS is set.
func RequireTool(tb testing.TB, name string) string {
	tb.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		missing(tb, "%s not installed: %v", name, err)
	}
	return p
}

// RequireFUSE checks that FUSE mounts can be made: /dev/fuse exists and
// fusermount3 is installed. Otherwise the test is skipped, or fails if
// CBTFS_REQUIRE_TOOLS is set.
func RequireFUSE(tb testing.TB) {
	tb.Helper()
	if _, err := os.Stat("/dev/fuse"); err != nil {
		missing(tb, "FUSE not available: %v", err)
	}
	RequireTool(tb, "fusermount3")
}
