package integration

import (
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/cbtfs/cbtfs/internal/testutil"
)

// refusedCase is an image cbtfs must refuse, with the reason.
type refusedCase struct {
	name string
	// build makes the image in b.dir and returns it, and the file the
	// error message must name (by its base name).
	build func(b *builder) (img, names string)
	// feature must match the error message (case-insensitively).
	feature string
}

// createLUKS creates a LUKS-encrypted qcow2 image. qemu 7.2's qemu-img
// create fails now and then with "Unable to get accurate CPU usage" while
// timing its key derivation: retry.
func createLUKS(b *builder, name string) string {
	b.t.Helper()
	p := b.path(name)
	var err error
	for range 5 {
		_, _, err = testutil.RunErr(b.t, "qemu-img", "create", "-q", "-f", "qcow2",
			"--object", "secret,id=sec0,data=abc",
			"-o", "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
			p, "4M")
		if err == nil {
			return p
		}
		if !strings.Contains(err.Error(), "Unable to get accurate CPU usage") {
			break
		}
	}
	b.t.Fatalf("create LUKS image: %v", err)
	return ""
}

// setIncompatBit returns a copy of the v3 image src with bit of the
// incompatible features (header bytes 72..79, big-endian) set.
func setIncompatBit(b *builder, src, name string, bit uint) string {
	b.t.Helper()
	p := b.path(name)
	testutil.CopyFile(b.t, src, p)
	cur := testutil.ReadAtFile(b.t, p, 79-int64(bit/8), 1)
	testutil.PatchFile(b.t, p, 79-int64(bit/8), []byte{cur[0] | 1<<(bit%8)})
	return p
}

func refusedCases() []refusedCase {
	plain := func(b *builder) string {
		img := b.qcow2("plain.qcow2", "4M")
		b.io(img, "write -P 0x71 0 64k")
		return img
	}
	return []refusedCase{
		{"luks", func(b *builder) (string, string) {
			p := createLUKS(b, "luks.qcow2")
			return p, p
		}, `encrypt|luks`},
		{"aes", func(b *builder) (string, string) {
			p := b.path("aes.qcow2")
			testutil.Run(b.t, "qemu-img", "create", "-q", "-f", "qcow2",
				"--object", "secret,id=sec0,data=abc",
				"-o", "encrypt.format=aes,encrypt.key-secret=sec0", p, "4M")
			return p, p
		}, `encrypt|aes`},
		{"external-data-file", func(b *builder) (string, string) {
			// An absolute name: qemu-img create resolves data_file against its
			// working directory.
			p := b.qcow2("ext.qcow2", "4M", "-o", "data_file="+b.path("ext.data"))
			return p, p
		}, `data[ _-]?file`},
		{"unknown-incompatible-bit", func(b *builder) (string, string) {
			p := setIncompatBit(b, plain(b), "bit5.qcow2", 5)
			return p, p
		}, `incompatible`},
		{"corrupt-bit", func(b *builder) (string, string) {
			p := setIncompatBit(b, plain(b), "corrupt.qcow2", 1)
			return p, p
		}, `corrupt`},
		{"missing-backing", func(b *builder) (string, string) {
			b.qcow2("gone.qcow2", "4M")
			p := b.overlay("top.qcow2", "gone.qcow2", "qcow2", "")
			if err := os.Remove(b.path("gone.qcow2")); err != nil {
				b.t.Fatal(err)
			}
			return p, "gone.qcow2"
		}, `backing|no such file|not found|missing`},
		{"backing-loop", func(b *builder) (string, string) {
			a := b.qcow2("a.qcow2", "4M")
			c := b.qcow2("b.qcow2", "4M")
			testutil.Img(b.t, "rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", a)
			testutil.Img(b.t, "rebase", "-u", "-b", "a.qcow2", "-F", "qcow2", c)
			return a, "a.qcow2"
		}, `loop|cycle|refers back`},
		{"not-qcow2", func(b *builder) (string, string) {
			p := b.raw("disk.raw", 1<<20, pattern(0x72))
			return p, p
		}, `not a qcow2|qcow2 magic|not qcow2`},
		{"truncated-header-60", func(b *builder) (string, string) {
			p := b.path("short.qcow2")
			full := plain(b)
			if err := os.WriteFile(p, testutil.ReadAtFile(b.t, full, 0, 60), 0o644); err != nil {
				b.t.Fatal(err)
			}
			return p, p
		}, `header|too short|truncat`},
		{"truncated-header-100", func(b *builder) (string, string) {
			p := b.path("short.qcow2")
			full := plain(b)
			if err := os.WriteFile(p, testutil.ReadAtFile(b.t, full, 0, 100), 0o644); err != nil {
				b.t.Fatal(err)
			}
			return p, p
		}, `header|too short|truncat`},
	}
}

