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

// TestCheckConfigMetricsTCPNeedsOptIn: a loopback TCP metrics address,
// which every local user can read, is refused unless --metrics-tcp (or
// metrics_tcp: true) says the operator accepts that; a socket path is not.
func TestCheckConfigMetricsTCPNeedsOptIn(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "s.sock")
	base := []string{"serve", "--socket", sock, "--token", "t", "--check-config", "--metrics-listen"}
	code, _, stderr := runCLI(t, append(base, "127.0.0.1:19465")...)
	if code != 2 || !strings.Contains(stderr, "readable by every local user") || !strings.Contains(stderr, "metrics_tcp: true") {
		t.Errorf("TCP without the opt-in: exit %d, stderr %q; want exit 2 naming the exposure and metrics_tcp", code, stderr)
	}
	if code, _, stderr := runCLI(t, append(base, "127.0.0.1:19465", "--metrics-tcp")...); code != 0 {
		t.Errorf("TCP with --metrics-tcp: exit %d, stderr %q", code, stderr)
	}
	if code, _, stderr := runCLI(t, append(base, filepath.Join(t.TempDir(), "m.sock"))...); code != 0 {
		t.Errorf("a socket path: exit %d, stderr %q", code, stderr)
	}
	cfg := filepath.Join(t.TempDir(), "agent.yaml")
	os.WriteFile(cfg, []byte("metrics_listen: 127.0.0.1:19465\nmetrics_tcp: true\n"), 0o644)
	if code, _, stderr := runCLI(t, "serve", "--socket", sock, "--token", "t", "--check-config", "--config", cfg); code != 0 {
		t.Errorf("metrics_tcp: true in the config: exit %d, stderr %q", code, stderr)
	}
}
