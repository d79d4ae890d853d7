package main

import (
	"crypto"
	"fmt"
	"io"
	"runtime"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/hsmagent/hsmagent/agent/bench"
	"github.com/hsmagent/hsmagent/hsm"
	"github.com/urfave/cli/v2"
)

func benchCommand() *cli.Command {
	return &cli.Command{
		Name:  "bench",
		Usage: "measure signatures and TLS 1.3 handshakes in-process and through the agent, side by side",
		Description: `Opens the token in this process and connects to the agent (--socket), or starts
its own agent as a child process on a temporary socket. Runs, on the same key: signatures
in-process, signatures through the agent, TLS 1.3 handshakes with the key in-process and
through the agent, and samples the agent's resident memory during the agent phases.
With --concurrency 1,8,32 the four phases run at each concurrency in turn, in one run.
At 1 caller it also measures the machine's floor: the p50 that three processes passing a
message along with plain reads and writes add to a wait as long as an in-process signature,
about the least that the agent's three processes (client, agent, HSM worker) pay; half of --duration
with the processes where the kernel puts them, half with the three on one CPU (on a VM often
far less; see docs/performance.md, "The machine's floor"). Run it on a quiet host.`,
		Flags: append(tokenFlags(),
			&cli.StringFlag{Name: "key", Usage: "key `LABEL` (required)"},
			&cli.StringFlag{Name: "socket", Usage: "agent socket `PATH` (default: start a child agent)"},
			&cli.StringFlag{Name: "pkcs11", Usage: "also sign through the agent's PKCS#11 socket with p11-kit's client module at `PATH` (p11-kit-client.so; the child agent serves one, a running agent's is named by P11_KIT_SERVER_ADDRESS)"},
			&cli.DurationFlag{Name: "duration", Usage: "length of each phase", Value: 5 * time.Second},
			&cli.StringFlag{Name: "concurrency", Usage: "concurrent callers: `N` or a list N,N,... measured one after the other", Value: "8"},
			jsonFlag,
		),
		Action: benchAction,
	}
}

// benchReport is the JSON of a run. Results lists every phase at every
// concurrency, in run order (each with its concurrency); Runs gives the
// ratios per concurrency. SignRatio and TLSRatio repeat the ratios of the
// first concurrency, for readers of the single-concurrency report.
type benchReport struct {
	Key         string         `json:"key"`
	KeyType     string         `json:"keyType"`
	Machine     string         `json:"machine"`
	Results     []bench.Result `json:"results"`
	Runs        []benchRun     `json:"runs"`
	SignRatio   float64        `json:"signRatio"`
	TLSRatio    float64        `json:"tlsRatio"`
	AgentMaxRSS int64          `json:"agentMaxRssBytes"`
}

// benchRun compares the agent with in-process at one concurrency.
type benchRun struct {
	Concurrency int     `json:"concurrency"`
	SignRatio   float64 `json:"signRatio"` // agent op/s over in-process op/s
	TLSRatio    float64 `json:"tlsRatio"`
	// SignP50Added and SignP99Added are the agent's latency minus in-process latency.
	SignP50Added time.Duration `json:"signP50Added"`
	SignP99Added time.Duration `json:"signP99Added"`
	// FloorP50Added, at 1 caller, is what the machine alone adds to the
	// median of a wait as long as the in-process signature's when it is
	// made two processes away, as the agent's are (bench.Floor): about
	// the least SignP50Added could be.
	FloorP50Added time.Duration `json:"floorP50Added,omitempty"`
	// FloorOneCPUP50Added is the same with the three processes on one CPU:
	// what the machine would charge the agent and its callers sharing one.
	FloorOneCPUP50Added time.Duration `json:"floorOneCpuP50Added,omitempty"`
	AgentMaxRSS         int64         `json:"agentMaxRssBytes"`
	// PKCS11SignRatio is op/s through p11-kit-client.so over in-process (--pkcs11).
	PKCS11SignRatio float64 `json:"pkcs11SignRatio,omitempty"`
}

