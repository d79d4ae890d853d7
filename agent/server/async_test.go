package server_test

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/sha256"
	"log/slog"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hsmagent/hsmagent/agent/agentpb"
	"github.com/hsmagent/hsmagent/agent/agenttest"
	"github.com/hsmagent/hsmagent/agent/core"
	"github.com/hsmagent/hsmagent/agent/server"
	"google.golang.org/grpc/codes"
)

// asyncStore is the stalling store with signers that are core.AsyncSigners,
// as the HSM worker's are: the agent sends a stream's items to them with no
// goroutine of its own waiting.
type asyncStore struct {
	*stallingStore
	started atomic.Int64 // SignAsync calls
}

func (s *asyncStore) Signer(label string) (crypto.Signer, error) {
	inner, err := s.stallingStore.Signer(label)
	if err != nil {
		return nil, err
	}
	return &asyncSigner{Signer: inner, store: s}, nil
}

type asyncSigner struct {
	crypto.Signer
	store *asyncStore
}

var _ core.AsyncSigner = (*asyncSigner)(nil)

func (s *asyncSigner) SignAsync(digest []byte, opts crypto.SignerOpts, done func([]byte, error)) {
	s.store.started.Add(1)
	go func() { done(s.Sign(nil, digest, opts)) }()
}

// ecPublic is the public key of store's key "ec".
func ecPublic(t *testing.T, store *asyncStore) *ecdsa.PublicKey {
	t.Helper()
	keys, err := store.Keys()
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range keys {
		if k.Label == "ec" {
			return k.Public.(*ecdsa.PublicKey)
		}
	}
	t.Fatal(`the store has no key "ec"`)
	return nil
}

func digestOf(s string) []byte {
	d := sha256.Sum256([]byte(s))
	return d[:]
}

// TestAsyncSignerStream: a signing connection's items go to an AsyncSigner:
// each gets its signature, valid for its own digest, and its audit record.
func TestAsyncSignerStream(t *testing.T) {
	store := &asyncStore{stallingStore: newStallingStore(t)}
	audit := &auditBuffer{}
	a := agenttest.Start(t, store, server.Options{HSMTimeout: time.Minute, Audit: slog.New(slog.NewTextHandler(audit, nil))})
	pub := ecPublic(t, store)
	c := openSignConn(t, a.Socket)
	var its []*agentpb.SignStreamItem
	for i := range 20 {
		its = append(its, &agentpb.SignStreamItem{Id: uint64(i + 1), Request: &agentpb.SignRequest{
			Key: "ec", Digest: digestOf(string(rune('a' + i))), Hash: agentpb.Hash_HASH_SHA256}})
	}
	c.send(t, its...)
	got := map[uint64]bool{}
	for len(got) < len(its) {
		m, err := c.next()
		if err != nil {
			t.Fatalf("after %d results: %v", len(got), err)
		}
		for _, r := range m.Results {
			if r.Code != 0 {
				t.Fatalf("item %d: code %d %q", r.Id, r.Code, r.Message)
			}
			if !ecdsa.VerifyASN1(pub, its[r.Id-1].Request.Digest, r.Signature) {
				t.Errorf("item %d: the signature does not verify for its digest", r.Id)
			}
			got[r.Id] = true
		}
	}
	if n := store.started.Load(); n != int64(len(its)) {
		t.Errorf("%d items went to SignAsync; want all %d", n, len(its))
	}
	if n := audit.count("result=ok"); n != len(its) {
		t.Errorf("%d ok records; want %d:\n%s", n, len(its), audit.buf.String())
	}
}

