// Package proxy is the sidecar that lets a backend in any language use D1
// mutual TLS with keys held by the agent: Client takes plain HTTP on loopback
// and calls D1 over mTLS; Server terminates D1's mTLS calls and forwards them
// to the backend in plain HTTP with the verified client certificate in headers.
package proxy

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"time"
)

// Headers the server proxy sets from the verified client certificate.
// Copies sent by the client are removed first, so the backend can trust them.
const (
	HeaderClientSubject     = "X-D1-Client-Subject"
	HeaderClientSerial      = "X-D1-Client-Serial"
	HeaderClientFingerprint = "X-D1-Client-Fingerprint"
)

// DefaultMaxBody caps request bodies in both proxies.
const DefaultMaxBody = 10 << 20

// NewClient forwards requests to target through rt, the D1 transport (mTLS,
// and Bearer tokens when configured).
func NewClient(target *url.URL, rt http.RoundTripper, log *slog.Logger, maxBody int64, opts ...Option) http.Handler {
	o := collect(opts)
	rp := &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.SetURL(target)
			pr.Out.Host = target.Host
		},
		Transport:    observeTransport(rt, o.observer),
		ErrorHandler: errorHandler(log, "D1"),
	}
	return limitAndLog(rp, log, maxBody, "proxy client", o.observer)
}

// NewServer forwards D1's verified requests to backend. With oauth set, the
// proxy also serves D1's token endpoint and requires a Bearer token on every
// other route (D1-S6).
func NewServer(backend *url.URL, log *slog.Logger, maxBody int64, oauth *OAuth, opts ...Option) http.Handler {
	o := collect(opts)
	rp := &httputil.ReverseProxy{
		Transport: observeTransport(nil, o.observer),
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.SetURL(backend)
			pr.SetXForwarded()
			h := pr.Out.Header
			h.Del(HeaderClientSubject)
			h.Del(HeaderClientSerial)
			h.Del(HeaderClientFingerprint)
			if pr.In.TLS != nil && len(pr.In.TLS.PeerCertificates) > 0 {
				c := pr.In.TLS.PeerCertificates[0]
				sum := sha256.Sum256(c.Raw)
				h.Set(HeaderClientSubject, c.Subject.String())
				h.Set(HeaderClientSerial, c.SerialNumber.Text(16))
				h.Set(HeaderClientFingerprint, hex.EncodeToString(sum[:]))
			}
		},
		ErrorHandler: errorHandler(log, "the backend"),
	}
	var h http.Handler = rp
	if oauth != nil {
		h = oauth.wrap(rp, o.observer)
	}
	return limitAndLog(h, log, maxBody, "proxy server", o.observer)
}

func errorHandler(log *slog.Logger, upstream string) func(http.ResponseWriter, *http.Request, error) {
	return func(w http.ResponseWriter, r *http.Request, err error) {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			http.Error(w, fmt.Sprintf("request body over %d bytes", mbe.Limit), http.StatusRequestEntityTooLarge)
			return
		}
		log.Warn("upstream call failed", "upstream", upstream, "method", r.Method, "path", r.URL.Path, "err", err)
		http.Error(w, "hsmagent proxy: "+upstream+" could not be reached; see the proxy's log", http.StatusBadGateway)
	}
}

type statusRecorder struct {
	http.ResponseWriter
	status int
}

func (s *statusRecorder) WriteHeader(code int) {
	s.status = code
	s.ResponseWriter.WriteHeader(code)
}

// limitAndLog caps the body and logs one line per request: no headers, so
// no tokens.
func limitAndLog(h http.Handler, log *slog.Logger, maxBody int64, name string, o Observer) http.Handler {
	if maxBody <= 0 {
		maxBody = DefaultMaxBody
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		r.Body = http.MaxBytesReader(w, r.Body, maxBody)
		rec := &statusRecorder{ResponseWriter: w, status: http.StatusOK}
		h.ServeHTTP(rec, r)
		d := time.Since(start)
		if o != nil {
			o.Request(rec.status, d)
		}
		attrs := []any{"method", r.Method, "path", r.URL.Path, "status", rec.status,
			"duration", d.Round(time.Microsecond), "remote", r.RemoteAddr}
		if r.TLS != nil && len(r.TLS.PeerCertificates) > 0 {
			attrs = append(attrs, "client", r.TLS.PeerCertificates[0].Subject.String())
		}
		log.Info(name, attrs...)
	})
}

// NewHTTPServer wraps h with the timeouts both proxies use.
func NewHTTPServer(h http.Handler, log *slog.Logger) *http.Server {
	return &http.Server{
		Handler:           h,
		ReadHeaderTimeout: 10 * time.Second,
		ReadTimeout:       60 * time.Second,
		WriteTimeout:      90 * time.Second,
		IdleTimeout:       120 * time.Second,
		MaxHeaderBytes:    64 << 10,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelWarn),
	}
}

// CheckLoopback refuses a listen address off the loopback interface: the
// client proxy attaches the issuer's D1 identity to whatever reaches it.
func CheckLoopback(addr string) error {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("proxy: listen address %q: %w", addr, err)
	}
	if host == "localhost" {
		return nil
	}
	ip := net.ParseIP(host)
	if ip == nil || !ip.IsLoopback() {
		return fmt.Errorf("proxy: the client proxy listens on loopback only (127.0.0.1:PORT or [::1]:PORT), not %q: it lends the issuer's D1 identity to every caller", addr)
	}
	return nil
}
