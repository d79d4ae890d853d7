package main

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"reflect"
	"regexp"
	"slices"
	"strconv"
	"strings"

	"github.com/hsmagent/hsmagent/agent/d1"
	"github.com/hsmagent/hsmagent/agent/server"
	"github.com/urfave/cli/v2"
	"go.yaml.in/yaml/v3"
)

// config is hsmagent's one configuration: the YAML file decoded into this
// struct, then the flags and HSMAGENT_* environment variables the user set
// merged over it (mergeFlags), in one place. A field's yaml tag is its name
// in the file and in errors; its flag tag is the command-line flag that
// overrides it. Adding a setting is a field here and a flag on the command.
type config struct {
	Socket        string        `yaml:"socket" flag:"socket"`
	SocketMode    string        `yaml:"socket_mode" flag:"socket-mode"`
	SocketGroup   string        `yaml:"socket_group" flag:"socket-group"`
	Module        string        `yaml:"module" flag:"module"`
	Token         string        `yaml:"token" flag:"token"`
	TokenSerial   string        `yaml:"token_serial" flag:"token-serial"`
	URI           string        `yaml:"uri" flag:"uri"`
	PINFile       string        `yaml:"pin_file" flag:"pin-file"`
	LogFormat     string        `yaml:"log_format" flag:"log-format"`
	LogLevel      string        `yaml:"log_level" flag:"log-level"`
	AuditLog      string        `yaml:"audit_log" flag:"audit-log"`
	AuditFailOpen string        `yaml:"audit_fail_open" flag:"audit-fail-open" command:"serve"`
	MetricsListen string        `yaml:"metrics_listen" flag:"metrics-listen" command:"serve"`
	MetricsGroup  string        `yaml:"metrics_group" flag:"metrics-group" command:"serve"`
	MetricsTCP    string        `yaml:"metrics_tcp" flag:"metrics-tcp" command:"serve"`
	MaxSessions   string        `yaml:"max_sessions" flag:"max-sessions"`
	MaxWaiting    string        `yaml:"max_waiting" flag:"max-waiting"`
	HSMTimeout    string        `yaml:"hsm_timeout" flag:"hsm-timeout"`
	Access        []server.Rule `yaml:"access"`
	// D1 holds the proxy and token settings per environment: PPR and PRD.
	D1 map[string]*d1Section `yaml:"d1"`

	// Limits per caller: see limitFlags.
	MaxConnections          string `yaml:"max_connections" flag:"max-connections"`
	MaxConnectionsPerUID    string `yaml:"max_connections_per_uid" flag:"max-connections-per-uid"`
	MaxStreamsPerConnection string `yaml:"max_streams_per_connection" flag:"max-streams-per-connection"`
	IdleTimeout             string `yaml:"idle_timeout" flag:"idle-timeout"`
	StreamSendTimeout       string `yaml:"stream_send_timeout" flag:"stream-send-timeout"`
	MaxSignaturesPerUID     string `yaml:"max_signatures_per_uid" flag:"max-signatures-per-uid"`
	MaxSignStreams          string `yaml:"max_sign_streams" flag:"max-sign-streams"`
	MaxSignStreamsPerUID    string `yaml:"max_sign_streams_per_uid" flag:"max-sign-streams-per-uid"`
	AuditRefusalBurst       string `yaml:"audit_refusal_burst" flag:"audit-refusal-burst"`
	ConnectionRatePerUID    string `yaml:"connection_rate_per_uid" flag:"connection-rate-per-uid"`

	path string                // the file, "" without one
	pos  map[string]settingPos // setting path ("d1.PPR.jwt.kid", "access.0") -> where it is
}

// settingPos is where a setting stands in the file: the line of its key (or
// list item) for errors about it, and where its value starts and its YAML
// kind, to name the setting a decoding error points at.
type settingPos struct {
	line, valueLine int
	kind            yaml.Kind
}

// d1Section configures the commands that talk to one D1 environment.
type d1Section struct {
	Target       string `yaml:"target" flag:"target"`
	Key          string `yaml:"key" flag:"key"`
	ServerCA     string `yaml:"server_ca" flag:"server-ca"`
	MaxConnAge   string `yaml:"max_conn_age" flag:"max-conn-age"`
	ClientListen string `yaml:"client_listen" flag:"listen"`
	// ClientMetrics is the client proxy's metrics listener.
	ClientMetrics string    `yaml:"client_metrics_listen" flag:"metrics-listen"`
	JWT           d1JWT     `yaml:"jwt"`
	Server        d1Inbound `yaml:"server"`
}

type d1JWT struct {
	Key      string `yaml:"key" flag:"jwt-key"`
	Kid      string `yaml:"kid" flag:"kid"`
	IssuerID string `yaml:"issuer_id" flag:"issuer-id"`
	Issuer   string `yaml:"issuer" flag:"jwt-issuer"`
	TokenURL string `yaml:"token_url" flag:"token-url"`
	Aud      string `yaml:"aud" flag:"aud"`
}

