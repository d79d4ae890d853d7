package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"slices"
	"time"

	"github.com/hsmagent/hsmagent/agent"
	"github.com/hsmagent/hsmagent/agent/metrics"
	"github.com/hsmagent/hsmagent/agent/server"
	"github.com/hsmagent/hsmagent/hsm"
	"github.com/hsmagent/hsmagent/hsm/hsmstore"
	"github.com/hsmagent/hsmagent/hsm/worker"
	"github.com/urfave/cli/v2"
)

// socketFlag is the agent's socket, for serve and for its clients.
var socketFlag = &cli.StringFlag{Name: "socket", Usage: "agent socket `PATH`", EnvVars: []string{agent.SocketEnv}}

func serveCommand() *cli.Command {
	return &cli.Command{
		Name:  "serve",
		Usage: "run the agent: open the token once and serve signatures over a Unix socket",
		Description: `The agent is the only process that knows the PIN. Local processes connect to
the socket; each connection's uid/gid/pid is read with SO_PEERCRED and checked against the
access rules of the config file (by default only the agent's own user and root may sign).
Every decision (signature, refusal, listing) writes one audit record with a seq number and
the request id the caller sees in its error.

Signals: SIGHUP reopens --audit-log (for logrotate) and reloads certificate chains and the
config's access rules (a failed reload keeps the previous state); SIGTERM and SIGINT stop accepting, finish in-flight requests,
close the token and exit 0.`,
		Flags: slices.Concat(tokenFlags(), flagsOf(limitSettings(new(server.Options))),
			[]cli.Flag{configFlag, socketFlag}, flagsOf(new(config).serveSettings()),
			[]cli.Flag{&cli.BoolFlag{Name: "check-config", Usage: "load the config, build the access policy, validate the flags and exit 0, without opening the token or listening"}},
		),
		Action: serveAction,
	}
}

// serveSettings are the agent's own: its socket, logs, audit and metrics,
// and the HSM's gate. Their flags are declared here, but for the socket's
// (socketFlag, shared with the agent's clients).
func (cfg *config) serveSettings() []setting {
	o := &cfg.Server
	return []setting{
		{key: "socket", val: text{&cfg.Socket}},
		{key: "socket_mode", usage: "socket file `MODE` (octal)", val: fileMode{&cfg.SocketMode, server.DefaultSocketMode}},
		{key: "socket_group", usage: "`GROUP` owning the socket: its members may connect, the access rules then decide (default: the directory's or the agent's group)", val: text{&cfg.SocketGroup}},
		{key: "pkcs11_socket", usage: "also serve PKCS#11 on a Unix socket `PATH`, for p11-kit-client.so (P11_KIT_SERVER_ADDRESS=unix:path=PATH; docs/pkcs11.md), with the socket's mode and group (default: off)", val: text{&cfg.PKCS11Socket}, serveOnly: true},
		{key: "log_format", usage: "`FORMAT`: text or json", val: logFormat{&cfg.LogFormat}},
		{key: "log_level", usage: "`LEVEL`: debug, info, warn, error", val: logLevel{&cfg.LogLevel}},
		{key: "hsm_in_process", usage: "load the PKCS#11 module in the agent's own process, not in a supervised worker process (a module that crashes then takes the agent with it)", val: toggle{&cfg.HSMInProcess}},
		{key: "hsm_kill_after", usage: "kill and replace the HSM worker when one of its calls has not returned for this `DURATION`", val: positive(&cfg.HSMKillAfter, worker.DefaultKillAfter)},
		{key: "audit_log", usage: "append audit records as JSON lines to `FILE` (default: the log)", val: text{&cfg.AuditLog}},
		{key: "audit_signing_key", usage: "`LABEL` of a key in the token that signs a checkpoint of the audit chain (hsmagent audit verify checks it) every --audit-checkpoint-every, on SIGHUP and at shutdown; needs --audit-log", val: text{&o.AuditSigningKey}},
		{key: "audit_checkpoint_every", usage: "how often the audit chain gets a signed checkpoint", val: positive(&o.AuditCheckpointEvery, time.Minute)},
		{key: "audit_fail_open", usage: "keep signing when the audit trail cannot be written (records lost, said once per outage in the log); by default nothing is signed without its record", val: toggle{&o.AuditFailOpen}},
		{key: "metrics_listen", usage: "serve Prometheus metrics at /metrics on a Unix socket `PATH` (mode 0600, or 0660 with --metrics-group) or, with --metrics-tcp, a loopback ADDR such as 127.0.0.1:9464 (default: off)", val: text{&cfg.MetricsListen}, serveOnly: true},
		{key: "metrics_group", usage: "`GROUP` owning the metrics socket: its members (the scrapers) may read it", val: text{&cfg.Metrics.Group}, serveOnly: true},
		{key: "metrics_tcp", usage: "allow a loopback TCP --metrics-listen, which every local user can read: key labels, certificate expiry and signature counts per key", val: toggle{&cfg.Metrics.TCP}, serveOnly: true},
		{key: "max_sessions", usage: "signatures in the HSM at once: its PKCS#11 session pool", val: count{&o.MaxInFlight, server.DefaultMaxInFlight}},
		{key: "max_waiting", usage: "signatures queued behind them before new ones are refused (ResourceExhausted)", val: count{&o.MaxWaiting, server.DefaultMaxWaiting}},
		{key: "hsm_timeout", usage: "deadline of each HSM operation; past it the agent reports NOT_SERVING and fails fast", val: positive(&o.HSMTimeout, server.DefaultHSMTimeout)},
	}
}

