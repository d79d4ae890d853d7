package main

import (
	"fmt"
	"io"
	"net"
	"strings"
	"text/tabwriter"
	"time"

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

func doctorCommand() *cli.Command {
	return &cli.Command{
		Name:  "doctor",
		Usage: "check a D1 host end to end: token, PIN, keys and certificates per environment, agent and what it serves, config, DNS (and with --online, D1 itself)",
		Description: `Runs every check and prints one line per check: pass, warn or fail, and for
each warning or failure what to do. Environments (PPR, PRD) are those with a d1 section in
the config and those a key label names (d1-ppr-mtls). Per environment the mTLS client key
is d1.ENV.key, else the keys whose label names the environment (labels with jwt, oauth or
server in them excepted).

Key by key, doctor compares what the token holds (public key, CKA_ID, certificate, chain)
with what the running agent serves, which it reads only at start and on reload, and fails
on any difference with the fix (mostly: reload the agent). With SoftHSM it also fails on
token files their token's owner cannot read (written by root: see 'ownership' in
docs/operations.md).

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

// checkResult is one line of the checklist as doctor prints it in JSON.
type checkResult struct {
	Check  string `json:"check"`
	Env    string `json:"env"` // "" for the host's checks
	Status string `json:"status"`
	Detail string `json:"detail"`
	Fix    string `json:"fix"`
	// Key and Differences: the key a served line is about and how what the
	// agent serves differs from the token (d1.Difference names).
	Key         string   `json:"key,omitempty"`
	Differences []string `json:"differences,omitempty"`
}

// doctorAction gathers what the host has, from the config to the agent,
// hands it to the D1 checks and prints what they found.
func doctorAction(c *cli.Context) error {
	timeout := c.Duration("timeout")
	if timeout <= 0 {
		return usagef("--timeout must be positive")
	}
	cfg, configLine := checkConfig(c.String("config"))
	found := []d1.Finding{configLine}
	if err := cfg.mergeFlags(c); err != nil {
		return err
	}
	sel, err := doctorSelection(c)
	if err != nil {
		return err
	}
	settings := d1Settings(cfg)
	tok, tokenLines := openToken(c, sel)
	found = append(found, tokenLines...)
	var keys []*hsm.Key // nil when the token could not be read
	if tok != nil {
		defer tok.Close()
		var keyLines []d1.Finding
		keys, keyLines = checkTokenKeys(tok, settings, time.Now())
		found = append(found, keyLines...)
	}
	if tokenLines[0].Status == d1.Pass { // the module loads
		found = append(found, checkTokenOwnership(doctorModule(c, sel))...)
	}
	agentAt, _ := agentSocket(c)
	client, served, agentLines := checkAgent(c, timeout)
	found = append(found, agentLines...)
	var creds d1.Credentials // stays nil without an agent: a nil *agent.Client would not be
	if client != nil {
		defer client.Close()
		creds = client
		if keys != nil && served != nil {
			found = append(found, checkServed(keys, served, agentAt, cfg.Server.AuditSigningKey)...)
		}
	}
	found = append(found, d1.CheckDNS(c.Context, settings, net.DefaultResolver, timeout)...)
	if c.Bool("online") {
		found = append(found, d1.CheckOnline(c.Context, settings, creds, timeout)...)
	}
	return report(c, found)
}

// report prints the checklist and turns failures into exit status 1.
func report(c *cli.Context, found []d1.Finding) error {
	results := make([]checkResult, len(found))
	var failed []string
	for i, f := range found {
		results[i] = checkResult{Check: string(f.Check), Env: string(f.Env), Status: f.Status.String(), Detail: f.Message, Fix: f.Fix, Key: f.Key}
		for _, d := range f.Differences {
			results[i].Differences = append(results[i].Differences, string(d))
		}
		if f.Status == d1.Fail {
			failed = append(failed, strings.TrimSpace(string(f.Env)+" "+string(f.Check)))
		}
	}
	var err error
	if c.Bool("json") {
		err = writeJSON(c, results)
	} else {
		err = printChecklist(c.App.Writer, results)
	}
	if err != nil {
		return err
	}
	if len(failed) > 0 {
		return exitError{doctorFailed, fmt.Errorf("doctor: %d failed: %s", len(failed), strings.Join(failed, ", "))}
	}
	return nil
}

// printChecklist prints one line per check, a fix under each problem, and a summary.
func printChecklist(w io.Writer, results []checkResult) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	counts := map[string]int{}
	for _, r := range results {
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
	_, err := fmt.Fprintf(w, "\n%d pass, %d warn, %d fail\n", counts[d1.Pass.String()], counts[d1.Warn.String()], counts[d1.Fail.String()])
	return err
}