// d1Inbound is the proxy server's part: D1 calling the issuer.
type d1Inbound struct {
	Listen   string `yaml:"listen" flag:"listen"`
	Backend  string `yaml:"backend" flag:"backend"`
	Key      string `yaml:"key" flag:"key"`
	ClientCA string `yaml:"client_ca" flag:"client-ca"`
	// MetricsListen is the server proxy's metrics listener.
	MetricsListen string `yaml:"metrics_listen" flag:"metrics-listen"`
	// OAuth for D1's calls (D1-S6).
	OAuthClientID   string `yaml:"oauth_client_id" flag:"oauth-client-id"`
	OAuthSecretFile string `yaml:"oauth_secret_file" flag:"oauth-secret-file"`
	OAuthKey        string `yaml:"oauth_key" flag:"oauth-key"`
}

type d1Role int

const (
	d1Client d1Role = iota // proxy client, d1 token: target, key, jwt
	d1Server               // proxy server: the server part
)

var configFlag = &cli.StringFlag{Name: "config", Usage: "YAML configuration `FILE` (flags and environment override it)", EnvVars: []string{"HSMAGENT_CONFIG"}}

// loadConfig reads path strictly: an unknown setting is an error, so a
// misspelt access rule is not silently ignored. Errors name the setting and
// its line, not Go types.
func loadConfig(path string) (*config, error) {
	cfg := &config{path: path, pos: map[string]settingPos{}}
	if path == "" {
		return cfg, nil
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, usagef("--config: %v", err)
	}
	var root yaml.Node
	if err := yaml.Unmarshal(data, &root); err != nil {
		return nil, fmt.Errorf("config %q: %s", path, strings.TrimPrefix(err.Error(), "yaml: "))
	}
	cfg.record(&root, "")
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(cfg); err != nil && !errors.Is(err, io.EOF) {
		return nil, cfg.decodeError(err)
	}
	return cfg, nil
}

// record maps each setting's dotted path to its line in the file.
func (cfg *config) record(n *yaml.Node, prefix string) {
	switch n.Kind {
	case yaml.DocumentNode:
		for _, c := range n.Content {
			cfg.record(c, prefix)
		}
	case yaml.MappingNode:
		for i := 0; i+1 < len(n.Content); i += 2 {
			p := join(prefix, n.Content[i].Value)
			cfg.pos[p] = settingPos{n.Content[i].Line, n.Content[i+1].Line, n.Content[i+1].Kind}
			cfg.record(n.Content[i+1], p)
		}
	case yaml.SequenceNode:
		for i, c := range n.Content {
			p := join(prefix, strconv.Itoa(i))
			cfg.pos[p] = settingPos{c.Line, c.Line, c.Kind}
			cfg.record(c, p)
		}
	}
}

func join(prefix, name string) string {
	if prefix == "" {
		return name
	}
	return prefix + "." + name
}

// The decoder's messages end with a Go type (which has no spaces), after a
// setting name or value that may hold anything, newlines and backquotes included.
var (
	unknownField = regexp.MustCompile(`(?s)^line (\d+): field (.*) not found in type \S+$`)
	fieldTwice   = regexp.MustCompile(`(?s)^line (\d+): field (.*) already set in type \S+$`)
	typeMismatch = regexp.MustCompile("(?s)^line (\\d+): cannot unmarshal !!?([^ ]*?)(?: `(.*)`)? into (\\S+)$")
	goTypeSuffix = regexp.MustCompile(`(?s) (?:into|in type) \S+$`)
)

// decodeError rewrites the YAML decoder's errors, which name Go types, into
// errors that name the setting and the line.
func (cfg *config) decodeError(err error) error {
	var te *yaml.TypeError
	if !errors.As(err, &te) {
		return fmt.Errorf("config %q: %s", cfg.path, strings.TrimPrefix(err.Error(), "yaml: "))
	}
	var msgs []string
	for _, e := range te.Errors {
		if m := unknownField.FindStringSubmatch(e); m != nil {
			msgs = append(msgs, fmt.Sprintf("line %s: unknown setting %q", m[1], m[2]))
			continue
		}
		if m := fieldTwice.FindStringSubmatch(e); m != nil {
			msgs = append(msgs, fmt.Sprintf("line %s: setting %q given twice", m[1], m[2]))
			continue
		}
		if m := typeMismatch.FindStringSubmatch(e); m != nil {
			line, _ := strconv.Atoi(m[1])
			msgs = append(msgs, fmt.Sprintf("line %d: %s must be %s, not %s", line, cfg.settingAt(line, m[2]), kindOf(m[4]), yamlKind(m[2], m[3])))
			continue
		}
		// Anything else still names no Go type and stays on one line.
		msgs = append(msgs, strings.ReplaceAll(goTypeSuffix.ReplaceAllString(e, ""), "\n", `\n`))
	}
	return fmt.Errorf("config %q %s", cfg.path, strings.Join(msgs, "; "))
}

