package main

import (
	"regexp"
	"strings"
	"unicode"
	"unicode/utf8"

	"github.com/hsmagent/hsmagent/agent/server"
	"github.com/urfave/cli/v2"
)

// helpArgs turns 'hsmagent help CMD [SUBCMD...]' into 'hsmagent CMD
// [SUBCMD...] --help', so help works at any depth (urfave/cli's own help
// command only looks one level down).
func helpArgs(args []string) []string {
	if len(args) < 2 || args[1] != "help" {
		return args
	}
	out := append([]string{args[0]}, args[2:]...)
	return append(out, "--help")
}

// unknownCommand is the error for a command name that is not one of cmds,
// with the nearest name when one is close enough to be a typo.
func unknownCommand(ctx *cli.Context, name string) error {
	parent := "hsmagent"
	var cmds []*cli.Command
	if path := commandPath(ctx); path != "hsmagent" {
		parent = path
		cmds = ctx.Command.Subcommands
	} else {
		cmds = ctx.App.Commands
	}
	var names []string
	for _, c := range cmds {
		if !c.Hidden {
			names = append(names, c.Names()...)
		}
	}
	if near := nearest(name, names); near != "" {
		return usagef("unknown command %q: did you mean %q? run '%s --help'", name, near, parent)
	}
	return usagef("unknown command %q; run '%s --help'", name, parent)
}

// nearest returns the candidate closest to s by edit distance (a swap of
// two neighbouring letters counts as one edit), or "" if none is within
// two edits and closer than s is long.
func nearest(s string, candidates []string) string {
	best, bestD := "", 3
	for _, c := range candidates {
		if d := editDistance(s, c); d < bestD && d < len(s) {
			best, bestD = c, d
		}
	}
	return best
}

// editDistance is the optimal string alignment distance of a and b.
func editDistance(a, b string) int {
	ra, rb := []rune(a), []rune(b)
	d := make([][]int, len(ra)+1)
	for i := range d {
		d[i] = make([]int, len(rb)+1)
		d[i][0] = i
	}
	for j := range d[0] {
		d[0][j] = j
	}
	for i := 1; i <= len(ra); i++ {
		for j := 1; j <= len(rb); j++ {
			cost := 1
			if ra[i-1] == rb[j-1] {
				cost = 0
			}
			d[i][j] = min(d[i-1][j]+1, d[i][j-1]+1, d[i-1][j-1]+cost)
			if i > 1 && j > 1 && ra[i-1] == rb[j-2] && ra[i-2] == rb[j-1] {
				d[i][j] = min(d[i][j], d[i-2][j-2]+1)
			}
		}
	}
	return d[len(ra)][len(rb)]
}

// Go's flag package names a flag "-name" whatever the user typed.
var flagInError = regexp.MustCompile(`(flag provided but not defined: |flag needs an argument: |for flag |for )--?([^\s:=-][^\s:=]*)`)

// flagsAsTyped rewrites a flag error to name the flag as the user typed it
// (--frobnicate, not -frobnicate); one not found in args gets "--".
func flagsAsTyped(msg string, args []string) string {
	return flagInError.ReplaceAllStringFunc(msg, func(m string) string {
		sub := flagInError.FindStringSubmatch(m)
		prefix, name := sub[1], sub[2]
		typed := "--" + name
		for _, a := range args {
			if n, _, _ := strings.Cut(strings.TrimLeft(a, "-"), "="); n == name && strings.HasPrefix(a, "-") {
				typed, _, _ = strings.Cut(a, "=")
				break
			}
		}
		if prefix == "flag provided but not defined: " {
			return "unknown flag " + typed
		}
		return prefix + typed
	})
}

// labelFlags take a key label.
var labelFlags = []string{"label", "key", "jwt-key", "oauth-key"}

// checkLabel refuses a label the agent would refuse or that would garble
// a terminal or a log: empty is left to the command.
func checkLabel(flag, label string) error {
	const maxShown = 40
	shown := label
	if len(shown) > maxShown {
		cut := maxShown
		for cut > 0 && !utf8.RuneStart(shown[cut]) {
			cut--
		}
		shown = shown[:cut] + "..."
	}
	if len(label) > server.MaxLabel {
		return usagef("--%s %q is %d bytes; a key label is at most %d", flag, shown, len(label), server.MaxLabel)
	}
	if !utf8.ValidString(label) {
		return usagef("--%s %q is not valid UTF-8", flag, shown)
	}
	for _, r := range label {
		if !unicode.IsPrint(r) {
			return usagef("--%s %q holds a control or non-printable character %q", flag, shown, r)
		}
	}
	return nil
}

// checkCommandLine is every command's Before hook: it refuses what
// urfave/cli would silently ignore (extra arguments) and labels that
// cannot be right, before any token is opened or agent dialled.
func checkCommandLine(c *cli.Context) error {
	cmd := c.Command
	// "help" alone is urfave/cli's help subcommand, there on every command.
	if !hasSubcommands(cmd) && cmd.ArgsUsage == "" && c.NArg() > 0 && (c.NArg() > 1 || c.Args().First() != "help") {
		path := commandPath(c)
		return usagef("'%s' takes no arguments, got %q; run '%s --help'", path, c.Args().First(), path)
	}
	for _, name := range labelFlags {
		if hasFlag(c, name) && c.IsSet(name) {
			if err := checkLabel(name, c.String(name)); err != nil {
				return err
			}
		}
	}
	return nil
}

// hasSubcommands ignores the help subcommand urfave/cli adds to every command.
func hasSubcommands(cmd *cli.Command) bool {
	for _, sub := range cmd.Subcommands {
		if sub.Name != "help" {
			return true
		}
	}
	return false
}

// commandPath names the command c runs, from the root: "hsmagent keys list".
func commandPath(c *cli.Context) string {
	var names []string
	for _, ctx := range c.Lineage() {
		if ctx.Command != nil && ctx.Command.Name != "" && ctx.Command.Name != c.App.Name {
			names = append([]string{ctx.Command.Name}, names...)
		}
	}
	return strings.Join(append([]string{"hsmagent"}, names...), " ")
}
