// Package integration holds cbtfs's end-to-end tests: the real cbtfs
// binary, mounted with FUSE as a separate process, checked against the
// real qemu tools (qemu-img, qemu-io, qemu-nbd, nbdinfo).
//
// Missing tools skip the tests unless CBTFS_REQUIRE_TOOLS is set.
package integration

import (
	"fmt"
	"os"
	"testing"

	"github.com/cbtfs/cbtfs/internal/testutil"
)

// cbtfs is the binary under test, built once by TestMain.
var cbtfs string

func TestMain(m *testing.M) {
	var err error
	cbtfs, err = testutil.BuildCbtfs()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	code := m.Run()
	testutil.RemoveBuild()
	os.Exit(code)
}
