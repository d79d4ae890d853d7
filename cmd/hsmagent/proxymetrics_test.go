package main

import (
	"strings"
	"testing"
)

// TestProxyMetricsListenSetting: each proxy takes its metrics listener from
// --metrics-listen, HSMAGENT_METRICS_LISTEN or its own d1 section, never from
// the agent's top-level metrics_listen (the two would fight for the port);
// a public address is refused before the agent is dialled.
func TestProxyMetricsListenSetting(t *testing.T) {
	const socket = "/nonexistent-dir/agent.sock"
	for _, tt := range []struct {
		name    string
		config  string
		args    []string
		env     string
		refused bool // refused for the metrics address
	}{
		{"client flag", "", []string{"proxy", "client", "--listen", "127.0.0.1:1", "--target", "https://d1.example", "--metrics-listen", "0.0.0.0:9465"}, "", true},
		{"client env", "", []string{"proxy", "client", "--listen", "127.0.0.1:1", "--target", "https://d1.example"}, "0.0.0.0:9465", true},
		{"client section", "d1:\n  PPR:\n    client_metrics_listen: 0.0.0.0:9465\n", []string{"proxy", "client", "--listen", "127.0.0.1:1", "--target", "https://d1.example"}, "", true},
		{"client ignores top level", "metrics_listen: 0.0.0.0:9465\n", []string{"proxy", "client", "--listen", "127.0.0.1:1", "--target", "https://d1.example"}, "", false},
		{"server section", "d1:\n  PPR:\n    server:\n      metrics_listen: 0.0.0.0:9465\n", []string{"proxy", "server", "--backend", "http://127.0.0.1:1", "--key", "k", "--client-ca", "/dev/null"}, "", true},
		{"server ignores top level", "metrics_listen: 0.0.0.0:9465\n", []string{"proxy", "server", "--backend", "http://127.0.0.1:1", "--key", "k", "--client-ca", "/dev/null"}, "", false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			args := append(tt.args, "--socket", socket)
			if tt.config != "" {
				args = append(args, "--config", writeConfig(t, tt.config))
			}
			var stderr string
			if tt.env != "" {
				runCLI(t) // clears HSMAGENT_*
				t.Setenv("HSMAGENT_METRICS_LISTEN", tt.env)
				_, _, stderr = run2(t, args...)
			} else {
				_, _, stderr = runCLI(t, args...)
			}
			if got := strings.Contains(stderr, "not a loopback address"); got != tt.refused {
				t.Errorf("refused for the metrics address: %v; want %v: %q", got, tt.refused, stderr)
			}
			if !tt.refused && !strings.Contains(stderr, socket) {
				t.Errorf("want the agent dial error: %q", stderr)
			}
		})
	}
}
