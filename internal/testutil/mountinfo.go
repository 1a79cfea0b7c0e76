package testutil

import (
	"bufio"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// MountEntry is one line of /proc/self/mountinfo.
type MountEntry struct {
	ID         int    // mount ID, unique while mounted
	Mountpoint string // unescaped
	FSType     string // e.g. "fuse.cbtfs"
	Source     string // cbtfs puts the image's absolute path here
	Options    string // per-mount options, e.g. "ro,nosuid,nodev,relatime"
}

// Mounts returns the entries of /proc/self/mountinfo, in order (a later
// entry at the same mountpoint is stacked on an earlier one).
func Mounts() ([]MountEntry, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []MountEntry
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		// 36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue
		fields := strings.Fields(sc.Text())
		sep := -1
		for i := 6; i < len(fields); i++ {
			if fields[i] == "-" {
				sep = i
				break
			}
		}
		if len(fields) < 6 || sep < 0 || sep+2 >= len(fields) {
			return nil, fmt.Errorf("testutil: bad mountinfo line %q", sc.Text())
		}
		id, err := strconv.Atoi(fields[0])
		if err != nil {
			return nil, fmt.Errorf("testutil: bad mountinfo line %q", sc.Text())
		}
		out = append(out, MountEntry{
			ID:         id,
			Mountpoint: unescapeMountinfo(fields[4]),
			Options:    fields[5],
			FSType:     unescapeMountinfo(fields[sep+1]),
			Source:     unescapeMountinfo(fields[sep+2]),
		})
	}
	return out, sc.Err()
}

// unescapeMountinfo undoes the octal escapes (\040 for a space) of
// /proc/self/mountinfo.
func unescapeMountinfo(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// canonical returns the path the kernel shows for mnt in mountinfo: the
// absolute path with symbolic links of its parent resolved. The last
// element is not resolved, so that a stale mountpoint (where stat fails
// with ENOTCONN) still has a name.
func canonical(mnt string) (string, error) {
	abs, err := filepath.Abs(mnt)
	if err != nil {
		return "", err
	}
	parent, err := filepath.EvalSymlinks(filepath.Dir(abs))
	if err != nil {
		return "", err
	}
	return filepath.Join(parent, filepath.Base(abs)), nil
}

// MountsAt returns the entries mounted at mnt, bottom first.
func MountsAt(tb testing.TB, mnt string) []MountEntry {
	tb.Helper()
	c, err := canonical(mnt)
	if err != nil {
		tb.Fatal(err)
	}
	all, err := Mounts()
	if err != nil {
		tb.Fatal(err)
	}
	var out []MountEntry
	for _, e := range all {
		if e.Mountpoint == c {
			out = append(out, e)
		}
	}
	return out
}

// RequireNoMount fails the test if anything is mounted at mnt.
func RequireNoMount(tb testing.TB, mnt string) {
	tb.Helper()
	if es := MountsAt(tb, mnt); len(es) > 0 {
		tb.Errorf("%s: still mounted: %+v", mnt, es)
	}
}
