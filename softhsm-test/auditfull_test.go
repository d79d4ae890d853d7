package softhsmtest

import (
	"bytes"
	"context"
	"crypto"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hsmagent/hsmagent/agent"
	"golang.org/x/sys/unix"
)

// TestServeAuditFailsClosed: when the audit file cannot grow (the kernel
// refuses writes past the agent's file-size limit, as a full disk would),
// the agent gives no signature without its record: the caller gets
// Unavailable, health turns NOT_SERVING, the log says so once, and no cut
// line is left in the file. When the file can grow again the agent resumes
// by itself, with an "audit resumed" record counting what it refused and no
// gap in seq.
func TestServeAuditFailsClosed(t *testing.T) {
	fx := New(t)
	path := filepath.Join(t.TempDir(), "audit.log")
	d, client, signer := fx.auditedAgent(t, path)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	digest := sha256.Sum256([]byte("audit me"))
	sign := func() error { _, err := signer.Sign(nil, digest[:], crypto.SHA256); return err }
	if err := sign(); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	// Room for part of one more record only.
	setFileSizeLimit(t, d.cmd.Process.Pid, uint64(fi.Size())+40)
	for i := range 3 {
		err := sign()
		var ce *agent.CallError
		if !errors.As(err, &ce) || ce.Code != "Unavailable" || !strings.Contains(ce.Msg, "audit trail cannot be written") {
			t.Fatalf("signature %d with the audit file full: %v; want Unavailable, audit trail cannot be written", i, err)
		}
	}
	if h, err := client.Health(ctx); err != nil || h != "NOT_SERVING" {
		t.Errorf("health with the audit file full: %q %v; want NOT_SERVING", h, err)
	}
	if n := strings.Count(d.logText(), "audit trail cannot be written"); n != 1 {
		t.Errorf("%d log lines of the outage; want 1:\n%s", n, d.logText())
	}
	if got, _ := os.Stat(path); got.Size() != fi.Size() {
		t.Errorf("audit file is %d bytes after refused writes; want %d (a cut record removed)", got.Size(), fi.Size())
	}

	setFileSizeLimit(t, d.cmd.Process.Pid, unix.RLIM_INFINITY)
	deadline := time.Now().Add(10 * time.Second)
	for sign() != nil {
		if time.Now().After(deadline) {
			t.Fatalf("still refusing 10 s after the audit file could grow:\n%s", d.logText())
		}
		time.Sleep(100 * time.Millisecond)
	}
	if h, err := client.Health(ctx); err != nil || h != "SERVING" {
		t.Errorf("health once the audit file grows again: %q %v; want SERVING", h, err)
	}
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var seq uint64
	resumed := false
	for _, line := range bytes.Split(bytes.TrimSpace(data), []byte("\n")) {
		var r struct {
			Msg     string `json:"msg"`
			Seq     uint64 `json:"seq"`
			Refused int    `json:"refused"`
		}
		if err := json.Unmarshal(line, &r); err != nil {
			t.Fatalf("audit line %q: %v", line, err)
		}
		if r.Seq != seq+1 {
			t.Errorf("seq %d after %d: a gap or repeat", r.Seq, seq)
		}
		seq = r.Seq
		if r.Msg == "audit resumed" {
			resumed = true
			if r.Refused < 3 {
				t.Errorf("audit resumed with refused=%d; want at least the 3 refused signatures", r.Refused)
			}
		}
	}
	if !resumed {
		t.Errorf("no \"audit resumed\" record:\n%s", data)
	}
}

// setFileSizeLimit sets RLIMIT_FSIZE of process pid: writes past it fail
// with EFBIG, as writes to a full disk fail with ENOSPC.
func setFileSizeLimit(t *testing.T, pid int, n uint64) {
	t.Helper()
	lim := unix.Rlimit{Cur: n, Max: unix.RLIM_INFINITY}
	if err := unix.Prlimit(pid, unix.RLIMIT_FSIZE, &lim, nil); err != nil {
		t.Fatalf("setting the agent's file-size limit: %v", err)
	}
}

// auditedAgent starts an agent writing its audit to path with one key,
// "web", and returns it with a client and the key's signer (a list record,
// seq 1, is written by then).
func (fx *Token) auditedAgent(t *testing.T, path string) (*daemon, *agent.Client, crypto.Signer) {
	t.Helper()
	fx.ok(t, fx.args([]string{"keys", "generate"}, "--label", "web", "--type", "ecdsa-p256")...)
	d := fx.startDaemon(t, "--audit-log", path)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	client, err := agent.Dial(ctx, d.socket)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { client.Close() })
	signer, err := client.Signer(ctx, "web")
	if err != nil {
		t.Fatal(err)
	}
	return d, client, signer
}