// TestAsyncSignerTimeout: an item in an AsyncSigner past the HSM timeout is
// answered Unavailable at the timeout; the HSM counts as stuck until the
// late answer frees its session; then the next item is signed.
func TestAsyncSignerTimeout(t *testing.T) {
	store := &asyncStore{stallingStore: newStallingStore(t)}
	audit := &auditBuffer{}
	a := agenttest.Start(t, store, server.Options{HSMTimeout: 200 * time.Millisecond, MaxInFlight: 1,
		Audit: slog.New(slog.NewTextHandler(audit, nil))})
	c := openSignConn(t, a.Socket)
	store.hold()
	start := time.Now()
	c.send(t, &agentpb.SignStreamItem{Id: 1, Request: goodEC})
	m, err := c.next()
	if err != nil {
		t.Fatal(err)
	}
	if r := m.Results[0]; codes.Code(r.Code) != codes.Unavailable || !strings.Contains(r.Message, "did not answer within 200ms") {
		t.Fatalf("stuck item: code %v %q; want Unavailable, the HSM timeout", codes.Code(r.Code), r.Message)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("the stuck item was answered after %v; want about the 200ms timeout", d)
	}
	if a.Server.HSMAnswering() {
		t.Error("with the item still in the HSM, the agent does not count it stuck")
	}
	store.release()
	waitFor(t, a.Server.HSMAnswering)
	c.send(t, &agentpb.SignStreamItem{Id: 2, Request: goodEC})
	m, err = c.next()
	if err != nil {
		t.Fatal(err)
	}
	if r := m.Results[0]; r.Id != 2 || r.Code != 0 || len(r.Signature) == 0 {
		t.Errorf("after the late answer: %+v; want a signature (the session given back)", r)
	}
	if audit.count("result=timeout") != 1 || audit.count("result=ok") != 1 {
		t.Errorf("audit results:\n%s", audit.buf.String())
	}
}

// TestAsyncResultsToAClientThatStopsReading: the goroutine that reads the
// HSM's answers sends a stream's last result in flight itself while the
// connection takes it, and leaves to the stream's handler what a full
// connection does not take; a client that stops reading, then reads again,
// gets every result whole, each frame intact. The client sends one item a
// frame and leaves the agent time to answer it, so that each result is the
// last in flight when it comes and the quick sends meet the full socket.
func TestAsyncResultsToAClientThatStopsReading(t *testing.T) {
	store := &asyncStore{stallingStore: newStallingStore(t)}
	a := agenttest.Start(t, store, server.Options{HSMTimeout: time.Minute, Audit: slog.New(slog.DiscardHandler)})
	pub := ecPublic(t, store)
	c := openSignConn(t, a.Socket)
	// Far more results than a Unix socket holds (its 208 KiB of buffer
	// count each write's whole allocation, about a kilobyte for a result of
	// 110 bytes), written while the client reads none.
	const total = 2000
	digest := digestOf("full")
	sent := make(chan error, 1)
	go func() {
		for id := 1; id <= total; id++ {
			c.conn.SetWriteDeadline(time.Now().Add(frameTimeout))
			if _, err := c.conn.Write(frame(t, &agentpb.SignStreamItem{Id: uint64(id), Request: &agentpb.SignRequest{
				Key: "ec", Digest: digest, Hash: agentpb.Hash_HASH_SHA256}})); err != nil {
				sent <- err
				return
			}
			time.Sleep(100 * time.Microsecond)
		}
		sent <- nil
	}()
	time.Sleep(time.Second) // the agent fills the socket and waits
	got := map[uint64]bool{}
	for len(got) < total {
		m, err := c.next()
		if err != nil {
			t.Fatalf("after %d of %d results: %v", len(got), total, err)
		}
		for _, r := range m.Results {
			if r.Code != 0 || got[r.Id] || r.Id < 1 || r.Id > total {
				t.Fatalf("result %d: code %d %q (seen before: %v)", r.Id, r.Code, r.Message, got[r.Id])
			}
			if !ecdsa.VerifyASN1(pub, digest, r.Signature) {
				t.Fatalf("result %d: the signature does not verify", r.Id)
			}
			got[r.Id] = true
		}
	}
	if err := <-sent; err != nil {
		t.Fatal(err)
	}
	if n := store.started.Load(); n < total/2 {
		t.Errorf("%d of %d items went to SignAsync; want most", n, total)
	}
}
