package proxy

import (
	"net/http"
	"time"
)

// Observer is told what a proxy does, for metrics (agent/metrics.Proxy is
// the Prometheus one), so that this package needs no metrics library. Its
// methods are called on the request path and must not block.
type Observer interface {
	// Request is called once per request answered, with the status sent.
	Request(status int, d time.Duration)
	// Upstream is called once per call to D1 (client proxy) or to the
	// backend (server proxy): its time to the response headers, and the
	// error when there was no response.
	Upstream(d time.Duration, err error)
	// TokenIssued is called once per request to the server proxy's token
	// endpoint, with "ok" or the OAuth error code it answered.
	TokenIssued(result string)
}

// An Option configures NewClient or NewServer.
type Option func(*options)

type options struct {
	observer Observer
}

// WithObserver tells o of every request and upstream call (and, for the
// server proxy, every token request).
func WithObserver(o Observer) Option {
	return func(opts *options) { opts.observer = o }
}

func collect(opts []Option) options {
	var o options
	for _, f := range opts {
		f(&o)
	}
	return o
}

// observedTransport times the calls upstream.
type observedTransport struct {
	base http.RoundTripper
	o    Observer
}

func (t observedTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	start := time.Now()
	resp, err := t.base.RoundTrip(r)
	t.o.Upstream(time.Since(start), err)
	return resp, err
}

func observeTransport(rt http.RoundTripper, o Observer) http.RoundTripper {
	if o == nil {
		return rt
	}
	if rt == nil {
		rt = http.DefaultTransport
	}
	return observedTransport{rt, o}
}
