package agent

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// TestCallErrorRequestID: CallError.RequestID is the id the agent sent
// beside its status, printed once; a message is kept as it came and never
// read for an id, even one that ends as older agents' did.
func TestCallErrorRequestID(t *testing.T) {
	const rid = "0123456789abcdef"
	oldStyle := status.Error(codes.NotFound, `agent: key "x" not found (request `+rid+`)`)
	for _, tt := range []struct {
		name              string
		err               error
		wantMsg, wantID   string
		wantErr, wantCode string
	}{
		{"id beside the status", withRequestID(status.Error(codes.NotFound, `agent: key "x" not found`), rid),
			`agent: key "x" not found`, rid, `agent: signing: agent: key "x" not found (NotFound) (request ` + rid + `)`, "NotFound"},
		{"no id", status.Error(codes.Unavailable, "agent: shutting down"),
			"agent: shutting down", "", "agent: signing: agent: shutting down (Unavailable)", "Unavailable"},
		{"an id in the text only", oldStyle,
			`agent: key "x" not found (request ` + rid + `)`, "", `agent: signing: agent: key "x" not found (request ` + rid + `) (NotFound)`, "NotFound"},
		{"empty id", withRequestID(status.Error(codes.Aborted, "idle"), ""), "idle", "", "agent: signing: idle (Aborted)", "Aborted"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			var ce *CallError
			if !errors.As(callError("signing", tt.err), &ce) {
				t.Fatalf("callError(%v) is not a *CallError", tt.err)
			}
			if ce.Msg != tt.wantMsg || ce.RequestID != tt.wantID || ce.Code != tt.wantCode || ce.Error() != tt.wantErr {
				t.Errorf("got Msg %q RequestID %q Code %s Error %q; want %q %q %s %q",
					ce.Msg, ce.RequestID, ce.Code, ce.Error(), tt.wantMsg, tt.wantID, tt.wantCode, tt.wantErr)
			}
		})
	}
}

// TestAgentStatusKeepsItsCause: an id attached to a status hides neither
// its code nor what it wraps, which dropStream tells a closed Client by.
func TestAgentStatusKeepsItsCause(t *testing.T) {
	err := withRequestID(fmt.Errorf("%w", context.Canceled), "0123456789abcdef")
	if !errors.Is(err, context.Canceled) {
		t.Errorf("%v is not context.Canceled", err)
	}
	err = withRequestID(status.Error(codes.Aborted, "idle"), "0123456789abcdef")
	if status.Code(err) != codes.Aborted || !strings.Contains(err.Error(), "idle") {
		t.Errorf("%v: code %v, want Aborted", err, status.Code(err))
	}
}
