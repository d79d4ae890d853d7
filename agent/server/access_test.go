package server

import (
	"os"
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
