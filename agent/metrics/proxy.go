package metrics

import (
	"net/http"
	"strconv"
	"time"

	"github.com/hsmagent/hsmagent/agent/proxy"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Proxy is a proxy.Observer that keeps the Prometheus metrics of one D1
// proxy: requests by status class, upstream latency and errors, and the
// OAuth tokens it fetches (client) or issues (server). Every series carries
// proxy="client" or proxy="server"; no label takes a caller's values.
type Proxy struct {
	registry  *prometheus.Registry
	requests  *prometheus.CounterVec
	duration  prometheus.Histogram
	upstream  prometheus.Histogram
	upErrors  prometheus.Counter
	fetches   *prometheus.CounterVec
	expiry    prometheus.Gauge
	issued    *prometheus.CounterVec
	tokenSide bool // client: fetches and expiry; server: issued
}

var _ proxy.Observer = (*Proxy)(nil)

// latencyBuckets span a loopback backend (sub-millisecond) to a slow D1 call.
var latencyBuckets = []float64{.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30}

// NewProxy registers the metrics of the proxy side, "client" or "server",
// and the Go runtime's, in a new registry.
func NewProxy(side string) *Proxy {
	c := prometheus.Labels{"proxy": side}
	m := &Proxy{
		registry: prometheus.NewRegistry(),
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "hsmagent_proxy_requests_total", Help: "Requests answered by the proxy, by status class (2xx, 4xx, 5xx, ...).", ConstLabels: c,
		}, []string{"code"}),
		duration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "hsmagent_proxy_request_duration_seconds", Help: "Time from a request's arrival to its answer.", ConstLabels: c, Buckets: latencyBuckets,
		}),
		upstream: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "hsmagent_proxy_upstream_duration_seconds", Help: "Time of each call to D1 (client) or the backend (server), to the response headers or the failure.", ConstLabels: c, Buckets: latencyBuckets,
		}),
		upErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "hsmagent_proxy_upstream_errors_total", Help: "Calls to D1 (client) or the backend (server) that got no response.", ConstLabels: c,
		}),
		tokenSide: side == "client",
	}
	m.registry.MustRegister(m.requests, m.duration, m.upstream, m.upErrors,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	if m.tokenSide {
		m.fetches = prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "hsmagent_proxy_token_fetches_total", Help: "OAuth access tokens fetched from D1 (JWT bearer), by result: ok or error.", ConstLabels: c,
		}, []string{"result"})
		m.expiry = prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "hsmagent_proxy_token_expiry_timestamp_seconds", Help: "Expiry of the current D1 access token, as a Unix time; 0 before the first.", ConstLabels: c,
		})
		m.registry.MustRegister(m.fetches, m.expiry)
		for _, r := range []string{"ok", "error"} {
			m.fetches.WithLabelValues(r) // present at 0, so that rate() and alerts see them from the start
		}
	} else {
		m.issued = prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "hsmagent_proxy_tokens_issued_total", Help: "Requests to the proxy's OAuth token endpoint (D1-S6), by result: ok or the OAuth error code.", ConstLabels: c,
		}, []string{"result"})
		m.registry.MustRegister(m.issued)
	}
	return m
}

// Request implements proxy.Observer.
func (m *Proxy) Request(status int, d time.Duration) {
	m.requests.WithLabelValues(statusClass(status)).Inc()
	m.duration.Observe(d.Seconds())
}

// statusClass bounds the label: a backend can send any number.
func statusClass(status int) string {
	if status < 100 || status > 599 {
		return "other"
	}
	return strconv.Itoa(status/100) + "xx"
}

// Upstream implements proxy.Observer.
func (m *Proxy) Upstream(d time.Duration, err error) {
	m.upstream.Observe(d.Seconds())
	if err != nil {
		m.upErrors.Inc()
	}
}

// TokenIssued implements proxy.Observer. The results are the proxy's own
// fixed OAuth error codes.
func (m *Proxy) TokenIssued(result string) {
	if m.issued != nil {
		m.issued.WithLabelValues(result).Inc()
	}
}

// TokenFetched is d1.JWTBearer's Observe: a fetched token's expiry, or the
// fetch's error.
func (m *Proxy) TokenFetched(expiry time.Time, err error) {
	if m.fetches == nil {
		return
	}
	if err != nil {
		m.fetches.WithLabelValues("error").Inc()
		return
	}
	m.fetches.WithLabelValues("ok").Inc()
	m.expiry.Set(float64(expiry.Unix()))
}

// Handler serves the metrics in the Prometheus text format.
func (m *Proxy) Handler() http.Handler {
	return promhttp.HandlerFor(m.registry, promhttp.HandlerOpts{})
}
