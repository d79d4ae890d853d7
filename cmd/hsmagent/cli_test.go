package main

import (
	"bytes"
	"strings"
	"testing"

	"github.com/urfave/cli/v2"
)

// commandPaths lists every command below hsmagent as its path of names.
func commandPaths(cmds []*cli.Command, prefix []string) [][]string {
	var out [][]string
	for _, c := range cmds {
		if c.Name == "help" {
			continue
		}
		path := append(append([]string(nil), prefix...), c.Name)
		out = append(out, path)
		out = append(out, commandPaths(c.Subcommands, path)...)
	}
	return out
}

// TestHelpAtEveryLevel: 'hsmagent help CMD...' and 'CMD... --help' show the
// command's own help, with examples that use only the command's flags.
func TestHelpAtEveryLevel(t *testing.T) {
	app := newApp(nil, nil)
	byPath := map[string]*cli.Command{}
	var walk func([]*cli.Command, string)
	walk = func(cmds []*cli.Command, prefix string) {
		for _, c := range cmds {
			p := strings.TrimSpace(prefix + " " + c.Name)
			byPath[p] = c
			walk(c.Subcommands, p)
		}
	}
	walk(app.Commands, "")
	for _, path := range commandPaths(app.Commands, nil) {
		name := strings.Join(path, " ")
		t.Run(name, func(t *testing.T) {
			for _, args := range [][]string{append([]string{"help"}, path...), append(append([]string(nil), path...), "--help")} {
				code, stdout, stderr := runCLI(t, args...)
				if code != 0 || stderr != "" || !strings.Contains(stdout, "hsmagent "+name+" - ") {
					t.Fatalf("%v: exit %d, stderr %q, stdout lacks the command's name:\n%s", args, code, stderr, stdout)
				}
				if !strings.Contains(stdout, "Examples:\n") {
					t.Errorf("%v: no examples:\n%s", args, stdout)
				}
			}
			for _, ex := range examples[name] {
				for _, word := range strings.Fields(ex) {
					if !strings.HasPrefix(word, "--") {
						continue
					}
					flag, _, _ := strings.Cut(strings.TrimPrefix(word, "--"), "=")
					if ex := exampleCommand(byPath, ex); ex != nil && !commandHasFlag(ex, flag) {
						t.Errorf("example %q: --%s is not a flag of the command", ex.Name, flag)
					}
				}
			}
		})
	}
	code, stdout, _ := runCLI(t, "help")
	if code != 0 || !strings.Contains(stdout, "COMMANDS:") {
		t.Errorf("help alone: exit %d\n%s", code, stdout)
	}
}

// exampleCommand finds the command an example line runs.
func exampleCommand(byPath map[string]*cli.Command, example string) *cli.Command {
	_, rest, ok := strings.Cut(example, "hsmagent ")
	if !ok {
		return nil
	}
	var path []string
	var found *cli.Command
	for _, w := range strings.Fields(rest) {
		path = append(path, w)
		c, ok := byPath[strings.Join(path, " ")]
		if !ok {
			break
		}
		found = c
	}
	return found
}

func commandHasFlag(c *cli.Command, name string) bool {
	for _, f := range c.Flags {
		for _, n := range f.Names() {
			if n == name {
				return true
			}
		}
	}
	return false
}

