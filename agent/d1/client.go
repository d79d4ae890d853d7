package d1

import (
	"crypto/tls"
	"crypto/x509"
	_ "embed"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"sync"
	"time"
)

//go:embed d1-server-roots.pem
var serverRootsPEM []byte

// ServerRoots returns the Amazon Trust Services roots (Amazon Root CA 1-4 and
// Starfield Services Root CA G2) that D1's server certificates chain to (D1-C6).
func ServerRoots() *x509.CertPool {
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(serverRootsPEM) {
		panic("d1: embedded server roots do not parse")
	}
	return pool
}

// LoadCertPool reads a PEM file of CA certificates.
func LoadCertPool(path string) (*x509.CertPool, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("d1: reading CA file: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(data) {
		return nil, fmt.Errorf("d1: %q holds no PEM certificate", path)
	}
	return pool, nil
}

// DefaultMaxConnAge bounds how long a connection to D1 is reused, so that new
// connections resolve D1's host name again (D1-C7).
const DefaultMaxConnAge = 5 * time.Minute

// ClientOptions configure calls from the issuer to D1 (inbound: the issuer is
// the TLS client).
type ClientOptions struct {
	// Env is the D1 environment these calls go to; a client certificate whose
	// CN names the other one is refused (D1-G2).
	Env Env
	// GetClientCertificate supplies the issuer's D1 client certificate, usually
	// agent.Client.GetClientCertificate(label), which follows rotation.
	GetClientCertificate func(*tls.CertificateRequestInfo) (*tls.Certificate, error)
	// ServerRoots verify D1's server certificate; nil means the embedded
	// Amazon Trust Services roots (D1-C6).
	ServerRoots *x509.CertPool
	// Resolver resolves D1's host name for every new connection; nil means
	// net.DefaultResolver. Nothing in this package caches addresses (D1-C7).
	Resolver *net.Resolver
	// MaxConnAge bounds connection reuse; 0 means DefaultMaxConnAge.
	MaxConnAge time.Duration
}

// tls12Suites are the TLS 1.2 suites offered to D1: ECDHE with AEAD only.
// TLS 1.3 suites are all AEAD and not configurable.
var tls12Suites = []uint16{
	tls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
	tls.TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
	tls.TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
	tls.TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
	tls.TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
	tls.TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
}

// ClientTLSConfig returns the TLS configuration for calls to D1: TLS 1.2 or
// 1.3 (D1-G4), ECDHE-AEAD suites, D1's certificate verified against the
// server roots (never skipped), and the client certificate checked against
// the environment at every handshake (D1-G2).
func ClientTLSConfig(opts ClientOptions) (*tls.Config, error) {
	if _, err := ParseEnv(string(opts.Env)); err != nil {
		return nil, err
	}
	if opts.GetClientCertificate == nil {
		return nil, errors.New("d1: no client certificate source: D1 requires mutual TLS (D1-G1)")
	}
	roots := opts.ServerRoots
	if roots == nil {
		roots = ServerRoots()
	}
	get := opts.GetClientCertificate
	env := opts.Env
	return &tls.Config{
		MinVersion:   tls.VersionTLS12,
		MaxVersion:   tls.VersionTLS13,
		CipherSuites: tls12Suites,
		RootCAs:      roots,
		GetClientCertificate: func(info *tls.CertificateRequestInfo) (*tls.Certificate, error) {
			cert, err := get(info)
			if err != nil {
				return nil, err
			}
			if err := CheckClientCertificate(cert, env); err != nil {
				return nil, err
			}
			return cert, nil
		},
	}, nil
}

// CheckClientCertificate refuses a certificate whose CN names the other D1
// environment than env (D1-G2). A CN naming no environment is accepted: the
// CN pattern is confirmed per issuer with Thales.
func CheckClientCertificate(cert *tls.Certificate, env Env) error {
	leaf := cert.Leaf
	if leaf == nil {
		if len(cert.Certificate) == 0 {
			return errors.New("d1: the client certificate is empty")
		}
		var err error
		if leaf, err = x509.ParseCertificate(cert.Certificate[0]); err != nil {
			return fmt.Errorf("d1: parsing the client certificate: %w", err)
		}
	}
	if certEnv, ok := EnvOfCN(leaf.Subject.CommonName); ok && certEnv != env {
		return fmt.Errorf("d1: client certificate %q is for %s but this connection goes to %s; PPR and PRD credentials must never be mixed (D1-G2)",
			leaf.Subject.CommonName, certEnv, env)
	}
	return nil
}

// NewHTTPClient returns an http.Client for D1 with ClientTLSConfig, a fresh
// DNS lookup for every new connection and connections retired after
// MaxConnAge (D1-C7). It checks the client certificate against the
// environment before any connection is made.
func NewHTTPClient(opts ClientOptions) (*http.Client, error) {
	rt, err := NewTransport(opts)
	if err != nil {
		return nil, err
	}
	return &http.Client{Transport: rt, Timeout: 60 * time.Second}, nil
}

// NewTransport is the RoundTripper behind NewHTTPClient.
func NewTransport(opts ClientOptions) (http.RoundTripper, error) {
	conf, err := ClientTLSConfig(opts)
	if err != nil {
		return nil, err
	}
	if cert, err := opts.GetClientCertificate(&tls.CertificateRequestInfo{}); err != nil {
		return nil, fmt.Errorf("d1: client certificate: %w", err)
	} else if err := CheckClientCertificate(cert, opts.Env); err != nil {
		return nil, err
	}
	maxAge := opts.MaxConnAge
	if maxAge <= 0 {
		maxAge = DefaultMaxConnAge
	}
	dialer := &net.Dialer{Timeout: 10 * time.Second, KeepAlive: 30 * time.Second, Resolver: opts.Resolver}
	return &agedTransport{maxAge: maxAge, newTransport: func() *http.Transport {
		return &http.Transport{
			DialContext:           dialer.DialContext,
			TLSClientConfig:       conf,
			ForceAttemptHTTP2:     true,
			TLSHandshakeTimeout:   10 * time.Second,
			ResponseHeaderTimeout: 30 * time.Second,
			IdleConnTimeout:       min(maxAge, 90*time.Second),
			MaxIdleConnsPerHost:   16,
		}
	}}, nil
}

// agedTransport hands each request to a pool no older than maxAge. When the
// pool ages out, a new one takes the new requests (and so new connections,
// new DNS lookups); the old one finishes its requests and is closed.
type agedTransport struct {
	maxAge       time.Duration
	newTransport func() *http.Transport

	mu      sync.Mutex
	current *http.Transport
	born    time.Time
}

func (a *agedTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	return a.pool().RoundTrip(req)
}

func (a *agedTransport) pool() *http.Transport {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.current == nil || time.Since(a.born) >= a.maxAge {
		if old := a.current; old != nil {
			old.CloseIdleConnections()
			// Connections busy now become idle later: close them then.
			time.AfterFunc(a.maxAge, old.CloseIdleConnections)
		}
		a.current, a.born = a.newTransport(), time.Now()
	}
	return a.current
}

// CloseIdleConnections closes the idle connections of the current pool.
func (a *agedTransport) CloseIdleConnections() {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.current != nil {
		a.current.CloseIdleConnections()
	}
}
