package main

import (
	"fmt"
	"log/slog"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/urfave/cli/v2"
)

// A setting is one entry of the config file with the typed field it fills
// and the flag that overrides it (and, through the flag, its HSMAGENT_*
// environment variable). Its flag is its key with dashes unless flag says
// otherwise: max_sessions is --max-sessions. A setting with usage declares
// its flag, whose environment variable is then named after the key
// (HSMAGENT_MAX_SESSIONS) and whose default is the value's; without usage,
// the command declares it (tokenFlags, socketFlag, the D1 commands).
type setting struct {
	key   string // in the file, within its mapping: "kid" in d1.PPR.jwt
	flag  string // "" for the key with dashes
	usage string // the flag's help, when the setting declares its flag
	val   value
	// serveOnly: other commands have a flag of that name that means
	// something else (the proxies' metrics-listen is in their d1 section).
	serveOnly bool
}

func (s setting) flagName() string {
	if s.flag != "" {
		return s.flag
	}
	return strings.ReplaceAll(s.key, "_", "-")
}

// flagsOf are the flags the settings declare, in their order.
func flagsOf(settings []setting) []cli.Flag {
	var flags []cli.Flag
	for _, s := range settings {
		if s.usage != "" {
			name := s.flagName()
			env := []string{"HSMAGENT_" + strings.ToUpper(s.key)}
			flags = append(flags, s.val.flag(name, s.usage, env))
		}
	}
	return flags
}

// A value is the typed field of one setting. set takes the file's text,
// read the flag's value (the user's or the flag's default); both refuse
// what the setting cannot take with a *badValue.
type value interface {
	set(text string) error
	read(c *cli.Context, flag string) error
	// String is the value as its flag takes it, for the code that reads
	// the flag rather than the config (fillFlag).
	String() string
	takes() string // what the file must give it, for a list or mapping in its place
	flag(name, usage string, env []string) cli.Flag
}

// badValue is a value a setting cannot take: as given, then why, as
// `"soon" is not a duration...` or `0: must be at least 1`. The flag's error
// puts --flag before it, the file's the setting and its line.
type badValue struct {
	given string
	why   string
}

func (e *badValue) Error() string { return e.given + e.why }

// Why a value was refused; explainFlagError says the same of the flags the
// CLI library parses.
const (
	notWholeNumber = " is not a whole number"
	notDuration    = " is not a duration; use e.g. 3s, 500ms or 5m"
	notBool        = " is not true or false"
)

// text is a string, taken as written.
type text struct{ p *string }

func (v text) set(s string) error { *v.p = s; return nil }
func (v text) read(c *cli.Context, flag string) error {
	*v.p = c.String(flag)
	return nil
}
func (v text) String() string { return *v.p }
func (text) takes() string    { return "a string" }
func (v text) flag(name, usage string, env []string) cli.Flag {
	return &cli.StringFlag{Name: name, Usage: usage, EnvVars: env}
}

// count is a whole number of at least 1, in the file as in a flag.
type count struct {
	p   *int
	def int
}

func (v count) set(s string) error {
	n, err := strconv.ParseInt(s, 0, strconv.IntSize) // as the flag parses it
	if err != nil {
		return &badValue{strconv.Quote(s), notWholeNumber}
	}
	return v.check(int(n))
}
func (v count) read(c *cli.Context, flag string) error { return v.check(c.Int(flag)) }
func (v count) check(n int) error {
	if n < 1 {
		return &badValue{strconv.Itoa(n), ": must be at least 1"}
	}
	*v.p = n
	return nil
}
func (v count) String() string { return strconv.Itoa(*v.p) }
func (count) takes() string    { return "a whole number" }
func (v count) flag(name, usage string, env []string) cli.Flag {
	return &cli.IntFlag{Name: name, Usage: usage, Value: v.def, EnvVars: env}
}

// duration is a time.Duration such as 3s; a positive one unless anyLength.
type duration struct {
	p         *time.Duration
	def       time.Duration
	anyLength bool
}

