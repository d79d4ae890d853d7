package main

import (
	"fmt"
	"regexp"
	"slices"
	"strings"

	"github.com/urfave/cli/v2"
)

// manPage renders the man page (roff, section 1) from the CLI definition: a
// synopsis line per command, and per command its usage, description,
// examples and options with their environment variables. (urfave/cli's own
// page leaves out the descriptions and the examples.)
func manPage(app *cli.App) string {
	var b strings.Builder
	fmt.Fprintf(&b, ".TH HSMAGENT 1 \"\" \"hsmagent %s\" \"User Commands\"\n", roffQuoted(app.Version))
	fmt.Fprintf(&b, ".SH NAME\nhsmagent \\- %s\n", roffText(app.Usage))
	b.WriteString(".SH SYNOPSIS\n.nf\n")
	for _, path := range manCommands(app.Commands, "") {
		if len(visibleSubcommands(path.cmd)) == 0 { // a group's line would only say "command"
			fmt.Fprintf(&b, "\\fBhsmagent %s\\fR%s\n", roffText(path.name), roffText(synopsisArgs(path.cmd)))
		}
	}
	b.WriteString(".fi\n.SH DESCRIPTION\n")
	b.WriteString(roffParagraphs(docDescription))
	b.WriteString(".SH COMMANDS\n")
	for _, path := range manCommands(app.Commands, "") {
		fmt.Fprintf(&b, ".SS \"hsmagent %s\"\n", roffQuoted(path.name))
		b.WriteString(roffText(path.cmd.Usage) + "\n")
		if path.cmd.Description != "" {
			b.WriteString(".PP\n" + roffParagraphs(path.cmd.Description))
		}
		if subs := visibleSubcommands(path.cmd); len(subs) > 0 {
			var names []string
			for _, sub := range subs {
				names = append(names, "\\fB"+roffText(path.name+" "+sub.Name)+"\\fR")
			}
			b.WriteString(".PP\nSubcommands: " + strings.Join(names, ", ") + ".\n")
		}
		flags := visibleFlags(path.cmd.Flags)
		if len(flags) == 0 {
			continue
		}
		b.WriteString(".PP\nOptions:\n")
		for _, f := range flags {
			b.WriteString(manFlag(f))
		}
	}
	return b.String() + manFooter
}

type manEntry struct {
	name string
	cmd  *cli.Command
}

func visibleSubcommands(c *cli.Command) []*cli.Command {
	var out []*cli.Command
	for _, sub := range c.Subcommands {
		if !sub.Hidden && sub.Name != "help" { // urfave/cli adds help commands while it runs
			out = append(out, sub)
		}
	}
	return out
}

// manCommands lists the visible commands depth first, each with its path
// below hsmagent.
func manCommands(cmds []*cli.Command, prefix string) []manEntry {
	var out []manEntry
	for _, c := range cmds {
		if c.Hidden || c.Name == "help" { // urfave/cli adds help commands while it runs
			continue
		}
		path := strings.TrimSpace(prefix + " " + c.Name)
		out = append(out, manEntry{path, c})
		out = append(out, manCommands(c.Subcommands, path)...)
	}
	return out
}

func synopsisArgs(c *cli.Command) string {
	s := ""
	if len(visibleFlags(c.Flags)) > 0 {
		s = " [options]"
	}
	if c.ArgsUsage != "" {
		s += " " + c.ArgsUsage
	}
	return s
}

func visibleFlags(flags []cli.Flag) []cli.DocGenerationFlag {
	var out []cli.DocGenerationFlag
	for _, f := range flags {
		if v, ok := f.(cli.VisibleFlag); ok && !v.IsVisible() || slices.Contains(f.Names(), "help") {
			continue
		}
		if d, ok := f.(cli.DocGenerationFlag); ok {
			out = append(out, d)
		}
	}
	return out
}

var placeholder = regexp.MustCompile("`([^`]*)`")

// manFlag is one option as a tagged paragraph: its names and value
// placeholder, its usage, default and environment variables.
func manFlag(f cli.DocGenerationFlag) string {
	usage := f.GetUsage()
	value := ""
	if m := placeholder.FindStringSubmatch(usage); m != nil {
		value = m[1]
	}
	usage = placeholder.ReplaceAllString(usage, "$1")
	if f.TakesValue() && value == "" {
		value = "VALUE"
	}
	var names []string
	for _, n := range f.Names() {
		dash := "\\-"
		if len(n) > 1 {
			dash = "\\-\\-"
		}
		names = append(names, "\\fB"+dash+roffText(n)+"\\fR")
	}
	tag := strings.Join(names, ", ")
	if f.TakesValue() {
		tag += " \\fI" + roffText(value) + "\\fR"
	}
	text := usage
	if d := f.GetDefaultText(); f.TakesValue() && d != "" && d != `""` && d != "[]" {
		text += " (default: " + strings.Trim(d, `"`) + ")"
	}
	if env := f.GetEnvVars(); len(env) > 0 {
		text += "; environment: " + strings.Join(env, ", ")
	}
	return ".TP\n" + tag + "\n" + roffText(text) + "\n"
}

// roffParagraphs renders plain text: paragraphs on blank lines, indented
// lines (examples, tables) kept as they are, "Examples:" blocks verbatim.
func roffParagraphs(s string) string {
	var b strings.Builder
	for i, para := range strings.Split(strings.TrimSpace(s), "\n\n") {
		if i > 0 {
			b.WriteString(".PP\n")
		}
		lines := strings.Split(para, "\n")
		for j := 0; j < len(lines); {
			if !strings.HasPrefix(lines[j], " ") {
				b.WriteString(roffText(emphasis(lines[j])) + "\n")
				j++
				continue
			}
			b.WriteString(".RS 4\n.nf\n")
			for ; j < len(lines) && strings.HasPrefix(lines[j], " "); j++ {
				b.WriteString(roffText(strings.TrimSpace(lines[j])) + "\n")
			}
			b.WriteString(".fi\n.RE\n")
		}
	}
	return b.String()
}

var bold = regexp.MustCompile(`\*\*([^*]+)\*\*`)

// emphasis turns **word** into bold; roffText keeps the escapes it adds.
func emphasis(s string) string {
	return bold.ReplaceAllString(s, "\x00B$1\x00R")
}

// roffText escapes backslashes, hyphens and a leading dot or quote.
func roffText(s string) string {
	s = strings.ReplaceAll(s, `\`, `\e`)
	s = strings.ReplaceAll(s, "-", `\-`)
	s = strings.ReplaceAll(s, "\x00B", `\fB`)
	s = strings.ReplaceAll(s, "\x00R", `\fR`)
	if strings.HasPrefix(s, ".") || strings.HasPrefix(s, "'") {
		s = `\&` + s
	}
	return s
}

func roffQuoted(s string) string {
	return strings.ReplaceAll(roffText(s), `"`, `\(dq`)
}
