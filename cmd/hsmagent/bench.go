package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	"github.com/hsmagent/hsmagent/agent"
	"github.com/hsmagent/hsmagent/agent/bench"
	"github.com/hsmagent/hsmagent/agent/server"
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
With --concurrency 1,8,32 the four phases run at each concurrency in turn, in one run.`,
		Flags: append(tokenFlags(),
			&cli.StringFlag{Name: "key", Usage: "key `LABEL` (required)"},
			&cli.StringFlag{Name: "socket", Usage: "agent socket `PATH` (default: start a child agent)"},
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
	AgentMaxRSS  int64         `json:"agentMaxRssBytes"`
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

func benchAction(c *cli.Context) error {
	sel, err := selectToken(c)
	if err != nil {
		return err
	}
	label, err := keyLabel(c, "key", sel)
	if err != nil {
		return err
	}
	levels, err := parseConcurrency(c.String("concurrency"))
	if err != nil {
		return err
	}
	d := c.Duration("duration")
	if d <= 0 {
		return usagef("--duration must be positive")
	}
	return withToken(sel, func(tok *hsm.Token) error {
		local, err := tok.Signer(label)
		if err != nil {
			return err
		}

		socket := c.String("socket")
		if socket == "" {
			stop, path, err := startChildAgent(c)
			if err != nil {
				return err
			}
			defer stop()
			socket = path
		}
		ctx := c.Context
		dialCtx, cancel := context.WithTimeout(ctx, 10*time.Second)
		client, err := agent.Dial(dialCtx, socket)
		cancel()
		if err != nil {
			return err
		}
		defer client.Close()
		remote, err := client.Signer(ctx, label)
		if err != nil {
			return err
		}
		agentPID, err := socketPeerPID(socket)
		if err != nil {
			return err
		}

		report := benchReport{Key: label, KeyType: string(hsm.KeyTypeOf(local.Public())),
			Machine: fmt.Sprintf("%s/%s, %d CPUs", runtime.GOOS, runtime.GOARCH, runtime.NumCPU())}
		infof(c, "benchmarking key %q (%s), %s callers, %s per phase", label, report.KeyType, c.String("concurrency"), d)
		add := func(r bench.Result) bench.Result {
			report.Results = append(report.Results, r)
			if r.Errors > 0 {
				warnf(c, "%s (%d callers): %d errors, first: %s", r.Name, r.Concurrency, r.Errors, r.FirstError)
			}
			return r
		}
		for _, n := range levels {
			rss := &rssSampler{pid: agentPID}
			signLocal := add(bench.Signatures(ctx, "sign in-process", local, n, d))
			stopRSS := rss.start()
			signAgent := add(bench.Signatures(ctx, "sign via agent", remote, n, d))
			stopRSS()
			tlsLocal, err := bench.Handshakes(ctx, "TLS 1.3 handshake in-process", local, n, d)
			if err != nil {
				return err
			}
			add(tlsLocal)
			stopRSS = rss.start()
			tlsAgent, err := bench.Handshakes(ctx, "TLS 1.3 handshake via agent", remote, n, d)
			stopRSS()
			if err != nil {
				return err
			}
			add(tlsAgent)
			report.Runs = append(report.Runs, benchRun{Concurrency: n,
				SignRatio: ratio(signAgent.PerSecond, signLocal.PerSecond), TLSRatio: ratio(tlsAgent.PerSecond, tlsLocal.PerSecond),
				SignP50Added: signAgent.P50 - signLocal.P50, SignP99Added: signAgent.P99 - signLocal.P99,
				AgentMaxRSS: rss.max()})
			report.AgentMaxRSS = max(report.AgentMaxRSS, rss.max())
		}
		report.SignRatio, report.TLSRatio = report.Runs[0].SignRatio, report.Runs[0].TLSRatio

		if c.Bool("json") {
			return writeJSON(c, report)
		}
		w := tabwriter.NewWriter(c.App.Writer, 0, 4, 2, ' ', tabwriter.AlignRight)
		fmt.Fprintf(w, "%s\tcallers\top/s\tp50\tp99\terrors\t\n", "")
		for _, r := range report.Results {
			fmt.Fprintf(w, "%s\t%d\t%.0f\t%s\t%s\t%d\t\n", r.Name, r.Concurrency, r.PerSecond, r.P50.Round(time.Microsecond), r.P99.Round(time.Microsecond), r.Errors)
		}
		w.Flush()
		fmt.Fprintln(c.App.Writer)
		for _, r := range report.Runs {
			fmt.Fprintf(c.App.Writer, "%d callers: agent/in-process signatures %.2fx, TLS 1.3 handshakes %.2fx (target >= 0.90); p50 %s, p99 %s through the agent; agent peak RSS %.1f MiB (target < 40)\n",
				r.Concurrency, r.SignRatio, r.TLSRatio, signedDelta(r.SignP50Added), signedDelta(r.SignP99Added), float64(r.AgentMaxRSS)/(1<<20))
		}
		fmt.Fprintf(c.App.Writer, "machine: %s\n", report.Machine)
		return nil
	})
}

func ratio(a, b float64) float64 {
	if b == 0 {
		return 0
	}
	return a / b
}

// startChildAgent runs "hsmagent serve" on a temporary socket with the same
// token selection. The PIN must come from a file, the environment or the URI:
// a prompted PIN is not handed to another process.
func startChildAgent(c *cli.Context) (stop func(), socket string, err error) {
	if c.String("pin-file") == "" && os.Getenv("HSMAGENT_PIN") == "" && !strings.Contains(c.String("uri"), "pin-source") {
		return nil, "", usagef("bench starts its own agent only with --pin-file, HSMAGENT_PIN or a URI pin-source; or pass --socket of a running agent")
	}
	dir, err := os.MkdirTemp("", "hsmagent-bench")
	if err != nil {
		return nil, "", err
	}
	socket = filepath.Join(dir, "agent.sock")
	self, err := os.Executable()
	if err != nil {
		return nil, "", err
	}
	args := []string{"serve", "--socket", socket, "--log-level", "warn"}
	for _, f := range []string{"module", "token", "token-serial", "uri", "pin-file"} {
		if v := c.String(f); v != "" {
			args = append(args, "--"+f, v)
		}
	}
	if c.Bool("allow-insecure-pin-file") {
		args = append(args, "--allow-insecure-pin-file")
	}
	cmd := exec.Command(self, args...)
	cmd.Stderr = c.App.ErrWriter
	// The audit log of a benchmark is millions of lines: send it nowhere.
	cmd.Env = append(os.Environ(), "HSMAGENT_AUDIT_LOG=/dev/null")
	if err := cmd.Start(); err != nil {
		return nil, "", fmt.Errorf("starting the agent: %w", err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	stop = func() {
		cmd.Process.Signal(os.Interrupt)
		<-exited
		os.RemoveAll(dir)
	}
	deadline := time.After(30 * time.Second)
	for {
		if conn, err := net.Dial("unix", socket); err == nil {
			conn.Close()
			return stop, socket, nil
		}
		select {
		case <-exited:
			os.RemoveAll(dir)
			return nil, "", errors.New("the child agent exited; see its message above")
		case <-deadline:
			stop()
			return nil, "", errors.New("the child agent did not start within 30s")
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// socketPeerPID finds the agent's pid from its socket with SO_PEERCRED.
func socketPeerPID(socket string) (int, error) {
	conn, err := net.Dial("unix", socket)
	if err != nil {
		return 0, fmt.Errorf("connecting to %q: %w", socket, err)
	}
	defer conn.Close()
	p, err := server.ReadPeer(conn)
	if err != nil {
		return 0, err
	}
	return p.PID, nil
}

// rssSampler records the largest resident set of a process while running.
type rssSampler struct {
	pid  int
	mu   sync.Mutex
	peak int64
}

func (s *rssSampler) start() (stop func()) {
	done := make(chan struct{})
	finished := make(chan struct{})
	go func() {
		defer close(finished)
		t := time.NewTicker(50 * time.Millisecond)
		defer t.Stop()
		for {
			s.sample()
			select {
			case <-done:
				return
			case <-t.C:
			}
		}
	}()
	return func() { close(done); <-finished }
}

func (s *rssSampler) sample() {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", s.pid))
	if err != nil {
		return
	}
	for _, line := range strings.Split(string(data), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			if err == nil {
				s.mu.Lock()
				s.peak = max(s.peak, kb*1024)
				s.mu.Unlock()
			}
		}
	}
}

func (s *rssSampler) max() int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.peak
}

// signedDelta words a latency difference: "+1.2ms" or "-300µs".
func signedDelta(d time.Duration) string {
	d = d.Round(time.Microsecond)
	if d < 0 {
		return "-" + (-d).String()
	}
	return "+" + d.String()
}
