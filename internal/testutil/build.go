package testutil

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
)

// build is the one cbtfs binary of this test binary: built on first use,
// removed by [RemoveBuild].
var build struct {
	once sync.Once
	dir  string
	path string
	err  error
}

// moduleRoot returns the directory holding go.mod, found from the working
// directory (go test runs a test binary in its package's directory).
func moduleRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("testutil: go.mod not found above the working directory")
		}
		dir = parent
	}
}

// goTool returns the go command: the one on PATH, else the one under
// $GOROOT, else the one where this machine kind installs Go.
func goTool() string {
	if p, err := exec.LookPath("go"); err == nil {
		return p
	}
	if root := os.Getenv("GOROOT"); root != "" {
		return filepath.Join(root, "bin", "go")
	}
	return "/usr/local/go/bin/go"
}

// BuildCbtfs builds cmd/cbtfs into a temporary directory, once per test
// binary, and returns the binary's path. When the test binary was built
// with -race, so is cbtfs, and a data race in the mount process then shows
// as exit status 66 (which the mount helpers report). Call it from TestMain
// (and [RemoveBuild] after m.Run), or through [Cbtfs] from a test.
func BuildCbtfs() (string, error) {
	build.once.Do(func() {
		root, err := moduleRoot()
		if err != nil {
			build.err = err
			return
		}
		build.dir, err = os.MkdirTemp("", "cbtfs-test-bin-")
		if err != nil {
			build.err = err
			return
		}
		build.path = filepath.Join(build.dir, "cbtfs")
		args := []string{"build", "-o", build.path}
		if raceEnabled {
			args = append(args, "-race")
		}
		cmd := exec.Command(goTool(), append(args, "./cmd/cbtfs")...)
		cmd.Dir = root
		if out, err := cmd.CombinedOutput(); err != nil {
			build.err = fmt.Errorf("testutil: go build cbtfs: %v\n%s", err, out)
		}
	})
	return build.path, build.err
}

// RemoveBuild removes the binary built by [BuildCbtfs], if any. TestMain
// calls it after m.Run.
func RemoveBuild() {
	if build.dir != "" {
		os.RemoveAll(build.dir)
	}
}

// Cbtfs returns the cbtfs binary built by [BuildCbtfs], failing the test if
// it cannot be built.
func Cbtfs(tb testing.TB) string {
	tb.Helper()
	p, err := BuildCbtfs()
	if err != nil {
		tb.Fatal(err)
	}
	return p
}
