package server_test

import (
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hsmagent/hsmagent/agent/agenttest"
	"github.com/hsmagent/hsmagent/agent/server"
)

// TestNoExistenceOracle: a caller without rules on a key gets the same
// answer whether the key exists or not; the audit keeps the real reason.
func TestNoExistenceOracle(t *testing.T) {
	needOtherUsers(t)
	policy, err := server.NewPolicy([]server.Rule{{Keys: []string{"rsa"}, Users: []string{"65534"}}})
	if err != nil {
		t.Fatal(err)
	}
	dir := agenttest.SocketDir(t)
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	audit := &auditBuffer{}
	seen := &recordingObserver{}
	a := agenttest.StartAt(t, filepath.Join(dir, "agent.sock"), 0o666, newMemStore(t),
		server.Options{Policy: policy, Audit: slog.New(slog.NewTextHandler(audit, nil)), Observer: seen})
	bin := copyTestBinary(t, dir)
	ask := func(key string) string {
		out, err := clientAs(bin, "sign-message", a.Socket, nobody, "HSMAGENT_TEST_KEY="+key).CombinedOutput()
		if err != nil {
			t.Fatalf("client: %v %s", err, out)
		}
		return strings.TrimSpace(string(out))
	}
	existing, missing := ask("ec"), ask("no-such-key")
	if !strings.HasPrefix(existing, "PermissionDenied ") || !strings.HasPrefix(missing, "PermissionDenied ") {
		t.Fatalf("answers: %q and %q; want PermissionDenied for both", existing, missing)
	}
	// Request ids differ by design: random, they say nothing of the key.
	rid := regexp.MustCompile(`\(request [0-9a-f]{16}\)$`)
	existing, missing = rid.ReplaceAllString(existing, "(request R)"), rid.ReplaceAllString(missing, "(request R)")
	if strings.ReplaceAll(existing, `"ec"`, "K") != strings.ReplaceAll(missing, `"no-such-key"`, "K") {
		t.Errorf("the answers differ beyond the label: %q and %q", existing, missing)
	}
	if audit.count("key=ec hash=HASH_SHA256 result=PermissionDenied") != 1 || audit.count("key=no-such-key hash=HASH_SHA256 result=NotFound") != 1 {
		t.Errorf("audit does not keep the real reasons:\n%s", audit.buf.String())
	}
	if got := ask("rsa"); got != "OK" {
		t.Errorf("allowed key: %q", got)
	}
	// Nor do the metrics, which more users may read than the audit.
	if got := seen.String(); got != "/denied /denied rsa/ok " {
		t.Errorf("metrics saw %q; want the two refusals alike (no label, reason denied)", got)
	}
}

// recordingObserver keeps what the agent reports for metrics.
type recordingObserver struct {
	mu  sync.Mutex
	buf strings.Builder
}

func (r *recordingObserver) Signed(key string, o server.Outcome, _ time.Duration) {
	r.mu.Lock()
	defer r.mu.Unlock()
	fmt.Fprintf(&r.buf, "%s/%s ", key, o.Metric())
}
func (r *recordingObserver) KeysLoaded([]server.Key) {}
func (r *recordingObserver) HSMServing(bool)         {}
func (r *recordingObserver) AuditWritable(bool)      {}
func (r *recordingObserver) String() string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.buf.String()
}
