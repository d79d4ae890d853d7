package main

import (
	"context"
	"crypto"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/user"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/hsmagent/hsmagent/agent"
	"github.com/hsmagent/hsmagent/agent/d1"
	"github.com/hsmagent/hsmagent/hsm"
	"github.com/urfave/cli/v2"
)

// Exit statuses of 'doctor', for scripts: a warning is worth reading but
// does not stop D1 traffic, so it does not fail the run.
const (
	doctorOK     = 0 // every check passed or only warned
	doctorFailed = 1 // at least one check failed
	// 2: the command was called wrongly (usage error), as for every command.
)

// Check outcomes.
const (
	checkPass = "pass"
	checkWarn = "warn"
	checkFail = "fail"
)

func doctorCommand() *cli.Command {
	return &cli.Command{
		Name:  "doctor",
		Usage: "check a D1 host end to end: token, PIN, keys and certificates per environment, agent, config, DNS (and with --online, D1 itself)",
		Description: `Runs every check and prints one line per check: pass, warn or fail, and for
each warning or failure what to do. Environments (PPR, PRD) are those with a d1 section in
the config and those a key label names (d1-ppr-mtls). Per environment the mTLS client key
is d1.ENV.key, else the keys whose label names the environment (labels with jwt, oauth or
server in them excepted).

Without --online nothing leaves the host but DNS queries. With --online, doctor makes an
mTLS handshake with each configured D1 target, presenting d1.ENV.key through the agent (any HTTP answer
after the handshake passes) and fetches an OAuth access token with the JWT key (D1-C8).

Exit status, for scripts:
  0  every check passed or only warned
  1  at least one check failed
  2  the command was called wrongly`,
		Flags: append(tokenFlags(),
			configFlag,
			socketFlag,
			&cli.BoolFlag{Name: "online", Usage: "also make an mTLS handshake and fetch an OAuth token against the configured D1 endpoints"},
			&cli.DurationFlag{Name: "timeout", Usage: "give up on the agent, each DNS query and each D1 request after `DURATION`", Value: 5 * time.Second},
			jsonFlag,
		),
		Action: doctorAction,
	}
}

// checkResult is one line of the checklist.
type checkResult struct {
	Check  string `json:"check"`
	Env    string `json:"env"` // "" for the host's checks
	Status string `json:"status"`
	Detail string `json:"detail"`
	Fix    string `json:"fix"`
}

// doctor collects the checklist of one run.
type doctor struct {
	c       *cli.Context
	cfg     *config
	now     time.Time
	timeout time.Duration
	results []checkResult
}

func (d *doctor) add(status, check string, env d1.Env, detail, fix string) {
	d.results = append(d.results, checkResult{Check: check, Env: string(env), Status: status, Detail: detail, Fix: fix})
}

func (d *doctor) pass(check string, env d1.Env, format string, args ...any) {
	d.add(checkPass, check, env, fmt.Sprintf(format, args...), "")
}

func (d *doctor) warn(check string, env d1.Env, detail, fix string) {
	d.add(checkWarn, check, env, detail, fix)
}
func (d *doctor) fail(check string, env d1.Env, detail, fix string) {
	d.add(checkFail, check, env, detail, fix)
}

func doctorAction(c *cli.Context) error {
	d := &doctor{c: c, now: time.Now(), timeout: c.Duration("timeout")}
	if d.timeout <= 0 {
		return usagef("--timeout must be positive")
	}
	d.cfg = d.checkConfig()
	if err := d.cfg.mergeFlags(c); err != nil {
		return err
	}
	// A contradictory token selection is a usage error; none at all is a finding.
	var sel *tokenSelection
	if c.String("token") != "" || c.String("token-serial") != "" || c.String("uri") != "" {
		s, err := selectToken(c)
		if err != nil {
			return err
		}
		sel = &s
	}
	if tok := d.checkToken(sel); tok != nil {
		defer tok.Close()
		d.checkKeys(tok)
	}
	client := d.checkAgent()
	if client != nil {
		defer client.Close()
	}
	d.checkDNS()
	if c.Bool("online") {
		d.checkOnline(client)
	}
	return d.report()
}

