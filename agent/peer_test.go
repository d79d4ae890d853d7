package agent_test

import (
	"bytes"
	"context"
	"crypto"
	"crypto/sha256"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hsmagent/hsmagent/agent"
	"github.com/hsmagent/hsmagent/agent/agentpb"
	"github.com/hsmagent/hsmagent/agent/agenttest"
	"github.com/hsmagent/hsmagent/agent/server"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
)

// helperEnv makes the test binary act as a plain agent client (see TestMain):
// it signs once with the key named in HSMAGENT_TEST_KEY and prints "ok" or the error.
const helperEnv = "HSMAGENT_TEST_HELPER"

func TestMain(m *testing.M) {
	switch os.Getenv(helperEnv) {
	case "sign":
		os.Exit(signHelper())
	case "dial":
		os.Exit(dialHelper())
	case "echo":
		os.Exit(echoHelper())
	}
	os.Exit(m.Run())
}

func signHelper() int {
	// A raw request first: the label is known, so only the policy can refuse it.
	conn, err := grpc.NewClient("unix://"+os.Getenv(agent.SocketEnv), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		fmt.Println(err)
		return 1
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	digest := sha256.Sum256([]byte("x"))
	_, err = agentpb.NewAgentClient(conn).Sign(ctx, &agentpb.SignRequest{
		Key: os.Getenv("HSMAGENT_TEST_KEY"), Digest: digest[:], Hash: agentpb.Hash_HASH_SHA256})
	fmt.Printf("raw: %v\n", status.Code(err))

	c, err := agent.Dial(ctx, os.Getenv(agent.SocketEnv))
	if err != nil {
		fmt.Println(err)
		return 1
	}
	defer c.Close()
	signer, err := c.Signer(ctx, os.Getenv("HSMAGENT_TEST_KEY"))
	if err != nil {
		fmt.Println(err)
		return 1
	}
	if _, err := signer.Sign(nil, digest[:], crypto.SHA256); err != nil {
		fmt.Println(err)
		return 1
	}
	fmt.Println("client: ok")
	return 0
}

// TestPeerCredentialsEnforced runs a client as another user (nobody) with
// setpriv: it is refused until a rule allows its uid, and both the refusal
// and the signature leave an audit record with its uid.
func TestPeerCredentialsEnforced(t *testing.T) {
	if os.Getuid() != 0 {
		if os.Getenv("CI") != "" {
			t.Fatal("this test must run as root in CI to switch users with setpriv")
		}
		t.Skip("needs root to run a client as another user")
	}
	f := newFixture(t)
	f.agent.Stop()
	dir := agenttest.SocketDir(t)
	os.Chmod(dir, 0o755)
	var audit bytes.Buffer
	sw := &syncWriter{w: &audit}
	auditLog := slog.New(slog.NewTextHandler(sw, nil))
	a := agenttest.StartAt(t, filepath.Join(dir, "agent.sock"), 0o666, f.store, server.Options{Audit: auditLog})

	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "client")
	data, _ := os.ReadFile(self)
	if err := os.WriteFile(bin, data, 0o755); err != nil {
		t.Fatal(err)
	}
	runAsNobody := func(key string) string {
		cmd := exec.Command("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", bin, "-test.run=^$")
		cmd.Env = append(os.Environ(), helperEnv+"=sign", agent.SocketEnv+"="+a.Socket, "HSMAGENT_TEST_KEY="+key)
		out, _ := cmd.CombinedOutput()
		return strings.TrimSpace(string(out))
	}

	if out := runAsNobody("ec"); !strings.Contains(out, "raw: PermissionDenied") || !strings.Contains(out, `key "ec" not found or not allowed`) {
		t.Errorf("nobody without a rule: %q", out)
	}
	policy, err := server.NewPolicy([]server.Rule{{Keys: []string{"ec"}, Users: []string{"nobody"}}})
	if err != nil {
		t.Fatal(err)
	}
	if err := a.Server.Reload(policy); err != nil {
		t.Fatal(err)
	}
	if out := runAsNobody("ec"); out != "raw: OK\nclient: ok" {
		t.Errorf("nobody with a rule for ec: %q", out)
	}
	if out := runAsNobody("rsa"); !strings.Contains(out, "raw: PermissionDenied") || !strings.Contains(out, `key "rsa" not found or not allowed`) {
		t.Errorf("nobody on a key the rule does not name: %q", out)
	}
	sw.mu.Lock()
	records := audit.String()
	sw.mu.Unlock()
	if !strings.Contains(records, "uid=65534 gid=65534") || !strings.Contains(records, "key=ec hash=HASH_SHA256 result=PermissionDenied") ||
		!strings.Contains(records, "key=ec hash=HASH_SHA256 result=ok") {
		t.Errorf("audit records:\n%s", records)
	}
}

// syncWriter serialises writes from the agent's goroutines.
type syncWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (s *syncWriter) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.w.Write(p)
}

// echoHelper answers every 100 bytes read on one connection with the same
// bytes, for BenchmarkSocketRoundTrip.
func echoHelper() int {
	l, err := net.Listen("unix", os.Getenv("HSMAGENT_TEST_ECHO"))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	c, err := l.Accept()
	if err != nil {
		return 1
	}
	buf := make([]byte, 100)
	for {
		if _, err := io.ReadFull(c, buf); err != nil {
			return 0
		}
		if _, err := c.Write(buf); err != nil {
			return 0
		}
	}
}
