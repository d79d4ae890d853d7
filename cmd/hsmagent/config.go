package main

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"time"

	"github.com/hsmagent/hsmagent/agent/d1"
	"github.com/hsmagent/hsmagent/agent/metrics"
	"github.com/hsmagent/hsmagent/agent/server"
	"github.com/urfave/cli/v2"
)

// config is hsmagent's one configuration, typed: the YAML file decoded into
// it (loadConfig), then the flags and HSMAGENT_* environment variables the
// user set read into the same fields (merge), in one place. Each setting is
// a field here and a row of settings: its key, its flag and its kind.
type config struct {
	// The token, selected with tokenFlags.
	Module, Token, TokenSerial, URI, PINFile string

	// The agent's socket, logs and metrics (serveSettings).
	Socket        string
	SocketMode    os.FileMode
	SocketGroup   string
	PKCS11Socket  string // the PKCS#11 transport's socket ("" for none)
	LogFormat     string
	LogLevel      slog.Level
	AuditLog      string
	MetricsListen string
	Metrics       metrics.ListenOptions
	// Where the PKCS#11 module runs: a supervised worker process, or with
	// HSMInProcess the agent's own.
	HSMInProcess bool
	HSMKillAfter time.Duration

	// Server holds the settings that are the server's options as they
	// are: the HSM's gate, the audit's failure mode and the limits per
	// caller (limitSettings). serve adds the logger, the policy and the
	// rest.
	Server server.Options

	Access []server.Rule
	// Admin names who may change the token through the agent besides root.
	Admin server.AdminRule
	// D1 holds the proxy and token settings per environment: PPR and PRD.
	D1 map[string]*d1Section

	path string                // the file, "" without one
	pos  map[string]settingPos // setting path ("d1.PPR.jwt.kid", "access.0") -> where it is
}

// settings are the top-level settings, each with its flag.
func (cfg *config) settings() []setting {
	return append(append(cfg.tokenSettings(), cfg.serveSettings()...), limitSettings(&cfg.Server)...)
}

// tokenSettings select the token; tokenFlags declares their flags.
func (cfg *config) tokenSettings() []setting {
	return []setting{
		{key: "module", val: text{&cfg.Module}},
		{key: "token", val: text{&cfg.Token}},
		{key: "token_serial", val: text{&cfg.TokenSerial}},
		{key: "uri", val: text{&cfg.URI}},
		{key: "pin_file", val: text{&cfg.PINFile}},
	}
}

// d1Section configures the commands that talk to one D1 environment.
type d1Section struct {
	Target        string
	Key           string
	ServerCA      string
	MaxConnAge    time.Duration
	ClientListen  string
	ClientMetrics string // the client proxy's metrics listener
	JWT           d1JWT
	Server        d1Inbound
}

// settings of the client role (proxy client, d1 token); d1ClientFlags and
// the proxy client declare their flags.
func (s *d1Section) settings() []setting {
	return []setting{
		{key: "target", val: text{&s.Target}},
		{key: "key", val: text{&s.Key}},
		{key: "server_ca", val: text{&s.ServerCA}},
		{key: "max_conn_age", val: duration{p: &s.MaxConnAge, anyLength: true}}, // 0 is d1's default
		{key: "client_listen", flag: "listen", val: text{&s.ClientListen}},
		{key: "client_metrics_listen", flag: "metrics-listen", val: text{&s.ClientMetrics}},
	}
}

type d1JWT struct {
	Key, Kid, IssuerID, Issuer, TokenURL, Aud string
}

// settings of the OAuth JWT bearer, whose flags jwtFlags declares.
func (j *d1JWT) settings() []setting {
	return []setting{
		{key: "key", flag: "jwt-key", val: text{&j.Key}},
		{key: "kid", val: text{&j.Kid}},
		{key: "issuer_id", val: text{&j.IssuerID}},
		{key: "issuer", flag: "jwt-issuer", val: text{&j.Issuer}},
		{key: "token_url", val: text{&j.TokenURL}},
		{key: "aud", val: text{&j.Aud}},
	}
}

// d1Inbound is the proxy server's part: D1 calling the issuer.
type d1Inbound struct {
	Listen, Backend, Key, ClientCA string
	MetricsListen                  string // the server proxy's metrics listener
	// OAuth for D1's calls (D1-S6).
	OAuthClientID, OAuthSecretFile, OAuthKey string
}

// settings of the proxy server, which declares their flags.
func (s *d1Inbound) settings() []setting {
	return []setting{
		{key: "listen", val: text{&s.Listen}},
		{key: "backend", val: text{&s.Backend}},
		{key: "key", val: text{&s.Key}},
		{key: "client_ca", val: text{&s.ClientCA}},
		{key: "metrics_listen", val: text{&s.MetricsListen}},
		{key: "oauth_client_id", val: text{&s.OAuthClientID}},
		{key: "oauth_secret_file", val: text{&s.OAuthSecretFile}},
		{key: "oauth_key", val: text{&s.OAuthKey}},
	}
}

type d1Role int

