package main

import (
	"crypto"
	"crypto/x509"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/hsmagent/hsmagent/agent/d1"
	"github.com/hsmagent/hsmagent/hsm"
	"github.com/urfave/cli/v2"
)

// The checks doctor makes itself: the HSM, before any D1 rule applies.
const (
	moduleCheck d1.Check = "module"
	tokenCheck  d1.Check = "token"
	pinCheck    d1.Check = "pin"
)

// doctorSelection is the token the flags select, or nil when they select
// none: for doctor that is a finding, while a contradictory selection is
// still a usage error.
func doctorSelection(c *cli.Context) (*tokenSelection, error) {
	if c.String("token") == "" && c.String("token-serial") == "" && c.String("uri") == "" {
		return nil, nil
	}
	sel, err := selectToken(c)
	if err != nil {
		return nil, err
	}
	return &sel, nil
}

// openToken loads the module, finds the token and logs in. The token is
// nil after a failed check.
func openToken(c *cli.Context, sel *tokenSelection) (*hsm.Token, []d1.Finding) {
	module := doctorModule(c, sel)
	shown := module
	if shown == "" {
		shown = hsm.DefaultModulePath()
	}
	infos, err := hsm.ListTokens(module)
	if err != nil {
		return nil, []d1.Finding{{Check: moduleCheck, Status: d1.Fail, Message: err.Error(),
			Fix: "install the HSM vendor's PKCS#11 library and pass its path with --module (module: in the config)"}}
	}
	out := []d1.Finding{{Check: moduleCheck, Status: d1.Pass, Message: fmt.Sprintf("%s loads: %d token(s)", shown, len(infos))}}
	if sel == nil {
		return nil, append(out, d1.Finding{Check: tokenCheck, Status: d1.Fail, Message: "no token selected",
			Fix: "pass --token LABEL (see 'hsmagent tokens') or put token: in the config"})
	}
	info, found := findToken(infos, sel.cfg)
	if out = append(out, found); info == nil {
		return nil, out
	}
	tok, err := hsm.Open(sel.cfg)
	if err != nil {
		return nil, append(out, d1.Finding{Check: pinCheck, Status: d1.Fail, Message: err.Error(),
			Fix: "check the PIN source: --pin-file (pin_file:, mode 0600), $HSMAGENT_PIN or the systemd credential 'hsmagent-pin'"})
	}
	return tok, append(out, d1.Finding{Check: pinCheck, Status: d1.Pass, Message: fmt.Sprintf("logged in to %q", info.Label)})
}

// findToken looks for the selected token among those the module lists; it
// returns the token only when it can be logged in to.
func findToken(infos []hsm.TokenInfo, cfg hsm.Config) (*hsm.TokenInfo, d1.Finding) {
	var found *hsm.TokenInfo
	var present []string
	for i, info := range infos {
		if info.Initialized {
			present = append(present, strconv.Quote(info.Label))
		}
		if (cfg.TokenLabel != "" && info.Label == cfg.TokenLabel) || (cfg.TokenSerial != "" && info.Serial == cfg.TokenSerial) {
			found = &infos[i]
		}
	}
	name := cfg.TokenLabel
	if name == "" {
		name = "serial " + cfg.TokenSerial
	}
	problem := func(message, fix string) (*hsm.TokenInfo, d1.Finding) {
		return nil, d1.Finding{Check: tokenCheck, Status: d1.Fail, Message: message, Fix: fix}
	}
	switch {
	case found == nil:
		return problem(fmt.Sprintf("token %q not found; tokens present: %s", name, orNone(present)), "select a token that 'hsmagent tokens' lists, or plug in or initialise the HSM token")
	case !found.Initialized:
		return problem(fmt.Sprintf("token %q is not initialised", name), "initialise it with the HSM vendor's tools")
	case found.UserPINLocked:
		return problem(fmt.Sprintf("token %q has its user PIN locked", name), "unlock the user PIN with the security officer PIN (HSM vendor's tools)")
	}
	return found, d1.Finding{Check: tokenCheck, Status: d1.Pass, Message: fmt.Sprintf("%q (serial %s, %s)", found.Label, found.Serial, found.Model)}
}

// checkTokenKeys reads the token's keys and checks those of each D1
// environment. The keys are nil when they could not be read.
func checkTokenKeys(tok *hsm.Token, settings map[d1.Env]*d1.Settings, now time.Time) ([]*hsm.Key, []d1.Finding) {
	keys, err := tok.Keys()
	if err != nil {
		return nil, []d1.Finding{{Check: d1.KeysCheck, Status: d1.Fail, Message: err.Error(), Fix: "see the HSM's log; 'hsmagent keys list' shows the same error"}}
	}
	if keys == nil {
		keys = []*hsm.Key{} // read, and none there
	}
	facts := make([]d1.Key, len(keys))
	for i, k := range keys {
		facts[i] = tokenFact(k)
	}
	return keys, d1.CheckKeys(facts, settings, hsmChains{}, now)
}

// doctorModule is the module doctor loaded.
func doctorModule(c *cli.Context, sel *tokenSelection) string {
	if sel != nil && sel.cfg.ModulePath != "" {
		return sel.cfg.ModulePath
	}
	return c.String("module")
}

// hsmChains gives the D1 checks the chain rules of 'cert import'.
type hsmChains struct{}

var _ d1.Chains = hsmChains{}

func (hsmChains) Sort(leafKey crypto.PublicKey, certs []*x509.Certificate) ([]*x509.Certificate, error) {
	return hsm.SortChain(leafKey, certs)
}

func (hsmChains) Warnings(chain []*x509.Certificate, now time.Time) ([]string, error) {
	warnings, err := hsm.ChainWarnings(chain, now)
	if err != nil {
		// The checklist's line already says which check this is.
		return nil, errors.New(strings.TrimPrefix(err.Error(), "hsm: "))
	}
	return warnings, nil
}
