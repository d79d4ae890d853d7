package agent_test

import (
	"bytes"
	"context"
	"crypto"
	"crypto/sha256"
	"errors"
	"log/slog"
	"regexp"
	"sync"
	"testing"

	"github.com/hsmagent/hsmagent/agent"
	"github.com/hsmagent/hsmagent/agent/agenttest"
	"github.com/hsmagent/hsmagent/agent/keytype"
	"github.com/hsmagent/hsmagent/agent/server"
)

type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// TestClientErrorsNameTheAuditRecord: the errors a client gets carry the
// request id of the agent's audit record for the call, both for a key that
// is not offered (the listing's record) and for a signature the agent
// refused (the sign record), so that one can be matched to the other.
func TestClientErrorsNameTheAuditRecord(t *testing.T) {
	store := server.NewMemoryStore()
	if _, err := store.Generate("ec", keytype.ECDSAP256); err != nil {
		t.Fatal(err)
	}
	audit := &lockedBuffer{}
	a := agenttest.Start(t, store, server.Options{Audit: slog.New(slog.NewJSONHandler(audit, nil))})
	client := dial(t, a.Socket)
	ctx := context.Background()
	rid := regexp.MustCompile(`\(request ([0-9a-f]{16})\)$`)

	_, err := client.Signer(ctx, "nope")
	m := rid.FindStringSubmatch(errString(err))
	if m == nil {
		t.Fatalf("key not offered: %v; want a request id", err)
	}
	if !regexp.MustCompile(`"msg":"list".*"request_id":"` + m[1] + `"`).MatchString(audit.String()) {
		t.Errorf("no list record with request id %s:\n%s", m[1], audit)
	}

	signer, err := client.Signer(ctx, "ec")
	if err != nil {
		t.Fatal(err)
	}
	// Gone from the store: the agent refuses the next signature itself.
	if err := store.Delete("ec"); err != nil {
		t.Fatal(err)
	}
	if err := a.Server.Reload(nil); err != nil {
		t.Fatal(err)
	}
	digest := sha256.Sum256([]byte("x"))
	_, err = signer.Sign(nil, digest[:], crypto.SHA256)
	var ce *agent.CallError
	if !errors.As(err, &ce) || ce.RequestID == "" {
		t.Fatalf("refused signature: %v; want a CallError with a request id", err)
	}
	if !regexp.MustCompile(`"msg":"sign".*"request_id":"` + ce.RequestID + `"`).MatchString(audit.String()) {
		t.Errorf("no sign record with request id %s:\n%s", ce.RequestID, audit)
	}
}

func errString(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}
