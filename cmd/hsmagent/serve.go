package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strconv"

	"github.com/hsmagent/hsmagent/agent"
	"github.com/hsmagent/hsmagent/agent/metrics"
	"github.com/hsmagent/hsmagent/agent/server"
	"github.com/hsmagent/hsmagent/hsm"
	"github.com/hsmagent/hsmagent/hsm/hsmstore"
	"github.com/urfave/cli/v2"
)

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
		Flags: append(append(tokenFlags(), limitFlags()...),
			configFlag,
			socketFlag,
			&cli.StringFlag{Name: "socket-mode", Usage: "socket file `MODE` (octal)", Value: "0660", EnvVars: []string{"HSMAGENT_SOCKET_MODE"}},
			&cli.StringFlag{Name: "socket-group", Usage: "`GROUP` owning the socket: its members may connect, the access rules then decide (default: the directory's or the agent's group)", EnvVars: []string{"HSMAGENT_SOCKET_GROUP"}},
			&cli.StringFlag{Name: "log-format", Usage: "`FORMAT`: text or json", Value: "text", EnvVars: []string{"HSMAGENT_LOG_FORMAT"}},
			&cli.StringFlag{Name: "log-level", Usage: "`LEVEL`: debug, info, warn, error", Value: "info", EnvVars: []string{"HSMAGENT_LOG_LEVEL"}},
			&cli.StringFlag{Name: "audit-log", Usage: "append audit records as JSON lines to `FILE` (default: the log)", EnvVars: []string{"HSMAGENT_AUDIT_LOG"}},
			&cli.BoolFlag{Name: "audit-fail-open", Usage: "keep signing when the audit trail cannot be written (records lost, said once per outage in the log); by default nothing is signed without its record", EnvVars: []string{"HSMAGENT_AUDIT_FAIL_OPEN"}},
			&cli.StringFlag{Name: "metrics-listen", Usage: "serve Prometheus metrics at /metrics on a Unix socket `PATH` (mode 0600, or 0660 with --metrics-group) or, with --metrics-tcp, a loopback ADDR such as 127.0.0.1:9464 (default: off)", EnvVars: []string{"HSMAGENT_METRICS_LISTEN"}},
			&cli.StringFlag{Name: "metrics-group", Usage: "`GROUP` owning the metrics socket: its members (the scrapers) may read it", EnvVars: []string{"HSMAGENT_METRICS_GROUP"}},
			&cli.BoolFlag{Name: "metrics-tcp", Usage: "allow a loopback TCP --metrics-listen, which every local user can read: key labels, certificate expiry and signature counts per key", EnvVars: []string{"HSMAGENT_METRICS_TCP"}},
			&cli.IntFlag{Name: "max-sessions", Usage: "signatures in the HSM at once: its PKCS#11 session pool", Value: server.DefaultMaxInFlight, EnvVars: []string{"HSMAGENT_MAX_SESSIONS"}},
			&cli.IntFlag{Name: "max-waiting", Usage: "signatures queued behind them before new ones are refused (ResourceExhausted)", Value: server.DefaultMaxWaiting, EnvVars: []string{"HSMAGENT_MAX_WAITING"}},
			&cli.BoolFlag{Name: "check-config", Usage: "load the config, build the access policy, validate the flags and exit 0, without opening the token or listening"},
			&cli.DurationFlag{Name: "hsm-timeout", Usage: "deadline of each HSM operation; past it the agent reports NOT_SERVING and fails fast", Value: server.DefaultHSMTimeout, EnvVars: []string{"HSMAGENT_HSM_TIMEOUT"}},
		),
		Action: serveAction,
	}
}

func newLogger(w io.Writer, format, level string) (*slog.Logger, error) {
	var lv slog.Level
	if err := lv.UnmarshalText([]byte(level)); err != nil {
		return nil, usagef("--log-level %q: use debug, info, warn or error", level)
	}
	opts := &slog.HandlerOptions{Level: lv}
	switch format {
	case "text":
		return slog.New(slog.NewTextHandler(w, opts)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(w, opts)), nil
	}
	return nil, usagef("--log-format %q: use text or json", format)
}

