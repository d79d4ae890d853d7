package main

import (
	"io"
	"reflect"
	"strings"
	"testing"

	"github.com/urfave/cli/v2"
)

// TestSettingsHaveTheirFlags: every setting merged into a command names a
// flag the command has, of the type its value reads (a misspelt flag name
// in a row would leave the setting to the file for good).
func TestSettingsHaveTheirFlags(t *testing.T) {
	cfg, sec := new(config), new(d1Section)
	for _, tt := range []struct {
		command  string
		settings []setting
	}{
		{"serve", cfg.settings()},
		{"doctor", cfg.tokenSettings()},
		{"proxy client", append(sec.settings(), sec.JWT.settings()...)},
		{"proxy server", sec.Server.settings()},
		{"d1 token", sec.JWT.settings()},
	} {
		cmd := findCommand(t, strings.Fields(tt.command))
		for _, s := range tt.settings {
			name := s.flagName()
			var found cli.Flag
			for _, f := range cmd.Flags {
				if f.Names()[0] == name {
					found = f
				}
			}
			if found == nil {
				t.Errorf("%s: setting %q has no flag --%s", tt.command, s.key, name)
				continue
			}
			if want := s.val.flag(name, "", nil); reflect.TypeOf(found) != reflect.TypeOf(want) {
				t.Errorf("%s: --%s is a %T, setting %q reads a %T", tt.command, name, found, s.key, want)
			}
		}
	}
}

// TestSettingsFlagsAndEnvironment: a setting that declares its flag names
// its flag and environment variable after its key.
func TestSettingsFlagsAndEnvironment(t *testing.T) {
	for _, f := range flagsOf(new(config).settings()) {
		name := f.Names()[0]
		env := f.(interface{ GetEnvVars() []string }).GetEnvVars()
		if want := "HSMAGENT_" + strings.ToUpper(strings.ReplaceAll(name, "-", "_")); len(env) != 1 || env[0] != want {
			t.Errorf("--%s: environment %v, want %s", name, env, want)
		}
	}
}

func findCommand(t *testing.T, path []string) *cli.Command {
	t.Helper()
	cmds := newApp(io.Discard, io.Discard).Commands
	var found *cli.Command
	for _, name := range path {
		found = nil
		for _, c := range cmds {
			if c.Name == name {
				found = c
			}
		}
		if found == nil {
			t.Fatalf("no command %v", path)
		}
		cmds = found.Subcommands
	}
	return found
}

// TestMergeKeys: a D1 section may take another's settings with YAML's
// merge key and override some of them; a mapping given again is merged
// into what it had, as the YAML library decodes one into a struct.
func TestMergeKeys(t *testing.T) {
	path := writeConfig(t, "d1:\n  PPR: &ppr\n    key: k\n    jwt: {kid: a, aud: x}\n  PRD:\n    <<: *ppr\n    jwt: {kid: b}\n")
	cfg, err := loadConfig(path)
	if err != nil {
		t.Fatal(err)
	}
	if prd := cfg.D1["PRD"]; prd.Key != "k" || prd.JWT.Kid != "b" || prd.JWT.Aud != "x" {
		t.Errorf("PRD = %+v; want PPR's key and aud, and its own kid", prd)
	}
	if got := cfg.lineOf("d1.PRD.jwt.kid"); !strings.HasSuffix(got, " line 7)") {
		t.Errorf("d1.PRD.jwt.kid is at%s, want line 7", got)
	}
}

// TestFileValues: numbers quoted or not, an octal mode as written, and an
// empty value leaving the setting to its flag.
func TestFileValues(t *testing.T) {
	path := writeConfig(t, "max_sessions: \"12\"\nmax_waiting: 34\nsocket_mode: 0640\nlog_level: WARN\nsocket_group: \"\"\naudit_log:\n")
	cfg, err := loadConfig(path)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Server.MaxInFlight != 12 || cfg.Server.MaxWaiting != 34 || cfg.SocketMode != 0o640 || cfg.LogLevel.String() != "WARN" {
		t.Errorf("got %d %d %o %v", cfg.Server.MaxInFlight, cfg.Server.MaxWaiting, cfg.SocketMode, cfg.LogLevel)
	}
	for _, key := range []string{"socket_group", "audit_log"} {
		if cfg.pos[key].set {
			t.Errorf("%s: empty, yet it would override its flag", key)
		}
	}
}
