// Package metrics exposes the agent's work to Prometheus: signatures by key
// and result, signing latency, refusals by reason, the HSM's load and
// health, and the expiry of each key's certificate. Labels are bounded: keys
// are the agent's own labels (a caller's unknown label counts as "other"),
// never uids, pids or request ids.
package metrics

import (
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/hsmagent/hsmagent/agent/server"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Agent is a server.Observer that keeps Prometheus metrics.
type Agent struct {
	registry   *prometheus.Registry
	signatures *prometheus.CounterVec
	latency    *prometheus.HistogramVec
	refusals   *prometheus.CounterVec
	expiry     *prometheus.GaugeVec
	keys       prometheus.Gauge
	serving    prometheus.Gauge
	audit      prometheus.Gauge
	auditDowns prometheus.Counter
	reloads    prometheus.Counter
	reopens    *prometheus.CounterVec
	workerEnds *prometheus.CounterVec

	mu     sync.Mutex
	labels map[string]bool
}

var _ server.Observer = (*Agent)(nil)

// NewAgent registers the agent's metrics (and the Go runtime's) in a new
// registry. load reports the signatures in the HSM and waiting for it
// (server.Server.HSMLoad); nil leaves those gauges out.
func NewAgent(load func() (inFlight, waiting int)) *Agent {
	m := &Agent{
		registry: prometheus.NewRegistry(),
		signatures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "hsmagent_signatures_total", Help: "Sign requests by key and audit result (ok, busy, caller-busy, abandoned, timeout, hsm-down, hsm-error, key-changed, audit-down, malformed, no-request, denied, or the refusal's code).",
		}, []string{"key", "result"}),
		latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "hsmagent_sign_duration_seconds", Help: "Time from a sign request's arrival to its answer, successful signatures only.",
			Buckets: []float64{.0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5},
		}, []string{"key"}),
		refusals: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "hsmagent_sign_failures_total", Help: "Sign requests that did not get a signature, by reason (the audit result).",
		}, []string{"reason"}),
		expiry: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "hsmagent_certificate_expiry_timestamp_seconds", Help: "Not-after of the leaf certificate stored with each key, as a Unix time.",
		}, []string{"key"}),
		keys:    prometheus.NewGauge(prometheus.GaugeOpts{Name: "hsmagent_keys", Help: "Keys the agent serves."}),
		serving: prometheus.NewGauge(prometheus.GaugeOpts{Name: "hsmagent_hsm_serving", Help: "1 while the HSM answers within the HSM timeout, 0 while an operation is stuck."}),
		audit: prometheus.NewGauge(prometheus.GaugeOpts{Name: "hsmagent_audit_writable",
			Help: "1 while the audit trail takes records, 0 while it cannot be written (requests are refused unless audit_fail_open)."}),
		auditDowns: prometheus.NewCounter(prometheus.CounterOpts{Name: "hsmagent_audit_outages_total",
			Help: "Times the audit trail stopped taking records."}),
		reloads: prometheus.NewCounter(prometheus.CounterOpts{Name: "hsmagent_key_loads_total", Help: "Times the keys and chains were read from the key store (start and reloads)."}),
		reopens: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "hsmagent_hsm_reopens_total", Help: "Attempts to reopen the HSM token after a lost session or during an outage, by result (ok, failed).",
		}, []string{"result"}),
		workerEnds: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "hsmagent_hsm_worker_ends_total", Help: "HSM worker processes that ended and were replaced, by how (crashed: it died; killed: a call stayed stuck past hsm_kill_after).",
		}, []string{"how"}),
		labels: map[string]bool{},
	}
	m.workerEnds.WithLabelValues("crashed")
	m.workerEnds.WithLabelValues("killed")
	m.serving.Set(1)
	m.audit.Set(1)
	m.reopens.WithLabelValues("ok")
	m.reopens.WithLabelValues("failed")
	m.registry.MustRegister(m.signatures, m.latency, m.refusals, m.expiry, m.keys, m.serving, m.audit, m.auditDowns, m.reloads, m.reopens, m.workerEnds,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	if load != nil {
		m.registry.MustRegister(
			prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "hsmagent_hsm_in_flight", Help: "Signatures inside the HSM now."},
				func() float64 { n, _ := load(); return float64(n) }),
			prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "hsmagent_hsm_waiting", Help: "Signatures waiting for an HSM session now."},
				func() float64 { _, n := load(); return float64(n) }))
	}
	return m
}

// Signed implements server.Observer.
func (m *Agent) Signed(key string, o server.Outcome, d time.Duration) {
	if key == "" {
		key = "other"
	}
	result := o.Metric()
	m.signatures.WithLabelValues(key, result).Inc()
	if o == server.Signed {
		m.latency.WithLabelValues(key).Observe(d.Seconds())
		return
	}
	m.refusals.WithLabelValues(result).Inc()
}

// KeysLoaded implements server.Observer: the expiry gauges follow the keys,
// and a key that is gone takes its series with it.
func (m *Agent) KeysLoaded(keys []server.Key) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.reloads.Inc()
	m.keys.Set(float64(len(keys)))
	now := map[string]bool{}
	for _, k := range keys {
		if k.Label == "" || len(k.Chain) == 0 {
			continue
		}
		now[k.Label] = true
		m.expiry.WithLabelValues(k.Label).Set(float64(k.Chain[0].NotAfter.Unix()))
	}
	for label := range m.labels {
		if !now[label] {
			m.expiry.DeleteLabelValues(label)
		}
	}
	m.labels = now
}

