package main

import (
	"bytes"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hsmagent/hsmagent/agent/server"
	"github.com/urfave/cli/v2"
)

// runCLI runs the command in process, as main does, with no terminal and a
// clean HSMAGENT_* environment.
func runCLI(t *testing.T, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	clearEnv(t)
	var out, errOut bytes.Buffer
	code = run(append([]string{"hsmagent"}, args...), &out, &errOut)
	return code, out.String(), errOut.String()
}

// clearEnv unsets the HSMAGENT_* variables for the test.
func clearEnv(t *testing.T) {
	t.Helper()
	for _, kv := range os.Environ() {
		if name, _, _ := strings.Cut(kv, "="); strings.HasPrefix(name, "HSMAGENT_") {
			t.Setenv(name, "")
			os.Unsetenv(name)
		}
	}
}

func writeConfig(t *testing.T, body string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "agent.yaml")
	if err := os.WriteFile(path, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// TestUsageErrors: every mistake in how the command is called is one line on
// stderr, says what to do, and exits 2 (1 for a failure at run time), before
// any token is opened or agent dialled.
func TestUsageErrors(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "s.sock")
	tests := []struct {
		name string
		args []string
		code int
		want string
	}{
		{"unknown command", []string{"frobnicate"}, 2, `unknown command "frobnicate"`},
		{"unknown flag", []string{"serve", "--frobnicate"}, 2, "frobnicate"},
		{"serve without socket", []string{"serve", "--token", "t"}, 2, "no socket path"},
		{"bad socket mode", []string{"serve", "--socket", sock, "--socket-mode", "999"}, 2, `--socket-mode "999" is not an octal file mode`},
		{"bad log level", []string{"serve", "--socket", sock, "--log-level", "loud"}, 2, `--log-level "loud"`},
		{"bad log format", []string{"serve", "--socket", sock, "--log-format", "xml"}, 2, `--log-format "xml"`},
		{"missing config file", []string{"serve", "--config", "/nonexistent/agent.yaml"}, 2, "--config"},
		{"unsupported key type", []string{"keys", "generate", "--token", "t", "--label", "k", "--type", "ed25519"}, 2, `unsupported key type "ed25519"`},
		{"generate without label", []string{"keys", "generate", "--token", "t"}, 2, "missing --label"},
		{"generate a successor's label", []string{"keys", "generate", "--token", "t", "--label", "web/successor"}, 2, `only a rotation makes; to rotate the key: hsmagent keys rotate --label web`},
		{"generate a retired key's label", []string{"keys", "generate", "--token", "t", "--label", "web/retired-29991231T000000Z"}, 2, `is the label of a retired key of "web"`},
		{"no token", []string{"keys", "list"}, 2, "no token selected"},
		{"token and serial", []string{"keys", "list", "--token", "a", "--token-serial", "b"}, 2, "not both"},
		{"PIN in URI", []string{"keys", "list", "--uri", "pkcs11:token=a?pin-value=1234"}, 2, "pin-value"},
		{"proxy client without target", []string{"proxy", "client", "--listen", "127.0.0.1:0"}, 2, "needs --listen"},
		{"proxy client on a public address", []string{"proxy", "client", "--listen", "0.0.0.0:8080", "--target", "https://d1.example"}, 2, "loopback"},
		{"proxy server without backend", []string{"proxy", "server"}, 2, "needs --backend"},
		{"d1 token without key", []string{"d1", "token"}, 2, "missing --jwt-key"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			code, _, stderr := runCLI(t, tt.args...)
			if code != tt.code || !strings.Contains(stderr, tt.want) {
				t.Fatalf("exit %d, stderr %q; want exit %d and %q", code, stderr, tt.code, tt.want)
			}
			if lines := strings.Count(strings.TrimSpace(stderr), "\n"); lines != 0 {
				t.Errorf("error is %d lines, want one: %q", lines+1, stderr)
			}
			if !strings.HasPrefix(stderr, "hsmagent: ") {
				t.Errorf("error not prefixed with the command name: %q", stderr)
			}
		})
	}
}

