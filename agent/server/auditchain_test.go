package server_test

import (
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hsmagent/hsmagent/agent/agentpb"
	"github.com/hsmagent/hsmagent/agent/agenttest"
	"github.com/hsmagent/hsmagent/agent/auditchain"
	"github.com/hsmagent/hsmagent/agent/keytype"
	"github.com/hsmagent/hsmagent/agent/server"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// TestAuditSigningKey: the audit signing key is the agent's own (no
// caller lists it or signs with it, whatever the rules); an idle agent
// writes no checkpoint of nothing new; the trail verifies with the key.
func TestAuditSigningKey(t *testing.T) {
	store := newMemStore(t)
	pub, err := store.Generate("audit", keytype.ECDSAP256)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "audit.jsonl")
	f, err := server.OpenAuditFile(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	rules := []server.Rule{{Keys: []string{"*"}, Users: []string{"root"}}}
	policy, err := server.NewPolicy(rules)
	if err != nil {
		t.Fatal(err)
	}
	a := agenttest.Start(t, store, server.Options{Audit: slog.New(slog.NewJSONHandler(f, nil)), AuditChain: f, Policy: policy,
		AuditSigningKey: "audit", AuditCheckpointEvery: 20 * time.Millisecond})
	api, _ := rawClient(t, a.Socket)
	keys, err := api.ListKeys(context.Background(), &agentpb.ListKeysRequest{})
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range keys.Keys {
		if k.Label == "audit" {
			t.Error("the audit signing key is listed to a caller")
		}
	}
	if _, err := api.Sign(context.Background(), &agentpb.SignRequest{Key: "audit", Digest: make([]byte, 32), Hash: agentpb.Hash_HASH_SHA256}); status.Code(err) != codes.NotFound && status.Code(err) != codes.PermissionDenied {
		t.Errorf("a caller signed with the audit signing key (rule \"*\"): %v", err)
	}
	if _, err := api.Sign(context.Background(), goodEC); err != nil {
		t.Fatal(err)
	}
	time.Sleep(300 * time.Millisecond) // fifteen intervals, idle after the first
	a.Server.Shutdown(context.Background())
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if n := strings.Count(string(b), `"msg":"audit checkpoint"`); n != 1 {
		t.Errorf("%d checkpoints; want 1 (the first interval: nothing new after it, shutdown included):\n%s", n, b)
	}
	r, err := auditchain.Verify([]string{path}, pub)
	if err != nil || r.Checkpoints != 1 {
		t.Errorf("verify: %+v %v\n%s", r, err, b)
	}
}
