package testutil

import (
	"bytes"
	"encoding/json"
	"os"
	"slices"
	"testing"
)

// This file wraps qemu-img and qemu-io in the manner of
// lima-vm/go-qcow2reader's test/qemuimg and test/qemuio: each helper runs
// the real tool and fails the test, with the tool's stderr, if it fails.

// hasFlag reports whether args holds flag as an argument of its own.
func hasFlag(args []string, flag string) bool { return slices.Contains(args, flag) }

// Create runs `qemu-img create -q -f qcow2 OPTS... path size`. opts are
// raw qemu-img arguments, e.g. "-o", "cluster_size=512,compat=0.10" or
// "-b", "base.qcow2", "-F", "qcow2"; a "-f" among them replaces the
// default format. size is in qemu-img's syntax ("4M", "1000000"); it may
// be "" when a backing file gives the size.
func Create(tb testing.TB, path, size string, opts ...string) {
	tb.Helper()
	args := []string{"create", "-q"}
	if !hasFlag(opts, "-f") {
		args = append(args, "-f", "qcow2")
	}
	args = append(args, opts...)
	args = append(args, path)
	if size != "" {
		args = append(args, size)
	}
	Run(tb, "qemu-img", args...)
}

// Img runs qemu-img with args and returns its stdout, failing the test if
// it fails.
func Img(tb testing.TB, args ...string) string {
	tb.Helper()
	return Run(tb, "qemu-img", args...)
}

// qcow2Magic starts every qcow2 file.
var qcow2Magic = []byte("QFI\xfb")

// IsQcow2 reports whether the file at path starts with the qcow2 magic.
func IsQcow2(tb testing.TB, path string) bool {
	tb.Helper()
	f, err := os.Open(path)
	if err != nil {
		tb.Fatal(err)
	}
	defer f.Close()
	b := make([]byte, len(qcow2Magic))
	if _, err := f.ReadAt(b, 0); err != nil {
		return false
	}
	return bytes.Equal(b, qcow2Magic)
}

// IO runs `qemu-io -f FMT -c CMD... img`, with FMT qcow2 when img starts
// with the qcow2 magic and raw otherwise (named explicitly so that qemu
// does not probe). Each of cmds is one qemu-io command, e.g.
// "write -P 0x5a 100001 7777", "write -z -u 64k 64k", "discard 1M 64k",
// "write -c -P 1 0 64k". qemu-io exits non-zero when a command fails,
// which fails the test. It returns qemu-io's output.
func IO(tb testing.TB, img string, cmds ...string) string {
	tb.Helper()
	format := "raw"
	if IsQcow2(tb, img) {
		format = "qcow2"
	}
	args := []string{"-f", format}
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	args = append(args, img)
	return Run(tb, "qemu-io", args...)
}

// Convert runs `qemu-img convert ARGS... src dst`; args are the options,
// e.g. "-O", "qcow2", "-c", "-o", "compression_type=zstd".
func Convert(tb testing.TB, src, dst string, args ...string) {
	tb.Helper()
	a := append([]string{"convert"}, args...)
	Run(tb, "qemu-img", append(a, src, dst)...)
}

// ConvertRaw writes the guest-visible content of img (its whole chain) to
// the raw file dst with `qemu-img convert -O raw`: the reference every
// cbtfs read is compared with.
func ConvertRaw(tb testing.TB, img, dst string) {
	tb.Helper()
	Convert(tb, img, dst, "-O", "raw")
}

// decodeJSON decodes data with numbers kept as json.Number, so that
// 64-bit sizes compare exactly.
func decodeJSON(tb testing.TB, what string, data []byte, v any) {
	tb.Helper()
	d := json.NewDecoder(bytes.NewReader(data))
	d.UseNumber()
	if err := d.Decode(v); err != nil {
		tb.Fatalf("decode %s: %v\n%s", what, err, data)
	}
}

// DecodeJSON decodes data as JSON into a generic value (maps, slices,
// json.Number, strings, bools, nil), as [JSONDiff] compares them.
func DecodeJSON(tb testing.TB, what string, data []byte) any {
	tb.Helper()
	var v any
	decodeJSON(tb, what, data, &v)
	return v
}

// InfoJSON returns the output of `qemu-img info --output=json img`, with
// --backing-chain when chain is set (then a JSON array, top first).
func InfoJSON(tb testing.TB, img string, chain bool) []byte {
	tb.Helper()
	args := []string{"info", "--output=json"}
	if chain {
		args = append(args, "--backing-chain")
	}
	return []byte(Run(tb, "qemu-img", append(args, img)...))
}

// Info returns `qemu-img info --output=json img`, decoded (see
// [DecodeJSON]).
func Info(tb testing.TB, img string) map[string]any {
	tb.Helper()
	var m map[string]any
	decodeJSON(tb, "qemu-img info", InfoJSON(tb, img, false), &m)
	return m
}

// InfoChain returns `qemu-img info --backing-chain --output=json img`,
// decoded: one object per layer, top first.
func InfoChain(tb testing.TB, img string) []any {
	tb.Helper()
	var l []any
	decodeJSON(tb, "qemu-img info --backing-chain", InfoJSON(tb, img, true), &l)
	return l
}

// CheckResult is `qemu-img check --output=json`.
type CheckResult struct {
	Filename          string `json:"filename"`
	Format            string `json:"format"`
	CheckErrors       int64  `json:"check-errors"`
	Corruptions       int64  `json:"corruptions"`
	Leaks             int64  `json:"leaks"`
	CorruptionsFixed  int64  `json:"corruptions-fixed"`
	LeaksFixed        int64  `json:"leaks-fixed"`
	ImageEndOffset    int64  `json:"image-end-offset"`
	TotalClusters     int64  `json:"total-clusters"`
	AllocatedClusters int64  `json:"allocated-clusters"`
	FragmentedCluster int64  `json:"fragmented-clusters"`
	CompressedCluster int64  `json:"compressed-clusters"`
}

// Check runs `qemu-img check --output=json img` and returns the parsed
// result and the exit status: 0 clean, 2 corruption, 3 leaks only. Exit 1
// (the check could not run) fails the test.
func Check(tb testing.TB, img string) (CheckResult, int) {
	tb.Helper()
	out, _, err := RunErr(tb, "qemu-img", "check", "--output=json", img)
	code := ExitCode(err)
	if code != 0 && code != 2 && code != 3 {
		tb.Fatalf("qemu-img check %s: %v", img, err)
	}
	var r CheckResult
	decodeJSON(tb, "qemu-img check", []byte(out), &r)
	return r, code
}

// Compare runs `qemu-img compare a b` and reports whether the two images
// have the same guest-visible content. Errors (exit 2 and above) fail the
// test.
func Compare(tb testing.TB, a, b string, args ...string) bool {
	tb.Helper()
	all := append(append([]string{"compare", "-q"}, args...), a, b)
	_, _, err := RunErr(tb, "qemu-img", all...)
	switch ExitCode(err) {
	case 0:
		return true
	case 1:
		return false
	}
	tb.Fatalf("qemu-img compare: %v", err)
	return false
}
