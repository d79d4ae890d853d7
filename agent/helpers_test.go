package agent_test

import (
	"context"
	"crypto/elliptic"
	"io"
	"log/slog"
	"testing"
	"time"

	"github.com/hsmagent/hsmagent/agent"
)

func ecdsaCurve() elliptic.Curve { return elliptic.P256() }

func discardLogger() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

func dialB(b *testing.B, socket string) *agent.Client {
	b.Helper()
	c, err := agent.Dial(context.Background(), socket)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { c.Close() })
	return c
}

// handshakePhase is how long BenchmarkTLS13Handshake measures each side:
// bench.Handshakes runs for a duration rather than b.N iterations.
const handshakePhase = 2 * time.Second
