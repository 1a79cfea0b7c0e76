package testutil

import (
	"fmt"
	"slices"
	"strings"
)

// JSONDiff compares two decoded JSON values (see [DecodeJSON]) key by key
// and returns one line per difference, each naming the path of the field
// ("chain[1].format-specific.data.compat"). Objects are compared on the
// keys both have; with requireAll, a key of want missing from got is a
// difference too (keys only got has are not). Arrays must have the same
// length and are compared element by element.
func JSONDiff(got, want any, requireAll bool) []string {
	var diffs []string
	jsonDiff(&diffs, "", got, want, requireAll)
	return diffs
}

func jsonDiff(diffs *[]string, path string, got, want any, requireAll bool) {
	at := path
	if at == "" {
		at = "(top)"
	}
	switch w := want.(type) {
	case map[string]any:
		g, ok := got.(map[string]any)
		if !ok {
			*diffs = append(*diffs, fmt.Sprintf("%s: got %s, want an object", at, short(got)))
			return
		}
		keys := make([]string, 0, len(w))
		for k := range w {
			keys = append(keys, k)
		}
		slices.Sort(keys)
		for _, k := range keys {
			p := k
			if path != "" {
				p = path + "." + k
			}
			gv, ok := g[k]
			if !ok {
				if requireAll {
					*diffs = append(*diffs, fmt.Sprintf("%s: missing, want %s", p, short(w[k])))
				}
				continue
			}
			jsonDiff(diffs, p, gv, w[k], requireAll)
		}
	case []any:
		g, ok := got.([]any)
		if !ok {
			*diffs = append(*diffs, fmt.Sprintf("%s: got %s, want an array", at, short(got)))
			return
		}
		if len(g) != len(w) {
			*diffs = append(*diffs, fmt.Sprintf("%s: got %d elements, want %d: got %s, want %s", at, len(g), len(w), short(got), short(want)))
			return
		}
		for i := range w {
			jsonDiff(diffs, fmt.Sprintf("%s[%d]", path, i), g[i], w[i], requireAll)
		}
	default:
		if fmt.Sprintf("%T %v", got, got) != fmt.Sprintf("%T %v", want, want) {
			*diffs = append(*diffs, fmt.Sprintf("%s: got %s, want %s", at, short(got), short(want)))
		}
	}
}

// short renders a JSON value for a difference line.
func short(v any) string {
	s := fmt.Sprintf("%#v", v)
	if len(s) > 200 {
		s = s[:200] + "..."
	}
	return strings.ReplaceAll(s, "\n", " ")
}
