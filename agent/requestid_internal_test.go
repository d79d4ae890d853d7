package agent

import (
	"bufio"
	"context"
	"crypto"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hsmagent/hsmagent/agent/agentpb"
	"github.com/hsmagent/hsmagent/agent/agenttest"
	"github.com/hsmagent/hsmagent/agent/keytype"
	"github.com/hsmagent/hsmagent/agent/server"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// auditLog collects an agent's JSON audit records.
type auditLog struct {
	mu  sync.Mutex
	buf strings.Builder
}

func (a *auditLog) Write(p []byte) (int, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.buf.Write(p)
}

// auditRecord is the part of an audit record these tests read.
type auditRecord struct {
	Msg       string `json:"msg"`
	Result    string `json:"result"`
	RequestID string `json:"request_id"`
}

// requireRecord fails the test unless rid is set and names a record of the
// event. The agent writes a record before its answer, so it is there.
func (a *auditLog) requireRecord(t *testing.T, what, event, rid string) auditRecord {
	t.Helper()
	if rid == "" {
		t.Fatalf("%s: no request id", what)
	}
	a.mu.Lock()
	text := a.buf.String()
	a.mu.Unlock()
	sc := bufio.NewScanner(strings.NewReader(text))
	for sc.Scan() {
		var r auditRecord
		if err := json.Unmarshal(sc.Bytes(), &r); err != nil {
			t.Fatalf("audit line %q: %v", sc.Text(), err)
		}
		if r.RequestID == rid {
			if r.Msg != event {
				t.Fatalf("%s: request id %s names a %q record; want %q", what, rid, r.Msg, event)
			}
			return r
		}
	}
	t.Fatalf("%s: no audit record with request id %s:\n%s", what, rid, text)
	return auditRecord{}
}

// requestIDAgent serves a key "ec" with a JSON audit log.
func requestIDAgent(t *testing.T) (*server.MemoryStore, *agenttest.Agent, *auditLog) {
	t.Helper()
	store := server.NewMemoryStore()
	if _, err := store.Generate("ec", keytype.ECDSAP256); err != nil {
		t.Fatal(err)
	}
	audit := &auditLog{}
	a := agenttest.Start(t, store, server.Options{Audit: slog.New(slog.NewJSONHandler(audit, nil))})
	return store, a, audit
}

// dialTransport dials the agent; grpcStreams makes its signatures go over
// gRPC's SignStream instead of a signing connection.
func dialTransport(t *testing.T, socket string, grpcStreams bool) *Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := Dial(ctx, socket, WithSignTimeout(2*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.grpcStreams.Store(grpcStreams)
	return c
}

var transports = []struct {
	name        string
	grpcStreams bool
}{{"signing connection", false}, {"gRPC SignStream", true}}

// TestClientErrorsNameTheAuditRecord: the errors a client gets carry, by
// type, the request id of the agent's audit record for the call, both for a
// key that is not offered (the listing's record) and for a signature the
// agent refused (the sign record), on either transport; the id comes from
// the protocol's field and is printed once.
func TestClientErrorsNameTheAuditRecord(t *testing.T) {
	for _, tr := range transports {
		t.Run(tr.name, func(t *testing.T) {
			store, a, audit := requestIDAgent(t)
			client := dialTransport(t, a.Socket, tr.grpcStreams)
			ctx := context.Background()

			_, err := client.Signer(ctx, "nope")
			var nf *KeyNotFoundError
			if !errors.As(err, &nf) || nf.Label != "nope" || !slices.Equal(nf.Offered, []string{"ec"}) {
				t.Fatalf("key not offered: %v; want a *KeyNotFoundError for nope offering [ec]", err)
			}
			audit.requireRecord(t, "key not offered", "list", nf.RequestID)
			if n := strings.Count(err.Error(), nf.RequestID); n != 1 {
				t.Errorf("%q names the request id %d times; want once", err, n)
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
			var ce *CallError
			if !errors.As(err, &ce) {
				t.Fatalf("refused signature: %v; want a *CallError", err)
			}
			audit.requireRecord(t, "refused signature", "sign", ce.RequestID)
			if strings.Contains(ce.Msg, ce.RequestID) || strings.Count(ce.Error(), ce.RequestID) != 1 {
				t.Errorf("Msg %q, Error %q; want the request id in neither the message nor twice in the error", ce.Msg, ce.Error())
			}
		})
	}
}

// TestRequestIDFields: every answer of the agent carries its audit record's
// request id in its request_id field, successes too, and a call that fails
// as a whole in the trailer; never in the message.
func TestRequestIDFields(t *testing.T) {
	_, a, audit := requestIDAgent(t)
	c := dialTransport(t, a.Socket, false)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	digest := sha256.Sum256([]byte("x"))
	good := &agentpb.SignRequest{Key: "ec", Digest: digest[:], Hash: agentpb.Hash_HASH_SHA256}
	bad := &agentpb.SignRequest{Key: "nope", Digest: digest[:], Hash: agentpb.Hash_HASH_SHA256}

	t.Run("ListKeys", func(t *testing.T) {
		resp, err := c.api.ListKeys(ctx, &agentpb.ListKeysRequest{})
		if err != nil {
			t.Fatal(err)
		}
		audit.requireRecord(t, "ListKeys", "list", resp.RequestId)
	})
	t.Run("WatchKeys", func(t *testing.T) {
		wctx, stop := context.WithCancel(ctx)
		defer stop()
		w, err := c.api.WatchKeys(wctx, &agentpb.WatchKeysRequest{})
		if err != nil {
			t.Fatal(err)
		}
		resp, err := w.Recv()
		if err != nil {
			t.Fatal(err)
		}
		audit.requireRecord(t, "WatchKeys", "watch", resp.RequestId)
	})
	t.Run("Sign", func(t *testing.T) {
		resp, err := c.api.Sign(ctx, good)
		if err != nil {
			t.Fatal(err)
		}
		if r := audit.requireRecord(t, "Sign", "sign", resp.RequestId); r.Result != "ok" {
			t.Errorf("record %+v; want result ok", r)
		}
	})
	t.Run("Sign refused", func(t *testing.T) {
		var trailer metadata.MD
		_, err := c.api.Sign(ctx, bad, grpc.Trailer(&trailer))
		if err == nil {
			t.Fatal("signed with a key that does not exist")
		}
		rid := trailerRequestID(trailer)
		audit.requireRecord(t, "Sign refused", "sign", rid)
		if msg := status.Convert(err).Message(); strings.Contains(msg, rid) {
			t.Errorf("message %q carries the request id", msg)
		}
	})
	for _, tr := range transports {
		t.Run(tr.name, func(t *testing.T) {
			st := openTransport(t, ctx, c, tr.grpcStreams)
			items := []*agentpb.SignStreamItem{{Id: 1, Request: good}, {Id: 2, Request: bad}}
			if err := st.Send(&agentpb.SignStreamRequest{Items: items}); err != nil {
				t.Fatal(err)
			}
			for got := 0; got < len(items); {
				resp, err := st.Recv()
				if err != nil {
					t.Fatal(err)
				}
				for _, r := range resp.Results {
					got++
					rec := audit.requireRecord(t, "item", "sign", r.RequestId)
					if ok := r.Id == 1; ok != (rec.Result == "ok") || ok != (r.Code == 0) {
						t.Errorf("item %d: code %d, record %+v", r.Id, r.Code, rec)
					}
					if strings.Contains(r.Message, r.RequestId) {
						t.Errorf("item %d: message %q carries the request id", r.Id, r.Message)
					}
				}
			}
		})
		t.Run(tr.name+" refused whole", func(t *testing.T) {
			st := openTransport(t, ctx, c, tr.grpcStreams)
			var items []*agentpb.SignStreamItem
			for i := range maxBatch + 1 {
				items = append(items, &agentpb.SignStreamItem{Id: uint64(i + 1), Request: good})
			}
			if err := st.Send(&agentpb.SignStreamRequest{Items: items}); err != nil {
				t.Fatal(err)
			}
			_, err := st.Recv()
			var ce *CallError
			if !errors.As(callError("signing", err), &ce) || ce.Code != codes.InvalidArgument.String() {
				t.Fatalf("stream ended with %v; want InvalidArgument", err)
			}
			// The trailer of the gRPC call; the last result's field on a signing connection.
			audit.requireRecord(t, "stream refused", "sign-stream", ce.RequestID)
			if strings.Contains(ce.Msg, ce.RequestID) {
				t.Errorf("message %q carries the request id", ce.Msg)
			}
		})
	}
}

// openTransport opens a SignStream as the Client does, over gRPC or a
// signing connection; it ends with the test.
func openTransport(t *testing.T, ctx context.Context, c *Client, grpcStreams bool) signStreamIO {
	t.Helper()
	ctx, cancel := context.WithCancel(ctx)
	t.Cleanup(cancel)
	if grpcStreams {
		gs, err := c.api.SignStream(ctx)
		if err != nil {
			t.Fatal(err)
		}
		return grpcSignStream{gs}
	}
	fs, err := dialSignConn(ctx, c.path)
	if err != nil {
		t.Fatal(err)
	}
	return fs
}
