package server_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/hsmagent/hsmagent/agent/agentpb"
	"github.com/hsmagent/hsmagent/agent/agenttest"
	"github.com/hsmagent/hsmagent/agent/keytype"
	"github.com/hsmagent/hsmagent/agent/server"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"
)

// newMemStore is an in-memory store with an ECDSA P-256 key "ec" and an
// RSA-2048 key "rsa". The contract suite proves that the PKCS#11 store
// behaves as this one does; the SoftHSM runs of the agent are in softhsm-test.
func newMemStore(t testing.TB) *server.MemoryStore {
	t.Helper()
	m := server.NewMemoryStore()
	for label, kt := range map[string]keytype.Type{"ec": keytype.ECDSAP256, "rsa": keytype.RSA2048} {
		if _, err := m.Generate(label, kt); err != nil {
			t.Fatal(err)
		}
	}
	return m
}

func rawClient(t *testing.T, socket string) (agentpb.AgentClient, *grpc.ClientConn) {
	t.Helper()
	conn, err := grpc.NewClient("unix://"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return agentpb.NewAgentClient(conn), conn
}

func stores(t *testing.T) map[string]server.KeyStore {
	return map[string]server.KeyStore{"memory": newMemStore(t)}
}

// TestBadRequestsKeepTheAgentServing sends every kind of malformed request;
// each gets a clean error with the right code and the next good one succeeds.
func TestBadRequestsKeepTheAgentServing(t *testing.T) {
	for name, store := range stores(t) {
		t.Run(name, func(t *testing.T) {
			a := agenttest.Start(t, store, server.Options{})
			api, conn := rawClient(t, a.Socket)
			ctx := context.Background()
			d32 := make([]byte, 32)
			good := &agentpb.SignRequest{Key: "ec", Digest: d32, Hash: agentpb.Hash_HASH_SHA256}
			tests := []struct {
				name string
				req  *agentpb.SignRequest
				code codes.Code
				want string
			}{
				{"wrong digest length", &agentpb.SignRequest{Key: "ec", Digest: make([]byte, 20), Hash: agentpb.Hash_HASH_SHA256}, codes.InvalidArgument, "digest is 20 bytes"},
				{"unknown hash", &agentpb.SignRequest{Key: "ec", Digest: d32, Hash: 42}, codes.InvalidArgument, "not supported"},
				{"unspecified hash", &agentpb.SignRequest{Key: "ec", Digest: d32}, codes.InvalidArgument, "not supported"},
				{"unknown key", &agentpb.SignRequest{Key: "missing", Digest: d32, Hash: agentpb.Hash_HASH_SHA256}, codes.NotFound, `key "missing" not found`},
				{"empty key", &agentpb.SignRequest{Digest: d32, Hash: agentpb.Hash_HASH_SHA256}, codes.InvalidArgument, "empty"},
				{"PSS on an EC key", &agentpb.SignRequest{Key: "ec", Digest: d32, Hash: agentpb.Hash_HASH_SHA256, Padding: agentpb.Padding_PADDING_PSS}, codes.InvalidArgument, "RSA only"},
				{"PSS salt too long", &agentpb.SignRequest{Key: "rsa", Digest: d32, Hash: agentpb.Hash_HASH_SHA256, Padding: agentpb.Padding_PADDING_PSS, PssSaltLength: 4000}, codes.InvalidArgument, "salt length 4000"},
				{"negative salt", &agentpb.SignRequest{Key: "rsa", Digest: d32, Hash: agentpb.Hash_HASH_SHA256, Padding: agentpb.Padding_PADDING_PSS, PssSaltLength: -3}, codes.InvalidArgument, "salt length -3"},
				{"unknown padding", &agentpb.SignRequest{Key: "rsa", Digest: d32, Hash: agentpb.Hash_HASH_SHA256, Padding: 9}, codes.InvalidArgument, "not supported"},
				{"oversized message", &agentpb.SignRequest{Key: "ec", Digest: make([]byte, 1<<20), Hash: agentpb.Hash_HASH_SHA256}, codes.ResourceExhausted, "larger than max"},
				{"label too long", &agentpb.SignRequest{Key: strings.Repeat("k", 300), Digest: d32, Hash: agentpb.Hash_HASH_SHA256}, codes.InvalidArgument, "longer than"},
			}
			for _, tt := range tests {
				t.Run(tt.name, func(t *testing.T) {
					_, err := api.Sign(ctx, tt.req)
					st, _ := status.FromError(err)
					if st.Code() != tt.code || !strings.Contains(st.Message(), tt.want) {
						t.Errorf("got %v %q, want %v containing %q", st.Code(), st.Message(), tt.code, tt.want)
					}
					if _, err := api.Sign(ctx, good); err != nil {
						t.Fatalf("good request after a bad one: %v", err)
					}
				})
			}
			h, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{})
			if err != nil || h.Status != healthpb.HealthCheckResponse_SERVING {
				t.Errorf("health: %v %v", h, err)
			}
		})
	}
}

