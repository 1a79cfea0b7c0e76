package testutil

import (
	"slices"
	"strings"
	"testing"
)

func TestJSONDiff(t *testing.T) {
	decode := func(s string) any { return DecodeJSON(t, "test", []byte(s)) }
	tests := []struct {
		name       string
		got, want  string
		requireAll bool
		wantDiffs  []string // substrings, one per difference, in order
	}{
		{"equal", `{"a": 1, "b": [1, {"c": "x"}]}`, `{"b": [1, {"c": "x"}], "a": 1}`, true, nil},
		{"value", `{"a": 1}`, `{"a": 2}`, false, []string{"a: got"}},
		{"nested", `{"a": {"b": [1, 2]}}`, `{"a": {"b": [1, 3]}}`, false, []string{"a.b[1]: got"}},
		{"length", `{"a": [1]}`, `{"a": [1, 2]}`, false, []string{"a: got 1 elements, want 2"}},
		{"missing ignored", `{"a": 1}`, `{"a": 1, "b": 2}`, false, nil},
		{"missing required", `{"a": 1}`, `{"a": 1, "b": 2}`, true, []string{"b: missing"}},
		{"extra in got", `{"a": 1, "chain": []}`, `{"a": 1}`, true, nil},
		{"type", `{"a": "1"}`, `{"a": 1}`, false, []string{"a: got"}},
		{"big numbers exact", `{"a": 9007199254740993}`, `{"a": 9007199254740992}`, false, []string{"a: got"}},
		{"top array", `[{"a": 1}]`, `[{"a": 1}, {"a": 2}]`, false, []string{"(top): got 1 elements"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			d := JSONDiff(decode(tc.got), decode(tc.want), tc.requireAll)
			if len(d) != len(tc.wantDiffs) {
				t.Fatalf("JSONDiff(%s, %s) = %q, want %d differences", tc.got, tc.want, d, len(tc.wantDiffs))
			}
			for i, w := range tc.wantDiffs {
				if !strings.Contains(d[i], w) {
					t.Errorf("difference %d = %q, want it to contain %q", i, d[i], w)
				}
			}
		})
	}
}

func TestUnescapeMountinfo(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{`/tmp/a`, `/tmp/a`},
		{`/tmp/with\040space`, `/tmp/with space`},
		{`/tmp/tab\011and\134backslash`, "/tmp/tab\tand\\backslash"},
		{`/tmp/not\x`, `/tmp/not\x`},
		{`/tmp/end\04`, `/tmp/end\04`},
	} {
		if got := unescapeMountinfo(tc.in); got != tc.want {
			t.Errorf("unescapeMountinfo(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}
}

func TestMounts(t *testing.T) {
	es, err := Mounts()
	if err != nil {
		t.Fatal(err)
	}
	if !slices.ContainsFunc(es, func(e MountEntry) bool { return e.Mountpoint == "/" }) {
		t.Errorf("no mount at / in %+v", es)
	}
}
