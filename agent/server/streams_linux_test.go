package server_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hsmagent/hsmagent/agent/agentpb"
	"github.com/hsmagent/hsmagent/agent/agenttest"
	"github.com/hsmagent/hsmagent/agent/server"
)

// TestSignStreamsBudget: the SignStreams a uid may hold open are bounded,
// and root's signatures over a stream still work while other users hold
// every stream they may (a stream's unread results are what a client can
// make the agent keep in memory).
func TestSignStreamsBudget(t *testing.T) {
	needOtherUsers(t)
	dir := agenttest.SocketDir(t)
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	a := agenttest.StartAt(t, filepath.Join(dir, "agent.sock"), 0o666, newMemStore(t),
		server.Options{MaxSignStreams: 24, MaxSignStreamsPerUID: 12})
	bin := copyTestBinary(t, dir)
	run := func(uid string) string {
		out, err := clientAs(bin, "streams", a.Socket, []string{"--reuid=" + uid, "--regid=" + uid, "--clear-groups"}).CombinedOutput()
		if err != nil {
			t.Errorf("client %s: %v %s", uid, err, out)
		}
		return strings.TrimSpace(string(out))
	}
	// One uid alone: its own budget.
	if got := run("65534"); got != "admitted=12 refused=12" {
		t.Errorf("one uid opening 24 streams: %s; want admitted=12 refused=12", got)
	}
	// Two uids at once hold what the total leaves others (24 less an
	// eighth kept for root: 21), and root still gets a stream.
	results := make(chan string, 2)
	for _, uid := range []string{"65534", "65533"} {
		go func() { results <- run(uid) }()
	}
	time.Sleep(300 * time.Millisecond) // both hold their streams for a second
	api, _ := rawClient(t, a.Socket)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	stream, err := api.SignStream(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := stream.Send(&agentpb.SignStreamRequest{Items: []*agentpb.SignStreamItem{{Id: 1, Request: goodEC}}}); err != nil {
		t.Fatal(err)
	}
	resp, err := stream.Recv()
	if err != nil || len(resp.Results) != 1 || resp.Results[0].Code != 0 {
		t.Errorf("root's stream while others hold theirs: %v %v", resp, err)
	}
	admitted := 0
	for range 2 {
		var a, r int
		if _, err := fmtSscanf(<-results, &a, &r); err == nil {
			admitted += a
		}
	}
	if admitted > 21 {
		t.Errorf("other users held %d streams at once; the total leaves them 21", admitted)
	}
}

func fmtSscanf(s string, a, r *int) (int, error) {
	return fmt.Sscanf(s, "admitted=%d refused=%d", a, r)
}
