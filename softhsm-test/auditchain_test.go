package softhsmtest

import (
	"context"
	"crypto"
	"crypto/sha256"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hsmagent/hsmagent/agent"
)

// TestAuditChainVerified: the agent chains its audit records and signs
// checkpoints with a key in the HSM (on SIGHUP and at shutdown here);
// across a logrotate rename and a restart the trail verifies with the
// key's public key, and an edited record is found, with its line and seq.
func TestAuditChainVerified(t *testing.T) {
	fx := New(t)
	for _, label := range []string{"audit-signing", "web"} {
		fx.ok(t, fx.args([]string{"keys", "generate"}, "--label", label, "--type", "ecdsa-p256")...)
	}
	dir := t.TempDir()
	logFile := filepath.Join(dir, "audit.jsonl")
	start := func() *daemon {
		return fx.startDaemon(t, "--audit-log", logFile, "--audit-signing-key", "audit-signing", "--audit-checkpoint-every", "1h")
	}
	signs := func(d *daemon, n int) {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		c, err := agent.Dial(ctx, d.socket)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		s, err := c.Signer(ctx, "web")
		if err != nil {
			t.Fatal(err)
		}
		digest := sha256.Sum256([]byte("chained"))
		for range n {
			if _, err := s.Sign(nil, digest[:], crypto.SHA256); err != nil {
				t.Fatal(err)
			}
		}
	}
	stop := func(d *daemon) {
		t.Helper()
		d.signal(t, syscall.SIGTERM)
		if err := d.cmd.Wait(); err != nil {
			t.Fatalf("the agent's exit: %v\n%s", err, d.logText())
		}
	}

	d := start()
	signs(d, 3)
	// logrotate: rename, then SIGHUP (a checkpoint, then the new file).
	if err := os.Rename(logFile, logFile+".1"); err != nil {
		t.Fatal(err)
	}
	d.signal(t, syscall.SIGHUP)
	d.waitFor(t, "reloaded")
	signs(d, 2)
	stop(d)
	d = start() // the chain goes on from the file's last line
	signs(d, 1)
	stop(d)

	pub := filepath.Join(dir, "audit-key.pem")
	r := fx.ok(t, fx.args([]string{"audit", "public-key"}, "--key", "audit-signing")...)
	if err := os.WriteFile(pub, []byte(r.stdout), 0o600); err != nil {
		t.Fatal(err)
	}
	verify := func() result {
		return fx.hsmagent(t, "audit", "verify", "--public-key", pub, logFile+".1", logFile)
	}
	if r := verify(); r.code != 0 || !strings.Contains(r.stderr+r.stdout, "OK") || !strings.Contains(r.stderr+r.stdout, "3 checkpoints verified") {
		t.Fatalf("audit verify of the untouched trail: exit %d\n%s%s\n%s", r.code, r.stdout, r.stderr, readFile(t, logFile))
	}
	if r := fx.hsmagent(t, "audit", "verify", "--public-key", pub, logFile); r.code != 0 || !strings.Contains(r.stderr+r.stdout, "follows one not given") {
		t.Errorf("the newer file alone: exit %d %s%s; want OK, saying it follows an older file", r.code, r.stdout, r.stderr)
	}
	if r := fx.hsmagent(t, "audit", "verify", "--public-key", pub, logFile, logFile+".1"); r.code != 1 || !strings.Contains(r.stderr, "oldest first") {
		t.Errorf("the files in the wrong order: exit %d %s; want BROKEN, oldest first", r.code, r.stderr)
	}

	// An auditor's copy edited: the record of a signature made "ok" says refused.
	old := readFile(t, logFile+".1")
	lines := strings.SplitAfter(old, "\n")
	at := -1
	for i, l := range lines {
		if strings.Contains(l, `"msg":"sign"`) && strings.Contains(l, `"result":"ok"`) {
			at = i
			break
		}
	}
	if at < 0 {
		t.Fatalf("no sign record in:\n%s", old)
	}
	lines[at] = strings.Replace(lines[at], `"result":"ok"`, `"result":"PermissionDenied"`, 1)
	if err := os.WriteFile(logFile+".1", []byte(strings.Join(lines, "")), 0o600); err != nil {
		t.Fatal(err)
	}
	r = verify()
	// The chain breaks at the next line, whose prev no longer matches.
	want := filepath.Base(logFile+".1") + " line " + strconv.Itoa(at+2)
	if r.code != 1 || !strings.Contains(r.stderr, "BROKEN") || !strings.Contains(r.stderr, want) {
		t.Fatalf("audit verify of an edited trail: exit %d, %q; want exit 1 naming %q", r.code, r.stderr, want)
	}
}

func readFile(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}