// TestConfigErrorsNameSettingAndLine: a config file's mistakes are reported
// by the setting's name and line, never by a Go type.
func TestConfigErrorsNameSettingAndLine(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "s.sock")
	tests := []struct {
		name, config string
		args         []string
		want         string
	}{
		{"unknown setting", "socket: /run/x.sock\nsockt_mode: \"0600\"\n", []string{"serve"}, `line 2: unknown setting "sockt_mode"`},
		{"list for a string", "log_level: info\nsocket: [a, b]\n", []string{"serve"}, `line 2: "socket" must be a string, not a list`},
		{"mapping for a list", "access:\n  keys: web\n", []string{"serve"}, `"access" must be a list, not a mapping`},
		{"bad value", "socket: " + sock + "\nlog_level: loud\n", []string{"serve"}, `config setting "log_level" (`},
		{"bad value, with its line", "socket: " + sock + "\nlog_level: loud\n", []string{"serve"}, `line 2): "loud": use debug, info, warn or error`},
		{"misspelt setting", "socket_mod: \"0600\"\n", []string{"serve"}, `line 1: unknown setting "socket_mod": did you mean "socket_mode"?`},
		{"misspelt nested setting", "d1:\n  PPR:\n    jwt:\n      kdi: k\n", []string{"serve"}, `line 4: unknown setting "d1.PPR.jwt.kdi": did you mean "d1.PPR.jwt.kid"?`},
		{"setting twice", "socket: a\nsocket: b\n", []string{"serve"}, `line 2: setting "socket" given twice`},
		{"list of strings", "access:\n  - keys: web\n", []string{"serve"}, `line 2: "access.0.keys" must be a list, not "web"`},
		{"list for a number", "max_sessions: [1]\n", []string{"serve"}, `line 1: "max_sessions" must be a whole number, not a list`},
		{"no number", "socket: " + sock + "\nmax_waiting: 0\n", []string{"serve"}, `config setting "max_waiting"`},
		{"bad toggle", "metrics_tcp: yes\n", []string{"serve"}, `"yes" is not true or false`},
		{"bad log format", "log_format: xml\n", []string{"serve"}, `config setting "log_format"`},
		{"bad setting of another command", "d1:\n  PPR:\n    max_conn_age: soon\n", []string{"serve"}, `config setting "d1.PPR.max_conn_age"`},
		{"not a mapping", "- socket\n", []string{"serve"}, `line 1: the file must be a mapping, not a list`},
		{"rule without users", "socket: " + sock + "\naccess:\n  - keys: [web]\n  - keys: [\"*\"]\n    users: [root]\n", []string{"serve"}, `config setting "access" (`},
		{"bad duration in a d1 section", "d1:\n  PPR:\n    target: https://d1.example\n    max_conn_age: soon\n", []string{"proxy", "client", "--listen", "127.0.0.1:0"}, `"d1.PPR.max_conn_age"`},
		{"bad d1 environment", "d1:\n  staging:\n    target: https://d1.example\n", []string{"proxy", "client", "--listen", "127.0.0.1:0"}, `"d1.staging"`},
		{"not YAML", "socket: [unclosed\n", []string{"serve"}, "agent.yaml"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := writeConfig(t, tt.config)
			code, _, stderr := runCLI(t, append(tt.args, "--config", path)...)
			if code == 0 || !strings.Contains(stderr, tt.want) {
				t.Fatalf("exit %d, stderr %q; want %q", code, stderr, tt.want)
			}
			for _, goType := range []string{"main.", "server.Rule", "[]string", "!!"} {
				if strings.Contains(stderr, goType) {
					t.Errorf("error names a Go or YAML type (%s): %q", goType, stderr)
				}
			}
			if strings.Count(strings.TrimSpace(stderr), "\n") != 0 {
				t.Errorf("error is not one line: %q", stderr)
			}
		})
	}
	// The rule error names the line of the rule that is wrong (line 3).
	path := writeConfig(t, "socket: "+sock+"\naccess:\n  - keys: [web]\n")
	if _, _, stderr := runCLI(t, "serve", "--config", path); !strings.Contains(stderr, "line 3") {
		t.Errorf("rule error does not name its line: %q", stderr)
	}
}

