package softhsmtest

import (
	"context"
	"crypto"
	"crypto/sha256"
	"fmt"
	"io"
	"log/slog"
	"net"
	"path/filepath"
	"testing"
	"time"

	"github.com/hsmagent/hsmagent/agent"
	"github.com/hsmagent/hsmagent/agent/core"
	"github.com/hsmagent/hsmagent/agent/server"
	"github.com/hsmagent/hsmagent/agent/transport/grpcsvc"
	"github.com/hsmagent/hsmagent/agent/transport/listen"
	"github.com/hsmagent/hsmagent/hsm"
	"github.com/hsmagent/hsmagent/hsm/worker"
)

// BenchmarkTransports measures the framed signing connection against gRPC's
// SignStream, the two ways the Go client streams signatures, side by side
// on every HSM shape: SoftHSM as it is (CPU-bound), SoftHSM behind 2 ms of
// latency, and the off-host shape of a network HSM (the fault module
// replays a signature after 2 ms without SoftHSM), each signed in an HSM
// worker process as serve runs it. The agent without
// signing connections (the core behind the gRPC adapter alone) is what the
// client falls back to.
//
//	go test -run '^$' -bench Transports -benchtime 2000x ./softhsm-test
func BenchmarkTransports(b *testing.B) {
	for _, shape := range []struct {
		name    string
		latency time.Duration
		replay  bool
	}{{"softhsm", 0, false}, {"softhsm+2ms", 2 * time.Millisecond, false}, {"network", 2 * time.Millisecond, true}} {
		fm := NewFaultModule(b, New(b))
		fm.SetReplay(shape.replay)
		tok, err := hsm.Open(fm.Config())
		if err != nil {
			b.Fatal(err)
		}
		if _, err := tok.GenerateKey("ec", hsm.ECDSAP256, nil); err != nil {
			b.Fatal(err)
		}
		tok.Close()
		fm.SetSignLatency(shape.latency)
		signers := map[string]crypto.Signer{}
		for _, tr := range []string{"framed", "grpc"} {
			signers[tr] = transportSigner(b, fm, tr == "grpc")
		}
		for _, callers := range []int{1, 8, 32, 64} {
			for _, tr := range []string{"framed", "grpc"} {
				b.Run(fmt.Sprintf("%s/%d/%s", shape.name, callers, tr), func(b *testing.B) {
					benchCallers(b, callers, signers[tr])
				})
			}
		}
	}
}

// transportSigner starts an agent on fm's token, in an HSM worker as the
// agent runs it (so that the HSM's calls do not share this process's
// scheduler with both transports), with signing connections or without
// (gRPC's SignStream then), and returns a client's signer of "ec".
func transportSigner(b *testing.B, fm *FaultModule, grpcOnly bool) crypto.Signer {
	cfg := fm.Config()
	store, err := worker.Start(worker.Options{Command: []string{binary, "hsm-worker"}, PIN: cfg.PIN,
		Init: worker.Init{ModulePath: cfg.ModulePath, TokenLabel: cfg.TokenLabel, MaxSessions: core.DefaultMaxInFlight + 1}})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { store.Close() })
	path := filepath.Join(b.TempDir(), "agent.sock")
	l, err := net.Listen("unix", path)
	if err != nil {
		b.Fatal(err)
	}
	if grpcOnly {
		c, err := core.New(store, core.Options{Audit: discardAudit()})
		if err != nil {
			b.Fatal(err)
		}
		svc := grpcsvc.New(c, grpcsvc.Options{IdleTimeout: time.Minute, MaxStreamsPerConnection: 16, Handshake: 10 * time.Second})
		go svc.Serve(listen.Admitted(l, c))
		b.Cleanup(func() {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			c.Drain()
			svc.Shutdown(ctx)
			c.Close()
		})
	} else {
		srv, err := server.New(store, server.Options{Audit: discardAudit()})
		if err != nil {
			b.Fatal(err)
		}
		go srv.Serve(l)
		b.Cleanup(func() {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			srv.Shutdown(ctx)
		})
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := agent.Dial(ctx, path)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { c.Close() })
	s, err := c.Signer(ctx, "ec")
	if err != nil {
		b.Fatal(err)
	}
	return s
}

// benchCallers runs b.N signatures with s from callers goroutines (the
// CPU RunCallers reports is the agent's and the client's: both run in
// this process), and the signatures per second.
func benchCallers(b *testing.B, callers int, s crypto.Signer) {
	digest := sha256.Sum256([]byte("bench"))
	RunCallers(b, callers, func() error {
		_, err := s.Sign(nil, digest[:], crypto.SHA256)
		return err
	})
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "sig/s")
}

// discardAudit drops the audit records: the benchmark measures transports.
func discardAudit() *slog.Logger { return slog.New(slog.NewJSONHandler(io.Discard, nil)) }
