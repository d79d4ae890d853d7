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
through the agent, and samples the agent's resident memory during the agent phases.`,
		Flags: append(tokenFlags(),
			&cli.StringFlag{Name: "key", Usage: "key `LABEL`"},
			&cli.StringFlag{Name: "socket", Usage: "agent socket `PATH` (default: start a child agent)"},
			&cli.DurationFlag{Name: "duration", Usage: "length of each phase", Value: 5 * time.Second},
			&cli.IntFlag{Name: "concurrency", Usage: "concurrent callers", Value: 8},
			jsonFlag,
		),
		Action: benchAction,
	}
}

type benchReport struct {
	Key         string         `json:"key"`
	KeyType     string         `json:"keyType"`
	Machine     string         `json:"machine"`
	Results     []bench.Result `json:"results"`
	SignRatio   float64        `json:"signRatio"`
	TLSRatio    float64        `json:"tlsRatio"`
	AgentMaxRSS int64          `json:"agentMaxRssBytes"`
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
	n, d := c.Int("concurrency"), c.Duration("duration")
	if n < 1 || d <= 0 {
		return usagef("--concurrency must be at least 1 and --duration positive")
	}
	tok, err := hsm.Open(sel.cfg)
	if err != nil {
		return err
	}
	defer tok.Close()
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
	infof(c, "benchmarking key %q (%s), %d callers, %s per phase", label, report.KeyType, n, d)
	add := func(r bench.Result) bench.Result {
		report.Results = append(report.Results, r)
		if r.Errors > 0 {
			warnf(c, "%s: %d errors, first: %s", r.Name, r.Errors, r.FirstError)
		}
		return r
	}
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
	report.SignRatio = ratio(signAgent.PerSecond, signLocal.PerSecond)
	report.TLSRatio = ratio(tlsAgent.PerSecond, tlsLocal.PerSecond)
	report.AgentMaxRSS = rss.max()

	if c.Bool("json") {
		return writeJSON(c, report)
	}
	w := tabwriter.NewWriter(c.App.Writer, 0, 4, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintf(w, "%s\top/s\tp50\tp99\terrors\t\n", "")
	for _, r := range report.Results {
		fmt.Fprintf(w, "%s\t%.0f\t%s\t%s\t%d\t\n", r.Name, r.PerSecond, r.P50.Round(time.Microsecond), r.P99.Round(time.Microsecond), r.Errors)
	}
	w.Flush()
	fmt.Fprintf(c.App.Writer, "\nagent/in-process: signatures %.2fx (target >= 0.85), TLS 1.3 handshakes %.2fx (target >= 0.90)\n",
		report.SignRatio, report.TLSRatio)
	fmt.Fprintf(c.App.Writer, "agent peak RSS during load: %.1f MiB (target < 40)\n", float64(report.AgentMaxRSS)/(1<<20))
	fmt.Fprintf(c.App.Writer, "machine: %s\n", report.Machine)
	return nil
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
