package main

import (
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// quoted removes the %q-quoted parts of a message: they are the user's own
// text, which may say anything.
var quoted = regexp.MustCompile(`"(?:[^"\\]|\\.)*"`)

// goType finds what only a Go type name looks like.
var goType = regexp.MustCompile(`\[\]|map\[|\bmain\.|\bserver\.|\byaml\.|\bstruct\b|\binterface\b|\bint(8|16|32|64)?\b|\buint|\bfloat(32|64)\b|\*[a-z]`)

// FuzzLoadConfig: any file gives a configuration or a one-line error that
// names the file (and, for a value its setting cannot take, the setting)
// and no Go type, never a panic or a hang.
func FuzzLoadConfig(f *testing.F) {
	for _, s := range []string{
		"socket: /run/hsmagent/agent.sock\nsocket_mode: \"0660\"\ntoken: t\npin_file: /etc/p\n",
		"access:\n  - keys: [\"*\"]\n    users: [app]\n    groups: [\"4242\"]\n",
		"access:\n  - keys: d1\n",
		"access: {keys: 1}\n",
		"d1:\n  PPR:\n    target: host:443\n    jwt: {kid: k, aud: a}\n    server: {listen: \":8443\"}\n",
		"d1:\n  PPR: [1, 2]\n",
		"sockt: x\n",
		"socket: [a, b]\n",
		"socket: a\nsocket: b\n",
		"max_sessions: 4\nhsm_timeout: 3s\n",
		"- a\n- b\n",
		"&a [*a]\n",
		"0 0: x\n",                             // a setting name with a space (found by this target)
		"socket: !foo [a]\n",                   // a custom tag
		"access: \"a\\nb`c\"\n",                // a value with a newline and a backquote
		"max_sessions: 0\n",                    // a value out of range
		"socket_mode: 0660\nlog_level: WARN\n", // 0660 as written, not as a YAML number
		"d1:\n  PPR: &p\n    kid: k\n  PRD:\n    <<: *p\n    target: t\n", // a merge key
		"d1: &a\n  <<: *a\n", // a mapping merged into itself
		"d1: {PPR: {jwt: {<<: [{kid: a}, {kid: b}]}}}\n",
		"{",
		"",
	} {
		f.Add([]byte(s))
	}
	dir := f.TempDir()
	f.Fuzz(func(t *testing.T, data []byte) {
		path := filepath.Join(dir, "agent.yaml")
		if err := os.WriteFile(path, data, 0o600); err != nil {
			t.Fatal(err)
		}
		cfg, err := loadConfig(path)
		if err == nil {
			if cfg == nil {
				t.Fatal("no config and no error")
			}
			return
		}
		msg := err.Error()
		if strings.Contains(msg, "\n") {
			t.Fatalf("error on more than one line: %q", msg)
		}
		if !strings.HasPrefix(msg, `config "`+path+`"`) && !(strings.HasPrefix(msg, `config setting "`) && strings.Contains(msg, " ("+path+" line ")) {
			t.Fatalf("error does not name the file: %q", msg)
		}
		if m := goType.FindString(quoted.ReplaceAllString(msg, `""`)); m != "" {
			t.Fatalf("error names a Go type (%q): %q", m, msg)
		}
	})
}
