package rotation

import (
	"strings"
	"testing"
	"time"
)

func TestParse(t *testing.T) {
	at := time.Date(2026, 12, 2, 18, 45, 0, 0, time.FixedZone("CET", 3600))
	for _, tc := range []struct {
		label, base string
		kind        Kind
	}{
		{"d1-ppr-mtls", "d1-ppr-mtls", Current},
		{SuccessorLabel("d1-ppr-mtls"), "d1-ppr-mtls", Successor},
		{RetiredLabel("d1-ppr-mtls", at), "d1-ppr-mtls", Retired},
		{"d1-ppr-mtls/retired-20261202T174500Z", "d1-ppr-mtls", Retired},
		{"d1-ppr-mtls/retired-yesterday", "d1-ppr-mtls/retired-yesterday", Current},
		{"/successor", "/successor", Current},
		{"a/b/successor", "a/b", Successor},
		{RetiredLabel(SuccessorLabel("k"), at), "k/successor", Retired},
	} {
		base, kind := Parse(tc.label)
		if base != tc.base || kind != tc.kind {
			t.Errorf("Parse(%q) = %q, %v; want %q, %v", tc.label, base, kind, tc.base, tc.kind)
		}
	}
	if got := RetiredLabel("k", at); got != "k/retired-20261202T174500Z" {
		t.Errorf("RetiredLabel is %q, want the UTC time", got)
	}
}

func TestCheckRotatable(t *testing.T) {
	for _, tc := range []struct {
		label string
		ok    bool
	}{
		{"d1-ppr-mtls", true},
		{SuccessorLabel("k"), false},
		{"k/retired-20261202T174500Z", false},
		{strings.Repeat("a", MaxLabel-len("/retired-20261202T174500Z")), true},
		{strings.Repeat("a", MaxLabel-len("/retired-20261202T174500Z")+1), false},
	} {
		if err := CheckRotatable(tc.label); (err == nil) != tc.ok {
			t.Errorf("CheckRotatable(%q) = %v, want ok %v", tc.label, err, tc.ok)
		}
	}
}
