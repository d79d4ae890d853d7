package agent

import "testing"

// TestCallErrorRequestID: the request id the agent appends to a message goes
// to CallError.RequestID and is printed once, so that an error on a client
// can be matched to its audit record.
func TestCallErrorRequestID(t *testing.T) {
	for _, tt := range []struct {
		name, msg, wantMsg, wantID, wantErr string
	}{
		{"with id", `agent: key "x" not found (request 0123456789abcdef)`, `agent: key "x" not found`, "0123456789abcdef",
			`agent: signing: agent: key "x" not found (NotFound) (request 0123456789abcdef)`},
		{"without id", "agent: shutting down", "agent: shutting down", "", "agent: signing: agent: shutting down (NotFound)"},
		{"not at the end", "x (request 0123456789abcdef) y", "x (request 0123456789abcdef) y", "",
			"agent: signing: x (request 0123456789abcdef) y (NotFound)"},
		{"short id", "x (request 0123)", "x (request 0123)", "", "agent: signing: x (request 0123) (NotFound)"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			e := newCallError("signing", "NotFound", tt.msg)
			if e.Msg != tt.wantMsg || e.RequestID != tt.wantID || e.Error() != tt.wantErr {
				t.Errorf("got Msg %q RequestID %q Error %q; want %q %q %q", e.Msg, e.RequestID, e.Error(), tt.wantMsg, tt.wantID, tt.wantErr)
			}
		})
	}
}
