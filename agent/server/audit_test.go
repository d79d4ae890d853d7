package server_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"sync"
	"testing"

	"github.com/hsmagent/hsmagent/agent/agentpb"
	"github.com/hsmagent/hsmagent/agent/agenttest"
	"github.com/hsmagent/hsmagent/agent/server"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// auditRecord is the part of a JSON audit record the tests read.
type auditRecord struct {
	Msg       string `json:"msg"`
	Seq       uint64 `json:"seq"`
	RequestID string `json:"request_id"`
	Result    string `json:"result"`
	Event     string `json:"event"`
	Reason    string `json:"reason"`
	Count     int    `json:"count"`
	Hidden    *int   `json:"hidden"`
}

func parseAudit(t *testing.T, data []byte) []auditRecord {
	t.Helper()
	var recs []auditRecord
	sc := bufio.NewScanner(bytes.NewReader(data))
	for sc.Scan() {
		var r auditRecord
		if err := json.Unmarshal(sc.Bytes(), &r); err != nil {
			t.Fatalf("audit line %q: %v", sc.Text(), err)
		}
		recs = append(recs, r)
	}
	return recs
}

// checkSeq asserts seq runs 1..len(recs) in the order written: none missing,
// none repeated.
func checkSeq(t *testing.T, recs []auditRecord) {
	t.Helper()
	for i, r := range recs {
		if r.Seq != uint64(i+1) {
			t.Fatalf("record %d has seq %d; want %d (%+v)", i, r.Seq, i+1, r)
		}
	}
}

// requestIDPattern is a request id as the agent makes them.
var requestIDPattern = regexp.MustCompile(`^[0-9a-f]{16}$`)

// seen is what a client learnt of one call: its request id and result.
type seen struct {
	id, result string
}

// TestAuditCountsUnderLoad: 8 callers × 200 requests at once, mixing good
// signatures, bad digests, unknown keys, listings and SignStream items,
// leave exactly one record per request, each with the request id its
// caller saw, and seq runs 1..N without a gap or a repeat (issue 11, item 5).
func TestAuditCountsUnderLoad(t *testing.T) {
	audit := &auditBuffer{}
	a := agenttest.Start(t, newMemStore(t), server.Options{AuditRefusalBurst: 1 << 20,
		Audit: slog.New(slog.NewJSONHandler(audit, nil))})
	api, _ := rawClient(t, a.Socket)
	const callers, perCaller = 8, 200
	var mu sync.Mutex
	var calls []seen
	note := func(s seen) {
		mu.Lock()
		calls = append(calls, s)
		mu.Unlock()
	}
	var wg sync.WaitGroup
	for c := range callers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			stream, err := api.SignStream(context.Background())
			if err != nil {
				t.Error(err)
				return
			}
			streamed := 0
			for i := range perCaller {
				var md metadata.MD
				var err error
				result := "ok"
				switch (c + i) % 5 {
				case 0:
					var resp *agentpb.SignResponse
					resp, err = api.Sign(context.Background(), goodEC, grpc.Trailer(&md))
					if err == nil && resp.RequestId != md.Get(server.RequestIDTrailer)[0] {
						t.Errorf("signature's request id %q; the trailer's %v", resp.RequestId, md.Get(server.RequestIDTrailer))
					}
				case 1:
					_, err = api.Sign(context.Background(), &agentpb.SignRequest{Key: "ec", Digest: []byte("short"), Hash: agentpb.Hash_HASH_SHA256}, grpc.Trailer(&md))
					result = codes.InvalidArgument.String()
				case 2:
					_, err = api.Sign(context.Background(), &agentpb.SignRequest{Key: fmt.Sprintf("no-such-key-%d", i), Digest: make([]byte, 32), Hash: agentpb.Hash_HASH_SHA256}, grpc.Trailer(&md))
					result = codes.NotFound.String()
				case 3:
					var resp *agentpb.ListKeysResponse
					resp, err = api.ListKeys(context.Background(), &agentpb.ListKeysRequest{}, grpc.Trailer(&md))
					if err == nil && resp.RequestId != md.Get(server.RequestIDTrailer)[0] {
						t.Errorf("listing's request id %q; the trailer's %v", resp.RequestId, md.Get(server.RequestIDTrailer))
					}
					result = "list"
				case 4:
					// A refused item carries its request id in its result.
					bad := &agentpb.SignRequest{Key: "rsa", Digest: make([]byte, 31), Hash: agentpb.Hash_HASH_SHA256}
					if err := stream.Send(&agentpb.SignStreamRequest{Items: []*agentpb.SignStreamItem{{Id: uint64(i), Request: bad}}}); err != nil {
						t.Error(err)
						return
					}
					streamed++
					continue
				}
				id := ""
				if v := md.Get(server.RequestIDTrailer); len(v) == 1 {
					id = v[0]
				}
				if !requestIDPattern.MatchString(id) {
					t.Errorf("call %s (%v): trailer's request id %q", result, err, id)
				}
				note(seen{id, result})
			}
			stream.CloseSend()
			for got := 0; got < streamed; {
				resp, err := stream.Recv()
				if err != nil {
					t.Errorf("stream: %v after %d of %d results", err, got, streamed)
					return
				}
				for _, r := range resp.Results {
					got++
					if codes.Code(r.Code) != codes.InvalidArgument || !requestIDPattern.MatchString(r.RequestId) {
						t.Errorf("stream result %v %q, request id %q: want InvalidArgument with a request id", codes.Code(r.Code), r.Message, r.RequestId)
						continue
					}
					note(seen{r.RequestId, codes.InvalidArgument.String()})
				}
			}
		}()
	}
	wg.Wait()
	a.Stop()

	recs := parseAudit(t, audit.buf.Bytes())
	checkSeq(t, recs)
	byID := map[string]auditRecord{}
	for _, r := range recs {
		if r.RequestID == "" {
			t.Errorf("record without a request id: %+v", r)
			continue
		}
		if _, dup := byID[r.RequestID]; dup {
			t.Errorf("request id %s on two records", r.RequestID)
		}
		byID[r.RequestID] = r
	}
	if len(calls) != callers*perCaller {
		t.Fatalf("%d calls made; want %d", len(calls), callers*perCaller)
	}
	for _, c := range calls {
		r, ok := byID[c.id]
		switch {
		case !ok:
			t.Errorf("no record for request %q (%s)", c.id, c.result)
		case c.result == "list" && (r.Msg != "list" || r.Hidden == nil):
			t.Errorf("request %s: record %+v; want a list record", c.id, r)
		case c.result != "list" && (r.Msg != "sign" || r.Result != c.result):
			t.Errorf("request %s: record %+v; want sign %s", c.id, r, c.result)
		}
		delete(byID, c.id)
	}
	for id, r := range byID {
		t.Errorf("record %s matches no request: %+v", id, r)
	}
	t.Logf("%d requests, %d records", len(calls), len(recs))
}

