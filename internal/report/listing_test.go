package report

import (
	"bytes"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cbtfs/cbtfs/dirtymap"
)

var update = flag.Bool("update", false, "re-record testdata from nbdinfo against nbdkit")

func TestDescribe(t *testing.T) {
	for _, c := range []struct {
		ctx  string
		typ  uint32
		want string
	}{
		{ContextAllocation, 0, "data"},
		{ContextAllocation, 1, "hole"},
		{ContextAllocation, 2, "zero"},
		{ContextAllocation, 3, "hole,zero"},
		{ContextAllocation, 4, ""},
		{ContextAllocation, 0xffffffff, ""},
		{ContextDepth, 0, "absent"},
		{ContextDepth, 1, "local"},
		{ContextDepth, 2, "backing depth 2"},
		{ContextDepth, 10, "backing depth 10"},
		{ContextDepth, 4294967295, "backing depth 4294967295"},
		{ContextBitmapPrefix + "bm0", 0, "clean"},
		{ContextBitmapPrefix + "bm0", 1, "dirty"},
		{ContextBitmapPrefix + "bm0", 2, ""},
		{ContextBitmapPrefix, 1, "dirty"},
		{"qemu:dirty-bitmap", 1, ""},
		{"base:other", 0, ""},
		{"qemu:other", 1, ""},
		{"", 0, ""},
	} {
		if got := Describe(c.ctx, c.typ); got != c.want {
			t.Errorf("Describe(%q, %d) = %q, want %q", c.ctx, c.typ, got, c.want)
		}
	}
}

type ext struct {
	off, n uint64
	typ    uint32
}

func listing(ctx string, es ...ext) *Listing {
	l := NewListing(ctx)
	for _, e := range es {
		l.Add(e.off, e.n, e.typ)
	}
	return l
}

func TestListingCoalesce(t *testing.T) {
	for _, c := range []struct {
		name string
		in   []ext
		want string
	}{
		{"empty", nil, ""},
		{"one", []ext{{0, 512, 0}},
			"         0         512    0  data\n"},
		{"adjacent equal types merge", []ext{{0, 512, 3}, {512, 512, 3}, {1024, 1024, 3}},
			"         0        2048    3  hole,zero\n"},
		{"different types stay apart", []ext{{0, 512, 3}, {512, 512, 0}, {1024, 512, 3}},
			"         0         512    3  hole,zero\n       512         512    0  data\n      1024         512    3  hole,zero\n"},
		{"zero-length extents are dropped", []ext{{0, 512, 0}, {512, 0, 3}, {512, 512, 0}},
			"         0        1024    0  data\n"},
		{"a gap is not bridged", []ext{{0, 512, 0}, {1024, 512, 0}},
			"         0         512    0  data\n      1024         512    0  data\n"},
		{"merging resumes after a different type", []ext{{0, 1, 1}, {1, 1, 2}, {2, 1, 2}, {3, 1, 2}, {4, 1, 1}},
			"         0           1    1  hole\n         1           3    2  zero\n         4           1    1  hole\n"},
	} {
		t.Run(c.name, func(t *testing.T) {
			l := listing(ContextAllocation, c.in...)
			if got := string(l.Text()); got != c.want {
				t.Errorf("Text() =\n%s\nwant\n%s", got, c.want)
			}
			if got, want := l.Len(), strings.Count(c.want, "\n"); got != want {
				t.Errorf("Len() = %d, want %d", got, want)
			}
		})
	}
}

