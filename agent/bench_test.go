package agent_test

import (
	"context"
	"crypto"
	"crypto/sha256"
	"testing"

	"github.com/hsmagent/hsmagent/agent/bench"
	"github.com/hsmagent/hsmagent/agent/server"
	"github.com/hsmagent/hsmagent/hsm"
	softhsmtest "github.com/hsmagent/hsmagent/softhsm-test"
)

// BenchmarkSign compares an ECDSA P-256 signature made in-process through
// crypto11 with the same key used through the agent, at 8 callers per CPU
// (go test -bench Sign -cpu 1 gives the 8-caller figure of the product target).
func BenchmarkSign(b *testing.B) {
	fx := softhsmtest.New(b)
	tok := fx.Open(b)
	if _, err := tok.GenerateKey("ec", hsm.ECDSAP256, nil); err != nil {
		b.Fatal(err)
	}
	local, err := tok.Signer("ec")
	if err != nil {
		b.Fatal(err)
	}
	a := softhsmtest.StartAgent(b, tok, server.Options{Audit: discardLogger()})
	client := dialB(b, a.Socket)
	remote, err := client.Signer(context.Background(), "ec")
	if err != nil {
		b.Fatal(err)
	}
	digest := sha256.Sum256([]byte("bench"))
	for name, s := range map[string]crypto.Signer{"in-process": local, "agent": remote} {
		b.Run(name, func(b *testing.B) {
			b.SetParallelism(8)
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					if _, err := s.Sign(nil, digest[:], crypto.SHA256); err != nil {
						b.Error(err)
						return
					}
				}
			})
		})
	}
}

// BenchmarkTLS13Handshake compares full TLS 1.3 handshakes with the server key
// in-process and through the agent.
func BenchmarkTLS13Handshake(b *testing.B) {
	fx := softhsmtest.New(b)
	tok := fx.Open(b)
	if _, err := tok.GenerateKey("ec", hsm.ECDSAP256, nil); err != nil {
		b.Fatal(err)
	}
	local, _ := tok.Signer("ec")
	a := softhsmtest.StartAgent(b, tok, server.Options{Audit: discardLogger()})
	remote, err := dialB(b, a.Socket).Signer(context.Background(), "ec")
	if err != nil {
		b.Fatal(err)
	}
	for name, s := range map[string]crypto.Signer{"in-process": local, "agent": remote} {
		b.Run(name, func(b *testing.B) {
			r, err := bench.Handshakes(context.Background(), name, s, 8, handshakePhase)
			if err != nil {
				b.Fatal(err)
			}
			b.ReportMetric(r.PerSecond, "handshakes/s")
			b.ReportMetric(float64(r.P99.Microseconds()), "p99-µs")
		})
	}
}
