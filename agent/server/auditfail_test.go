package server_test

import (
	"context"
	"log/slog"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/hsmagent/hsmagent/agent/agenttest"
	"github.com/hsmagent/hsmagent/agent/server"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"
)

// failingSink is an audit sink that fails with ENOSPC while full is set.
type failingSink struct {
	jsonAudit
	full atomic.Bool
}

func (f *failingSink) Write(p []byte) (int, error) {
	if f.full.Load() {
		return 0, syscall.ENOSPC
	}
	return f.jsonAudit.Write(p)
}

// TestAuditFailsClosed: while the audit sink fails, no signature goes out
// (unary Sign, signing connections) and later requests are refused before
// the HSM is asked; health is NOT_SERVING; ListKeys is refused too; the log
// has one line for the outage; the agent resumes by itself. With
// AuditFailOpen it signs on and says so once.
func TestAuditFailsClosed(t *testing.T) {
	defer server.SetAuditProbeEvery(50 * time.Millisecond)()
	for _, failOpen := range []bool{false, true} {
		t.Run(map[bool]string{false: "closed", true: "fail-open"}[failOpen], func(t *testing.T) {
			store := &fastStore{MemoryStore: newMemStore(t)}
			sink := &failingSink{}
			logs := &auditBuffer{}
			a := agenttest.Start(t, store, server.Options{Audit: slog.New(slog.NewJSONHandler(sink, nil)),
				Logger: slog.New(slog.NewTextHandler(logs, nil)), AuditFailOpen: failOpen})
			api, conn := rawClient(t, a.Socket)
			health := healthpb.NewHealthClient(conn)
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			serving := func() healthpb.HealthCheckResponse_ServingStatus {
				r, err := health.Check(ctx, &healthpb.HealthCheckRequest{Service: "hsmagent.v1.Agent"})
				if err != nil {
					t.Fatal(err)
				}
				return r.Status
			}
			if _, err := api.Sign(ctx, goodEC); err != nil {
				t.Fatal(err)
			}
			sink.full.Store(true)
			_, err := api.Sign(ctx, goodEC)
			calls := store.calls.Load()
			r := signConnOnce(t, a.Socket)
			_, lerr := api.ListKeys(ctx, nil)
			if failOpen {
				if err != nil || r.Code != 0 || lerr != nil {
					t.Fatalf("fail-open with the audit failing: Sign %v, stream %v %s, ListKeys %v; want all served", err, codes.Code(r.Code), r.Message, lerr)
				}
				if n := logs.count("SIGNING CONTINUES WITHOUT AUDIT RECORDS"); n != 1 {
					t.Errorf("%d log lines of signing without audit; want 1:\n%s", n, logs.buf.String())
				}
				if s := serving(); s != healthpb.HealthCheckResponse_SERVING {
					t.Errorf("fail-open health %v; want SERVING", s)
				}
				return
			}
			if status.Code(err) != codes.Unavailable {
				t.Errorf("Sign whose record fails: %v; want Unavailable", err)
			}
			if codes.Code(r.Code) != codes.Unavailable || len(r.Signature) != 0 {
				t.Errorf("signing connection with the audit failing: %v %s; want Unavailable and no signature", codes.Code(r.Code), r.Message)
			}
			if store.calls.Load() != calls {
				t.Errorf("the HSM was asked to sign while the audit trail was down")
			}
			if status.Code(lerr) != codes.Unavailable {
				t.Errorf("ListKeys with the audit failing: %v; want Unavailable", lerr)
			}
			if s := serving(); s != healthpb.HealthCheckResponse_NOT_SERVING {
				t.Errorf("health %v with the audit failing; want NOT_SERVING", s)
			}
			if n := logs.count("audit trail cannot be written"); n != 1 {
				t.Errorf("%d log lines of the outage; want 1:\n%s", n, logs.buf.String())
			}
			sink.full.Store(false)
			waitFor(t, func() bool { return serving() == healthpb.HealthCheckResponse_SERVING })
			if _, err := api.Sign(ctx, goodEC); err != nil {
				t.Errorf("Sign after the audit came back: %v", err)
			}
			recs := sink.records(t, "msg", "audit resumed")
			if len(recs) != 1 || jsonString(recs[0]["refused"]) != "3" {
				t.Errorf("audit resumed records %v; want one with refused 3", recs)
			}
		})
	}
}