func serveAction(c *cli.Context) error {
	if err := harden(); err != nil {
		return err
	}
	cfg, err := commandConfig(c)
	if err != nil {
		return err
	}
	log, err := newLogger(c.App.ErrWriter, c.String("log-format"), c.String("log-level"))
	if err != nil {
		return err
	}
	mode, err := strconv.ParseUint(c.String("socket-mode"), 8, 32)
	if err != nil || mode > 0o777 {
		return usagef("--socket-mode %q is not an octal file mode such as 0660", c.String("socket-mode"))
	}
	if mode&0o007 != 0 {
		log.Warn("the socket is open to all users; access rules still apply", "mode", fmt.Sprintf("%04o", mode))
	}
	inherited, err := server.InheritedListener()
	if err != nil {
		return err
	}
	if c.String("socket") == "" && inherited == nil {
		return usagef("no socket path: pass --socket PATH, set %s or put socket: in the config", agent.SocketEnv)
	}
	policy, err := cfg.policy()
	if err != nil {
		return err
	}
	audit := log
	var auditFile *server.AuditFile // reopened on SIGHUP, for logrotate
	if path := c.String("audit-log"); path != "" && !c.Bool("check-config") {
		if auditFile, err = server.OpenAuditFile(path); err != nil {
			return err
		}
		defer auditFile.Close()
		audit = slog.New(slog.NewJSONHandler(auditFile, nil))
	}
	for _, f := range []string{"max-sessions", "max-waiting"} {
		if c.Int(f) < 1 {
			return usagef("--%s %d: must be at least 1", f, c.Int(f))
		}
	}
	if c.Duration("hsm-timeout") <= 0 {
		return usagef("--hsm-timeout %v: must be positive, e.g. 3s", c.Duration("hsm-timeout"))
	}
	opts := server.Options{Logger: log, Audit: audit, Policy: policy,
		MaxInFlight: c.Int("max-sessions"), MaxWaiting: c.Int("max-waiting"), HSMTimeout: c.Duration("hsm-timeout"),
		AuditFailOpen: c.Bool("audit-fail-open"), Version: version}
	if err := limitOptions(c, &opts); err != nil {
		return err
	}
	sel, err := selectToken(c)
	if err != nil {
		return err
	}
	metricsOpts := metrics.ListenOptions{Group: c.String("metrics-group"), TCP: c.Bool("metrics-tcp")}
	if addr := c.String("metrics-listen"); addr != "" {
		if err := metrics.CheckAddrWith(addr, metricsOpts); err != nil {
			return usageError{err}
		}
	}
	if c.Bool("check-config") {
		infof(c, "serve: configuration valid (--check-config: token not opened, socket not created)")
		return nil
	}
	var srv *server.Server
	m, stopMetrics, err := startMetrics(c.String("metrics-listen"), metricsOpts, &opts, func() (int, int) { return srv.HSMLoad() }, log)
	if err != nil {
		return err
	}
	defer stopMetrics()
	// crypto11 keeps one session of its pool for itself, logged in.
	sel.cfg.MaxSessions = c.Int("max-sessions") + 1
	sel.cfg.Logger = log
	if m != nil {
		sel.cfg.OnReopen = m.Reopened
	}
	tok, err := hsm.Open(sel.cfg)
	if err != nil {
		return err
	}
	defer tok.Close()
	srv, err = server.New(hsmstore.New(tok), opts)
	if err != nil {
		return err
	}
	l, socket, err := serveListener(c, inherited, os.FileMode(mode), log)
	if err != nil {
		return err
	}
	d := daemon{
		name:     "agent",
		log:      log,
		serve:    func() error { return srv.Serve(l) },
		shutdown: func(ctx context.Context) error { srv.Shutdown(ctx); return nil },
		reload:   func() { reopenAudit(auditFile, log); reload(c, srv, log) },
		healthy:  srv.HSMAnswering,
	}
	return d.run("agent serving", "socket", socket, "token", tok.Label(), "pid", os.Getpid(), "revision", srv.Revision())
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

// reopenAudit starts a new audit file after logrotate moved the old one; on
// error the agent keeps writing to the old one.
func reopenAudit(f *server.AuditFile, log *slog.Logger) {
	if f == nil {
		return
	}
	if err := f.Reopen(); err != nil {
		log.Error("reopening the audit log failed, writing to the previous file", "err", err)
	}
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
