package main

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"

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
