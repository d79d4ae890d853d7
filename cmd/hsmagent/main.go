// Command hsmagent manages keys in a PKCS#11 token, serves signatures made
// with them over a Unix socket, and connects mTLS peers whose keys live there.
package main

import (
	"errors"
	"fmt"
	"io"
	"os"
	"regexp"
	"slices"
	"strings"

	"github.com/urfave/cli/v2"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

// usageError marks an error in how the command was called: exit status 2.
type usageError struct{ err error }

func (u usageError) Error() string { return u.err.Error() }
func (u usageError) Unwrap() error { return u.err }

// exitError asks run for a given exit status: 'status' documents its own.
type exitError struct {
	code int
	err  error
}

func (e exitError) Error() string { return e.err.Error() }
func (e exitError) Unwrap() error { return e.err }

func usagef(format string, args ...any) error {
	return usageError{fmt.Errorf(format, args...)}
}

func newApp(stdout, stderr io.Writer) *cli.App {
	return &cli.App{
		Name:      "hsmagent",
		Usage:     "keys in an HSM, signatures over a Unix socket, mTLS for Thales D1",
		Version:   version,
		Writer:    stdout,
		ErrWriter: stderr,
		Commands: withUsageErrors(withExamples([]*cli.Command{
			tokensCommand(),
			keysCommand(),
			csrCommand(),
			certCommand(),
			serveCommand(),
			statusCommand(),
			doctorCommand(),
			benchCommand(),
			proxyCommand(),
			d1Command(),
			jwtCommand(),
			auditCommand(),
			completionCommand(),
			manCommand(),
		}, "")),
		OnUsageError: func(c *cli.Context, err error, _ bool) error {
			return usageError{explainFlagError(c, err)}
		},
		// Errors are printed once, by main, on one line.
		ExitErrHandler:  func(*cli.Context, error) {},
		HideHelpCommand: true,
		// Candidates for the completion scripts of 'hsmagent completion'.
		EnableBashCompletion: true,
	}
}

func main() {
	if len(os.Args) == 2 && os.Args[1] == workerCommand {
		os.Exit(runHSMWorker()) // started by serve: no CLI, fd 3 is the agent
	}
	if len(os.Args) == 4 && os.Args[1] == floorPeerCommand {
		os.Exit(runFloorPeer(os.Args[2], os.Args[3])) // started by bench: fds 3 and 4
	}
	os.Exit(run(os.Args, os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	app := newApp(stdout, stderr)
	var unknown error
	app.CommandNotFound = func(c *cli.Context, name string) {
		unknown = unknownCommand(c, name)
	}
	err := app.Run(helpArgs(args))
	if err == nil {
		err = unknown
	}
	if err == nil {
		return 0
	}
	msg := strings.ReplaceAll(err.Error(), "\n", " ")
	var u usageError
	if errors.As(err, &u) {
		msg = flagsAsTyped(msg, args)
	}
	if !strings.HasPrefix(msg, "hsmagent:") {
		msg = "hsmagent: " + msg
	}
	fmt.Fprintln(stderr, msg)
	var ee exitError
	if errors.As(err, &ee) {
		return ee.code
	}
	if errors.As(err, &u) {
		return 2
	}
	return 1
}

// badFlagValue is how the CLI library reports a value it could not parse.
var badFlagValue = regexp.MustCompile(`^invalid value "(.*)" for flag -{1,2}([a-z0-9-]+): parse error$`)

// undefinedFlag is how the CLI library reports a flag the command does not have.
var undefinedFlag = regexp.MustCompile(`^flag provided but not defined: -{1,2}([^\s=]+)$`)

// explainFlagError names the nearest flag for a misspelt one, and replaces
// the CLI library's "parse error" with what the flag takes, as the config
// file's errors do.
func explainFlagError(c *cli.Context, err error) error {
	var flags []cli.Flag
	if c.Command != nil {
		flags = c.Command.Flags
	}
	flags = append(flags, c.App.Flags...)
	if u := undefinedFlag.FindStringSubmatch(err.Error()); u != nil {
		var names []string
		for _, f := range flags {
			names = append(names, f.Names()...)
		}
		if near := nearest(u[1], names); near != "" {
			return fmt.Errorf("%w: did you mean --%s?", err, near)
		}
		return err
	}
	m := badFlagValue.FindStringSubmatch(err.Error())
	if m == nil {
		return err
	}
	for _, f := range flags {
		if !slices.Contains(f.Names(), m[2]) {
			continue
		}
		switch f.(type) {
		case *cli.DurationFlag:
			return fmt.Errorf("--%s: %q%s", m[2], m[1], notDuration)
		case *cli.IntFlag, *cli.UintFlag, *cli.Int64Flag:
			return fmt.Errorf("--%s: %q%s", m[2], m[1], notWholeNumber)
		}
	}
	return err
}

// withUsageErrors wraps every command's OnUsageError so flag errors exit 2,
// and checks every command line before the command runs (checkCommandLine).
func withUsageErrors(cmds []*cli.Command) []*cli.Command {
	for _, c := range cmds {
		c.OnUsageError = func(c *cli.Context, err error, _ bool) error { return usageError{explainFlagError(c, err)} }
		c.Before = chainBefore(checkCommandLine, c.Before)
		withUsageErrors(c.Subcommands)
	}
	return cmds
}

func chainBefore(first, then cli.BeforeFunc) cli.BeforeFunc {
	if then == nil {
		return first
	}
	return func(c *cli.Context) error {
		if err := first(c); err != nil {
			return err
		}
		return then(c)
	}
}
