package server_test

import (
	"context"
	"crypto"
	"errors"
	"io"
	"log/slog"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/hsmagent/hsmagent/agent/agenttest"
	"github.com/hsmagent/hsmagent/agent/server"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// failingStore's signers fail with err.
type failingStore struct {
	*server.MemoryStore
	err atomic.Pointer[error]
}

func (s *failingStore) Signer(label string) (crypto.Signer, error) {
	inner, err := s.MemoryStore.Signer(label)
	if err != nil {
		return nil, err
	}
	return &failingSigner{Signer: inner, store: s}, nil
}

type failingSigner struct {
	crypto.Signer
	store *failingStore
}

func (s *failingSigner) Sign(r io.Reader, d []byte, o crypto.SignerOpts) ([]byte, error) {
	if err := s.store.err.Load(); err != nil {
		return nil, *err
	}
	return s.Signer.Sign(r, d, o)
}

// downError is a backend-down error as the KeyStore contract describes it.
type downError struct{}

func (downError) Error() string {
	return `hsm: token "t" is unavailable (the token is not present); retrying in 1s`
}
func (downError) Unavailable() bool { return true }

// TestBackendDown: a signer error that implements Unavailable() bool is
// answered Unavailable with its text and audited hsm-down, without an ERROR
// line per request; other errors are Internal, audited hsm-error, and logged
// at most once a second.
func TestBackendDown(t *testing.T) {
	store := &failingStore{MemoryStore: newMemStore(t)}
	audit, logs := &auditBuffer{}, &auditBuffer{}
	a := agenttest.Start(t, store, server.Options{
		Audit: slog.New(slog.NewTextHandler(audit, nil)), Logger: slog.New(slog.NewTextHandler(logs, nil))})
	api, _ := rawClient(t, a.Socket)
	ctx := context.Background()

	var down error = downError{}
	store.err.Store(&down)
	for i := 0; i < 20; i++ {
		_, err := api.Sign(ctx, goodEC)
		if status.Code(err) != codes.Unavailable || !strings.Contains(err.Error(), `token "t" is unavailable`) {
			t.Fatalf("sign with the backend down: %v; want Unavailable with the store's words", err)
		}
	}
	if n := audit.count("result=hsm-down"); n != 20 {
		t.Errorf("%d of 20 requests audited hsm-down", n)
	}
	if n := logs.count("level=ERROR"); n != 0 {
		t.Errorf("%d ERROR lines for a backend that said it is down", n)
	}

	var failed error = errors.New("hsm: signing with key \"ec\": the HSM reported a device error")
	store.err.Store(&failed)
	for i := 0; i < 20; i++ {
		if _, err := api.Sign(ctx, goodEC); status.Code(err) != codes.Internal {
			t.Fatalf("sign with a failing backend: %v; want Internal", err)
		}
	}
	if n := audit.count("result=hsm-error"); n != 20 {
		t.Errorf("%d of 20 requests audited hsm-error", n)
	}
	if n := logs.count("signing failed"); n != 1 {
		t.Errorf("%d 'signing failed' lines for 20 failures within a second, want 1", n)
	}
	store.err.Store(nil)
	if _, err := api.Sign(ctx, goodEC); err != nil {
		t.Errorf("sign after the backend recovered: %v", err)
	}
}