func TestListKeysAndWatch(t *testing.T) {
	store := newMemStore(t)
	a := agenttest.Start(t, store, server.Options{})
	api, _ := rawClient(t, a.Socket)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	resp, err := api.ListKeys(ctx, &agentpb.ListKeysRequest{})
	if err != nil || len(resp.Keys) != 2 || resp.Keys[0].Label != "ec" || resp.Keys[0].Algorithm != agentpb.Algorithm_ALGORITHM_ECDSA_P256 {
		t.Fatalf("ListKeys: %v %v", resp, err)
	}
	stream, err := api.WatchKeys(ctx, &agentpb.WatchKeysRequest{})
	if err != nil {
		t.Fatal(err)
	}
	first, err := stream.Recv()
	if err != nil || first.Revision != resp.Revision {
		t.Fatalf("first watch message: %v %v", first, err)
	}
	// A reload that changes nothing does not bump the revision.
	if err := a.Server.Reload(nil); err != nil || a.Server.Revision() != first.Revision {
		t.Fatalf("no-op reload: revision %d, %v", a.Server.Revision(), err)
	}
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err := store.Add("new", k, nil); err != nil {
		t.Fatal(err)
	}
	if err := a.Server.Reload(nil); err != nil {
		t.Fatal(err)
	}
	for {
		msg, err := stream.Recv()
		if err != nil {
			t.Fatal(err)
		}
		if len(msg.Keys) == 3 {
			if msg.Revision != first.Revision+1 {
				t.Errorf("revision %d after one change from %d", msg.Revision, first.Revision)
			}
			break
		}
	}
	// Shutdown ends watch streams instead of hanging on them.
	done := make(chan struct{})
	go func() { a.Stop(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("Shutdown hung on an open watch stream")
	}
}

func TestListenRefusesLiveSocketAndReplacesStale(t *testing.T) {
	dir := agenttest.SocketDir(t)
	path := dir + "/sub/agent.sock"
	l, err := server.Listen(path, 0o660)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := server.Listen(path, 0o660); err == nil || !strings.Contains(err.Error(), "another agent is listening") {
		t.Errorf("second listener: %v", err)
	}
	// A socket file whose listener died without removing it.
	l.Close()
	dead, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	dead.(*net.UnixListener).SetUnlinkOnClose(false)
	dead.Close()
	l2, err := server.Listen(path, 0o600)
	if err != nil {
		t.Fatalf("stale socket not replaced: %v", err)
	}
	defer l2.Close()
	if fi, err := statMode(path); err != nil || fi != 0o600 {
		t.Errorf("socket mode %o, %v", fi, err)
	}
	if fi, err := statMode(dir + "/sub"); err != nil || fi != 0o750 {
		t.Errorf("socket directory mode %o, %v", fi, err)
	}
}

// TestSignStream sends a batch mixing good and bad items: each is answered
// under its own id, and the stream stays usable.
func TestSignStream(t *testing.T) {
	a := agenttest.Start(t, newMemStore(t), server.Options{})
	api, _ := rawClient(t, a.Socket)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	stream, err := api.SignStream(ctx)
	if err != nil {
		t.Fatal(err)
	}
	d32 := make([]byte, 32)
	items := []*agentpb.SignStreamItem{
		{Id: 7, Request: &agentpb.SignRequest{Key: "ec", Digest: d32, Hash: agentpb.Hash_HASH_SHA256}},
		{Id: 8, Request: &agentpb.SignRequest{Key: "missing", Digest: d32, Hash: agentpb.Hash_HASH_SHA256}},
		{Id: 9, Request: &agentpb.SignRequest{Key: "ec", Digest: d32[:5], Hash: agentpb.Hash_HASH_SHA256}},
		{Id: 10},
	}
	if err := stream.Send(&agentpb.SignStreamRequest{Items: items}); err != nil {
		t.Fatal(err)
	}
	want := map[uint64]codes.Code{7: codes.OK, 8: codes.NotFound, 9: codes.InvalidArgument, 10: codes.InvalidArgument}
	for len(want) > 0 {
		resp, err := stream.Recv()
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range resp.Results {
			code, ok := want[r.Id]
			if !ok {
				t.Fatalf("unexpected result id %d", r.Id)
			}
			if codes.Code(r.Code) != code || (code == codes.OK) != (len(r.Signature) > 0) {
				t.Errorf("id %d: code %v %q, %d signature bytes; want %v", r.Id, codes.Code(r.Code), r.Message, len(r.Signature), code)
			}
			delete(want, r.Id)
		}
	}
	// Too many items in one message ends the stream with InvalidArgument.
	var big []*agentpb.SignStreamItem
	for i := range 65 {
		big = append(big, &agentpb.SignStreamItem{Id: uint64(100 + i), Request: items[0].Request})
	}
	stream.Send(&agentpb.SignStreamRequest{Items: big})
	if _, err := stream.Recv(); status.Code(err) != codes.InvalidArgument {
		t.Errorf("oversized batch: %v", err)
	}
	// Shutdown with an idle stream open does not wait for the client.
	idle, err := api.SignStream(ctx)
	if err != nil {
		t.Fatal(err)
	}
	idle.Send(&agentpb.SignStreamRequest{Items: items[:1]})
	if _, err := idle.Recv(); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	a.Stop()
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("shutdown took %v with an open sign stream", d)
	}
	if _, err := idle.Recv(); status.Code(err) != codes.Unavailable {
		t.Errorf("stream after shutdown: %v", err)
	}
}