// parseConcurrency reads "8" or "1,8,32".
func parseConcurrency(s string) ([]int, error) {
	var out []int
	for _, f := range strings.Split(s, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n < 1 {
			return nil, usagef("--concurrency %q: want a number of callers of at least 1, or a comma-separated list of them", s)
		}
		out = append(out, n)
	}
	return out, nil
}

// benchSetup is what the flags ask of a run.
type benchSetup struct {
	sel    tokenSelection
	label  string
	levels []int         // concurrencies, measured one after the other
	phase  time.Duration // length of each phase
}

func parseBench(c *cli.Context) (benchSetup, error) {
	sel, err := selectToken(c)
	if err != nil {
		return benchSetup{}, err
	}
	label, err := keyLabel(c, "key", sel)
	if err != nil {
		return benchSetup{}, err
	}
	levels, err := parseConcurrency(c.String("concurrency"))
	if err != nil {
		return benchSetup{}, err
	}
	if c.Duration("duration") <= 0 {
		return benchSetup{}, usagef("--duration must be positive")
	}
	return benchSetup{sel: sel, label: label, levels: levels, phase: c.Duration("duration")}, nil
}

func benchAction(c *cli.Context) error {
	setup, err := parseBench(c)
	if err != nil {
		return err
	}
	return withToken(setup.sel, func(tok *hsm.Token) error {
		local, err := tok.Signer(setup.label)
		if err != nil {
			return err
		}
		remote, agentPID, p11Addr, stop, err := benchAgent(c, setup.label)
		if err != nil {
			return err
		}
		defer stop()
		var p11 crypto.Signer
		if module := c.String("pkcs11"); module != "" {
			var closeP11 func()
			if p11, closeP11, err = pkcs11Signer(module, p11Addr, setup.label); err != nil {
				return err
			}
			defer closeP11()
		}
		report := benchReport{Key: setup.label, KeyType: string(hsm.KeyTypeOf(local.Public())),
			Machine: fmt.Sprintf("%s/%s, %d CPU%s", runtime.GOOS, runtime.GOARCH, runtime.NumCPU(), plural(runtime.NumCPU()))}
		infof(c, "benchmarking key %q (%s), %s callers, %s per phase", setup.label, report.KeyType, c.String("concurrency"), setup.phase)
		b := &benchRunner{c: c, report: &report, local: local, remote: remote, p11: p11, agentPID: agentPID, phase: setup.phase}
		for _, n := range setup.levels {
			if err := b.level(n); err != nil {
				return err
			}
		}
		report.SignRatio, report.TLSRatio = report.Runs[0].SignRatio, report.Runs[0].TLSRatio
		if c.Bool("json") {
			return writeJSON(c, report)
		}
		return printBench(c.App.Writer, report)
	})
}

// benchRunner runs the four phases at each concurrency into one report.
type benchRunner struct {
	c             *cli.Context
	report        *benchReport
	local, remote crypto.Signer // the key in this process, and through the agent
	p11           crypto.Signer // through the agent's PKCS#11 socket (--pkcs11), or nil
	agentPID      int
	phase         time.Duration
}

// add records a phase's result and warns of its errors.
func (b *benchRunner) add(r bench.Result) bench.Result {
	b.report.Results = append(b.report.Results, r)
	if r.Errors > 0 {
		warnf(b.c, "%s (%d callers): %d errors, first: %s", r.Name, r.Concurrency, r.Errors, r.FirstError)
	}
	return r
}