// newLogger is the logger of a command whose flags give its format and
// level as text.
func newLogger(w io.Writer, format, level string) (*slog.Logger, error) {
	var lv slog.Level
	if err := (logLevel{&lv}).set(level); err != nil {
		return nil, usagef("--log-level %v", err)
	}
	if err := (logFormat{&format}).set(format); err != nil {
		return nil, usagef("--log-format %v", err)
	}
	return logger(w, format, lv), nil
}

// logger writes to w in format, text or json.
func logger(w io.Writer, format string, level slog.Level) *slog.Logger {
	opts := &slog.HandlerOptions{Level: level}
	if format == "json" {
		return slog.New(slog.NewJSONHandler(w, opts))
	}
	return slog.New(slog.NewTextHandler(w, opts))
}

func serveAction(c *cli.Context) error {
	if err := harden(); err != nil {
		return err
	}
	cfg, err := commandConfig(c)
	if err != nil {
		return err
	}
	log := logger(c.App.ErrWriter, cfg.LogFormat, cfg.LogLevel)
	inherited, err := server.InheritedListener()
	if err != nil {
		return err
	}
	if err := cfg.checkListeners(inherited, log); err != nil {
		return err
	}
	check := c.Bool("check-config")
	opts, audit, err := cfg.serverOptions(log, !check)
	if err != nil {
		return err
	}
	defer audit.close()
	sel, err := selectToken(c)
	if err != nil || check {
		return configChecked(c, err)
	}
	var srv *server.Server
	m, stopMetrics, err := startMetrics(cfg.MetricsListen, cfg.Metrics, &opts, func() (int, int) { return srv.HSMLoad() }, log)
	if err != nil {
		return err
	}
	defer stopMetrics()
	events := &workerEvents{metrics: m}
	store, err := cfg.openStore(sel, opts.MaxInFlight, m, log, events)
	if err != nil {
		return err
	}
	defer store.Close()
	if srv, err = server.New(store, opts); err != nil {
		return err
	}
	warnUnreadableTokenFiles(sel.cfg.ModulePath, log)
	events.srv.Store(srv)
	l, socket, err := serveListener(c, inherited, cfg.SocketMode, log)
	if err != nil {
		return err
	}
	pl, err := pkcs11Listener(c, cfg)
	if err != nil {
		l.Close()
		return err
	}
	d := daemon{
		name: "agent",
		log:  log,
		serve: func() error {
			if pl != nil {
				go func() {
					if err := srv.ServePKCS11(pl); err != nil {
						log.Error("the PKCS#11 socket stopped accepting connections", "socket", cfg.PKCS11Socket, "err", err)
					}
				}()
			}
			return srv.Serve(l)
		},
		shutdown: func(ctx context.Context) error { srv.Shutdown(ctx); return nil },
		reload: func() {
			srv.Checkpoint("sighup")
			audit.reopen(log)
			reload(c, srv, log)
			warnUnreadableTokenFiles(sel.cfg.ModulePath, log)
		},
		healthy: srv.HSMAnswering,
	}
	return d.run("agent serving", "socket", socket, "pkcs11_socket", cfg.PKCS11Socket, "token", store.TokenLabel(), "pid", os.Getpid(), "revision", srv.Revision(),
		"hsm_worker", !cfg.HSMInProcess)
}

// configChecked ends --check-config: err, or the news that all is well.
func configChecked(c *cli.Context, err error) error {
	if err == nil {
		infof(c, "serve: configuration valid (--check-config: token not opened, socket not created)")
	}
	return err
}

// agentStore is the agent's key store: the token, in a worker process or
// in this one.
type agentStore interface {
	server.KeyStore
	TokenLabel() string
	Close() error
}

// openStore opens the token with a session for each signature in the HSM
// at once, and the one crypto11 keeps for itself, logged in: in a
// supervised worker process unless hsm_in_process is set.
func (cfg *config) openStore(sel tokenSelection, inFlight int, m *metrics.Agent, log *slog.Logger, ev *workerEvents) (agentStore, error) {
	sel.cfg.MaxSessions = inFlight + 1
	if !cfg.HSMInProcess {
		return startWorker(sel.cfg, cfg.HSMKillAfter, log, ev)
	}
	sel.cfg.Logger = log
	if m != nil {
		sel.cfg.OnReopen = m.Reopened
	}
	tok, err := hsm.Open(sel.cfg)
	if err != nil {
		return nil, err
	}
	return inProcessStore{hsmstore.New(tok)}, nil
}

