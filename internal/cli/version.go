package cli

import (
	"strconv"
	"strings"
)

// versionAtLeast reports whether v ≥ min under `sort -V` ordering, which is
// how the old script compared versions. An empty version always fails.
// Numeric runs compare as numbers; a trailing comma (old QEMU builds print
// "2.1.3,") is ignored.
func versionAtLeast(v, min string) bool {
	v = strings.TrimRight(strings.TrimSpace(v), ",")
	if v == "" {
		return false
	}
	return compareVersions(v, min) >= 0
}

func compareVersions(a, b string) int {
	for a != "" || b != "" {
		na, ra := splitNum(a)
		nb, rb := splitNum(b)
		switch {
		case na != "" && nb != "":
			x, _ := strconv.ParseUint(na, 10, 64)
			y, _ := strconv.ParseUint(nb, 10, 64)
			if x != y {
				if x < y {
					return -1
				}
				return 1
			}
		case na != "":
			return 1
		case nb != "":
			return -1
		}
		a, b = ra, rb
		sa, ra2 := splitNonNum(a)
		sb, rb2 := splitNonNum(b)
		if c := strings.Compare(sa, sb); c != 0 {
			return c
		}
		a, b = ra2, rb2
	}
	return 0
}

func splitNum(s string) (string, string) {
	i := 0
	for i < len(s) && s[i] >= '0' && s[i] <= '9' {
		i++
	}
	return s[:i], s[i:]
}

func splitNonNum(s string) (string, string) {
	i := 0
	for i < len(s) && (s[i] < '0' || s[i] > '9') {
		i++
	}
	return s[:i], s[i:]
}