// level runs the phases with n callers, sampling the agent's memory while
// it works.
func (b *benchRunner) level(n int) error {
	ctx := b.c.Context
	rss := &rssSampler{pid: b.agentPID}
	signLocal := b.add(bench.Signatures(ctx, "sign in-process", b.local, n, b.phase))
	stopRSS := rss.start()
	signAgent := b.add(bench.Signatures(ctx, "sign via agent", b.remote, n, b.phase))
	stopRSS()
	tlsLocal, err := bench.Handshakes(ctx, "TLS 1.3 handshake in-process", b.local, n, b.phase)
	if err != nil {
		return err
	}
	b.add(tlsLocal)
	stopRSS = rss.start()
	tlsAgent, err := bench.Handshakes(ctx, "TLS 1.3 handshake via agent", b.remote, n, b.phase)
	stopRSS()
	if err != nil {
		return err
	}
	b.add(tlsAgent)
	run := benchRun{Concurrency: n,
		SignRatio: ratio(signAgent.PerSecond, signLocal.PerSecond), TLSRatio: ratio(tlsAgent.PerSecond, tlsLocal.PerSecond),
		SignP50Added: signAgent.P50 - signLocal.P50, SignP99Added: signAgent.P99 - signLocal.P99}
	if b.p11 != nil {
		stopRSS = rss.start()
		signP11 := b.add(bench.Signatures(ctx, "sign via PKCS#11", b.p11, n, b.phase))
		stopRSS()
		run.PKCS11SignRatio = ratio(signP11.PerSecond, signLocal.PerSecond)
	}
	if n == 1 {
		// What the machine adds to a wait as long as the HSM's, crossing
		// processes as the agent's signatures do (see bench.Floor).
		// A floor that cannot be measured leaves the rest of the report.
		if floor, err := bench.Floor(ctx, signLocal.P50, b.phase, spawnFloorPeer); err != nil {
			warnf(b.c, "the machine's floor was not measured: %v", err)
		} else {
			run.FloorP50Added, run.FloorOneCPUP50Added = floor.Added(), floor.AddedOneCPU()
		}
	}
	run.AgentMaxRSS = rss.max()
	b.report.Runs = append(b.report.Runs, run)
	b.report.AgentMaxRSS = max(b.report.AgentMaxRSS, rss.max())
	return nil
}

func printBench(out io.Writer, report benchReport) error {
	w := tabwriter.NewWriter(out, 0, 4, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintf(w, "%s\tcallers\top/s\tp50\tp99\terrors\t\n", "")
	for _, r := range report.Results {
		fmt.Fprintf(w, "%s\t%d\t%.0f\t%s\t%s\t%d\t\n", r.Name, r.Concurrency, r.PerSecond, r.P50.Round(time.Microsecond), r.P99.Round(time.Microsecond), r.Errors)
	}
	if err := w.Flush(); err != nil {
		return err
	}
	fmt.Fprintln(out)
	for _, r := range report.Runs {
		if r.PKCS11SignRatio > 0 {
			fmt.Fprintf(out, "%d caller%s: PKCS#11 (p11-kit-client.so)/in-process signatures %.2fx\n", r.Concurrency, plural(r.Concurrency), r.PKCS11SignRatio)
		}
		fmt.Fprintf(out, "%d caller%s: agent/in-process signatures %.2fx, TLS 1.3 handshakes %.2fx (target >= 0.90); p50 %s, p99 %s through the agent; agent peak RSS %.1f MiB (target < 40)\n",
			r.Concurrency, plural(r.Concurrency), r.SignRatio, r.TLSRatio, signedDelta(r.SignP50Added), signedDelta(r.SignP99Added), float64(r.AgentMaxRSS)/(1<<20))
		if r.Concurrency == 1 && r.FloorP50Added != 0 {
			where := "where the kernel puts them"
			if runtime.NumCPU() == 1 {
				where = "on this bench's one CPU" // taskset: both chains share it
			}
			fmt.Fprintf(out, "1 caller: this machine's floor, three processes passing a message around the same wait with plain reads and writes: p50 %s %s, %s with the three on one CPU\n",
				signedDelta(r.FloorP50Added), where, signedDelta(r.FloorOneCPUP50Added))
		}
	}
	_, err := fmt.Fprintf(out, "machine: %s\n", report.Machine)
	return err
}

func ratio(a, b float64) float64 {
	if b == 0 {
		return 0
	}
	return a / b
}

// signedDelta words a latency difference: "+1.2ms" or "-300µs".
func signedDelta(d time.Duration) string {
	d = d.Round(time.Microsecond)
	if d < 0 {
		return "-" + (-d).String()
	}
	return "+" + d.String()
}
