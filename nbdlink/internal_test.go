package nbdlink

import (
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"syscall"
	"testing"
)

func TestErrnoOf(t *testing.T) {
	for _, tc := range []struct {
		err      error
		fastZero bool
		want     errno
	}{
		{nil, false, 0},
		{ErrReadOnly, false, ePERM},
		{fmt.Errorf("qcow: write: %w", ErrReadOnly), false, ePERM},
		{ErrNoSpace, false, eNOSPC},
		{ErrOutOfRange, false, eINVAL},
		{errors.ErrUnsupported, false, eINVAL},
		{errors.ErrUnsupported, true, eNOTSUP},
		{syscall.EOPNOTSUPP, true, eNOTSUP},
		{syscall.EOPNOTSUPP, false, eINVAL},
		{&os.PathError{Op: "write", Path: "x", Err: syscall.EROFS}, false, ePERM},
		{fmt.Errorf("a: %w", syscall.EACCES), false, ePERM},
		{syscall.EDQUOT, false, eNOSPC},
		{syscall.EFBIG, false, eNOSPC},
		{syscall.EINVAL, false, eINVAL},
		{syscall.ESHUTDOWN, false, eSHUTDOWN},
		{syscall.ENOMEM, false, eIO}, // "SHOULD NOT return NBD_ENOMEM"
		{syscall.EOVERFLOW, false, eIO},
		{syscall.EIO, false, eIO},
		{io.ErrUnexpectedEOF, false, eIO},
		{errors.New("anything"), false, eIO},
		// A sentinel wins over an errno in the same chain.
		{fmt.Errorf("%w: %w", ErrNoSpace, syscall.EIO), false, eNOSPC},
	} {
		if got := errnoOf(tc.err, tc.fastZero); got != tc.want {
			t.Errorf("errnoOf(%v, %v) = %v, want %v", tc.err, tc.fastZero, got, tc.want)
		}
	}
}

type namesExport struct {
	Export
	names []string
}

func (e namesExport) MetaContexts() []string { return e.names }

func TestContextsOf(t *testing.T) {
	for _, tc := range []struct {
		names []string
		want  []string // "id name" or "id name*" for synthetic
	}{
		{nil, []string{"0 base:allocation*"}},
		{
			[]string{"qemu:dirty-bitmap:c", "x-foo:bar", "qemu:allocation-depth", "base:allocation", "qemu:dirty-bitmap:a"},
			[]string{"0 base:allocation", "1 qemu:allocation-depth", "2 qemu:dirty-bitmap:c", "3 qemu:dirty-bitmap:a", "4 x-foo:bar"},
		},
		{
			// No depth: bitmaps still start at 2, as in qemu.
			[]string{"base:allocation", "qemu:dirty-bitmap:b0"},
			[]string{"0 base:allocation", "2 qemu:dirty-bitmap:b0"},
		},
		{
			// Invalid and duplicate names are dropped.
			[]string{"", "a\x00b", "\xff", "qemu:dirty-bitmap:b", "qemu:dirty-bitmap:b", string(make([]byte, 4097))},
			[]string{"0 base:allocation*", "2 qemu:dirty-bitmap:b"},
		},
	} {
		var got []string
		for _, c := range contextsOf(namesExport{names: tc.names}) {
			s := fmt.Sprintf("%d %s", c.id, c.name)
			if c.synthetic {
				s += "*"
			}
			got = append(got, s)
		}
		if !slices.Equal(got, tc.want) {
			t.Errorf("contextsOf(%q) = %q, want %q", tc.names, got, tc.want)
		}
	}
}

func TestMatchQuery(t *testing.T) {
	ctxs := contextsOf(namesExport{names: []string{
		"base:allocation", "qemu:allocation-depth", "qemu:dirty-bitmap:a", "qemu:dirty-bitmap:a:b", "x-foo:bar",
	}})
	for _, tc := range []struct {
		query string
		list  bool
		want  []int
	}{
		{"base:allocation", false, []int{0}},
		{"base:", true, []int{0}},
		{"base:", false, nil},
		{"base:alloc", true, nil},
		{"qemu:", true, []int{1, 2, 3}},
		{"qemu:", false, nil},
		{"qemu:dirty-bitmap:", true, []int{2, 3}},
		{"qemu:dirty-bitmap:", false, nil},
		{"qemu:dirty-bitmap:a", false, []int{2}},
		{"qemu:dirty-bitmap:a:", true, nil}, // qemu compares the leaf exactly
		{"qemu:dirty-bitmap:a:b", false, []int{3}},
		{"qemu:allocation-depth", false, []int{1}},
		{"x-foo:", true, []int{4}},
		{"x-foo:bar", false, []int{4}},
		{"nocolon", true, nil},
		{"", true, nil},
	} {
		sel := make([]bool, len(ctxs))
		matchQuery(ctxs, tc.query, tc.list, sel)
		var got []int
		for i, s := range sel {
			if s {
				got = append(got, i)
			}
		}
		if !slices.Equal(got, tc.want) {
			t.Errorf("matchQuery(%q, list=%v) = %v, want %v", tc.query, tc.list, got, tc.want)
		}
	}
}

func TestStringers(t *testing.T) {
	for _, tc := range []struct {
		got, want string
	}{
		{option(7).String(), "go"},
		{option(99).String(), "unknown-99"},
		{repType(1<<31 + 6).String(), "ERR_UNKNOWN"},
		{repType(77).String(), "unknown-77"},
		{infoType(3).String(), "block size"},
		{infoType(9).String(), "unknown-9"},
		{command(6).String(), "write zeroes"},
		{command(42).String(), "unknown-42"},
		{replyType(2).String(), "OFFSET_HOLE"},
		{replyType(3).String(), "unknown-3"},
		{eNOSPC.String(), "ENOSPC"},
		{errno(4).String(), "unknown-4"},
	} {
		if tc.got != tc.want {
			t.Errorf("got %q, want %q", tc.got, tc.want)
		}
	}
}

func TestBufPool(t *testing.T) {
	var bp bufPool
	for _, n := range []int{1, 4096, 4097, 65536, 1<<20 + 1, maxPayload} {
		b := bp.get(n)
		if len(b) != n || cap(b) < n || cap(b)&(cap(b)-1) != 0 {
			t.Errorf("get(%d): len %d cap %d", n, len(b), cap(b))
		}
		bp.put(b)
	}
	if b := bp.get(0); b != nil {
		t.Errorf("get(0) = %v", b)
	}
	bp.put(make([]byte, 5000)) // not from get: ignored
}
