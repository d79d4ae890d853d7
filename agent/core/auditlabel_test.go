package core

import (
	"strings"
	"testing"
	"unicode/utf8"
)

// TestAuditLabel: a label is cut on a character boundary, never inside
// one, and characters a log viewer could break a line on are escaped.
func TestAuditLabel(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"d1-prd-mtls", "d1-prd-mtls"},
		{strings.Repeat("a", 127) + "é", strings.Repeat("a", 127)}, // é would straddle byte 128
		{strings.Repeat("é", 100), strings.Repeat("é", 64)},
		{"a\u2028b", `a\u2028b`},
		{"a\u0085b\u2029c", `a\u0085b\u2029c`},
		{"tab\there", `tab\u0009here`},
	} {
		got := auditLabel(tc.in)
		if got != tc.want || !utf8.ValidString(got) || len(got) > MaxLabel+5*6 {
			t.Errorf("auditLabel(%q) = %q; want %q", tc.in, got, tc.want)
		}
	}
}
