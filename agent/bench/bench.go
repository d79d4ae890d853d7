// Package bench measures signatures and TLS 1.3 handshakes made with a
// crypto.Signer, so that a key used in-process (through crypto11) and the
// same key used through the agent can be compared side by side in one run.
package bench

import (
	"context"
	"crypto"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"io"
	"math/big"
	"slices"
	"sync"
	"time"
)

// Result is one measurement.
type Result struct {
	Name        string        `json:"name"`
	Concurrency int           `json:"concurrency"`
	Duration    time.Duration `json:"duration"`
	Ops         int           `json:"ops"`
	Errors      int           `json:"errors"`
	PerSecond   float64       `json:"perSecond"`
	P50         time.Duration `json:"p50"`
	P99         time.Duration `json:"p99"`
	FirstError  string        `json:"firstError,omitempty"`
}

// run calls op from concurrency goroutines until d has passed.
func run(ctx context.Context, name string, concurrency int, d time.Duration, op func() error) Result {
	ctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	type worker struct {
		lat    []time.Duration
		errors int
		first  error
	}
	workers := make([]worker, concurrency)
	var wg sync.WaitGroup
	start := time.Now()
	for i := range workers {
		wg.Add(1)
		go func(w *worker) {
			defer wg.Done()
			for ctx.Err() == nil {
				t0 := time.Now()
				if err := op(); err != nil {
					w.errors++
					if w.first == nil {
						w.first = err
					}
					continue
				}
				w.lat = append(w.lat, time.Since(t0))
			}
		}(&workers[i])
	}
	wg.Wait()
	elapsed := time.Since(start)
	r := Result{Name: name, Concurrency: concurrency, Duration: elapsed}
	var all []time.Duration
	for _, w := range workers {
		all = append(all, w.lat...)
		r.Errors += w.errors
		if w.first != nil && r.FirstError == "" {
			r.FirstError = w.first.Error()
		}
	}
	r.Ops = len(all)
	r.PerSecond = float64(r.Ops) / elapsed.Seconds()
	if len(all) > 0 {
		slices.Sort(all)
		r.P50 = all[len(all)/2]
		r.P99 = all[min(len(all)-1, len(all)*99/100)]
	}
	return r
}

// Signatures signs SHA-256 digests with s.
func Signatures(ctx context.Context, name string, s crypto.Signer, concurrency int, d time.Duration) Result {
	digest := sha256.Sum256([]byte("hsmagent bench"))
	return run(ctx, name, concurrency, d, func() error {
		_, err := s.Sign(rand.Reader, digest[:], crypto.SHA256)
		return err
	})
}

// SelfSigned makes a throwaway certificate for s, signed by s, valid for "localhost".
func SelfSigned(s crypto.Signer) (tls.Certificate, *x509.CertPool, error) {
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "hsmagent bench"},
		DNSNames:              []string{"localhost"},
		NotBefore:             time.Now().Add(-time.Minute),
		NotAfter:              time.Now().Add(time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IsCA:                  true,
		BasicConstraintsValid: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, s.Public(), s)
	if err != nil {
		return tls.Certificate{}, nil, fmt.Errorf("bench: self-signed certificate: %w", err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	pool := x509.NewCertPool()
	pool.AddCert(leaf)
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: s, Leaf: leaf}, pool, nil
}

// Handshakes runs full TLS 1.3 handshakes (no resumption) against a loopback
// server whose certificate key is s: each costs the server one signature.
func Handshakes(ctx context.Context, name string, s crypto.Signer, concurrency int, d time.Duration) (Result, error) {
	cert, pool, err := SelfSigned(s)
	if err != nil {
		return Result{}, err
	}
	l, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{
		Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS13, SessionTicketsDisabled: true})
	if err != nil {
		return Result{}, err
	}
	var wg sync.WaitGroup
	defer wg.Wait()
	defer l.Close()
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				c.SetDeadline(time.Now().Add(10 * time.Second))
				if c.(*tls.Conn).Handshake() == nil {
					c.Write([]byte{1})
				}
			}()
		}
	}()
	addr := l.Addr().String()
	client := &tls.Config{RootCAs: pool, ServerName: "localhost", MinVersion: tls.VersionTLS13}
	return run(ctx, name, concurrency, d, func() error {
		c, err := tls.Dial("tcp", addr, client)
		if err != nil {
			return err
		}
		defer c.Close()
		var b [1]byte
		if _, err := io.ReadFull(c, b[:]); err != nil {
			return errors.Join(errors.New("bench: reading after handshake"), err)
		}
		return nil
	}), nil
}
