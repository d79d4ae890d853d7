package server_test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/hsmagent/hsmagent/agent/agenttest"
	"github.com/hsmagent/hsmagent/agent/server"
)

// TestSignConnsPerUIDBudget: another user's gRPC SignStreams and signing
// connections fill one budget per uid; the next of either kind is refused
// with ResourceExhausted (a status result on a signing connection) and
// audited as too-many-streams-uid.
func TestSignConnsPerUIDBudget(t *testing.T) {
	needOtherUsers(t)
	dir := agenttest.SocketDir(t)
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	audit := &jsonAudit{}
	a := agenttest.StartAt(t, filepath.Join(dir, "agent.sock"), 0o666, newMemStore(t),
		server.Options{MaxSignStreamsPerUID: 4, Audit: audit.logger()})
	bin := copyTestBinary(t, dir)
	out, err := clientAs(bin, "stream-mix", a.Socket, nobody, "HSMAGENT_TEST_PLAN=gsgssg").CombinedOutput()
	if err != nil {
		t.Fatalf("client: %v %s", err, out)
	}
	const want = "g:ok s:ok g:ok s:ok s:ResourceExhausted g:ResourceExhausted"
	if got := strings.TrimSpace(string(out)); got != want {
		t.Errorf("uid 65534 with a budget of 4 streams: %s; want %s", got, want)
	}
	if n := len(audit.records(t, "msg", "sign-stream", "uid", "65534", "result", "too-many-streams-uid")); n != 2 {
		t.Errorf("%d audit records of uid 65534's streams refused; want 2:\n%s", n, audit)
	}
}
