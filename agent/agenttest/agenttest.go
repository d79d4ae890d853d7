// Package agenttest runs an agent in the test process, on a real Unix
// socket, over any server.KeyStore: with server.NewMemoryStore it lets the
// tests of a service that uses the agent run without an HSM.
package agenttest

import (
	"context"
	"crypto"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"io"
	"log/slog"
	"math/big"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/hsmagent/hsmagent/agent/server"
)

// SocketDir returns a short-lived directory for sockets, removed when the
// test ends: t.TempDir paths can exceed the 108-byte limit of socket addresses.
func SocketDir(tb testing.TB) string {
	tb.Helper()
	dir, err := os.MkdirTemp("", "hsa")
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// Agent is an agent server running in the test process.
type Agent struct {
	Socket string
	Server *server.Server
	done   chan error
	once   sync.Once
}

// Start serves store on a new socket until the test ends. A nil
// opts.Logger discards logs.
func Start(tb testing.TB, store server.KeyStore, opts server.Options) *Agent {
	tb.Helper()
	return StartAt(tb, filepath.Join(SocketDir(tb), "agent.sock"), 0o660, store, opts)
}

// StartAt is Start on a given socket path and mode.
func StartAt(tb testing.TB, path string, mode os.FileMode, store server.KeyStore, opts server.Options) *Agent {
	tb.Helper()
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	srv, err := server.New(store, opts)
	if err != nil {
		tb.Fatal(err)
	}
	l, err := server.Listen(path, mode)
	if err != nil {
		tb.Fatal(err)
	}
	a := &Agent{Socket: path, Server: srv, done: make(chan error, 1)}
	go func() { a.done <- srv.Serve(l) }()
	tb.Cleanup(a.Stop)
	return a
}

// Stop shuts the agent down and waits for it; calling it twice is harmless.
func (a *Agent) Stop() {
	a.once.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		a.Server.Shutdown(ctx)
		select {
		case <-a.done:
		case <-time.After(5 * time.Second):
		}
	})
}

// SelfSigned returns a certificate for signer's key, signed by that key,
// with common name cn, valid for the year up to notAfter: a chain for a key
// of a server.MemoryStore in tests of expiry, status or metrics.
func SelfSigned(tb testing.TB, signer crypto.Signer, cn string, notAfter time.Time) *x509.Certificate {
	tb.Helper()
	serial, err := rand.Int(rand.Reader, big.NewInt(1<<62))
	if err != nil {
		tb.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: serial, Subject: pkix.Name{CommonName: cn},
		NotBefore: notAfter.AddDate(-1, 0, 0), NotAfter: notAfter}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, signer.Public(), signer)
	if err != nil {
		tb.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		tb.Fatal(err)
	}
	return cert
}
