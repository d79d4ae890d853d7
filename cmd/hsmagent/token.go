package main

import (
	"errors"
	"fmt"
	"io"
	"os"
	"sync"

	"github.com/hsmagent/hsmagent/hsm"
	"github.com/urfave/cli/v2"
	"golang.org/x/term"
)

// tokenFlags select the module, the token and the PIN. There is no flag that
// takes the PIN itself: argv is readable by every user of the host.
func tokenFlags() []cli.Flag {
	return []cli.Flag{
		&cli.StringFlag{Name: "module", Usage: "PKCS#11 library `PATH` (default: SoftHSM where installed)", EnvVars: []string{"HSMAGENT_MODULE"}},
		&cli.StringFlag{Name: "token", Usage: "token `LABEL`", EnvVars: []string{"HSMAGENT_TOKEN"}},
		&cli.StringFlag{Name: "token-serial", Usage: "token `SERIAL` (instead of --token)", EnvVars: []string{"HSMAGENT_TOKEN_SERIAL"}},
		&cli.StringFlag{Name: "uri", Usage: "RFC 7512 PKCS#11 `URI` (token, object, module-path, pin-source)", EnvVars: []string{"HSMAGENT_URI"}},
		&cli.StringFlag{Name: "pin-file", Usage: "read the user PIN from `FILE` (else $HSMAGENT_PIN, the URI's pin-source, a systemd credential 'hsmagent-pin', or a prompt)", EnvVars: []string{"HSMAGENT_PIN_FILE"}},
		&cli.BoolFlag{Name: "allow-insecure-pin-file", Usage: "read a PIN file that group or others may read or write (refused otherwise), with a warning", EnvVars: []string{"HSMAGENT_ALLOW_INSECURE_PIN_FILE"}},
	}
}

// tokenSelection is what the token flags say, merged with the URI.
type tokenSelection struct {
	cfg    hsm.Config
	object string // key label named by the URI
	// warn says on stderr what withToken repaired (see repairTokenOwnership).
	warn func(format string, args ...any)
}

func selectToken(c *cli.Context) (tokenSelection, error) {
	sel := tokenSelection{warn: func(format string, args ...any) { warnf(c, format, args...) }}
	if s := c.String("uri"); s != "" {
		u, err := hsm.ParseURI(s)
		if err != nil {
			return sel, usageError{err}
		}
		sel.cfg, sel.object = u.Config, u.Object
		if u.PINFile != "" && c.Bool("allow-insecure-pin-file") {
			sel.cfg.PIN = insecurePINFile(c, u.PINFile)
		}
	}
	// A flag that names another token than the URI is a mistake, not an override.
	if v := c.String("token"); v != "" && sel.cfg.TokenLabel != "" && v != sel.cfg.TokenLabel {
		return sel, usagef("--token %q and --uri (token=%q) name different tokens; give one", v, sel.cfg.TokenLabel)
	}
	if v := c.String("token-serial"); v != "" && sel.cfg.TokenSerial != "" && v != sel.cfg.TokenSerial {
		return sel, usagef("--token-serial %q and --uri (serial=%q) name different tokens; give one", v, sel.cfg.TokenSerial)
	}
	if v := c.String("module"); v != "" {
		sel.cfg.ModulePath = v
	}
	if v := c.String("token"); v != "" {
		sel.cfg.TokenLabel = v
	}
	if v := c.String("token-serial"); v != "" {
		sel.cfg.TokenSerial = v
	}
	if sel.cfg.TokenLabel != "" && sel.cfg.TokenSerial != "" && c.IsSet("token") && c.IsSet("token-serial") {
		return sel, usagef("give --token or --token-serial, not both")
	}
	if sel.cfg.TokenLabel == "" && sel.cfg.TokenSerial == "" {
		return sel, usagef("no token selected: pass --token LABEL (see 'hsmagent tokens'), --token-serial or --uri")
	}
	sel.cfg.PIN = pinSource(c, sel.cfg.PIN)
	return sel, nil
}

// pinSource picks the PIN source in hsm's order (hsm.PINChoice), warning
// when an insecure PIN file is read because the operator allowed it.
func pinSource(c *cli.Context, fromURI hsm.PINSource) hsm.PINSource {
	choice := hsm.PINChoice{File: c.String("pin-file"), AllowInsecureFile: c.Bool("allow-insecure-pin-file"), FromURI: fromURI}
	if choice.File != "" && choice.AllowInsecureFile {
		return insecurePINFile(c, choice.File)
	}
	if term.IsTerminal(int(os.Stdin.Fd())) {
		choice.Prompt = promptPIN(c.App.ErrWriter)
	}
	return choice.Source()
}

// insecurePINFile reads path whatever its mode, and warns now if the mode
// would have been refused.
func insecurePINFile(c *cli.Context, path string) hsm.PINSource {
	var insecure *hsm.InsecurePINFileError
	if errors.As(hsm.CheckPINFile(path), &insecure) {
		warnf(c, "PIN file %q has mode %04o, open to group or others; reading it because of --allow-insecure-pin-file: run chmod 600 %s",
			path, uint32(insecure.Mode), path)
	}
	return hsm.PINFromFileInsecure(path)
}

// promptPIN asks once and keeps the answer in memory, so a reopen after a
// lost session does not prompt again.
func promptPIN(w io.Writer) hsm.PINSource {
	var once sync.Once
	var pin string
	var err error
	return func() (string, error) {
		once.Do(func() {
			fmt.Fprint(w, "Token user PIN: ")
			var b []byte
			b, err = term.ReadPassword(int(os.Stdin.Fd()))
			fmt.Fprintln(w)
			if err != nil {
				err = fmt.Errorf("reading PIN: %w", err)
				return
			}
			pin = string(b)
			if pin == "" {
				err = errors.New("empty PIN")
			}
		})
		return pin, err
	}
}

// keyLabel reads the key label from flag name, or from the URI's object.
func keyLabel(c *cli.Context, flag string, sel tokenSelection) (string, error) {
	if v := c.String(flag); v != "" {
		return v, checkLabel(flag, v)
	}
	if sel.object != "" {
		return sel.object, checkLabel("uri", sel.object)
	}
	return "", usagef("missing --%s LABEL (see 'hsmagent keys list')", flag)
}

// withToken opens the token the flags selected, runs fn with it and closes
// it: the commands' one way to the HSM. Checks of flags that need no PIN come
// before it, so that a mistake never costs a PIN prompt or a login. Run as
// root, it then gives the SoftHSM files it wrote to the token's owner, even
// when fn failed halfway (see ownership.go).
func withToken(sel tokenSelection, fn func(*hsm.Token) error) (err error) {
	defer func() {
		warn := sel.warn
		if warn == nil {
			warn = func(string, ...any) {}
		}
		if rerr := repairTokenOwnership(sel.cfg.ModulePath, warn); rerr != nil {
			err = errors.Join(err, rerr)
		}
	}()
	tok, err := hsm.Open(sel.cfg)
	if err != nil {
		return err
	}
	defer tok.Close()
	return fn(tok)
}
