package main

import (
	"log/slog"

	"github.com/hsmagent/hsmagent/agent/d1"
	"github.com/hsmagent/hsmagent/agent/metrics"
	"github.com/hsmagent/hsmagent/agent/proxy"
	"github.com/urfave/cli/v2"
)

// proxyMetricsFlag is each proxy's metrics listener; in the config it is
// d1.ENV.client_metrics_listen (client) or d1.ENV.server.metrics_listen. A
// new flag per command: a shared one keeps "set" from one run to the next.
func proxyMetricsFlag() cli.Flag {
	return &cli.StringFlag{Name: "metrics-listen", Usage: "serve Prometheus metrics at /metrics on loopback `ADDR` (127.0.0.1:9465) or a Unix socket path (default: off)", EnvVars: []string{"HSMAGENT_METRICS_LISTEN"}}
}

// proxyMetrics is a proxy's metrics endpoint; its zero value (metrics off)
// observes nothing.
type proxyMetrics struct {
	m    *metrics.Proxy
	stop func()
}

// startProxyMetrics opens the metrics listener of the proxy side ("client"
// or "server") when addr is set.
func startProxyMetrics(addr, side string, log *slog.Logger) (*proxyMetrics, error) {
	if addr == "" {
		return &proxyMetrics{stop: func() {}}, nil
	}
	l, err := metrics.Listen(addr)
	if err != nil {
		return nil, usageError{err}
	}
	m := metrics.NewProxy(side)
	go func() {
		if err := metrics.Serve(l, m.Handler()); err != nil {
			log.Error("metrics listener stopped", "err", err)
		}
	}()
	log.Info("metrics served", "listen", addr, "path", "/metrics")
	return &proxyMetrics{m: m, stop: func() { l.Close() }}, nil
}

// options are the proxy constructor's options: none with metrics off.
func (p *proxyMetrics) options() []proxy.Option {
	if p.m == nil {
		return nil
	}
	return []proxy.Option{proxy.WithObserver(p.m)}
}

// observeTokens counts j's token fetches and follows the token's expiry.
func (p *proxyMetrics) observeTokens(j *d1.JWTBearer) {
	if p.m != nil && j != nil {
		j.Observe = p.m.TokenFetched
	}
}
