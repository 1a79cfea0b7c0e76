// Package layering checks the one-way import graph of cbtfs's packages
// (house rule 1 of the style guide): the image engine knows nothing of
// FUSE or the network, the NBD server nothing of qcow2 or FUSE.
package layering

import (
	"encoding/json"
	"os/exec"
	"strings"
	"testing"
)

const mod = "github.com/cbtfs/cbtfs/"

// allowed lists, per package, the non-standard-library imports it may have
// (directly or through its dependencies), as prefixes.
var allowed = map[string][]string{
	"dirtymap":        {},
	"nbdlink":         {},
	"internal/units":  {},
	"qcow":            {mod + "dirtymap", "golang.org/x/sys", "github.com/klauspost/compress"},
	"internal/report": {mod + "qcow", mod + "dirtymap", "golang.org/x/sys", "github.com/klauspost/compress", "github.com/dustin/go-humanize"},
	"fsnode": {mod + "qcow", mod + "dirtymap", mod + "internal/report", mod + "internal/units",
		"golang.org/x/sys", "github.com/klauspost/compress", "github.com/dustin/go-humanize", "github.com/hanwen/go-fuse/v2"},
}

func TestImportGraph(t *testing.T) {
	if _, err := exec.LookPath("go"); err != nil {
		t.Skipf("go tool not found: %v", err)
	}
	for pkg, ok := range allowed {
		out, err := exec.Command("go", "list", "-deps", "-json=ImportPath,Standard", mod+pkg).Output()
		if err != nil {
			t.Fatalf("go list %s: %v", pkg, err)
		}
		dec := json.NewDecoder(strings.NewReader(string(out)))
		for dec.More() {
			var p struct {
				ImportPath string
				Standard   bool
			}
			if err := dec.Decode(&p); err != nil {
				t.Fatal(err)
			}
			if p.Standard || p.ImportPath == mod+pkg {
				continue
			}
			if !allowedImport(p.ImportPath, ok) {
				t.Errorf("%s depends on %s, which it must not", pkg, p.ImportPath)
			}
		}
	}
}

func allowedImport(path string, prefixes []string) bool {
	for _, p := range prefixes {
		if path == p || strings.HasPrefix(path, p+"/") {
			return true
		}
	}
	return false
}