// inProcessStore is the token opened in the agent's process.
type inProcessStore struct{ *hsmstore.Store }

func (s inProcessStore) TokenLabel() string { return s.Token.Label() }
func (s inProcessStore) Close() error       { return s.Token.Close() }

// checkListeners refuses what the agent could not listen on, before the
// token is opened: no socket, or a metrics address serve would refuse; and
// an HSM worker bound no longer than the HSM timeout.
func (cfg *config) checkListeners(inherited net.Listener, log *slog.Logger) error {
	if cfg.Socket == "" && inherited == nil {
		return usagef("no socket path: pass --socket PATH, set %s or put socket: in the config", agent.SocketEnv)
	}
	if cfg.Server.AuditSigningKey != "" && cfg.AuditLog == "" {
		return usagef("--audit-signing-key %q needs --audit-log FILE: the checkpoints sign the chain of that file's lines", cfg.Server.AuditSigningKey)
	}
	if !cfg.HSMInProcess && cfg.HSMKillAfter <= cfg.Server.HSMTimeout {
		// A slow answer would kill the worker before the caller was told.
		return usagef("--hsm-kill-after %v must be longer than --hsm-timeout %v", cfg.HSMKillAfter, cfg.Server.HSMTimeout)
	}
	if cfg.SocketMode&0o007 != 0 {
		log.Warn("the socket is open to all users; access rules still apply", "mode", fmt.Sprintf("%04o", uint32(cfg.SocketMode)))
	}
	if cfg.MetricsListen != "" {
		if err := metrics.CheckAddrWith(cfg.MetricsListen, cfg.Metrics); err != nil {
			return usageError{err}
		}
	}
	return nil
}

// serverOptions are the server's options as configured, with the logger,
// the access policy and the audit trail: the log, or the audit_log file
// (opened unless open is false, for --check-config).
func (cfg *config) serverOptions(log *slog.Logger, open bool) (server.Options, *auditFile, error) {
	opts := cfg.Server
	opts.Logger, opts.Audit, opts.Version = log, log, version
	var err error
	if opts.Policy, err = cfg.policy(); err != nil {
		return opts, nil, err
	}
	var audit *auditFile
	if cfg.AuditLog != "" && open {
		f, err := server.OpenAuditFile(cfg.AuditLog)
		if err != nil {
			return opts, nil, err
		}
		audit = &auditFile{f}
		opts.Audit = slog.New(slog.NewJSONHandler(f, nil))
		opts.AuditChain = f
	}
	return opts, audit, nil
}

// auditFile is the audit_log file, reopened on SIGHUP for logrotate; nil
// when the audit records go to the log.
type auditFile struct{ f *server.AuditFile }

func (a *auditFile) close() {
	if a != nil {
		a.f.Close()
	}
}

// reopen starts a new audit file after logrotate moved the old one; on
// error the agent keeps writing to the old one.
func (a *auditFile) reopen(log *slog.Logger) {
	if a == nil {
		return
	}
	if err := a.f.Reopen(); err != nil {
		log.Error("reopening the audit log failed, writing to the previous file", "err", err)
	}
}

// reload re-reads the config's access rules and the token's chains; on any
// error the agent keeps serving with what it had.
func reload(c *cli.Context, srv *server.Server, log *slog.Logger) {
	cfg, err := loadConfig(c.String("config"))
	if err != nil {
		log.Error("reload failed, keeping the previous state", "err", err)
		return
	}
	policy, err := cfg.policy()
	if err != nil {
		log.Error("reload failed, keeping the previous state", "err", err)
		return
	}
	if err := srv.Reload(policy); err != nil {
		log.Error("reload failed, keeping the previous state", "err", err)
		return
	}
	log.Info("reloaded", "revision", srv.Revision())
}

// startMetrics opens the metrics listener when addr is set and makes the
// server's observer the Prometheus one; the returned func closes it.
func startMetrics(addr string, lo metrics.ListenOptions, opts *server.Options, load func() (int, int), log *slog.Logger) (*metrics.Agent, func(), error) {
	if addr == "" {
		return nil, func() {}, nil
	}
	l, err := metrics.ListenWith(addr, lo)
	if err != nil {
		return nil, nil, usageError{err}
	}
	m := metrics.NewAgent(load)
	opts.Observer = m
	go func() {
		if err := metrics.Serve(l, m.Handler()); err != nil {
			log.Error("metrics listener stopped", "err", err)
		}
	}()
	log.Info("metrics served", "listen", addr, "path", "/metrics")
	return m, func() { l.Close() }, nil
}