// TestFormats pins the printf formats of libnbd's info/map.c (formats.md
// C.6) on values that overflow the field widths and on contexts without
// descriptions.
func TestFormats(t *testing.T) {
	l := listing("vendor:ctx", ext{0, 1, 0}, ext{1, 1<<40 - 1, 12345}, ext{1 << 40, 1 << 62, 7})
	wantText := "         0           1    0\n" +
		"         1  1099511627775  12345\n" +
		"1099511627776  4611686018427387904    7\n"
	if got := string(l.Text()); got != wantText {
		t.Errorf("Text() =\n%q\nwant\n%q", got, wantText)
	}
	wantJSON := "[\n" +
		`{ "offset": 0, "length": 1, "type": 0}` + ",\n" +
		`{ "offset": 1, "length": 1099511627775, "type": 12345}` + ",\n" +
		`{ "offset": 1099511627776, "length": 4611686018427387904, "type": 7}` + "\n]\n"
	if got := string(l.JSON()); got != wantJSON {
		t.Errorf("JSON() =\n%q\nwant\n%q", got, wantJSON)
	}
	d := listing(ContextDepth, ext{0, 65536, 0}, ext{65536, 512, 1}, ext{66048, 512, 17})
	wantText = "         0       65536    0  absent\n" +
		"     65536         512    1  local\n" +
		"     66048         512   17  backing depth 17\n"
	if got := string(d.Text()); got != wantText {
		t.Errorf("depth Text() =\n%q\nwant\n%q", got, wantText)
	}
}

// nbdkitScenarios are served by nbdkit's sh plugin: the extents it
// returns, in order, for base:allocation. nbdinfo's output for each is
// recorded in testdata/NAME.txt and NAME.json.
var nbdkitScenarios = []struct {
	name string
	size uint64
	ext  []ext
}{
	// Every base:allocation type, adjacent equal extents that nbdinfo
	// coalesces, and numbers wider than the %10 fields (a 2 TiB export,
	// which nbdinfo queries in several requests).
	{"wide", 2 << 40, []ext{
		{0, 1 << 20, 1}, {1 << 20, 1 << 20, 1}, {2 << 20, 4096, 2}, {2<<20 + 4096, 1000, 3},
		{2<<20 + 5096, 2<<40 - (2<<20 + 5096), 0},
	}},
	// Many small alternating extents.
	{"alternating", 64 << 10, alternating(64<<10, 512)},
	// A zero-length export: nbdinfo prints no text lines and "[\n\n]\n".
	{"empty", 0, nil},
}

func alternating(size, step uint64) []ext {
	var es []ext
	for off := uint64(0); off < size; off += step {
		typ := uint32(0)
		if off/step%3 == 1 {
			typ = 3
		}
		es = append(es, ext{off, step, typ})
	}
	return es
}

func TestAgainstNbdinfo(t *testing.T) {
	if *update {
		for _, tool := range []string{"nbdkit", "nbdinfo"} {
			if _, err := exec.LookPath(tool); err != nil {
				t.Skipf("-update needs %s: %v", tool, err)
			}
		}
		for _, s := range nbdkitScenarios {
			recordNbdkit(t, s.name, s.size, s.ext)
		}
	}
	for _, s := range nbdkitScenarios {
		t.Run(s.name, func(t *testing.T) {
			l := listing(ContextAllocation, s.ext...)
			for _, f := range []struct {
				file string
				got  []byte
			}{{s.name + ".txt", l.Text()}, {s.name + ".json", l.JSON()}} {
				want, err := os.ReadFile(filepath.Join("testdata", f.file))
				if err != nil {
					t.Fatalf("%v (record with: go test ./internal/report/ -update)", err)
				}
				if !bytes.Equal(f.got, want) {
					t.Errorf("%s differs from nbdinfo's:\n--- got\n%q\n--- want\n%q", f.file, f.got, want)
				}
			}
		})
	}
}

