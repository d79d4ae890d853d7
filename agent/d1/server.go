package d1

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"time"
)

// DefaultServerPort is where D1 calls the issuer (D1-S1); 8443 is also supported.
const DefaultServerPort = 443

// ServerOptions configure the issuer's server that D1 calls (outbound: the
// issuer is the TLS server).
type ServerOptions struct {
	// GetCertificate serves the issuer's full chain, usually
	// agent.Client.GetCertificate(label) (D1-S5).
	GetCertificate func(*tls.ClientHelloInfo) (*tls.Certificate, error)
	// ClientCAFile is the Thales Client CA given at onboarding: the only CA
	// trusted for D1's client certificates (D1-S3). No system roots are added.
	ClientCAFile string
}

// ServerTLS is the server side of D1 mTLS. Its client-CA pool is read from
// the file and can be reloaded while serving; no client certificate is pinned,
// so any valid certificate from the CA is accepted, a rotated one included (D1-S4).
type ServerTLS struct {
	opts    ServerOptions
	pool    atomic.Pointer[x509.CertPool]
	mu      sync.Mutex
	current []byte // the CA file's content behind pool
}

// NewServerTLS loads the client CA file.
func NewServerTLS(opts ServerOptions) (*ServerTLS, error) {
	if opts.GetCertificate == nil {
		return nil, errors.New("d1: no server certificate source")
	}
	if opts.ClientCAFile == "" {
		return nil, errors.New("d1: no Thales client CA file: D1 calls must be authenticated with it (D1-S3)")
	}
	s := &ServerTLS{opts: opts}
	if _, err := s.Reload(); err != nil {
		return nil, err
	}
	return s, nil
}

// Reload reads the client CA file again; it reports whether the content
// changed. On error the previous pool stays in force.
func (s *ServerTLS) Reload() (changed bool, err error) {
	data, err := os.ReadFile(s.opts.ClientCAFile)
	if err != nil {
		return false, fmt.Errorf("d1: reading client CA file: %w", err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if bytes.Equal(data, s.current) {
		return false, nil
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(data) {
		return false, fmt.Errorf("d1: client CA file %q holds no PEM certificate", s.opts.ClientCAFile)
	}
	s.pool.Store(pool)
	s.current = data
	return true, nil
}

// WatchCAFile reloads the client CA file every interval until ctx is done;
// onReload learns about each change or error.
func (s *ServerTLS) WatchCAFile(ctx context.Context, interval time.Duration, onReload func(changed bool, err error)) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			changed, err := s.Reload()
			if (changed || err != nil) && onReload != nil {
				onReload(changed, err)
			}
		}
	}
}

// TLSConfig returns the server configuration: TLS 1.2 or 1.3 (D1-S2),
// client certificates required and verified against the client CA only.
func (s *ServerTLS) TLSConfig() *tls.Config {
	base := &tls.Config{
		MinVersion:     tls.VersionTLS12,
		MaxVersion:     tls.VersionTLS13,
		CipherSuites:   tls12Suites,
		ClientAuth:     tls.RequireAndVerifyClientCert,
		GetCertificate: s.opts.GetCertificate,
	}
	base.ClientCAs = s.pool.Load()
	// Each handshake takes the pool as it is now, so a reloaded CA file
	// applies to the next connection without a restart.
	base.GetConfigForClient = func(*tls.ClientHelloInfo) (*tls.Config, error) {
		c := base.Clone()
		c.GetConfigForClient = nil
		c.ClientCAs = s.pool.Load()
		return c, nil
	}
	return base
}
