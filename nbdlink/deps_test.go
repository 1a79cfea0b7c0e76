package nbdlink_test

import (
	"strings"
	"testing"
)

// TestStdlibOnly enforces house rule 1: nbdlink imports nothing outside
// the standard library (not even other cbtfs packages).
func TestStdlibOnly(t *testing.T) {
	out := run(t, "go", "list", "-deps", "-f", "{{if not .Standard}}{{.ImportPath}}{{end}}", ".")
	for _, p := range strings.Fields(out) {
		if p != "github.com/cbtfs/cbtfs/nbdlink" {
			t.Errorf("nbdlink depends on %s", p)
		}
	}
}