// report prints the checklist and turns failures into exit status 1.
func (d *doctor) report() error {
	var err error
	if d.c.Bool("json") {
		err = writeJSON(d.c, d.results)
	} else {
		err = d.print()
	}
	if err != nil {
		return err
	}
	var failed []string
	for _, r := range d.results {
		if r.Status == checkFail {
			failed = append(failed, strings.TrimSpace(r.Env+" "+r.Check))
		}
	}
	if len(failed) > 0 {
		return exitError{doctorFailed, fmt.Errorf("doctor: %d failed: %s", len(failed), strings.Join(failed, ", "))}
	}
	return nil
}

func (d *doctor) print() error {
	w := d.c.App.Writer
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	counts := map[string]int{}
	for _, r := range d.results {
		counts[r.Status]++
		env := r.Env
		if env == "" {
			env = "-"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", strings.ToUpper(r.Status), env, r.Check, r.Detail)
		if r.Fix != "" {
			fmt.Fprintf(tw, "\t\t\tfix: %s\n", r.Fix)
		}
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	_, err := fmt.Fprintf(w, "\n%d pass, %d warn, %d fail\n", counts[checkPass], counts[checkWarn], counts[checkFail])
	return err
}

// checkConfig loads the config as the agent would and checks the D1
// sections; it returns an empty config when the file cannot be used, so the
// other checks still run on the flags.
func (d *doctor) checkConfig() *config {
	path := d.c.String("config")
	const fixFile = "correct the setting named; 'hsmagent serve --check-config --config FILE' checks the file as the agent reads it"
	if path == "" {
		d.warn("config", "", "no config file: the D1 targets, token URL and key names come from one",
			"pass --config /etc/hsmagent/agent.yaml (or set HSMAGENT_CONFIG)")
		return &config{pos: map[string]settingPos{}}
	}
	cfg, err := loadConfig(path)
	if err != nil {
		d.fail("config", "", strings.TrimPrefix(err.Error(), "--config: "), fixFile)
		return &config{pos: map[string]settingPos{}}
	}
	if _, err := cfg.policy(); err != nil {
		d.fail("config", "", err.Error(), fixFile)
		return cfg
	}
	var problems []string
	for _, key := range sortedKeys(cfg.D1) {
		sec, setting := cfg.D1[key], "d1."+key
		if _, err := d1.ParseEnv(key); err != nil {
			problems = append(problems, fmt.Sprintf("%q%s: %v", setting, cfg.lineOf(setting), err))
			continue
		}
		if sec == nil {
			continue
		}
		if sec.Target != "" {
			if u, err := url.Parse(sec.Target); err != nil || u.Scheme != "https" || u.Host == "" {
				problems = append(problems, fmt.Sprintf("%q%s: %q is not an https:// URL", setting+".target", cfg.lineOf(setting+".target"), sec.Target))
			}
		}
		if t := sec.JWT.TokenURL; t != "" {
			if u, err := url.Parse(t); err != nil || u.Scheme != "https" || u.Host == "" {
				problems = append(problems, fmt.Sprintf("%q%s: %q is not an https:// URL", setting+".jwt.token_url", cfg.lineOf(setting+".jwt.token_url"), t))
			}
		}
		if sec.ServerCA != "" {
			if _, err := d1.LoadCertPool(sec.ServerCA); err != nil {
				problems = append(problems, fmt.Sprintf("%q%s: %v", setting+".server_ca", cfg.lineOf(setting+".server_ca"), err))
			}
		}
	}
	if len(problems) > 0 {
		d.fail("config", "", fmt.Sprintf("config %q: %s", path, strings.Join(problems, "; ")), fixFile)
		return cfg
	}
	var envs []string
	for _, k := range sortedKeys(cfg.D1) {
		e, _ := d1.ParseEnv(k)
		envs = append(envs, string(e))
	}
	d.pass("config", "", "%s: %d access rules, D1 sections: %s", path, len(cfg.Access), orNone(envs))
	return cfg
}

// checkToken loads the module, finds the token and logs in. It returns the
// open token, or nil after a failed check.
func (d *doctor) checkToken(sel *tokenSelection) *hsm.Token {
	module := d.c.String("module")
	if sel != nil && sel.cfg.ModulePath != "" {
		module = sel.cfg.ModulePath
	}
	shown := module
	if shown == "" {
		shown = hsm.DefaultModulePath()
	}
	infos, err := hsm.ListTokens(module)
	if err != nil {
		d.fail("module", "", err.Error(), "install the HSM vendor's PKCS#11 library and pass its path with --module (module: in the config)")
		return nil
	}
	d.pass("module", "", "%s loads: %d token(s)", shown, len(infos))
	if sel == nil {
		d.fail("token", "", "no token selected", "pass --token LABEL (see 'hsmagent tokens') or put token: in the config")
		return nil
	}
	var found *hsm.TokenInfo
	var present []string
	for i, info := range infos {
		if info.Initialized {
			present = append(present, strconv.Quote(info.Label))
		}
		if (sel.cfg.TokenLabel != "" && info.Label == sel.cfg.TokenLabel) || (sel.cfg.TokenSerial != "" && info.Serial == sel.cfg.TokenSerial) {
			found = &infos[i]
		}
	}
	name := sel.cfg.TokenLabel
	if name == "" {
		name = "serial " + sel.cfg.TokenSerial
	}
	switch {
	case found == nil:
		d.fail("token", "", fmt.Sprintf("token %q not found; tokens present: %s", name, orNone(present)), "select a token that 'hsmagent tokens' lists, or plug in or initialise the HSM token")
		return nil
	case !found.Initialized:
		d.fail("token", "", fmt.Sprintf("token %q is not initialised", name), "initialise it with the HSM vendor's tools")
		return nil
	case found.UserPINLocked:
		d.fail("token", "", fmt.Sprintf("token %q has its user PIN locked", name), "unlock the user PIN with the security officer PIN (HSM vendor's tools)")
		return nil
	}
	d.pass("token", "", "%q (serial %s, %s)", found.Label, found.Serial, found.Model)
	tok, err := hsm.Open(sel.cfg)
	if err != nil {
		d.fail("pin", "", err.Error(), "check the PIN source: --pin-file (pin_file:, mode 0600), $HSMAGENT_PIN or the systemd credential 'hsmagent-pin'")
		return nil
	}
	d.pass("pin", "", "logged in to %q", found.Label)
	return tok
}

// envPlan is what one D1 environment should have on the token.
type envPlan struct {
	section *d1Section // nil when only key labels name the environment
	mtls    []string   // client key labels to check
}

// plans gathers the environments from the config's d1 sections and the key labels.
func (d *doctor) plans(keys []*hsm.Key) map[d1.Env]*envPlan {
	plans := map[d1.Env]*envPlan{}
	// Keys the config gives another role than mTLS client.
	otherRole := map[string]bool{}
	for k, sec := range d.cfg.D1 {
		env, err := d1.ParseEnv(k)
		if err != nil {
			continue
		}
		p := &envPlan{section: sec}
		if sec != nil {
			if sec.Key != "" {
				p.mtls = []string{sec.Key}
			}
			for _, l := range []string{sec.JWT.Key, sec.Server.Key, sec.Server.OAuthKey} {
				if l != "" {
					otherRole[l] = true
				}
			}
		}
		plans[env] = p
	}
	for _, k := range keys {
		env, ok := d1.EnvOfLabel(k.Label)
		if !ok {
			continue
		}
		p := plans[env]
		if p == nil {
			p = &envPlan{}
			plans[env] = p
		}
		if (p.section != nil && p.section.Key != "") || otherRole[k.Label] || otherRoleLabel(k.Label) {
			continue
		}
		p.mtls = append(p.mtls, k.Label)
	}
	return plans
}

// otherRoleLabel says whether a label names a JWT, OAuth or server key,
// which are not mTLS client keys and carry no D1 client certificate.
func otherRoleLabel(label string) bool {
	for _, w := range strings.FieldsFunc(strings.ToLower(label), func(r rune) bool {
		return !(r >= 'a' && r <= 'z' || r >= '0' && r <= '9')
	}) {
		if w == "jwt" || w == "oauth" || w == "server" {
			return true
		}
	}
	return false
}

func (d *doctor) checkKeys(tok *hsm.Token) {
	keys, err := tok.Keys()
	if err != nil {
		d.fail("keys", "", err.Error(), "see the HSM's log; 'hsmagent keys list' shows the same error")
		return
	}
	byLabel := map[string]*hsm.Key{}
	for _, k := range keys {
		byLabel[k.Label] = k
	}
	plans := d.plans(keys)
	if len(plans) == 0 {
		d.warn("keys", "", "no D1 environment: no d1 section in the config and no key label naming PPR or PRD",
			"follow the D1 onboarding runbook: hsmagent keys generate --label d1-ppr-mtls --type ecdsa-p256")
		return
	}
	for _, env := range []d1.Env{d1.PreProd, d1.Production} {
		p := plans[env]
		if p == nil {
			continue
		}
		if len(p.mtls) == 0 {
			report, fix := d.fail, fmt.Sprintf("hsmagent keys generate --label d1-%s-mtls --type ecdsa-p256, then the runbook (CSR, Thales, import); or name the key in d1.%s.key", strings.ToLower(string(env)), env)
			if p.section == nil {
				// Only a server, JWT or OAuth key names this environment and no
				// d1 section asks for it: maybe a host for the inbound side only.
				report = d.warn
			}
			report("key", env, fmt.Sprintf("no mTLS client key for %s", env), fix)
		}
		for _, label := range p.mtls {
			d.checkClientKey(env, p.section, label, byLabel[label])
		}
		if p.section != nil && p.section.JWT.Key != "" {
			d.checkJWTKey(env, p.section.JWT.Key, byLabel[p.section.JWT.Key])
		}
	}
}

const fixRegenerate = "generate a new key inside the HSM with 'hsmagent keys generate' (D1-K1): a key that was once readable cannot be made safe"

// checkKeyPolicy reports the key's type and attributes; false when it failed.
func (d *doctor) checkKeyPolicy(check string, env d1.Env, k *hsm.Key, typeOK func(crypto.PublicKey) error) bool {
	if err := typeOK(k.Public); err != nil {
		d.fail(check, env, fmt.Sprintf("%q: %v", k.Label, err), "generate an ecdsa-p256 key (rsa-4096 is accepted for mTLS, D1-C2) and repeat the runbook")
		return false
	}
	problems := k.Usage.Problems()
	if !k.Usage.Sign {
		problems = append([]string{"cannot sign"}, problems...)
	}
	if len(problems) > 0 {
		d.fail(check, env, fmt.Sprintf("%q (%s) departs from the D1 key policy: %s", k.Label, k.Type, strings.Join(problems, ", ")), fixRegenerate)
		return false
	}
	d.pass(check, env, "%q: %s, sign only, sensitive, never extractable", k.Label, k.Type)
	return true
}

func (d *doctor) checkClientKey(env d1.Env, sec *d1Section, label string, k *hsm.Key) {
	if k == nil {
		d.fail("key", env, fmt.Sprintf("no key %q on the token", label),
			fmt.Sprintf("generate it (hsmagent keys generate --label %s --type ecdsa-p256) or correct d1.%s.key", label, env))
		return
	}
	if labelEnv, ok := d1.EnvOfLabel(label); ok && labelEnv != env {
		d.fail("key", env, fmt.Sprintf("%q is named for %s but configured for %s", label, labelEnv, env),
			fmt.Sprintf("use a key of its own for %s (D1-G2): correct d1.%s.key", env, env))
		return
	}
	if !d.checkKeyPolicy("key", env, k, func(pub crypto.PublicKey) error { _, err := d1.CNKeyType(pub); return err }) {
		return
	}
	if len(k.Chain) == 0 {
		d.fail("certificate", env, fmt.Sprintf("key %q has no certificate", label),
			fmt.Sprintf("send a CSR to Thales (hsmagent csr --key %s --profile d1 --env %s ...) and import what they return: hsmagent cert import --key %s --cert FILE --chain FILE", label, env, label))
		return
	}
	leaf := k.Chain[0]
	if !samePublicKey(leaf.PublicKey, k.Public) {
		d.fail("certificate", env, fmt.Sprintf("the certificate stored with %q (%q) is for another key", label, leaf.Subject.CommonName),
			fmt.Sprintf("import the certificate Thales issued for this key's CSR: hsmagent cert import --key %s --cert FILE", label))
		return
	}
	d.pass("certificate", env, "%q matches key %q, issued by %q", leaf.Subject.CommonName, label, leaf.Issuer.CommonName)
	d.checkChain(env, label, k)
	d.checkCN(env, sec, label, k)
	d.checkExpiry(env, k.Chain)
}

func (d *doctor) checkChain(env d1.Env, label string, k *hsm.Key) {
	fix := fmt.Sprintf("re-import the certificate with the chain Thales sent: hsmagent cert import --key %s --cert FILE --chain FILE", label)
	sorted, err := hsm.SortChain(k.Public, k.Chain)
	if err != nil {
		d.fail("chain", env, err.Error(), fix)
		return
	}
	for i := range sorted {
		if sorted[i] != k.Chain[i] {
			d.warn("chain", env, "the stored chain is out of order (leaf, then each issuer)", fix)
			return
		}
	}
	names := make([]string, len(sorted))
	for i, c := range sorted {
		names[i] = strconv.Quote(c.Subject.CommonName)
	}
	top := sorted[len(sorted)-1]
	d.pass("chain", env, "%s, top issued by %q", strings.Join(names, " <- "), top.Issuer.CommonName)
}

func (d *doctor) checkCN(env d1.Env, sec *d1Section, label string, k *hsm.Key) {
	cn := k.Chain[0].Subject.CommonName
	const confirm = "confirm the CN pattern with the Thales Delivery Team; the default is " + d1.DefaultCNTemplate
	certEnv, ok := d1.EnvOfCN(cn)
	switch {
	case !ok:
		d.warn("cn", env, fmt.Sprintf("CN %q names no environment (PPR or PRD)", cn), confirm)
		return
	case certEnv != env:
		d.fail("cn", env, fmt.Sprintf("CN %q is a %s certificate on the %s key %q; PPR and PRD credentials must never be mixed (D1-G2)", cn, certEnv, env, label),
			fmt.Sprintf("import the %s certificate on %q, and the %s one on a %s key", env, label, certEnv, certEnv))
		return
	}
	keyType, _ := d1.CNKeyType(k.Public)
	if rest, found := strings.CutPrefix(cn, "TLSMA-"); found {
		if named, _, _ := strings.Cut(rest, "/"); named != keyType {
			d.warn("cn", env, fmt.Sprintf("CN %q names key type %s but the key is %s", cn, named, keyType), confirm)
			return
		}
	}
	if sec != nil && sec.JWT.IssuerID != "" && !slices.Contains(strings.Split(cn, "/"), sec.JWT.IssuerID) {
		d.warn("cn", env, fmt.Sprintf("CN %q does not hold the issuer id %q of d1.%s.jwt.issuer_id", cn, sec.JWT.IssuerID, env), confirm)
		return
	}
	d.pass("cn", env, "%q: %s, %s", cn, keyType, env)
}

func (d *doctor) checkExpiry(env d1.Env, chain []*x509.Certificate) {
	const fix = "renew: a new CSR (hsmagent csr --profile d1), signed by Thales, imported with hsmagent cert import"
	warnings, err := hsm.ChainWarnings(chain, d.now)
	switch {
	case err != nil:
		d.fail("expiry", env, strings.TrimPrefix(err.Error(), "hsm: "), fix)
	case len(warnings) > 0:
		d.warn("expiry", env, strings.Join(warnings, "; "), fix)
	default:
		na := chain[0].NotAfter
		d.pass("expiry", env, "valid until %s (%d days)", na.UTC().Format(time.DateOnly), int(na.Sub(d.now)/(24*time.Hour)))
	}
}

func (d *doctor) checkJWTKey(env d1.Env, label string, k *hsm.Key) {
	if k == nil {
		d.fail("jwt-key", env, fmt.Sprintf("no key %q on the token", label),
			fmt.Sprintf("generate it (hsmagent keys generate --label %s --type ecdsa-p256), register its public key with D1, or correct d1.%s.jwt.key", label, env))
		return
	}
	d.checkKeyPolicy("jwt-key", env, k, func(pub crypto.PublicKey) error {
		if hsm.KeyTypeOf(pub) != hsm.ECDSAP256 {
			return errors.New("D1 takes ES256 assertions only (D1-C8): the JWT key must be ecdsa-p256")
		}
		return nil
	})
}

// checkAgent looks at the socket, then dials the agent; it returns the
// client when the agent answered.
func (d *doctor) checkAgent() *agent.Client {
	path, err := agentSocket(d.c) // the same socket the other commands use
	if err != nil {
		d.fail("agent", "", "no socket path", fmt.Sprintf("pass --socket PATH, set %s or put socket: in the config", agent.SocketEnv))
		return nil
	}
	fi, err := os.Stat(path)
	if err != nil {
		d.fail("socket", "", fmt.Sprintf("no socket at %q", path), "start the agent (hsmagent serve, or systemctl start hsmagent) or correct the socket path")
		return nil
	}
	if fi.Mode()&os.ModeSocket == 0 {
		d.fail("socket", "", fmt.Sprintf("%q is not a socket", path), "correct the socket path")
		return nil
	}
	owner, group := "?", "?"
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		owner, group = userName(st.Uid), groupName(st.Gid)
	}
	perm := fi.Mode().Perm()
	detail := fmt.Sprintf("%s: owner %s, group %s, mode %04o", path, owner, group, perm)
	if perm&0o007 != 0 {
		d.warn("socket", "", detail+": every user of the host may connect (access rules still apply)",
			`set socket_mode: "0660" and put the backend users in the socket's group`)
	} else {
		d.pass("socket", "", "%s", detail)
	}
	ctx, cancel := context.WithTimeout(d.c.Context, d.timeout)
	defer cancel()
	client, err := agent.Dial(ctx, path)
	if err != nil {
		d.fail("agent", "", err.Error(), "start the agent (hsmagent serve) and check that this user may open the socket")
		return nil
	}
	keys, kerr := client.Keys(ctx)
	health, herr := client.Health(ctx)
	if err := errors.Join(kerr, herr); err != nil {
		d.fail("agent", "", err.Error(), "see the agent's log")
		return client
	}
	if health != "SERVING" {
		d.fail("agent", "", "agent health is "+health, "the HSM does not answer in time: see the agent's log and the HSM")
		return client
	}
	v := client.AgentVersion()
	if v == "" {
		v = "unknown"
	}
	d.pass("agent", "", "version %s, SERVING, %d key(s) offered to this user", v, len(keys))
	return client
}

func userName(uid uint32) string {
	id := strconv.FormatUint(uint64(uid), 10)
	if u, err := user.LookupId(id); err == nil {
		return u.Username
	}
	return id
}

func groupName(gid uint32) string {
	id := strconv.FormatUint(uint64(gid), 10)
	if g, err := user.LookupGroupId(id); err == nil {
		return g.Name
	}
	return id
}

// checkDNS resolves the D1 host names of the config, as every new
// connection to D1 does (D1-C7).
func (d *doctor) checkDNS() {
	for _, env := range []d1.Env{d1.PreProd, d1.Production} {
		sec := d.section(env)
		if sec == nil {
			continue
		}
		seen := map[string]bool{}
		for _, setting := range []struct{ name, value string }{{"target", sec.Target}, {"jwt.token_url", sec.JWT.TokenURL}} {
			u, err := url.Parse(setting.value)
			if setting.value == "" || err != nil || u.Hostname() == "" || seen[u.Hostname()] {
				continue
			}
			host := u.Hostname()
			seen[host] = true
			if net.ParseIP(host) != nil {
				d.warn("dns", env, fmt.Sprintf("d1.%s.%s is the IP address %s", env, setting.name, host),
					"configure D1's host name: D1 has no static IP addresses (D1-C7)")
				continue
			}
			ctx, cancel := context.WithTimeout(d.c.Context, d.timeout)
			addrs, err := net.DefaultResolver.LookupHost(ctx, host)
			cancel()
			if err != nil {
				d.warn("dns", env, fmt.Sprintf("%s (d1.%s.%s) does not resolve: %v", host, env, setting.name, err),
					"check /etc/resolv.conf and the host name; D1 host names are given at onboarding")
				continue
			}
			d.pass("dns", env, "%s resolves to %s", host, strings.Join(addrs, ", "))
		}
	}
}

// section is the config's d1 section for env, or nil.
func (d *doctor) section(env d1.Env) *d1Section {
	for k, sec := range d.cfg.D1 {
		if e, err := d1.ParseEnv(k); err == nil && e == env {
			return sec
		}
	}
	return nil
}

// checkOnline makes a real mTLS handshake with each configured D1 target
// through the agent, then fetches an access token (D1-G1, D1-C6, D1-C8).
func (d *doctor) checkOnline(client *agent.Client) {
	for _, env := range []d1.Env{d1.PreProd, d1.Production} {
		sec := d.section(env)
		if sec == nil || sec.Target == "" {
			continue
		}
		if client == nil {
			d.fail("mtls", env, "not tried: the agent did not answer", "fix the agent check first")
			continue
		}
		if sec.Key == "" {
			d.fail("mtls", env, fmt.Sprintf("no d1.%s.key: which key to present is not configured", env), fmt.Sprintf("set d1.%s.key to the mTLS client key's label", env))
			continue
		}
		hc, err := d.onlineClient(client, env, sec)
		if err != nil {
			d.fail("mtls", env, err.Error(), fmt.Sprintf("fix the key and certificate checks of %s; the agent must offer %q to this user", env, sec.Key))
			continue
		}
		if !d.handshake(env, sec, hc) {
			continue
		}
		d.fetchToken(client, env, sec, hc)
	}
}

func (d *doctor) onlineClient(client *agent.Client, env d1.Env, sec *d1Section) (*http.Client, error) {
	opts := d1.ClientOptions{Env: env, GetClientCertificate: client.GetClientCertificate(sec.Key)}
	if sec.ServerCA != "" {
		pool, err := d1.LoadCertPool(sec.ServerCA)
		if err != nil {
			return nil, err
		}
		opts.ServerRoots = pool
	}
	hc, err := d1.NewHTTPClient(opts)
	if err != nil {
		return nil, err
	}
	hc.Timeout = d.timeout
	return hc, nil
}

func (d *doctor) handshake(env d1.Env, sec *d1Section, hc *http.Client) bool {
	req, err := http.NewRequestWithContext(d.c.Context, http.MethodHead, sec.Target, nil)
	if err != nil {
		d.fail("mtls", env, err.Error(), fmt.Sprintf("correct d1.%s.target", env))
		return false
	}
	resp, err := hc.Do(req)
	if err != nil {
		d.fail("mtls", env, err.Error(), handshakeFix(err, env))
		return false
	}
	resp.Body.Close()
	d.pass("mtls", env, "handshake with %s completed (%s), HTTP %d", req.URL.Host, tls.VersionName(resp.TLS.Version), resp.StatusCode)
	return true
}

// handshakeFix tells what to look at from how the handshake failed.
func handshakeFix(err error, env d1.Env) string {
	var unknown x509.UnknownAuthorityError
	var hostname x509.HostnameError
	var invalid x509.CertificateInvalidError
	var alert tls.AlertError
	var netErr net.Error
	switch {
	case errors.As(err, &unknown):
		return fmt.Sprintf("D1's server certificate does not chain to the trusted roots (D1-C6): check d1.%s.server_ca (without it the embedded Amazon roots are used) and that the target is D1", env)
	case errors.As(err, &hostname), errors.As(err, &invalid):
		return fmt.Sprintf("D1's server certificate is not valid for d1.%s.target: check the host name and the clock", env)
	case errors.As(err, &alert), strings.Contains(err.Error(), "remote error"):
		return "D1 refused the client certificate: it must be the one Thales signed for this environment, valid today"
	case errors.As(err, &netErr):
		return fmt.Sprintf("check d1.%s.target, DNS and the firewall or proxy towards D1", env)
	}
	return fmt.Sprintf("check d1.%s.target and the network towards D1", env)
}

func (d *doctor) fetchToken(client *agent.Client, env d1.Env, sec *d1Section, hc *http.Client) {
	j := sec.JWT
	if j.Key == "" {
		d.warn("oauth", env, fmt.Sprintf("no d1.%s.jwt section: the OAuth token fetch (D1-C8) is not checked", env),
			fmt.Sprintf("set d1.%s.jwt: key, kid, issuer_id and token_url", env))
		return
	}
	ctx, cancel := context.WithTimeout(d.c.Context, d.timeout)
	defer cancel()
	signer, err := client.Signer(ctx, j.Key)
	if err != nil {
		d.fail("oauth", env, err.Error(), fmt.Sprintf("the agent must offer %q to this user", j.Key))
		return
	}
	bearer := &d1.JWTBearer{Signer: signer, KeyID: j.Kid, IssuerID: j.IssuerID, Issuer: j.Issuer, Audience: j.Aud, TokenURL: j.TokenURL, HTTPClient: hc}
	tok, err := bearer.Token()
	if err != nil {
		var te *d1.TokenError
		fix := fmt.Sprintf("check d1.%s.jwt.token_url and the network towards D1", env)
		if errors.As(err, &te) {
			fix = "D1 refused the assertion: check kid and issuer_id, and that the JWT key's public key is registered with D1 under that kid"
		} else if strings.Contains(err.Error(), "d1: ") && !strings.Contains(err.Error(), "token request") {
			fix = fmt.Sprintf("complete d1.%s.jwt: key, kid, issuer_id, token_url", env)
		}
		d.fail("oauth", env, err.Error(), fix)
		return
	}
	d.pass("oauth", env, "access token from %s, valid until %s", j.TokenURL, tok.Expiry.UTC().Format(time.RFC3339))
}

func samePublicKey(a, b crypto.PublicKey) bool {
	type equaler interface{ Equal(crypto.PublicKey) bool }
	e, ok := a.(equaler)
	return ok && e.Equal(b)
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}

func orNone(s []string) string {
	if len(s) == 0 {
		return "none"
	}
	return strings.Join(s, ", ")
}
