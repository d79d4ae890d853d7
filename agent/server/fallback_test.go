package server_test

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hsmagent/hsmagent/agent"
	"github.com/hsmagent/hsmagent/agent/agenttest"
	"github.com/hsmagent/hsmagent/agent/server"
)

// TestClientFallsBackToGRPCSignStream: the Client signs through an agent
// that has no signing connections (gRPC alone on the socket) over gRPC's
// SignStream, after one signing connection that agent refused.
func TestClientFallsBackToGRPCSignStream(t *testing.T) {
	store := newMemStore(t)
	srv, err := server.New(store, server.Options{Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(agenttest.SocketDir(t), "agent.sock")
	l, err := server.Listen(path, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	counted := &countingListener{Listener: l}
	served := make(chan error, 1)
	go func() { served <- srv.ServeGRPCOnly(counted) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		srv.Shutdown(ctx)
		if err := <-served; err != nil {
			t.Error(err)
		}
	})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := agent.Dial(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	signer, err := c.Signer(ctx, "ec")
	if err != nil {
		t.Fatal(err)
	}
	before := counted.accepted.Load() // Dial's probe of the socket, and gRPC's connection
	signThree(t, signer, "through an agent without signing connections")
	if n := counted.accepted.Load() - before; n != 1 {
		t.Errorf("the agent accepted %d connections for the signatures; want 1: the signing connection it refused, then gRPC's SignStream on the client's connection", n)
	}
}

// TestClientSignsAtConnectionLimit: a Client whose gRPC connection the agent
// admitted, at its connection limit (of the uid, or in all) with it, signs
// over gRPC's SignStream on that connection when the agent refuses its
// signing connection, as it did before signing connections (the tests run
// as root, whom only the total limit binds).
func TestClientSignsAtConnectionLimit(t *testing.T) {
	a := agenttest.Start(t, newMemStore(t), server.Options{MaxConnections: 1})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := agent.Dial(ctx, a.Socket)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	signer, err := c.Signer(ctx, "ec")
	if err != nil {
		t.Fatal(err)
	}
	signThree(t, signer, "with the Client's gRPC connection the agent's last")
}

// TestClientCallsFailingTogether: calls with different keys that fail
// together, their stream broken under them (the agent stopped at its
// deadline with the HSM hung), each get an error that names their own key;
// under the race detector, without writing to one another's error.
func TestClientCallsFailingTogether(t *testing.T) {
	store := newStallingStore(t)
	a := agenttest.Start(t, store, server.Options{HSMTimeout: time.Minute})
	release := sync.OnceFunc(store.release)
	t.Cleanup(release) // before the agent's Stop, should the test fail first
	c, err := agent.Dial(context.Background(), a.Socket, agent.WithSignTimeout(time.Minute))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	signers := map[string]crypto.Signer{}
	for _, label := range []string{"ec", "rsa"} {
		if signers[label], err = c.Signer(context.Background(), label); err != nil {
			t.Fatal(err)
		}
	}
	store.hold()
	const perKey = 8
	type failure struct {
		label string
		err   error
	}
	failures := make(chan failure, 2*perKey)
	for label, s := range signers {
		for range perKey {
			go func() {
				digest := sha256.Sum256([]byte(label))
				_, err := s.Sign(nil, digest[:], crypto.SHA256)
				if err != nil {
					err = errors.New(err.Error()) // read it now, as a caller would
				}
				failures <- failure{label, err}
			}()
		}
	}
	waitFor(t, func() bool { return store.calls.Load() == 2*perKey })
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	a.Server.Shutdown(ctx)
	for range 2 * perKey {
		f := <-failures
		if want := fmt.Sprintf("signing with key %q", f.label); f.err == nil || !strings.Contains(f.err.Error(), want) {
			t.Errorf("a call with key %q, its stream broken: %v; want an error that says %s", f.label, f.err, want)
		}
	}
}

// countingListener counts the connections it accepts.
type countingListener struct {
	net.Listener
	accepted atomic.Int64
}

func (l *countingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err == nil {
		l.accepted.Add(1)
	}
	return c, err
}

// signThree makes three ECDSA signatures with signer and verifies them.
func signThree(t *testing.T, signer crypto.Signer, how string) {
	t.Helper()
	for i := range 3 {
		digest := sha256.Sum256([]byte{byte(i)})
		sig, err := signer.Sign(nil, digest[:], crypto.SHA256)
		if err != nil {
			t.Fatalf("signature %d %s: %v", i, how, err)
		}
		if !ecdsa.VerifyASN1(signer.Public().(*ecdsa.PublicKey), digest[:], sig) {
			t.Fatalf("signature %d %s does not verify", i, how)
		}
	}
}
