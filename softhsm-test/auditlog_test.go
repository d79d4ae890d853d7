package softhsmtest

import (
	"crypto"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hsmagent/hsmagent/agent"
)

// TestServeAuditLogReopenedOnSIGHUP: with --audit-log, the records are JSON
// lines with seq and request_id; after logrotate's rename and SIGHUP the
// agent writes to a new file at the path, and seq goes on where the old
// file stopped. A refused signature's error names its record.
func TestServeAuditLogReopenedOnSIGHUP(t *testing.T) {
	fx := New(t)
	path := filepath.Join(t.TempDir(), "audit.log")
	d, _, signer := fx.auditedAgent(t, path) // a list record; a sign record next
	digest := sha256.Sum256([]byte("audit me"))
	if _, err := signer.Sign(nil, digest[:], crypto.SHA256); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(path, path+".1"); err != nil {
		t.Fatal(err)
	}
	d.signal(t, syscall.SIGHUP)
	d.waitFor(t, "reloaded")
	// Deleted from the token: the agent refuses the next signature itself.
	fx.ok(t, fx.args([]string{"keys", "delete"}, "--label", "web", "--yes")...)
	_, err := signer.Sign(nil, digest[:], crypto.SHA256)
	var ce *agent.CallError
	if !errors.As(err, &ce) || ce.RequestID == "" {
		t.Fatalf("signature with a deleted key: %v; want a CallError with a request id", err)
	}

	type record struct {
		Msg, Result, RequestID string
		Seq                    uint64
	}
	read := func(p string) []record {
		data, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		var recs []record
		if len(data) == 0 {
			return nil
		}
		for _, line := range strings.Split(strings.TrimSpace(string(data)), "\n") {
			var r struct {
				Msg       string `json:"msg"`
				Result    string `json:"result"`
				RequestID string `json:"request_id"`
				Seq       uint64 `json:"seq"`
			}
			if err := json.Unmarshal([]byte(line), &r); err != nil {
				t.Fatalf("%s: %q: %v", p, line, err)
			}
			recs = append(recs, record{r.Msg, r.Result, r.RequestID, r.Seq})
		}
		return recs
	}
	old := read(path + ".1")
	if len(old) != 2 || old[0].Msg != "list" || old[0].Seq != 1 || old[1].Msg != "sign" || old[1].Result != "ok" || old[1].Seq != 2 {
		t.Errorf("rotated file: %+v; want list seq 1, sign ok seq 2", old)
	}
	var cur []record
	deadline := time.Now().Add(10 * time.Second)
	for {
		if cur = read(path); len(cur) > 0 || time.Now().After(deadline) {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if len(cur) != 1 || cur[0].Msg != "sign" || cur[0].Result == "ok" || cur[0].Seq != 3 || cur[0].RequestID != ce.RequestID {
		t.Errorf("new file: %+v; want the refusal with seq 3 and request id %s", cur, ce.RequestID)
	}
}
