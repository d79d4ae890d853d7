package main

import (
	"strings"
	"testing"

	"github.com/hsmagent/hsmagent/agent/core"
)

// TestAdminRuleConfig: the admin: setting names the users and groups of
// the admin rule; a mistake in it names the setting and its line.
func TestAdminRuleConfig(t *testing.T) {
	tests := []struct {
		name, file string
		admin      []core.Peer // allowed
		refused    []core.Peer
		err        string
	}{
		{"default: root only", "log_level: INFO\n", []core.Peer{{UID: 0}}, []core.Peer{{UID: 4100, GID: 4100}}, ""},
		{"users and groups", "admin:\n  users: [\"4100\"]\n  groups: [\"4200\"]\n",
			[]core.Peer{{UID: 0}, {UID: 4100, GID: 1}, {UID: 7, GID: 7, Groups: []int{4200}}}, []core.Peer{{UID: 7, GID: 7}}, ""},
		{"unknown user", "log_level: INFO\nadmin:\n  users: [no-such-user-hsmagent]\n", nil, nil,
			`config setting "admin" (` + "%s" + ` line 2): agent: admin rule: unknown user "no-such-user-hsmagent" on this host`},
		{"misspelt key", "admin:\n  user: [\"4100\"]\n", nil, nil, `unknown setting "admin.user": did you mean "admin.users"?`},
		{"not a list", "admin:\n  users: root\n", nil, nil, `"admin.users"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := writeConfig(t, tt.file)
			cfg, err := loadConfig(path)
			var p *core.Policy
			if err == nil {
				p, err = cfg.policy()
			}
			if tt.err != "" {
				want := tt.err
				if strings.Contains(want, "%s") {
					want = strings.Replace(want, "%s", path, 1)
				}
				if err == nil || !strings.Contains(err.Error(), want) {
					t.Fatalf("error %v, want %q", err, want)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			for _, peer := range tt.admin {
				if !p.IsAdmin(peer) {
					t.Errorf("%+v is not an admin", peer)
				}
			}
			for _, peer := range tt.refused {
				if p.IsAdmin(peer) {
					t.Errorf("%+v is an admin", peer)
				}
			}
		})
	}
}