// TestFlagsOverrideConfig: a flag wins over its environment variable, the
// variable over the file, and the file over the flag's default; the code
// that reads flags sees the file's value.
func TestFlagsOverrideConfig(t *testing.T) {
	path := writeConfig(t, "token: from-file\nsocket_mode: \"0600\"\nmax_sessions: 4\nhsm_timeout: 5s\nlog_level: debug\nmetrics_tcp: true\n")
	clearEnv(t)
	t.Setenv("HSMAGENT_SOCKET_MODE", "0640")
	t.Setenv("HSMAGENT_MAX_SESSIONS", "6")
	cfg, c := servedConfig(t, "--config", path, "--max-sessions", "8")
	for _, tt := range []struct {
		name      string
		got, want any
	}{
		{"flag over environment and file", cfg.Server.MaxInFlight, 8},
		{"environment over file", cfg.SocketMode, os.FileMode(0o640)},
		{"file over default", cfg.Server.HSMTimeout, 5 * time.Second},
		{"file over default", cfg.LogLevel, slog.LevelDebug},
		{"file over default", cfg.Metrics.TCP, true},
		{"default", cfg.Server.MaxWaiting, server.DefaultMaxWaiting},
		{"default", cfg.Server.IdleTimeout, server.DefaultIdleTimeout},
		{"default", cfg.LogFormat, "text"},
		{"the flag of the file's value", c.String("token"), "from-file"},
		{"the flag of the file's value", c.Duration("hsm-timeout"), 5 * time.Second},
	} {
		if tt.got != tt.want {
			t.Errorf("%s: got %v, want %v", tt.name, tt.got, tt.want)
		}
	}
	// A value the file cannot hold is refused, whatever the flags say: the
	// file is checked whole, as SIGHUP and --check-config read it.
	bad := writeConfig(t, "socket: /nonexistent-dir/s.sock\nsocket_mode: \"999\"\n")
	if _, _, stderr := runCLI(t, "serve", "--config", bad, "--socket-mode", "0600"); !strings.Contains(stderr, `config setting "socket_mode"`) || !strings.Contains(stderr, `line 2): "999" is not an octal file mode`) {
		t.Errorf("bad socket_mode under a flag: %q", stderr)
	}
}

// servedConfig is the configuration serve would run with, and its flags.
func servedConfig(t *testing.T, args ...string) (*config, *cli.Context) {
	t.Helper()
	app := newApp(io.Discard, io.Discard)
	var cfg *config
	var ctx *cli.Context
	for _, cmd := range app.Commands {
		if cmd.Name == "serve" {
			cmd.Action = func(c *cli.Context) (err error) {
				cfg, ctx = nil, c
				cfg, err = commandConfig(c)
				return err
			}
		}
	}
	if err := app.Run(append([]string{"hsmagent", "serve"}, args...)); err != nil {
		t.Fatal(err)
	}
	return cfg, ctx
}

// run2 is runCLI without clearing the environment.
func run2(t *testing.T, args ...string) (int, string, string) {
	t.Helper()
	var out, errOut bytes.Buffer
	code := run(append([]string{"hsmagent"}, args...), &out, &errOut)
	return code, out.String(), errOut.String()
}

func TestVersionAndHelp(t *testing.T) {
	code, stdout, _ := runCLI(t, "--version")
	if code != 0 || !strings.Contains(stdout, "hsmagent version") {
		t.Errorf("--version: exit %d %q", code, stdout)
	}
	code, stdout, _ = runCLI(t, "serve", "--help")
	if code != 0 || !strings.Contains(stdout, "--socket") {
		t.Errorf("serve --help: exit %d %q", code, stdout)
	}
}

func TestHSMLimitsValidated(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "s.sock")
	for _, args := range [][]string{
		{"--max-sessions", "0"},
		{"--max-waiting", "-1"},
		{"--hsm-timeout", "0s"},
	} {
		code, _, stderr := runCLI(t, append([]string{"serve", "--socket", sock}, args...)...)
		// The error names the flag that is wrong, and only that one.
		if code != 2 || !strings.Contains(stderr, args[0]+" "+args[1]+": must be") || strings.Count(stderr, "--") != 1 {
			t.Errorf("%v: exit %d %q", args, code, stderr)
		}
	}
	path := writeConfig(t, "socket: "+sock+"\nhsm_timeout: soon\n")
	if _, _, stderr := runCLI(t, "serve", "--config", path); !strings.Contains(stderr, `config setting "hsm_timeout"`) || !strings.Contains(stderr, "line 2") {
		t.Errorf("bad hsm_timeout in the file: %q", stderr)
	}
}

// TestRequiredFlagsMarked: a flag without which the command refuses to run
// says so in its help.
func TestRequiredFlagsMarked(t *testing.T) {
	for _, tt := range []struct {
		args  []string
		flags []string
	}{
		{[]string{"cert", "import", "--help"}, []string{"--cert", "--key"}},
		{[]string{"keys", "generate", "--help"}, []string{"--label"}},
		{[]string{"bench", "--help"}, []string{"--key"}},
		{[]string{"jwt", "sign", "--help"}, []string{"--key", "--kid", "--claims"}},
		{[]string{"proxy", "server", "--help"}, []string{"--backend", "--key", "--client-ca"}},
	} {
		_, stdout, _ := runCLI(t, tt.args...)
		for _, f := range tt.flags {
			line := ""
			for _, l := range strings.Split(stdout, "\n") {
				if strings.HasPrefix(strings.TrimSpace(l), f+" ") {
					line = l
					break
				}
			}
			if !strings.Contains(line, "required") {
				t.Errorf("%v: %s not marked required: %q", tt.args, f, line)
			}
		}
	}
}
