package main

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/hsmagent/hsmagent/agent"
	"github.com/hsmagent/hsmagent/agent/keytype"
	"github.com/hsmagent/hsmagent/agent/rotation"
	"github.com/urfave/cli/v2"
)

// expiryWarning is how close a certificate's not-after may come before
// 'status' exits 1: the first of the agent's log warnings.
const expiryWarning = 30 * 24 * time.Hour

// Exit statuses of 'status', for scripts.
const (
	statusOK          = 0
	statusDegraded    = 1 // a certificate expires within 30 days (or has), or the agent is NOT_SERVING
	statusUnreachable = 2 // no agent answered on the socket (usage errors exit 2 as well)
)

func statusCommand() *cli.Command {
	return &cli.Command{
		Name:  "status",
		Usage: "ask the running agent for its version, health and the keys it offers you (like ssh-add -l)",
		Description: `Connects to the agent as the calling user and lists the keys this user may use,
each with its certificate's subject, not-after and the whole days left.

Exit status, for scripts and monitoring:
  0  the agent is SERVING and no certificate expires within 30 days
  1  a certificate expires within 30 days or has expired, or the agent is NOT_SERVING
     (a key without a certificate is listed but is not a problem: JWT signing keys have none)
  2  no agent answered on the socket (or the command was called wrongly)

Examples:
  hsmagent status --socket /run/hsmagent/agent.sock
  HSMAGENT_SOCKET=/run/hsmagent/agent.sock hsmagent status --json | jq '.keys[].daysLeft'`,
		Flags: []cli.Flag{
			configFlag,
			socketFlag,
			&cli.DurationFlag{Name: "timeout", Usage: "give up on the agent after `DURATION`", Value: 5 * time.Second},
			jsonFlag,
		},
		Action: statusAction,
	}
}

type statusView struct {
	Socket   string          `json:"socket"`
	Version  string          `json:"version"`
	Health   string          `json:"health"`
	Keys     []statusKeyView `json:"keys"`
	Problems []string        `json:"problems"`
	Exit     int             `json:"exit"`
}

type statusKeyView struct {
	Label    string     `json:"label"`
	Type     string     `json:"type"`
	Subject  string     `json:"subject,omitempty"`
	NotAfter *time.Time `json:"notAfter,omitempty"`
	// DaysLeft counts whole days to NotAfter (negative once expired by a
	// day or more); absent without a certificate.
	DaysLeft *int `json:"daysLeft,omitempty"`
	// Successor is the pending successor of a key being rotated ('keys
	// rotate'); Retired, the keys it replaced and that are not yet deleted.
	Successor *statusSuccessor `json:"successor,omitempty"`
	Retired   []string         `json:"retired,omitempty"`
}

type statusSuccessor struct {
	Label          string `json:"label"`
	Type           string `json:"type"`
	HasCertificate bool   `json:"hasCertificate"`
}

func statusAction(c *cli.Context) error {
	if _, err := commandConfig(c); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(c.Context, c.Duration("timeout"))
	defer cancel()
	socket, err := agentSocket(c)
	if err != nil {
		return err
	}
	client, err := agent.Dial(ctx, socket)
	if err != nil {
		return exitError{statusUnreachable, err}
	}
	defer client.Close()
	keys, err := client.Keys(ctx)
	if err != nil {
		if agent.IsUnavailable(err) {
			return exitError{statusUnreachable, err}
		}
		return err
	}
	health, err := client.Health(ctx)
	if err != nil {
		if agent.IsUnavailable(err) {
			return exitError{statusUnreachable, err}
		}
		return err
	}
	v := statusReport(keys, time.Now())
	v.Socket, v.Version, v.Health = socket, client.AgentVersion(), health
	if v.Version == "" {
		v.Version = "unknown"
	}
	if health != "SERVING" {
		v.Problems = append([]string{"agent health is " + health}, v.Problems...)
	}
	if len(v.Problems) > 0 {
		v.Exit = statusDegraded
	}
	if c.Bool("json") {
		err = writeJSON(c, v)
	} else {
		err = printStatus(c, v)
	}
	if err != nil {
		return err
	}
	if v.Exit != statusOK {
		return exitError{v.Exit, fmt.Errorf("status: %s", strings.Join(v.Problems, "; "))}
	}
	return nil
}