const (
	d1Client d1Role = iota // proxy client, d1 token: target, key, jwt
	d1Server               // proxy server: the server part
)

var configFlag = &cli.StringFlag{Name: "config", Usage: "YAML configuration `FILE` (flags and environment override it)", EnvVars: []string{"HSMAGENT_CONFIG"}}

// mergeFlags merges the command's flags with the file's top-level settings.
func (cfg *config) mergeFlags(c *cli.Context) error {
	return cfg.merge(c, "", cfg.settings())
}

// merge is the one place where flags and environment meet the file, for
// the settings (under prefix in the file) that command c has a flag for: a
// flag the user set, on the command line or through its environment
// variable, wins over the file, and the file over the flag's default.
func (cfg *config) merge(c *cli.Context, prefix string, settings []setting) error {
	for _, s := range settings {
		name := s.flagName()
		if !hasFlag(c, name) || (s.serveOnly && c.Command.Name != "serve") {
			continue
		}
		if cfg.pos[join(prefix, s.key)].set && !c.IsSet(name) {
			if err := fillFlag(c, name, s.val); err != nil {
				return err
			}
			continue
		}
		if err := s.val.read(c, name); err != nil {
			return usagef("--%s %v", name, err)
		}
	}
	return nil
}

// fillFlag gives the flag the file's value, for the code that reads flags,
// not the config: selectToken, serveListener, the D1 commands and status.
// The value is already valid, so setting it cannot fail but by a bug.
func fillFlag(c *cli.Context, name string, v value) error {
	if err := c.Set(name, v.String()); err != nil {
		return fmt.Errorf("config: --%s %q: %w", name, v.String(), err)
	}
	return nil
}

// mergeD1 picks the config's section for the environment given by --env
// (or the only one there is) and merges it with the command's flags.
func (cfg *config) mergeD1(c *cli.Context, role d1Role) error {
	if len(cfg.D1) == 0 {
		return nil
	}
	var key string
	switch {
	case c.String("env") != "":
		env, err := d1.ParseEnv(c.String("env"))
		if err != nil {
			return usageError{err}
		}
		for k := range cfg.D1 {
			if e, err := d1.ParseEnv(k); err == nil && e == env {
				key = k
			}
		}
		if key == "" {
			return usagef("config %q has no d1 section for %s", cfg.path, env)
		}
	case len(cfg.D1) == 1:
		for k := range cfg.D1 {
			key = k
		}
	default:
		return usagef("the config has several D1 environments: pass --env PPR or --env PRD")
	}
	sec := cfg.D1[key]
	if sec == nil {
		return nil
	}
	env, err := d1.ParseEnv(key)
	if err != nil {
		return usagef("config setting %q%s: %v", "d1."+key, cfg.lineOf("d1."+key), err)
	}
	if hasFlag(c, "env") && !c.IsSet("env") {
		if err := c.Set("env", string(env)); err != nil {
			return err
		}
	}
	prefix := "d1." + key
	if role == d1Server {
		return cfg.merge(c, prefix+".server", sec.Server.settings())
	}
	if err := cfg.merge(c, prefix, sec.settings()); err != nil {
		return err
	}
	return cfg.merge(c, prefix+".jwt", sec.JWT.settings())
}

// commandConfig loads --config and merges it with the command's flags; D1
// commands pass their role to merge their environment's section as well.
func commandConfig(c *cli.Context, d1role ...d1Role) (*config, error) {
	cfg, err := loadConfig(c.String("config"))
	if err != nil {
		return nil, err
	}
	if err := cfg.mergeFlags(c); err != nil {
		return nil, err
	}
	for _, r := range d1role {
		if err := cfg.mergeD1(c, r); err != nil {
			return nil, err
		}
	}
	return cfg, nil
}

func hasFlag(c *cli.Context, name string) bool {
	for _, f := range c.Command.Flags {
		for _, n := range f.Names() {
			if n == name {
				return true
			}
		}
	}
	return false
}

// policy builds the access policy from the rules, naming the rule's line
// in the file when one is refused.
func (cfg *config) policy() (*server.Policy, error) {
	p, err := server.NewPolicyWithAdmin(cfg.Access, cfg.Admin)
	if err == nil {
		return p, nil
	}
	var ae *server.AdminRuleError
	if errors.As(err, &ae) {
		return nil, fmt.Errorf("config setting \"admin\"%s: %w", cfg.lineOf("admin"), err)
	}
	var re *server.RuleError
	if errors.As(err, &re) {
		if where := cfg.lineOf(fmt.Sprintf("access.%d", re.Index)); where != "" {
			return nil, fmt.Errorf("config setting \"access\"%s: %w", where, err)
		}
	}
	return nil, err
}

// d1Hint explains, for an error about missing D1 settings, that the config
// file given has no d1 section to take them from.
func (cfg *config) d1Hint() string {
	if cfg.path == "" || len(cfg.D1) > 0 {
		return ""
	}
	return fmt.Sprintf(" (config %q has no d1: section for them; see the commented one in docs/agent.example.yaml)", cfg.path)
}
