package main

import (
	"fmt"
	"log/slog"
	"net"
	"os"
	"runtime"
	"runtime/debug"
	"sync/atomic"
	"time"

	"github.com/hsmagent/hsmagent/agent/core"
	"github.com/hsmagent/hsmagent/agent/metrics"
	"github.com/hsmagent/hsmagent/agent/server"
	"github.com/hsmagent/hsmagent/hsm"
	"github.com/hsmagent/hsmagent/hsm/hsmstore"
	"github.com/hsmagent/hsmagent/hsm/worker"
)

// workerCommand is the argv[1] of the HSM worker that serve starts: not a
// command of the CLI (no flags, no help), the worker's socketpair is fd 3.
const workerCommand = "hsm-worker"

// runHSMWorker is the worker process: it opens the token the agent names
// over fd 3 and signs what it is asked (the signatures on fd 4), until the agent closes fd 3.
func runHSMWorker() int {
	log := slog.New(slog.NewJSONHandler(os.Stderr, nil)).With("component", "hsm-worker", "pid", os.Getpid())
	conn, err := net.FileConn(os.NewFile(3, "agent"))
	if err != nil {
		fmt.Fprintf(os.Stderr, "hsmagent %s: fd 3 is not the agent's socket (this command is started by 'hsmagent serve'): %v\n", workerCommand, err)
		return 2
	}
	err = worker.Serve(conn, os.NewFile(4, "signatures"), os.Getpid(), func(in worker.Init) (core.KeyStore, string, error) {
		// Every session's call waits in C holding a scheduler slot, so
		// the worker has a slot per session and two for its socket: no
		// answer ever waits for the runtime to take a slot back. It
		// allocates little, so more slots cost no collection work.
		runtime.GOMAXPROCS(max(runtime.NumCPU(), in.MaxSessions+2))
		debug.SetGCPercent(400)
		tok, err := hsm.Open(hsm.Config{ModulePath: in.ModulePath, TokenLabel: in.TokenLabel, TokenSerial: in.TokenSerial,
			MaxSessions: in.MaxSessions, Logger: log, PIN: func() (string, error) { return in.PIN, nil }})
		if err != nil {
			return nil, "", err
		}
		return hsmstore.New(tok), tok.Label(), nil
	})
	if err != nil {
		log.Error("the HSM worker stops", "err", err)
		return 1
	}
	return 0
}

// workerEvents is where a worker's end and its replacement are told: the
// audit trail and the metrics, once serve has them.
type workerEvents struct {
	srv     atomic.Pointer[server.Server]
	metrics *metrics.Agent
}

func (e *workerEvents) ended(pid int, exit string, killed bool, inFlight int) {
	if e.metrics != nil {
		e.metrics.WorkerEnded(killed)
	}
	if srv := e.srv.Load(); srv != nil {
		srv.AuditEvent("hsm worker ended", slog.Int("pid", pid), slog.String("exit", exit), slog.Bool("killed", killed),
			slog.Int("in_flight_failed", inFlight))
	}
}

func (e *workerEvents) started(pid int) {
	if srv := e.srv.Load(); srv != nil {
		srv.AuditEvent("hsm worker started", slog.Int("pid", pid))
	}
}

// startWorker starts the HSM worker for the token cfg selects, with the
// PIN cfg's source gives, and returns it as the agent's key store.
func startWorker(cfg hsm.Config, killAfter time.Duration, log *slog.Logger, ev *workerEvents) (*worker.Store, error) {
	exe, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("hsm: finding this binary to start the HSM worker: %w", err)
	}
	return worker.Start(worker.Options{
		Command:   []string{exe, workerCommand},
		Init:      worker.Init{ModulePath: cfg.ModulePath, TokenLabel: cfg.TokenLabel, TokenSerial: cfg.TokenSerial, MaxSessions: cfg.MaxSessions},
		PIN:       cfg.PIN,
		Logger:    log,
		KillAfter: killAfter,
		OnEnd:     ev.ended,
		OnStart:   ev.started,
	})
}
