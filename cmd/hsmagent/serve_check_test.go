package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestServeCheckConfig: serve --check-config validates the config and the
// flags and exits 0 without opening the token (there is none here),
// creating the socket or the audit log; a bad config exits as serve would.
func TestServeCheckConfig(t *testing.T) {
	dir := t.TempDir()
	sock, audit := filepath.Join(dir, "agent.sock"), filepath.Join(dir, "audit.log")
	good := writeConfig(t, fmt.Sprintf("socket: %s\naudit_log: %s\ntoken: no-such-token\naccess:\n  - keys: [\"*\"]\n    users: [root]\n", sock, audit))
	code, stdout, stderr := runCLI(t, "serve", "--check-config", "--config", good, "--module", "/nonexistent/module.so")
	if code != 0 || stdout != "" || !strings.Contains(stderr, "configuration valid") {
		t.Errorf("good config: exit %d, stdout %q, stderr %q", code, stdout, stderr)
	}
	for _, p := range []string{sock, audit} {
		if _, err := os.Stat(p); err == nil {
			t.Errorf("--check-config created %s", p)
		}
	}
	for _, tt := range []struct {
		name, config string
		args         []string
		code         int
		want         string
	}{
		{"bad rule", "socket: " + sock + "\ntoken: t\naccess:\n  - keys: [web]\n", nil, 1, "line 4"},
		{"bad flag value", "socket: " + sock + "\ntoken: t\n", []string{"--max-sessions", "0"}, 2, "--max-sessions 0: must be at least 1"},
		{"no token", "socket: " + sock + "\n", nil, 2, "no token selected"},
		{"no socket", "token: t\n", nil, 2, "no socket path"},
	} {
		code, _, stderr := runCLI(t, append([]string{"serve", "--check-config", "--config", writeConfig(t, tt.config)}, tt.args...)...)
		if code != tt.code || !strings.Contains(stderr, tt.want) {
			t.Errorf("%s: exit %d, stderr %q; want exit %d and %q", tt.name, code, stderr, tt.code, tt.want)
		}
	}
}

// TestCheckConfigChecksMetricsAddress: --check-config refuses what serve
// would refuse, the metrics address included.
func TestCheckConfigChecksMetricsAddress(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "s.sock")
	code, _, stderr := runCLI(t, "serve", "--socket", sock, "--token", "t", "--metrics-listen", "0.0.0.0:19465", "--check-config")
	if code != 2 || !strings.Contains(stderr, "not a loopback address") {
		t.Errorf("exit %d, stderr %q", code, stderr)
	}
}