// statusReport describes keys at now, with a problem for every
// certificate within expiryWarning of its not-after.
func statusReport(keys []agent.Key, now time.Time) statusView {
	v := statusView{Keys: []statusKeyView{}, Problems: []string{}}
	listed := map[string]bool{} // the keys shown as keys: a rotation's keys are shown beside theirs
	for _, k := range keys {
		if _, kind := rotation.Parse(k.Label); kind == rotation.Current {
			listed[k.Label] = true
		}
	}
	var others []agent.Key // the successors and retired keys of listed keys
	for _, k := range keys {
		if base, kind := rotation.Parse(k.Label); kind != rotation.Current && listed[base] {
			others = append(others, k)
			continue
		}
		kv := statusKeyView{Label: k.Label, Type: string(keytype.Of(k.Public))}
		if kv.Type == "" {
			kv.Type = "other"
		}
		if len(k.Chain) > 0 {
			leaf := k.Chain[0]
			na := leaf.NotAfter.UTC()
			left := leaf.NotAfter.Sub(now)
			days := int(left / (24 * time.Hour)) // whole days: toward zero, so "expired 1 day ago" is -1
			kv.Subject, kv.NotAfter, kv.DaysLeft = leaf.Subject.String(), &na, &days
			switch {
			case left <= 0:
				v.Problems = append(v.Problems, fmt.Sprintf("the certificate of key %q expired on %s", k.Label, na.Format(time.DateOnly)))
			case left < expiryWarning:
				v.Problems = append(v.Problems, fmt.Sprintf("the certificate of key %q expires in %d day%s (%s)", k.Label, days, plural(days), na.Format(time.DateOnly)))
			}
		}
		v.Keys = append(v.Keys, kv)
	}
	// Told beside their key, never a problem: no client signs with them.
	for _, k := range others {
		base, kind := rotation.Parse(k.Label)
		i := slices.IndexFunc(v.Keys, func(kv statusKeyView) bool { return kv.Label == base })
		if kind == rotation.Successor {
			v.Keys[i].Successor = &statusSuccessor{Label: k.Label, Type: string(keytype.Of(k.Public)), HasCertificate: len(k.Chain) > 0}
		} else {
			v.Keys[i].Retired = append(v.Keys[i].Retired, k.Label)
		}
	}
	return v
}

func printStatus(c *cli.Context, v statusView) error {
	w := c.App.Writer
	fmt.Fprintf(w, "agent:   %s\nversion: %s\nhealth:  %s\n", v.Socket, v.Version, v.Health)
	if len(v.Keys) == 0 {
		fmt.Fprintln(w, "keys:    none offered to this user")
		return nil
	}
	fmt.Fprintln(w)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "KEY\tTYPE\tCERTIFICATE\tNOT AFTER\tDAYS LEFT")
	for _, k := range v.Keys {
		subject, notAfter, days := "-", "-", "-"
		if k.NotAfter != nil {
			subject, notAfter, days = k.Subject, k.NotAfter.Format(time.RFC3339), fmt.Sprint(*k.DaysLeft)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", k.Label, k.Type, subject, notAfter, days)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	for _, k := range v.Keys {
		if s := k.Successor; s != nil {
			next := "next: hsmagent csr --key " + k.Label + " --successor"
			if s.HasCertificate {
				next = "certified, not promoted: hsmagent cert import --key " + k.Label + " --successor"
			}
			fmt.Fprintf(w, "%s: pending successor %s (%s), not used until promoted; %s\n", k.Label, s.Label, s.Type, next)
		}
		for _, r := range k.Retired {
			fmt.Fprintf(w, "%s: retired key %s kept; delete it once no one needs it: hsmagent keys delete --label %s --yes\n", k.Label, r, r)
		}
	}
	return nil
}

func plural(n int) string {
	if n == 1 {
		return ""
	}
	return "s"
}
