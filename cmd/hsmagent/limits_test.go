package main

import (
	"path/filepath"
	"strings"
	"testing"
)

func TestLimitsValidated(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "s.sock")
	for _, tt := range []struct{ flag, value string }{
		{"max-connections", "0"},
		{"max-connections-per-uid", "-1"},
		{"max-streams-per-connection", "0"},
		{"idle-timeout", "0s"},
		{"stream-send-timeout", "-1s"},
		{"max-signatures-per-uid", "0"},
		{"audit-refusal-burst", "0"},
	} {
		t.Run(tt.flag, func(t *testing.T) {
			code, _, stderr := runCLI(t, "serve", "--socket", sock, "--"+tt.flag, tt.value)
			if code != 2 || !strings.Contains(stderr, "--"+tt.flag+" "+tt.value+": must be") {
				t.Errorf("exit %d %q", code, stderr)
			}
		})
	}
	path := writeConfig(t, "socket: "+sock+"\nmax_connections_per_uid: many\n")
	if _, _, stderr := runCLI(t, "serve", "--config", path); !strings.Contains(stderr, `config setting "max_connections_per_uid"`) || !strings.Contains(stderr, "line 2") {
		t.Errorf("bad max_connections_per_uid in the file: %q", stderr)
	}
	path = writeConfig(t, "socket: "+sock+"\nidle_timeout: 0s\n")
	if _, _, stderr := runCLI(t, "serve", "--config", path); !strings.Contains(stderr, `config setting "idle_timeout"`) || !strings.Contains(stderr, "line 2): 0s: must be positive") {
		t.Errorf("idle_timeout 0s in the file: %q", stderr)
	}
}
