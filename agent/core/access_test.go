package core

import (
	"fmt"
	"os"
	"path"
	"strings"
	"testing"
)

func TestPolicy(t *testing.T) {
	p, err := NewPolicy([]Rule{
		{Keys: []string{"d1-ppr-*"}, Users: []string{"4242"}},
		{Keys: []string{"jwt"}, Groups: []string{"5000"}},
	})
	if err != nil {
		t.Fatal(err)
	}
	own := os.Getuid()
	tests := []struct {
		name  string
		peer  Peer
		key   string
		allow bool
	}{
		{"root", Peer{UID: 0}, "anything", true},
		{"agent's own user", Peer{UID: own}, "anything", true},
		{"user rule by pattern", Peer{UID: 4242, GID: 1}, "d1-ppr-mtls", true},
		{"user rule, other key", Peer{UID: 4242, GID: 1}, "d1-prd-mtls", own == 4242},
		{"group rule by primary gid", Peer{UID: 7, GID: 5000}, "jwt", true},
		{"group rule by supplementary group", Peer{UID: 7, GID: 1, Groups: []int{5000}}, "jwt", true},
		{"stranger", Peer{UID: 7, GID: 7}, "jwt", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := p.Allowed(tt.peer, tt.key); got != tt.allow {
				t.Errorf("Allowed = %v, want %v", got, tt.allow)
			}
		})
	}
}

// TestPolicyRefusesWhatItCannotEnforce: a rule naming an unknown user or
// group would match nobody; it is refused at start-up instead.
func TestPolicyRefusesWhatItCannotEnforce(t *testing.T) {
	tests := []struct {
		rule Rule
		want string
	}{
		{Rule{Keys: []string{"k"}, Users: []string{"no-such-user-hsmagent"}}, `unknown user "no-such-user-hsmagent"`},
		{Rule{Keys: []string{"k"}, Groups: []string{"no-such-group-hsmagent"}}, `unknown group "no-such-group-hsmagent"`},
		{Rule{Users: []string{"0"}}, "names no keys"},
		{Rule{Keys: []string{"k"}}, "names no users or groups"},
		{Rule{Keys: []string{"[bad"}, Users: []string{"0"}}, "bad key pattern"},
		{Rule{Keys: []string{"k"}, Users: []string{"-1"}}, "unknown user"},
	}
	for _, tt := range tests {
		if _, err := NewPolicy([]Rule{tt.rule}); err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("%+v: %v, want %q", tt.rule, err, tt.want)
		}
	}
}

// TestKeyPatterns pins the documented pattern syntax: "*" alone is every key;
// elsewhere * and ? stay within one "/"-separated part of a label, ** crosses
// "/", [...] is a class of one character (never "/"), \ quotes.
func TestKeyPatterns(t *testing.T) {
	tests := []struct {
		pattern, label string
		match          bool
	}{
		{"*", "jwt", true},
		{"*", "d1/ppr/mtls", true},
		{"**", "d1/ppr/mtls", true},
		{"jwt", "jwt", true},
		{"jwt", "jwt2", false},
		{"jwt", "a/jwt", false},
		{"d1-ppr-*", "d1-ppr-mtls", true},
		{"d1-ppr-*", "d1-ppr-", true},
		{"d1-ppr-*", "d1-prd-mtls", false},
		{"d1-ppr-*", "d1-ppr-a/b", false},
		{"d1/*", "d1/mtls", true},
		{"d1/*", "d1/ppr/mtls", false},
		{"d1/*", "d1", false},
		{"d1/**", "d1/ppr/mtls", true},
		{"d1/**", "d1/mtls", true},
		{"d1/**", "d1", false},
		{"d1/**", "d2/mtls", false},
		{"*/*", "a/b", true},
		{"*/*", "a/b/c", false},
		{"**/jwt", "a/b/jwt", true},
		{"**/jwt", "jwt", false},
		{"a**b", "ab", true},
		{"a**b", "a/x/y/b", true},
		{"a***", "a/b", true},
		{"*-mtls", "ppr-mtls", true},
		{"*-mtls", "d1/ppr-mtls", false},
		{"a?c", "abc", true},
		{"a?c", "a/c", false},
		{"a?c", "ac", false},
		{"a?c", "aéc", true},
		{"[ab]x", "bx", true},
		{"[ab]x", "cx", false},
		{"[a-c]", "b", true},
		{"[a-c]", "d", false},
		{"[^a]x", "bx", true},
		{"[^a]x", "ax", false},
		{"[^a]x", "/x", false},
		{"[/]x", "/x", false},
		{`\*`, "*", true},
		{`\*`, "x", false},
		{`[\]]`, "]", true},
		{`a\/b`, "a/b", true},
		// A rotation's labels: named only exactly, by no pattern.
		{"*", "web/successor", false},
		{"**", "web/successor", false},
		{"web/*", "web/successor", false},
		{"web/**", "web/retired-20261203T170000Z", false},
		{"*", "web/retired-20261203T170000Z", false},
		{"web/successor", "web/successor", true},
		{"web/retired-20261203T170000Z", "web/retired-20261203T170000Z", true},
		{`web/retired-20261203T170000\Z`, "web/retired-20261203T170000Z", true},
		{"web/**", "web/retired-later", true}, // not a retired label: its time does not parse
	}
	for _, tt := range tests {
		t.Run(tt.pattern+" "+tt.label, func(t *testing.T) {
			p, err := NewPolicy([]Rule{{Keys: []string{tt.pattern}, Users: []string{"4242"}}})
			if err != nil {
				t.Fatal(err)
			}
			if got := p.Allowed(Peer{UID: 4242, GID: 4242}, tt.label); got != tt.match {
				t.Errorf("%q matches %q: %v, want %v", tt.pattern, tt.label, got, tt.match)
			}
		})
	}
}

func TestBadKeyPatterns(t *testing.T) {
	for _, pattern := range []string{"", "[bad", "a[", `a\`, "[]", "[^]", "[z-a]", "[a-]", `[\`} {
		_, err := NewPolicy([]Rule{{Keys: []string{pattern}, Users: []string{"4242"}}})
		if err == nil || !strings.Contains(err.Error(), fmt.Sprintf("bad key pattern %q", pattern)) {
			t.Errorf("%q: %v", pattern, err)
		}
	}
}

// TestKeyPatternsAgreeWithPathMatch: without "/" in the label and without **,
// the syntax is path.Match's, so patterns written for the old matcher keep
// their meaning.
func TestKeyPatternsAgreeWithPathMatch(t *testing.T) {
	patterns := []string{"d1-*", "*-mtls", "d1-???-mtls", "[a-c]*", "[^a-c]*", `\[x*`, "*a*b*", "k", "[é]", "?"}
	labels := []string{"d1-ppr-mtls", "d1-", "a", "abc", "dab", "[x]", "k", "é", "", "-mtls", "ab"}
	for _, pattern := range patterns {
		kp, err := compileKeyPattern(pattern)
		if err != nil {
			t.Fatalf("%q: %v", pattern, err)
		}
		for _, label := range labels {
			want, _ := path.Match(pattern, label)
			if got := kp.match(label); got != want {
				t.Errorf("%q on %q: %v, path.Match says %v", pattern, label, got, want)
			}
		}
	}
}
