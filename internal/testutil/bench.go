package testutil

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
)

// benchBuild is the cbtfs binary built without -race for benchmarks, when
// the test binary itself runs with -race (otherwise [BuildCbtfs]'s binary
// is already a plain build and is shared).
var benchBuild struct {
	once sync.Once
	path string
	err  error
}

// CbtfsNoRace returns a cbtfs binary built without the race detector, for
// benchmarks: a -race build is several times slower and would measure the
// detector. When the test binary is not built with -race this is the
// binary of [BuildCbtfs]; otherwise a second binary is built next to it,
// once, and removed by [RemoveBuild] with it.
func CbtfsNoRace(tb testing.TB) string {
	tb.Helper()
	p := Cbtfs(tb)
	if !raceEnabled {
		return p
	}
	benchBuild.once.Do(func() {
		root, err := moduleRoot()
		if err != nil {
			benchBuild.err = err
			return
		}
		benchBuild.path = filepath.Join(build.dir, "cbtfs-norace")
		cmd := exec.Command(goTool(), "build", "-o", benchBuild.path, "./cmd/cbtfs")
		cmd.Dir = root
		if out, err := cmd.CombinedOutput(); err != nil {
			benchBuild.err = fmt.Errorf("testutil: go build cbtfs (no -race): %v\n%s", err, out)
		}
	})
	if benchBuild.err != nil {
		tb.Fatal(benchBuild.err)
	}
	return benchBuild.path
}

// shared is the directory of [SharedDir].
var shared struct {
	once sync.Once
	dir  string
	err  error
}

// SharedDir returns a directory that lives as long as the test binary:
// inputs that several tests or benchmarks reuse (large images that take
// long to make) are kept there. It lies inside the directory of
// [BuildCbtfs], so [RemoveBuild] (which TestMain calls after m.Run)
// removes it. Whoever puts a file there must finish writing it before
// using it, and must not change it afterwards.
func SharedDir(tb testing.TB) string {
	tb.Helper()
	Cbtfs(tb) // makes the build directory
	shared.once.Do(func() {
		shared.dir = filepath.Join(build.dir, "shared")
		shared.err = os.Mkdir(shared.dir, 0o755)
	})
	if shared.err != nil {
		tb.Fatal(shared.err)
	}
	return shared.dir
}