// TestCLIHelps: mistakes get one line that names what was typed and what
// to do, exit 2, before any token is opened or agent dialled.
func TestCLIHelps(t *testing.T) {
	long := strings.Repeat("k", 200)
	tests := []struct {
		name string
		args []string
		want string
	}{
		{"long flag as typed", []string{"serve", "--frobnicate"}, "unknown flag --frobnicate"},
		{"short flag as typed", []string{"serve", "-frobnicate"}, "unknown flag -frobnicate"},
		{"typo in a flag", []string{"keys", "generate", "--lable", "x"}, "unknown flag --lable: did you mean --label?"},
		{"typo in a flag with =", []string{"status", "--sockt=/run/x.sock"}, "unknown flag --sockt: did you mean --socket?"},
		{"nothing near a flag", []string{"serve", "--frobnicate"}, "unknown flag --frobnicate\n"},
		{"bad value names the flag", []string{"serve", "--max-sessions", "many"}, `--max-sessions: "many" is not a whole number`},
		{"bad value with =", []string{"serve", "--max-sessions=many"}, `--max-sessions: "many" is not a whole number`},
		{"bad duration says what one is", []string{"serve", "--hsm-timeout", "3 seconds"}, `--hsm-timeout: "3 seconds" is not a duration; use e.g. 3s`},
		{"worker bound within the HSM timeout", []string{"serve", "--socket", "/run/x.sock", "--hsm-timeout", "5s", "--hsm-kill-after", "5s"}, "--hsm-kill-after 5s must be longer than --hsm-timeout 5s"},
		{"audit signing key without a file", []string{"serve", "--socket", "/run/x.sock", "--audit-signing-key", "k", "--check-config"}, `--audit-signing-key "k" needs --audit-log FILE`},
		{"bad duration of a subcommand", []string{"bench", "--key", "k", "--duration=3x"}, `--duration: "3x" is not a duration`},
		{"missing value", []string{"status", "--socket"}, "flag needs an argument: --socket"},
		{"typo in a command", []string{"stauts"}, `unknown command "stauts": did you mean "status"? run 'hsmagent --help'`},
		{"typo in a subcommand", []string{"keys", "lsit"}, `did you mean "list"? run 'hsmagent keys --help'`},
		{"typo in a proxy", []string{"proxy", "clinet"}, `did you mean "client"?`},
		{"nothing near", []string{"frobnicate"}, `unknown command "frobnicate"; run 'hsmagent --help'`},
		{"help for an unknown command", []string{"help", "stauts"}, `did you mean "status"?`},
		{"extra argument", []string{"keys", "list", "--token", "t", "extra"}, `'hsmagent keys list' takes no arguments, got "extra"`},
		{"extra argument to status", []string{"status", "now"}, `'hsmagent status' takes no arguments, got "now"`},
		{"extra arguments to a proxy", []string{"proxy", "client", "a", "b"}, `'hsmagent proxy client' takes no arguments, got "a"`},
		{"label too long, cut", []string{"keys", "generate", "--token", "t", "--label", long}, `--label "` + long[:40] + `..." is 200 bytes; a key label is at most 128`},
		{"key too long", []string{"cert", "show", "--token", "t", "--key", long}, "--key"},
		{"jwt key with a control character", []string{"d1", "token", "--jwt-key", "a\tb"}, `--jwt-key "a\tb" holds a control or non-printable character`},
		{"label not UTF-8", []string{"keys", "delete", "--token", "t", "--label", "a\xffb"}, `--label "a\xffb" is not valid UTF-8`},
		{"label from the URI", []string{"keys", "delete", "--uri", "pkcs11:token=t;object=a%09b"}, "non-printable"},
		{"token against URI", []string{"keys", "list", "--token", "a", "--uri", "pkcs11:token=b"}, `--token "a" and --uri (token="b") name different tokens`},
		{"serial against URI", []string{"keys", "list", "--token-serial", "1", "--uri", "pkcs11:serial=2"}, `--token-serial "1" and --uri (serial="2")`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			code, _, stderr := runCLI(t, tt.args...)
			if code != 2 || !strings.Contains(stderr, tt.want) {
				t.Fatalf("exit %d, stderr %q; want exit 2 and %q", code, stderr, tt.want)
			}
			if !strings.HasPrefix(stderr, "hsmagent: ") || strings.Count(strings.TrimSpace(stderr), "\n") != 0 {
				t.Errorf("not one prefixed line: %q", stderr)
			}
		})
	}
	// The same token named twice is no conflict: the command goes on to need a PIN.
	if _, _, stderr := runCLI(t, "keys", "list", "--token", "a", "--uri", "pkcs11:token=a"); strings.Contains(stderr, "different tokens") {
		t.Errorf("same token refused: %q", stderr)
	}
	// "help" after a command is urfave/cli's help subcommand, not an extra argument.
	if code, stdout, _ := runCLI(t, "keys", "list", "help"); code != 0 || !strings.Contains(stdout, "hsmagent keys list - ") {
		t.Errorf("keys list help: exit %d\n%s", code, stdout)
	}
}

func TestNearest(t *testing.T) {
	names := []string{"tokens", "keys", "csr", "cert", "serve", "status", "proxy"}
	tests := []struct{ in, want string }{
		{"stauts", "status"}, // a swap is one edit
		{"serv", "serve"},
		{"sreve", "serve"},
		{"crt", "cert"},
		{"token", "tokens"},
		{"frobnicate", ""},
		{"x", ""}, // as far from everything as it is long
		{"proxxy", "proxy"},
	}
	for _, tt := range tests {
		if got := nearest(tt.in, names); got != tt.want {
			t.Errorf("nearest(%q) = %q, want %q", tt.in, got, tt.want)
		}
	}
}

// TestHelpListsEveryCommand: the top-level help names every command,
// completion and man included (they were hidden, and nobody found them).
func TestHelpListsEveryCommand(t *testing.T) {
	var out, errOut bytes.Buffer
	if code := run([]string{"hsmagent", "--help"}, &out, &errOut); code != 0 {
		t.Fatalf("hsmagent --help: exit %d\n%s", code, errOut.String())
	}
	for _, c := range newApp(nil, nil).Commands {
		if !strings.Contains(out.String(), "   "+c.Name+" ") {
			t.Errorf("hsmagent --help does not list %q:\n%s", c.Name, out.String())
		}
	}
}
