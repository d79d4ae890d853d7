package server_test

import (
	"bytes"
	"context"
	"crypto"
	"io"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hsmagent/hsmagent/agent"
	"github.com/hsmagent/hsmagent/agent/agentpb"
	"github.com/hsmagent/hsmagent/agent/agenttest"
	"github.com/hsmagent/hsmagent/agent/server"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"
)

// stallingStore wraps the memory store with signers that wait while the
// store is held, as a hung HSM does; calls counts what reached the "HSM".
// (The same behaviours against a real PKCS#11 module are in softhsm-test.)
type stallingStore struct {
	*server.MemoryStore
	mu    sync.Mutex
	held  chan struct{} // closed: signers run
	calls atomic.Int64
}

func newStallingStore(t *testing.T) *stallingStore {
	s := &stallingStore{MemoryStore: newMemStore(t), held: make(chan struct{})}
	close(s.held)
	return s
}

func (s *stallingStore) hold() {
	s.mu.Lock()
	s.held = make(chan struct{})
	s.mu.Unlock()
}

func (s *stallingStore) release() {
	s.mu.Lock()
	close(s.held)
	s.mu.Unlock()
}

func (s *stallingStore) Signer(label string) (crypto.Signer, error) {
	inner, err := s.MemoryStore.Signer(label)
	if err != nil {
		return nil, err
	}
	return &stallingSigner{Signer: inner, store: s}, nil
}

type stallingSigner struct {
	crypto.Signer
	store *stallingStore
}

func (s *stallingSigner) Sign(r io.Reader, d []byte, o crypto.SignerOpts) ([]byte, error) {
	s.store.calls.Add(1)
	s.store.mu.Lock()
	held := s.store.held
	s.store.mu.Unlock()
	<-held
	return s.Signer.Sign(r, d, o)
}

type auditBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (a *auditBuffer) Write(p []byte) (int, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.buf.Write(p)
}

func (a *auditBuffer) count(s string) int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return strings.Count(a.buf.String(), s)
}

var goodEC = &agentpb.SignRequest{Key: "ec", Digest: make([]byte, 32), Hash: agentpb.Hash_HASH_SHA256}

// TestQueueBoundedAndDepartedCallersNotSent: with the HSM busy, requests
// beyond in-flight + waiting are refused at once with ResourceExhausted, and
// a waiting request whose caller gave up never reaches the HSM.
func TestQueueBoundedAndDepartedCallersNotSent(t *testing.T) {
	store := newStallingStore(t)
	audit := &auditBuffer{}
	a := agenttest.Start(t, store, server.Options{MaxInFlight: 2, MaxWaiting: 2, HSMTimeout: time.Minute,
		Audit: slog.New(slog.NewTextHandler(audit, nil))})
	api, _ := rawClient(t, a.Socket)
	store.hold()
	var wg sync.WaitGroup
	for range 2 { // fill the HSM
		wg.Add(1)
		go func() { defer wg.Done(); api.Sign(context.Background(), goodEC) }()
	}
	waitFor(t, func() bool { return store.calls.Load() == 2 })
	// Two waiters whose callers give up after a while, and who stay queued
	// until then: the next request finds the queue full.
	leave := make(chan struct{})
	for range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithCancel(context.Background())
			go func() { <-leave; cancel() }()
			_, err := api.Sign(ctx, goodEC)
			if status.Code(err) != codes.Canceled {
				t.Errorf("waiting caller: %v", err)
			}
		}()
	}
	waitFor(t, func() bool { _, waiting := a.Server.HSMLoad(); return waiting == 2 })
	start := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err := api.Sign(ctx, goodEC)
	if status.Code(err) != codes.ResourceExhausted || !strings.Contains(err.Error(), "waiting for the HSM") {
		t.Errorf("request beyond the queue: %v", err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("the full queue answered after %v instead of at once", d)
	}
	close(leave)
	waitFor(t, func() bool { return audit.count("result=abandoned") == 2 })
	store.release()
	wg.Wait()
	if n := store.calls.Load(); n != 2 {
		t.Errorf("%d signatures reached the HSM; the two departed callers' must not", n)
	}
	if _, err := api.Sign(context.Background(), goodEC); err != nil {
		t.Errorf("after the HSM freed up: %v", err)
	}
	if audit.count("result=busy") != 1 {
		t.Errorf("busy refusal not audited:\n%s", audit.buf.String())
	}
}

