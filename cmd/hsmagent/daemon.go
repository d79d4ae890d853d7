package main

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
	"time"
)

// daemon is the skeleton shared by serve and the proxies: one place for
// signals, reload, graceful stop and readiness. SIGHUP calls reload (a failed
// reload is the reload's to log; the old state stays); SIGTERM and SIGINT
// stop taking work, drain for up to drain, and return nil.
type daemon struct {
	name     string // "agent", "proxy client", ...: the subject of the log lines
	log      *slog.Logger
	serve    func() error                // blocks until shutdown; nil after a graceful stop
	shutdown func(context.Context) error // stops taking work and drains until ctx ends
	reload   func()                      // nil: SIGHUP only logs
	drain    time.Duration               // 0: 10 seconds
	// healthy gates systemd's watchdog pings: while it is false (the HSM is
	// stuck) the pings stop, so WatchdogSec= restarts an agent that stays so.
	// nil means always healthy.
	healthy func() bool
}

// run serves until a stop signal or a serving error, logging ready with
// attrs once serving has begun.
func (d daemon) run(ready string, attrs ...any) error {
	signals := make(chan os.Signal, 4)
	signal.Notify(signals, syscall.SIGHUP, syscall.SIGTERM, syscall.SIGINT)
	defer signal.Stop(signals)
	served := make(chan error, 1)
	go func() { served <- d.serve() }()
	d.log.Info(ready, attrs...)
	if err := sdNotify("READY=1"); err != nil {
		d.log.Warn("cannot tell systemd we are ready", "err", err)
	}
	var watchdog <-chan time.Time
	if every := watchdogInterval(); every > 0 {
		t := time.NewTicker(every)
		defer t.Stop()
		watchdog = t.C
	}
	for {
		select {
		case <-watchdog:
			if d.healthy == nil || d.healthy() {
				_ = sdNotify("WATCHDOG=1")
			}
		case err := <-served:
			if err == nil {
				return nil
			}
			return fmt.Errorf("%s stopped: %w", d.name, err)
		case sig := <-signals:
			if sig == syscall.SIGHUP {
				if d.reload == nil {
					d.log.Info("SIGHUP: nothing to reload")
				} else {
					d.reload()
				}
				continue
			}
			return d.stop(sig, served)
		}
	}
}

func (d daemon) stop(sig os.Signal, served <-chan error) error {
	d.log.Info("shutting down", "signal", sig.String())
	_ = sdNotify("STOPPING=1")
	drain := d.drain
	if drain == 0 {
		drain = 10 * time.Second
	}
	ctx, cancel := context.WithTimeout(context.Background(), drain)
	defer cancel()
	err := d.shutdown(ctx)
	select {
	case <-served:
	case <-ctx.Done():
	}
	d.log.Info(d.name + " stopped")
	return err
}