func recordNbdkit(t *testing.T, name string, size uint64, es []ext) {
	var lines strings.Builder
	for _, e := range es {
		fmt.Fprintf(&lines, "%d %d %d\n", e.off, e.n, e.typ)
	}
	dir := t.TempDir()
	list := filepath.Join(dir, "extents")
	if err := os.WriteFile(list, []byte(lines.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	// The sh plugin answers extents OFF LEN with the listed extents that
	// overlap [OFF, OFF+LEN), clipped to it.
	script := `#!/bin/sh
case "$1" in
get_size) echo ` + strconv.FormatUint(size, 10) + ` ;;
pread) head -c "$3" /dev/zero ;;
can_extents) exit 0 ;;
extents) awk -v o="$4" -v n="$3" '{ s=$1; e=$1+$2; if (s < o) s = o; if (e > o+n) e = o+n; if (s < e) printf "%.0f %.0f %d\n", s, e-s, $3 }' ` + list + ` ;;
*) exit 2 ;;
esac
`
	sh := filepath.Join(dir, "plugin.sh")
	if err := os.WriteFile(sh, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	for _, json := range []bool{false, true} {
		args := []string{"--map"}
		file := name + ".txt"
		if json {
			args = append(args, "--json")
			file = name + ".json"
		}
		args = append(args, "--", "[", "nbdkit", "sh", sh, "]")
		cmd := exec.CommandContext(t.Context(), "nbdinfo", args...)
		cmd.WaitDelay = 10 * time.Second
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		out, err := cmd.Output()
		if err != nil {
			t.Fatalf("nbdinfo %v: %v: %s", args, err, stderr.Bytes())
		}
		if err := os.WriteFile(filepath.Join("testdata", file), out, 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

// TestQemuListings re-renders the nbdinfo listings recorded against
// qemu-nbd for the qcow fixtures (qemu:allocation-depth and
// qemu:dirty-bitmap:NAME as well as base:allocation): parsing each text
// listing into extents and rendering them again must give back the
// recorded text and JSON byte for byte.
func TestQemuListings(t *testing.T) {
	files, err := filepath.Glob("../../qcow/testdata/golden/*/*.txt")
	if err != nil {
		t.Fatal(err)
	}
	if len(files) == 0 {
		t.Skip("no qcow golden listings")
	}
	for _, f := range files {
		t.Run(strings.TrimPrefix(f, "../../qcow/testdata/golden/"), func(t *testing.T) { checkQemuListing(t, f) })
	}
}

func checkQemuListing(t *testing.T, f string) {
	base := strings.TrimSuffix(filepath.Base(f), ".txt")
	var ctx string
	switch {
	case base == "allocation":
		ctx = ContextAllocation
	case base == "depth":
		ctx = ContextDepth
	case strings.HasPrefix(base, "bitmap-"):
		ctx = ContextBitmapPrefix + strings.TrimPrefix(base, "bitmap-")
	default:
		return
	}
	text, err := os.ReadFile(f)
	if err != nil {
		t.Fatal(err)
	}
	js, err := os.ReadFile(strings.TrimSuffix(f, ".txt") + ".json")
	if err != nil {
		t.Fatal(err)
	}
	l := NewListing(ctx)
	for line := range strings.Lines(string(text)) {
		var off, n uint64
		var typ uint32
		if _, err := fmt.Sscan(line, &off, &n, &typ); err != nil {
			t.Fatalf("%s: %q: %v", f, line, err)
		}
		// Split each extent in two to exercise coalescing.
		l.Add(off, n/2, typ)
		l.Add(off+n/2, n-n/2, typ)
	}
	if got := l.Text(); !bytes.Equal(got, text) {
		t.Errorf("%s: Text() =\n%s\nwant\n%s", f, got, text)
	}
	if got := l.JSON(); !bytes.Equal(got, js) {
		t.Errorf("%s: JSON() =\n%s\nwant\n%s", f, got, js)
	}
}

// TestBitmapListing: a bitmap's listing covers the whole disk, clips the
// last granule to the disk size and merges runs.
func TestBitmapListing(t *testing.T) {
	const size = 3<<20 + 512
	m, err := dirtymap.New(size, 64<<10)
	if err != nil {
		t.Fatal(err)
	}
	m.Set(1000, 10)    // granule 0
	m.Set(65535, 2)    // granules 0 and 1
	m.Set(1<<20, 4096) // granule 16
	m.Set(size-1, 1)   // the partial last granule
	l := Bitmap("b", m)
	want := "         0      131072    1  dirty\n" +
		"    131072      917504    0  clean\n" +
		"   1048576       65536    1  dirty\n" +
		"   1114112     2031616    0  clean\n" +
		"   3145728         512    1  dirty\n"
	if got := string(l.Text()); got != want {
		t.Errorf("Text() =\n%s\nwant\n%s", got, want)
	}
	empty, err := dirtymap.New(size, 512)
	if err != nil {
		t.Fatal(err)
	}
	if got, want := string(Bitmap("e", empty).Text()), "         0     3146240    0  clean\n"; got != want {
		t.Errorf("clean bitmap Text() = %q, want %q", got, want)
	}
}
