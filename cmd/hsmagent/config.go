package main

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/hsmagent/hsmagent/agent/d1"
	"github.com/hsmagent/hsmagent/agent/server"
	"github.com/urfave/cli/v2"
	"go.yaml.in/yaml/v3"
)

// fileConfig is the YAML configuration file shared by serve and the commands
// that use the agent. Flags and environment variables override it.
type fileConfig struct {
	Socket      string        `yaml:"socket"`
	SocketMode  string        `yaml:"socket_mode"`
	Module      string        `yaml:"module"`
	Token       string        `yaml:"token"`
	TokenSerial string        `yaml:"token_serial"`
	URI         string        `yaml:"uri"`
	PINFile     string        `yaml:"pin_file"`
	LogFormat   string        `yaml:"log_format"`
	LogLevel    string        `yaml:"log_level"`
	AuditLog    string        `yaml:"audit_log"`
	Access      []server.Rule `yaml:"access"`
	// D1 holds the proxy and token settings per environment: PPR and PRD.
	D1 map[string]d1Section `yaml:"d1"`
}

// d1Section configures the commands that talk to one D1 environment.
// Each field fills the flag of the same name.
type d1Section struct {
	Target       string `yaml:"target"`
	Key          string `yaml:"key"`
	ServerCA     string `yaml:"server_ca"`
	MaxConnAge   string `yaml:"max_conn_age"`
	ClientListen string `yaml:"client_listen"`
	JWT          struct {
		Key      string `yaml:"key"`
		Kid      string `yaml:"kid"`
		IssuerID string `yaml:"issuer_id"`
		Issuer   string `yaml:"issuer"`
		TokenURL string `yaml:"token_url"`
		Aud      string `yaml:"aud"`
	} `yaml:"jwt"`
	Server struct {
		Listen   string `yaml:"listen"`
		Backend  string `yaml:"backend"`
		Key      string `yaml:"key"`
		ClientCA string `yaml:"client_ca"`
		// OAuth for D1's calls (D1-S6).
		OAuthClientID   string `yaml:"oauth_client_id"`
		OAuthSecretFile string `yaml:"oauth_secret_file"`
		OAuthKey        string `yaml:"oauth_key"`
	} `yaml:"server"`
}

// loadConfig reads path strictly: an unknown key is an error, so a misspelt
// access rule is not silently ignored.
func loadConfig(path string) (*fileConfig, error) {
	cfg := &fileConfig{}
	if path == "" {
		return cfg, nil
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, usagef("--config: %v", err)
	}
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(cfg); err != nil && !errors.Is(err, io.EOF) {
		return nil, fmt.Errorf("config %q: %w", path, err)
	}
	return cfg, nil
}

// applyConfig fills flags the user did not set (on the command line or in
// the environment) from the config file.
func applyConfig(c *cli.Context, values map[string]string) error {
	for flag, v := range values {
		if v == "" || c.IsSet(flag) {
			continue
		}
		if err := c.Set(flag, v); err != nil {
			return fmt.Errorf("config value for %q: %w", flag, err)
		}
	}
	return nil
}

var configFlag = &cli.StringFlag{Name: "config", Usage: "YAML configuration `FILE` (flags and environment override it)", EnvVars: []string{"HSMAGENT_CONFIG"}}

// applyD1Config fills the flags of a D1 command from the config file's
// section for the environment given by --env (or the only section there is).
// role is "client" (proxy client, d1 token) or "server" (proxy server).
func applyD1Config(c *cli.Context, role string) error {
	if c.String("config") == "" {
		return nil
	}
	cfg, err := loadConfig(c.String("config"))
	if err != nil {
		return err
	}
	if err := applyConfig(c, map[string]string{"socket": cfg.Socket}); err != nil {
		return err
	}
	if len(cfg.D1) == 0 {
		return nil
	}
	var env string
	if c.String("env") != "" {
		e, err := d1.ParseEnv(c.String("env"))
		if err != nil {
			return usageError{err}
		}
		env = string(e)
	} else if len(cfg.D1) == 1 {
		for k := range cfg.D1 {
			env = k
		}
	} else {
		return usagef("the config has several D1 environments: pass --env PPR or --env PRD")
	}
	sec, ok := cfg.D1[env]
	if !ok {
		for k := range cfg.D1 {
			if e, err := d1.ParseEnv(k); err == nil && string(e) == env {
				sec, ok = cfg.D1[k], true
			}
		}
	}
	if !ok {
		return usagef("config %q has no d1 section for %s", c.String("config"), env)
	}
	var values map[string]string
	if role == "client" {
		values = map[string]string{"env": env, "target": sec.Target, "key": sec.Key, "server-ca": sec.ServerCA,
			"max-conn-age": sec.MaxConnAge, "listen": sec.ClientListen,
			"jwt-key": sec.JWT.Key, "kid": sec.JWT.Kid, "issuer-id": sec.JWT.IssuerID, "jwt-issuer": sec.JWT.Issuer,
			"token-url": sec.JWT.TokenURL, "aud": sec.JWT.Aud}
	} else {
		values = map[string]string{"listen": sec.Server.Listen, "backend": sec.Server.Backend, "key": sec.Server.Key, "client-ca": sec.Server.ClientCA,
			"oauth-client-id": sec.Server.OAuthClientID, "oauth-secret-file": sec.Server.OAuthSecretFile, "oauth-key": sec.Server.OAuthKey}
	}
	// Only flags the command has: "d1 token" has no --listen or --target.
	for name := range values {
		if !hasFlag(c, name) {
			delete(values, name)
		}
	}
	return applyConfig(c, values)
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
