// Package units parses sizes the way qemu-img does: a bare number is
// bytes, and the suffixes K, M, G, T, P, E (or KiB, MiB, ...) are powers of
// 1024. "1G" is 1 GiB. (go-humanize's ParseBytes reads "1G" as 10^9, which
// is not what a qemu user means.)
package units

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
)

// ErrSize is matched by every error ParseSize returns.
var ErrSize = errors.New("invalid size")

var suffixes = map[string]uint{
	"": 0, "b": 0,
	"k": 10, "kib": 10,
	"m": 20, "mib": 20,
	"g": 30, "gib": 30,
	"t": 40, "tib": 40,
	"p": 50, "pib": 50,
	"e": 60, "eib": 60,
}

// ParseSize parses s ("4096", "64K", "1.5G", "2MiB") into bytes.
func ParseSize(s string) (uint64, error) {
	t := strings.TrimSpace(s)
	i := 0
	for i < len(t) && (t[i] >= '0' && t[i] <= '9' || t[i] == '.') {
		i++
	}
	num, suf := t[:i], strings.ToLower(strings.TrimSpace(t[i:]))
	shift, ok := suffixes[suf]
	if num == "" || !ok {
		return 0, fmt.Errorf("%w: %q (use a number of bytes or K, M, G, T suffixes)", ErrSize, s)
	}
	if !strings.Contains(num, ".") {
		v, err := strconv.ParseUint(num, 10, 64)
		if err != nil {
			return 0, fmt.Errorf("%w: %q", ErrSize, s)
		}
		if shift > 0 && v > (^uint64(0))>>shift {
			return 0, fmt.Errorf("%w: %q is too large", ErrSize, s)
		}
		return v << shift, nil
	}
	f, err := strconv.ParseFloat(num, 64)
	if err != nil || f < 0 {
		return 0, fmt.Errorf("%w: %q", ErrSize, s)
	}
	v := f * float64(uint64(1)<<shift)
	if v >= 1<<64 {
		return 0, fmt.Errorf("%w: %q is too large", ErrSize, s)
	}
	return uint64(v), nil
}