// TestRefused checks that every image cbtfs cannot serve correctly is
// refused by `cbtfs info`, `cbtfs mount --read-only --daemon` and a
// foreground `cbtfs mount --read-only`: a non-zero exit, exactly one line
// on stderr naming the file and the reason, and no mount left behind.
func TestRefused(t *testing.T) {
	testutil.RequireFUSE(t)
	for _, c := range refusedCases() {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			b := &builder{t: t, dir: filepath.Join(dir, "img")}
			if err := os.Mkdir(b.dir, 0o755); err != nil {
				t.Fatal(err)
			}
			img, names := c.build(b)
			feature := regexp.MustCompile(`(?i)` + c.feature)
			mnt := filepath.Join(dir, "mnt")
			if err := os.Mkdir(mnt, 0o755); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { detachIfMounted(t, mnt) })

			_, stderr, err := testutil.RunErr(t, cbtfs, "info", img)
			check := func(what string, err error, stderr string) {
				t.Helper()
				checkRefusal(t, what, err, stderr, dir, filepath.Base(names), feature)
			}
			check("cbtfs info", err, stderr)

			_, stderr, err = testutil.RunErr(t, cbtfs, "info", "--json", img)
			check("cbtfs info --json", err, stderr)

			_, stderr, err = testutil.RunErr(t, cbtfs, "mount", "--read-only", "--daemon", img, mnt)
			check("cbtfs mount --daemon", err, stderr)
			testutil.RequireNoMount(t, mnt)

			p := testutil.Start(t, "", cbtfs, "mount", "--read-only", img, mnt)
			if _, ok := p.Wait(20 * time.Second); !ok {
				t.Errorf("cbtfs mount (foreground) of a refused image still running after 20s")
				detachIfMounted(t, mnt)
				p.Wait(testutil.ExitTimeout)
			} else {
				check("cbtfs mount", p.Err(), p.Stderr())
			}
			testutil.RequireNoMount(t, mnt)
		})
	}
}

// checkRefusal checks one refusal: a non-zero exit and exactly one line on
// stderr naming name and matching feature. The feature is looked for in
// the message with the test's directory and name taken out, so that a
// file name cannot pass for the reason.
func checkRefusal(t *testing.T, what string, err error, stderr, dir, name string, feature *regexp.Regexp) {
	t.Helper()
	if err == nil {
		t.Errorf("%s: succeeded, want a refusal", what)
		return
	}
	if code := testutil.ExitCode(err); code <= 0 {
		t.Errorf("%s: %v, want a non-zero exit status", what, err)
	}
	msg := strings.TrimSuffix(stderr, "\n")
	if msg == "" || strings.Contains(msg, "\n") {
		t.Errorf("%s: stderr %q, want exactly one line", what, stderr)
	}
	if !strings.Contains(msg, name) {
		t.Errorf("%s: stderr %q does not name %s", what, msg, name)
	}
	reason := strings.ReplaceAll(strings.ReplaceAll(msg, dir, ""), name, "")
	if !feature.MatchString(reason) {
		t.Errorf("%s: stderr %q does not give the reason (want a match for %q)", what, msg, feature)
	}
}

// detachIfMounted lazily unmounts whatever is mounted at mnt, so that a
// test that failed half-way leaves no mount behind.
func detachIfMounted(t *testing.T, mnt string) {
	t.Helper()
	for range testutil.MountsAt(t, mnt) {
		if _, _, err := testutil.RunErr(t, "fusermount3", "-u", "-z", mnt); err != nil {
			t.Error(err)
			return
		}
	}
}
