package server_test

import (
	"log/slog"
	"testing"

	"github.com/hsmagent/hsmagent/agent/core"
	"github.com/hsmagent/hsmagent/agent/server"
	"google.golang.org/grpc/codes"
)

// TestOutcomes: each outcome's audit result, metric label, wire code and
// log level, as docs/audit.md's table of results documents them. Both denials
// read the same on the wire and in metrics, apart only in the audit.
func TestOutcomes(t *testing.T) {
	for _, tc := range []struct {
		o              server.Outcome
		result, metric string
		code           codes.Code
	}{
		{server.Signed, "ok", "ok", codes.OK},
		{server.Invalid, "InvalidArgument", "InvalidArgument", codes.InvalidArgument},
		{server.Denied, "PermissionDenied", "denied", codes.PermissionDenied},
		{server.DeniedNotFound, "NotFound", "denied", codes.PermissionDenied},
		{server.NotFound, "NotFound", "NotFound", codes.NotFound},
		{server.Busy, "busy", "busy", codes.ResourceExhausted},
		{server.CallerBusy, "caller-busy", "caller-busy", codes.ResourceExhausted},
		{server.Cancelled, "abandoned", "abandoned", codes.Canceled},
		{server.Expired, "abandoned", "abandoned", codes.DeadlineExceeded},
		{server.Timeout, "timeout", "timeout", codes.Unavailable},
		{server.HSMDown, "hsm-down", "hsm-down", codes.Unavailable},
		{server.HSMError, "hsm-error", "hsm-error", codes.Internal},
		{server.KeyChanged, "key-changed", "key-changed", codes.FailedPrecondition},
		{server.AuditDown, "audit-down", "audit-down", codes.Unavailable},
		{server.Malformed, "malformed", "malformed", codes.InvalidArgument},
		{server.NoRequest, "no-request", "no-request", codes.DeadlineExceeded},
	} {
		if tc.o.String() != tc.result || tc.o.Metric() != tc.metric || codes.Code(tc.o.Code()) != tc.code {
			t.Errorf("outcome %d: result %q metric %q code %v; want %q %q %v", tc.o, tc.o.String(), tc.o.Metric(), tc.o.Code(), tc.result, tc.metric, tc.code)
		}
		if want := map[bool]slog.Level{true: slog.LevelInfo, false: slog.LevelWarn}[tc.o == server.Signed]; tc.o.Level() != want {
			t.Errorf("outcome %s: level %v; want %v", tc.o, tc.o.Level(), want)
		}
	}
}

// TestCodeNames checks that the core's codes are gRPC's numbers and names:
// the gRPC adapter converts them by number, the audit records them by name.
func TestCodeNames(t *testing.T) {
	for c := codes.OK; c <= codes.Unauthenticated; c++ {
		if got := core.Code(c).String(); got != c.String() {
			t.Errorf("core.Code(%d) is %q, gRPC's is %q", c, got, c.String())
		}
	}
}