// positive is a duration that must be more than zero: a timeout.
func positive(p *time.Duration, def time.Duration) duration { return duration{p: p, def: def} }

func (v duration) set(s string) error {
	d, err := time.ParseDuration(s)
	if err != nil {
		return &badValue{strconv.Quote(s), notDuration}
	}
	return v.check(d)
}
func (v duration) read(c *cli.Context, flag string) error { return v.check(c.Duration(flag)) }
func (v duration) check(d time.Duration) error {
	if d <= 0 && !v.anyLength {
		return &badValue{d.String(), ": must be positive"}
	}
	*v.p = d
	return nil
}
func (v duration) String() string { return v.p.String() }
func (duration) takes() string    { return "a duration" }
func (v duration) flag(name, usage string, env []string) cli.Flag {
	return &cli.DurationFlag{Name: name, Usage: usage, Value: v.def, EnvVars: env}
}

// toggle is true or false (or what strconv.ParseBool takes, as the flag).
type toggle struct{ p *bool }

func (v toggle) set(s string) error {
	b, err := strconv.ParseBool(s)
	if err != nil {
		return &badValue{strconv.Quote(s), notBool}
	}
	*v.p = b
	return nil
}
func (v toggle) read(c *cli.Context, flag string) error {
	*v.p = c.Bool(flag)
	return nil
}
func (v toggle) String() string { return strconv.FormatBool(*v.p) }
func (toggle) takes() string    { return "true or false" }
func (v toggle) flag(name, usage string, env []string) cli.Flag {
	return &cli.BoolFlag{Name: name, Usage: usage, EnvVars: env}
}

// fileMode is a file's permission bits in octal, such as 0660 (in the file
// quoted or not: the reader takes a value as written).
type fileMode struct {
	p   *os.FileMode
	def os.FileMode
}

func (v fileMode) set(s string) error {
	m, err := strconv.ParseUint(s, 8, 32)
	if err != nil || m > 0o777 {
		return &badValue{strconv.Quote(s), " is not an octal file mode such as 0660"}
	}
	*v.p = os.FileMode(m)
	return nil
}
func (v fileMode) read(c *cli.Context, flag string) error { return v.set(c.String(flag)) }
func (v fileMode) String() string                         { return fmt.Sprintf("%04o", uint32(*v.p)) }
func (fileMode) takes() string                            { return "an octal file mode" }
func (v fileMode) flag(name, usage string, env []string) cli.Flag {
	return &cli.StringFlag{Name: name, Usage: usage, Value: fmt.Sprintf("%04o", uint32(v.def)), EnvVars: env}
}

// logLevel is debug, info, warn or error; info by default.
type logLevel struct{ p *slog.Level }

func (v logLevel) set(s string) error {
	if err := v.p.UnmarshalText([]byte(s)); err != nil {
		return &badValue{strconv.Quote(s), ": use debug, info, warn or error"}
	}
	return nil
}
func (v logLevel) read(c *cli.Context, flag string) error { return v.set(c.String(flag)) }
func (v logLevel) String() string                         { return strings.ToLower(v.p.String()) }
func (logLevel) takes() string                            { return "a log level" }
func (v logLevel) flag(name, usage string, env []string) cli.Flag {
	return &cli.StringFlag{Name: name, Usage: usage, Value: "info", EnvVars: env}
}

// logFormat is text or json; text by default.
type logFormat struct{ p *string }

func (v logFormat) set(s string) error {
	if s != "text" && s != "json" {
		return &badValue{strconv.Quote(s), ": use text or json"}
	}
	*v.p = s
	return nil
}
func (v logFormat) read(c *cli.Context, flag string) error { return v.set(c.String(flag)) }
func (v logFormat) String() string                         { return *v.p }
func (logFormat) takes() string                            { return "a log format" }
func (v logFormat) flag(name, usage string, env []string) cli.Flag {
	return &cli.StringFlag{Name: name, Usage: usage, Value: "text", EnvVars: env}
}
