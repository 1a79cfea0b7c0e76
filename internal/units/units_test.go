package units

import (
	"errors"
	"testing"
)

func TestParseSize(t *testing.T) {
	tests := []struct {
		in   string
		want uint64
	}{
		{"0", 0}, {"512", 512}, {"4K", 4096}, {"4k", 4096}, {"64KiB", 65536},
		{"1M", 1 << 20}, {"1G", 1 << 30}, {"2T", 2 << 40}, {"1.5K", 1536}, {" 8M ", 8 << 20},
	}
	for _, tc := range tests {
		got, err := ParseSize(tc.in)
		if err != nil || got != tc.want {
			t.Errorf("ParseSize(%q) = %d, %v; want %d", tc.in, got, err, tc.want)
		}
	}
	for _, bad := range []string{"", "K", "12X", "-1", "1.2.3M", "99999999999999999999", "20E"} {
		if _, err := ParseSize(bad); !errors.Is(err, ErrSize) {
			t.Errorf("ParseSize(%q): err = %v, want ErrSize", bad, err)
		}
	}
}
