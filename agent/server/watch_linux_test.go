package server_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hsmagent/hsmagent/agent/agentpb"
	"github.com/hsmagent/hsmagent/agent/agenttest"
	"github.com/hsmagent/hsmagent/agent/server"
)

// TestWatchKeysCoalesced: reloads that change nothing send a watcher
// nothing: the next list it gets is the one with the change (issue 18,
// item 7: every SIGHUP queued a message to every watcher).
func TestWatchKeysCoalesced(t *testing.T) {
	store := newMemStore(t)
	a := agenttest.Start(t, store, server.Options{})
	api, _ := rawClient(t, a.Socket)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	stream, err := api.WatchKeys(ctx, &agentpb.WatchKeysRequest{})
	if err != nil {
		t.Fatal(err)
	}
	first, err := stream.Recv()
	if err != nil {
		t.Fatal(err)
	}
	for range 5 {
		if err := a.Server.Reload(nil); err != nil {
			t.Fatal(err)
		}
		time.Sleep(50 * time.Millisecond) // time for the watcher to send, if it would
	}
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err := store.Add("new", k, nil); err != nil {
		t.Fatal(err)
	}
	if err := a.Server.Reload(nil); err != nil {
		t.Fatal(err)
	}
	next, err := stream.Recv()
	if err != nil {
		t.Fatal(err)
	}
	if len(next.Keys) != len(first.Keys)+1 || next.Revision != first.Revision+1 {
		t.Errorf("the message after 5 no-op reloads and one change: %d keys, revision %d; want %d keys, revision %d",
			len(next.Keys), next.Revision, len(first.Keys)+1, first.Revision+1)
	}
}

// TestKeyRevisionPerCaller: a caller's revision moves when what it may use
// changes, not when root adds or removes a key it cannot see; and one uid
// may hold a bounded number of watchers (issue 18, item 7).
func TestKeyRevisionPerCaller(t *testing.T) {
	needOtherUsers(t)
	policy, err := server.NewPolicy([]server.Rule{{Keys: []string{"ec"}, Users: []string{"65534"}}})
	if err != nil {
		t.Fatal(err)
	}
	dir := agenttest.SocketDir(t)
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	store := newMemStore(t)
	a := agenttest.StartAt(t, filepath.Join(dir, "agent.sock"), 0o666, store, server.Options{Policy: policy})
	bin := copyTestBinary(t, dir)
	list := func() string {
		t.Helper()
		out, err := clientAs(bin, "list-revision", a.Socket, nobody).CombinedOutput()
		if err != nil {
			t.Fatalf("%s%v", out, err)
		}
		return strings.TrimSpace(string(out))
	}
	before := list()
	if !strings.HasSuffix(before, " keys=ec") {
		t.Fatalf("nobody's view: %q; want the key ec only", before)
	}
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err := store.Add("roots-only", k, nil); err != nil {
		t.Fatal(err)
	}
	rev := a.Server.Revision()
	if err := a.Server.Reload(nil); err != nil || a.Server.Revision() == rev {
		t.Fatalf("reload with a new key: revision %d -> %d, %v", rev, a.Server.Revision(), err)
	}
	if got := list(); got != before {
		t.Errorf("nobody's view after root added a key it cannot see: %q; want %q unchanged", got, before)
	}
	if err := store.Delete("roots-only"); err != nil {
		t.Fatal(err)
	}
	if err := a.Server.Reload(nil); err != nil {
		t.Fatal(err)
	}
	if got := list(); got != before {
		t.Errorf("nobody's view after root removed a key it cannot see: %q; want %q unchanged", got, before)
	}
	if err := store.Delete("ec"); err != nil {
		t.Fatal(err)
	}
	if err := a.Server.Reload(nil); err != nil {
		t.Fatal(err)
	}
	if got := list(); got == before || !strings.HasSuffix(got, " keys=") {
		t.Errorf("nobody's view after its key was removed: %q; want a new revision and no keys (was %q)", got, before)
	}

	out, err := clientAs(bin, "watches", a.Socket, nobody, "HSMAGENT_TEST_N=40").CombinedOutput()
	if got := strings.TrimSpace(string(out)); err != nil || got != "admitted=32 refused=8" {
		t.Errorf("40 watchers of one uid: %q %v; want admitted=32 refused=8", got, err)
	}
}
