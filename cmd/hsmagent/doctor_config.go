package main

import (
	"fmt"
	"maps"
	"slices"
	"strings"

	"github.com/hsmagent/hsmagent/agent/d1"
)

const configCheck d1.Check = "config"

// checkConfig loads the config as the agent would and checks its D1
// sections. When the file cannot be used it returns an empty config, so the
// other checks still run on the flags.
func checkConfig(path string) (*config, d1.Finding) {
	const fix = "correct the setting named; 'hsmagent serve --check-config --config FILE' checks the file as the agent reads it"
	empty, _ := loadConfig("")
	if path == "" {
		return empty, d1.Finding{Check: configCheck, Status: d1.Warn, Message: "no config file: the D1 targets, token URL and key names come from one",
			Fix: "pass --config /etc/hsmagent/agent.yaml (or set HSMAGENT_CONFIG)"}
	}
	cfg, err := loadConfig(path)
	if err != nil {
		return empty, d1.Finding{Check: configCheck, Status: d1.Fail, Message: strings.TrimPrefix(err.Error(), "--config: "), Fix: fix}
	}
	if _, err := cfg.policy(); err != nil {
		return cfg, d1.Finding{Check: configCheck, Status: d1.Fail, Message: err.Error(), Fix: fix}
	}
	if problems := d1Problems(cfg); len(problems) > 0 {
		return cfg, d1.Finding{Check: configCheck, Status: d1.Fail, Message: fmt.Sprintf("config %q: %s", path, strings.Join(problems, "; ")), Fix: fix}
	}
	var envs []string
	for _, k := range slices.Sorted(maps.Keys(cfg.D1)) {
		e, _ := d1.ParseEnv(k)
		envs = append(envs, string(e))
	}
	return cfg, d1.Finding{Check: configCheck, Status: d1.Pass,
		Message: fmt.Sprintf("%s: %d access rules, D1 sections: %s", path, len(cfg.Access), orNone(envs))}
}

// d1Problems lists the d1 settings that cannot work, each with its line.
func d1Problems(cfg *config) []string {
	var out []string
	for _, key := range slices.Sorted(maps.Keys(cfg.D1)) {
		section := "d1." + key
		if _, err := d1.ParseEnv(key); err != nil {
			out = append(out, fmt.Sprintf("%q%s: %v", section, cfg.lineOf(section), err))
			continue
		}
		if cfg.D1[key] == nil {
			continue
		}
		for _, p := range settingsOf(cfg.D1[key]).Problems() {
			setting := section + "." + p.Setting
			out = append(out, fmt.Sprintf("%q%s: %s", setting, cfg.lineOf(setting), p.Message))
		}
	}
	return out
}

// d1Settings are the config's d1 sections by environment. A section with
// nothing in it names its environment with nil settings; a section whose
// name is no environment is left to checkConfig to report.
func d1Settings(cfg *config) map[d1.Env]*d1.Settings {
	out := map[d1.Env]*d1.Settings{}
	for _, key := range slices.Sorted(maps.Keys(cfg.D1)) {
		env, err := d1.ParseEnv(key)
		if _, seen := out[env]; err != nil || seen {
			continue
		}
		out[env] = nil
		if sec := cfg.D1[key]; sec != nil {
			out[env] = settingsOf(sec)
		}
	}
	return out
}

func settingsOf(sec *d1Section) *d1.Settings {
	j := sec.JWT
	return &d1.Settings{
		Target: sec.Target, Key: sec.Key, ServerCA: sec.ServerCA,
		JWT:       d1.JWTSettings{Key: j.Key, Kid: j.Kid, IssuerID: j.IssuerID, Issuer: j.Issuer, TokenURL: j.TokenURL, Audience: j.Aud},
		ServerKey: sec.Server.Key, OAuthKey: sec.Server.OAuthKey,
	}
}

func orNone(s []string) string {
	if len(s) == 0 {
		return "none"
	}
	return strings.Join(s, ", ")
}