// TestStreamCallerDeadlineNotSent: a signature on a stream (the Go
// client's path) whose caller's deadline passes while it waits for the HSM
// is answered DeadlineExceeded, audited as abandoned, and never reaches the
// HSM, while the stream goes on serving.
func TestStreamCallerDeadlineNotSent(t *testing.T) {
	store := newStallingStore(t)
	audit := &auditBuffer{}
	a := agenttest.Start(t, store, server.Options{MaxInFlight: 1, HSMTimeout: time.Minute,
		Audit: slog.New(slog.NewTextHandler(audit, nil))})
	signerWith := func(timeout time.Duration) crypto.Signer {
		client, err := agent.Dial(context.Background(), a.Socket, agent.WithSignTimeout(timeout))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { client.Close() })
		s, err := client.Signer(context.Background(), "ec")
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	patient, hasty := signerWith(time.Minute), signerWith(300*time.Millisecond)
	store.hold()
	first := make(chan error, 1)
	go func() { _, err := patient.Sign(nil, goodEC.Digest, crypto.SHA256); first <- err }()
	waitFor(t, func() bool { return store.calls.Load() == 1 }) // the HSM's one slot is taken
	if _, err := hasty.Sign(nil, goodEC.Digest, crypto.SHA256); err == nil || !strings.Contains(err.Error(), "DeadlineExceeded") {
		t.Errorf("caller past its deadline: %v, want DeadlineExceeded", err)
	}
	waitFor(t, func() bool { return audit.count("result=abandoned") == 1 })
	store.release()
	if err := <-first; err != nil {
		t.Errorf("first signature: %v", err)
	}
	if _, err := hasty.Sign(nil, goodEC.Digest, crypto.SHA256); err != nil {
		t.Errorf("the same stream afterwards: %v", err)
	}
	if n := store.calls.Load(); n != 2 {
		t.Errorf("%d signatures reached the HSM, want 2: the departed caller's must not", n)
	}
}

// TestStuckHSM: an operation past the HSM timeout fails with Unavailable,
// health turns NOT_SERVING and new requests fail fast without reaching the
// HSM; when it answers again, health is SERVING and signatures work.
func TestStuckHSM(t *testing.T) {
	store := newStallingStore(t)
	audit := &auditBuffer{}
	logs := &auditBuffer{}
	a := agenttest.Start(t, store, server.Options{HSMTimeout: 200 * time.Millisecond,
		Audit: slog.New(slog.NewTextHandler(audit, nil)), Logger: slog.New(slog.NewTextHandler(logs, nil))})
	api, conn := rawClient(t, a.Socket)
	health := healthpb.NewHealthClient(conn)
	ctx := context.Background()
	store.hold()
	_, err := api.Sign(ctx, goodEC)
	if status.Code(err) != codes.Unavailable || !strings.Contains(err.Error(), "did not answer within 200ms") {
		t.Fatalf("stuck signature: %v", err)
	}
	if h, err := health.Check(ctx, &healthpb.HealthCheckRequest{}); err != nil || h.Status != healthpb.HealthCheckResponse_NOT_SERVING {
		t.Errorf("health while stuck: %v %v", h, err)
	}
	calls := store.calls.Load()
	for range 20 {
		start := time.Now()
		_, err := api.Sign(ctx, goodEC)
		if status.Code(err) != codes.Unavailable || !strings.Contains(err.Error(), "HSM is not answering") {
			t.Fatalf("request while stuck: %v", err)
		}
		if d := time.Since(start); d > time.Second {
			t.Fatalf("request while stuck took %v; it must fail fast", d)
		}
	}
	if store.calls.Load() != calls {
		t.Error("requests reached the HSM while it was stuck")
	}
	store.release()
	waitFor(t, func() bool {
		h, err := health.Check(ctx, &healthpb.HealthCheckRequest{})
		return err == nil && h.Status == healthpb.HealthCheckResponse_SERVING
	})
	if _, err := api.Sign(ctx, goodEC); err != nil {
		t.Errorf("after recovery: %v", err)
	}
	if audit.count("result=timeout") != 1 || audit.count("result=hsm-down") != 20 || audit.count("result=ok") != 1 {
		t.Errorf("audit results:\n%s", audit.buf.String())
	}
	if logs.count("HSM stopped answering") != 1 || logs.count("HSM answers again") != 1 {
		t.Errorf("want one log line when the HSM stops and one when it is back:\n%s", logs.buf.String())
	}
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not reached within 10s")
		}
		time.Sleep(10 * time.Millisecond)
	}
}