// TestAuditRationedRefusalsAccounted: with a small burst, the refusals left
// out are counted exactly by the "refusals suppressed" records, and seq
// still runs without a gap over the records written.
func TestAuditRationedRefusalsAccounted(t *testing.T) {
	audit := &auditBuffer{}
	a := agenttest.Start(t, newMemStore(t), server.Options{AuditRefusalBurst: 5,
		Audit: slog.New(slog.NewJSONHandler(audit, nil))})
	api, _ := rawClient(t, a.Socket)
	const callers, perCaller = 8, 100
	var wg sync.WaitGroup
	ids := make(chan string, callers*perCaller)
	for range callers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range perCaller {
				var md metadata.MD
				_, err := api.Sign(context.Background(), &agentpb.SignRequest{Key: "no-such-key", Digest: make([]byte, 32), Hash: agentpb.Hash_HASH_SHA256}, grpc.Trailer(&md))
				rid := md.Get(server.RequestIDTrailer)
				if status.Code(err) != codes.NotFound || len(rid) != 1 || !requestIDPattern.MatchString(rid[0]) {
					t.Errorf("got %v, trailer %v; want NotFound with a request id", err, rid)
					continue
				}
				ids <- rid[0]
			}
		}()
	}
	wg.Wait()
	close(ids)
	a.Stop() // writes the summaries still pending
	seenIDs := map[string]bool{}
	for id := range ids {
		seenIDs[id] = true
	}
	recs := parseAudit(t, audit.buf.Bytes())
	checkSeq(t, recs)
	full, suppressed := 0, 0
	for _, r := range recs {
		switch {
		case r.Msg == "sign" && r.Result == codes.NotFound.String():
			if !seenIDs[r.RequestID] {
				t.Errorf("record with request id %q no caller saw", r.RequestID)
			}
			delete(seenIDs, r.RequestID) // a second record with it fails above
			full++
		case r.Msg == "refusals suppressed" && r.Event == "sign" && r.Reason == codes.NotFound.String():
			suppressed += r.Count
		default:
			t.Errorf("unexpected record %+v", r)
		}
	}
	t.Logf("%d refusals: %d full records, %d counted in summaries", callers*perCaller, full, suppressed)
	if full+suppressed != callers*perCaller || full < 5 {
		t.Errorf("%d full + %d suppressed; want %d with at least the burst of 5 in full", full, suppressed, callers*perCaller)
	}
}

// TestAuditFileReopen: after the file is moved away (logrotate), Reopen
// starts a new one at the path, and no record is lost or split.
func TestAuditFileReopen(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "audit.log")
	f, err := server.OpenAuditFile(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	log := slog.New(slog.NewJSONHandler(f, nil))
	for _, tt := range []struct {
		name   string
		rotate bool
	}{{"first", false}, {"before rotation", false}, {"after rotation", true}} {
		if tt.rotate {
			if err := os.Rename(path, path+".1"); err != nil {
				t.Fatal(err)
			}
			if err := f.Reopen(); err != nil {
				t.Fatal(err)
			}
		}
		log.Info(tt.name)
	}
	old, _ := os.ReadFile(path + ".1")
	cur, _ := os.ReadFile(path)
	if n := bytes.Count(old, []byte("\n")); n != 2 {
		t.Errorf("rotated file has %d records; want 2:\n%s", n, old)
	}
	if !bytes.Contains(cur, []byte(`"after rotation"`)) || bytes.Count(cur, []byte("\n")) != 1 {
		t.Errorf("new file: %q; want the one record written after the rotation", cur)
	}
	if fi, err := os.Stat(path); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("new file: %v %v; want mode 0600", fi.Mode(), err)
	}
}