// Reopened counts an attempt to reopen the HSM token (hsm.Config.OnReopen).
func (m *Agent) Reopened(ok bool) {
	if ok {
		m.reopens.WithLabelValues("ok").Inc()
	} else {
		m.reopens.WithLabelValues("failed").Inc()
	}
}

// WorkerEnded counts an HSM worker that ended (hsm/worker's OnEnd).
func (m *Agent) WorkerEnded(killed bool) {
	if killed {
		m.workerEnds.WithLabelValues("killed").Inc()
	} else {
		m.workerEnds.WithLabelValues("crashed").Inc()
	}
}

// HSMServing implements server.Observer.
func (m *Agent) HSMServing(serving bool) {
	if serving {
		m.serving.Set(1)
	} else {
		m.serving.Set(0)
	}
}

// AuditWritable implements server.Observer.
func (m *Agent) AuditWritable(writable bool) {
	if writable {
		m.audit.Set(1)
		return
	}
	m.audit.Set(0)
	m.auditDowns.Inc()
}

// Handler serves the metrics in the Prometheus text format.
func (m *Agent) Handler() http.Handler {
	return promhttp.HandlerFor(m.registry, promhttp.HandlerOpts{})
}

// ListenOptions say how a metrics listener is made.
type ListenOptions struct {
	// Mode is a metrics socket's permission bits; 0 means 0600 without a
	// Group (the agent's user and root only) and 0660 with one.
	Mode os.FileMode
	// Group owns a metrics socket: the operators' group that may scrape.
	Group string
	// TCP accepts a loopback TCP address. Every local user can connect to
	// one and read what the metrics say: each key's label, its
	// certificate's expiry and its signature counts.
	TCP bool
}

// ErrTCPNotAllowed is returned for a TCP address without ListenOptions.TCP.
var ErrTCPNotAllowed = errors.New("metrics: a TCP port is readable by every local user")

// Listen opens a metrics listener as the proxies use it: a loopback TCP
// address (127.0.0.1:9464, [::1]:9464, localhost:9464) or the path of a
// Unix socket of mode 0660.
func Listen(addr string) (net.Listener, error) {
	return ListenWith(addr, ListenOptions{Mode: 0o660, TCP: true})
}

// ListenWith opens the metrics listener: the path of a Unix socket
// (anything with a "/"), made like the agent's own socket
// (server.ListenWith: its directory checked, an existing socket replaced
// only when nothing answers it), or with o.TCP a loopback TCP address.
// Other addresses are refused: the metrics name keys.
func ListenWith(addr string, o ListenOptions) (net.Listener, error) {
	if strings.Contains(addr, "/") {
		mode := o.Mode
		if mode == 0 {
			mode = 0o600
			if o.Group != "" {
				mode = 0o660
			}
		}
		l, err := server.ListenWith(addr, server.ListenOptions{Mode: mode, Group: o.Group})
		if err != nil {
			return nil, fmt.Errorf("metrics: %w", err)
		}
		return l, nil
	}
	if err := CheckAddrWith(addr, o); err != nil {
		return nil, err
	}
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("metrics: listening on %q: %w", addr, err)
	}
	return l, nil
}

// CheckAddr checks a proxy's metrics address without listening: a socket
// path, or a loopback host:port.
func CheckAddr(addr string) error { return CheckAddrWith(addr, ListenOptions{TCP: true}) }

// CheckAddrWith checks a metrics address without listening.
func CheckAddrWith(addr string, o ListenOptions) error {
	if strings.Contains(addr, "/") {
		return nil
	}
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("metrics: %q is neither host:port nor a socket path: %w", addr, err)
	}
	if ip := net.ParseIP(host); host != "localhost" && (ip == nil || !ip.IsLoopback()) {
		return fmt.Errorf("metrics: %q is not a loopback address; use 127.0.0.1:PORT or a socket path (put a proxy in front to publish it)", addr)
	}
	if !o.TCP {
		return fmt.Errorf("%w (key labels, certificate expiry, signature counts per key): %q; use a socket path "+
			"such as /run/hsmagent/metrics.sock with metrics_group for the scrapers, or accept that with metrics_tcp: true", ErrTCPNotAllowed, addr)
	}
	return nil
}

// Limits of the metrics listener: a scraper needs one or two connections,
// and any user who can reach the listener can open them.
const (
	// MaxConnections bounds the open connections. When all are taken a new
	// one closes the one idle the longest, so that connections kept open
	// with a rare request cannot lock the scrapers out.
	MaxConnections = 8
	// MaxRequestsPerConnection and MaxConnectionAge end a keep-alive
	// connection (Connection: close on the answer) after so many requests
	// or so long.
	MaxRequestsPerConnection = 100
	MaxConnectionAge         = time.Minute
)

// Serve serves h on l until l is closed, with at most MaxConnections open
// and every connection bounded in time and requests, so that connections to
// it cannot take the agent's file descriptors or memory, or blind the
// scrapes.
func Serve(l net.Listener, h http.Handler) error {
	bl := newBoundedListener(l, MaxConnections)
	mux := http.NewServeMux()
	mux.Handle("/metrics", h)
	srv := &http.Server{Handler: bl.limitRequests(mux), ReadHeaderTimeout: 2 * time.Second, ReadTimeout: 5 * time.Second,
		WriteTimeout: 30 * time.Second, IdleTimeout: 30 * time.Second, MaxHeaderBytes: 8 << 10,
		ConnState: bl.connState, ConnContext: bl.connContext}
	if err := srv.Serve(bl); err != nil && !errors.Is(err, net.ErrClosed) && !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}