// settingAt names the setting whose value of YAML kind tag (seq, map, str,
// ...) starts on line: the one the decoder could not fit.
func (cfg *config) settingAt(line int, tag string) string {
	want := yaml.ScalarNode
	switch tag {
	case "seq":
		want = yaml.SequenceNode
	case "map":
		want = yaml.MappingNode
	}
	best := ""
	for p, v := range cfg.pos {
		if v.valueLine == line && v.kind == want && (best == "" || len(p) < len(best)) {
			best = p
		}
	}
	if best == "" {
		return "the value"
	}
	return strconv.Quote(best)
}

func kindOf(goType string) string {
	switch {
	case strings.HasPrefix(goType, "[]"):
		return "a list"
	case strings.HasPrefix(goType, "map["), strings.HasPrefix(goType, "main."), strings.HasPrefix(goType, "server."), strings.HasPrefix(goType, "*main."):
		return "a mapping"
	case goType == "string":
		return "a string"
	case goType == "bool":
		return "true or false"
	case strings.HasPrefix(goType, "int"), strings.HasPrefix(goType, "uint"):
		return "a whole number"
	}
	return "another kind of value"
}

func yamlKind(tag, value string) string {
	switch tag {
	case "seq":
		return "a list"
	case "map":
		return "a mapping"
	}
	if value != "" {
		return strconv.Quote(value)
	}
	return "a " + tag
}

// lineOf says where a setting is, for errors: " (line N)" or "".
func (cfg *config) lineOf(setting string) string {
	if at, ok := cfg.pos[setting]; ok {
		return fmt.Sprintf(" (%s line %d)", cfg.path, at.line)
	}
	return ""
}

// mergeFlags is the one place where flags and environment meet the file:
// a flag the user set (on the command line or through its environment
// variable) overrides the file; a setting only the file has fills the flag,
// so every command reads its flags and validates them once. Only the
// command's own flags take part.
func (cfg *config) mergeFlags(c *cli.Context) error {
	return mergeStruct(c, reflect.ValueOf(cfg).Elem(), cfg, "")
}

func mergeStruct(c *cli.Context, v reflect.Value, cfg *config, prefix string) error {
	t := v.Type()
	for i := range t.NumField() {
		f := t.Field(i)
		name, _, _ := strings.Cut(f.Tag.Get("yaml"), ",")
		flag := f.Tag.Get("flag")
		if flag == "" || !f.IsExported() || f.Type.Kind() != reflect.String || !hasFlag(c, flag) {
			continue
		}
		// A setting of one command only: the proxies' metrics-listen is
		// in their d1 section, not the agent's top-level one.
		if only := f.Tag.Get("command"); only != "" && only != c.Command.Name {
			continue
		}
		fv := v.Field(i)
		setting := join(prefix, name)
		switch {
		case c.IsSet(flag):
			fv.SetString(c.String(flag))
		case fv.String() != "":
			if err := c.Set(flag, fv.String()); err != nil {
				return fmt.Errorf("config setting %q%s: %q is %s", setting, cfg.lineOf(setting), fv.String(), expected(c, flag, err))
			}
		}
	}
	return nil
}

// expected says what a flag's value must look like, for an error about a
// value from the config file.
func expected(c *cli.Context, flag string, err error) string {
	for _, f := range c.Command.Flags {
		if !slices.Contains(f.Names(), flag) {
			continue
		}
		switch f.(type) {
		case *cli.DurationFlag:
			return "not a duration; use e.g. 3s, 500ms or 5m"
		case *cli.IntFlag, *cli.Int64Flag, *cli.UintFlag:
			return "not a whole number"
		case *cli.BoolFlag:
			return "not true or false"
		}
	}
	return fmt.Sprintf("not valid for --%s: %v", flag, unwrapAll(err))
}

// unwrapAll strips the flag package's wrapping down to the cause.
func unwrapAll(err error) error {
	for {
		next := errors.Unwrap(err)
		if next == nil {
			return err
		}
		err = next
	}
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
		return mergeStruct(c, reflect.ValueOf(&sec.Server).Elem(), cfg, prefix+".server")
	}
	if err := mergeStruct(c, reflect.ValueOf(sec).Elem(), cfg, prefix); err != nil {
		return err
	}
	return mergeStruct(c, reflect.ValueOf(&sec.JWT).Elem(), cfg, prefix+".jwt")
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
	p, err := server.NewPolicy(cfg.Access)
	if err == nil {
		return p, nil
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
