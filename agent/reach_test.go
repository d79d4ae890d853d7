package agent_test

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hsmagent/hsmagent/agent"
	"github.com/hsmagent/hsmagent/agent/agenttest"
	"github.com/hsmagent/hsmagent/agent/server"
)

// fastFail is how soon Dial must give up on a permanent error, although its
// context would allow much longer.
const fastFail = time.Second

// dialHelper dials once with a long context and prints the error (see TestMain).
func dialHelper() int {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	start := time.Now()
	c, err := agent.Dial(ctx, os.Getenv(agent.SocketEnv))
	if err == nil {
		c.Close()
		fmt.Println("connected")
		return 0
	}
	fmt.Printf("%v\nelapsed %s\n", err, time.Since(start).Round(time.Millisecond))
	return 1
}

// dialFails dials path with a 30 s context and returns the error, failing
// the test unless Dial failed in under a second.
func dialFails(t *testing.T, path string) error {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	start := time.Now()
	c, err := agent.Dial(ctx, path)
	if err == nil {
		c.Close()
		t.Fatal("Dial succeeded")
	}
	if took := time.Since(start); took > fastFail {
		t.Errorf("Dial took %s to fail (%v)", took, err)
	}
	return err
}

func TestDialNoSocketFailsFast(t *testing.T) {
	path := filepath.Join(agenttest.SocketDir(t), "agent.sock")
	err := dialFails(t, path)
	if !strings.Contains(err.Error(), "no agent socket at "+fmt.Sprintf("%q", path)) {
		t.Errorf("error: %v", err)
	}
}

// A socket file left by an agent that died: connecting is refused.
func TestDialStaleSocketFailsFast(t *testing.T) {
	path := filepath.Join(agenttest.SocketDir(t), "agent.sock")
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	l.SetUnlinkOnClose(false)
	l.Close()
	err = dialFails(t, path)
	if !strings.Contains(err.Error(), "connection refused") || !strings.Contains(err.Error(), "no agent listens there") {
		t.Errorf("error: %v", err)
	}
}

// A caller without write permission on the socket: as root, the client runs
// as nobody against root's 0600 socket; as another user, the socket's owner
// is refused by mode 0000 (only root bypasses it).
func TestDialPermissionDeniedFailsFast(t *testing.T) {
	dir := agenttest.SocketDir(t)
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "agent.sock")
	mode := os.FileMode(0o600)
	if os.Getuid() != 0 {
		mode = 0
	}
	agenttest.StartAt(t, path, mode, server.NewMemoryStore(), server.Options{})
	var out string
	if os.Getuid() == 0 {
		out = runHelperAsNobody(t, dir, "dial", path)
	} else {
		err := dialFails(t, path)
		out = err.Error()
	}
	t.Logf("the error:\n%s", out)
	uid := os.Getuid()
	if uid == 0 {
		uid = 65534
	}
	for _, want := range []string{"permission denied connecting to " + fmt.Sprintf("%q", path),
		fmt.Sprintf("mode %04o)", mode), fmt.Sprintf("uid %d gid %d,", os.Getuid(), os.Getgid()),
		fmt.Sprintf("runs as uid %d", uid), "with groups "} {
		if !strings.Contains(out, want) {
			t.Errorf("error lacks %q:\n%s", want, out)
		}
	}
	if d, err := time.ParseDuration(strings.TrimSpace(out[strings.LastIndex(out, "elapsed ")+len("elapsed "):])); os.Getuid() == 0 && (err != nil || d > fastFail) {
		t.Errorf("Dial as nobody took %v to fail (%v)", d, err)
	}
}

// runHelperAsNobody runs a copy of the test binary as nobody in mode (see
// TestMain) against the socket and returns its output.
func runHelperAsNobody(t *testing.T, dir, mode, socket string) string {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "client")
	data, err := os.ReadFile(self)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(bin, data, 0o755); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", bin, "-test.run=^$")
	cmd.Env = append(os.Environ(), helperEnv+"="+mode, agent.SocketEnv+"="+socket)
	out, _ := cmd.CombinedOutput()
	return string(out)
}

// WithWaitForAgent: a client started before the agent connects once the
// agent is up (300 ms later), where a plain Dial fails at once.
func TestDialWaitForAgent(t *testing.T) {
	path := filepath.Join(agenttest.SocketDir(t), "agent.sock")
	started := make(chan struct{})
	go func() {
		time.Sleep(300 * time.Millisecond)
		agenttest.StartAt(t, path, 0o600, server.NewMemoryStore(), server.Options{})
		close(started)
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	start := time.Now()
	c, err := agent.Dial(ctx, path, agent.WithWaitForAgent(5*time.Second))
	<-started
	if err != nil {
		t.Fatalf("Dial with WithWaitForAgent: %v", err)
	}
	defer c.Close()
	if took := time.Since(start); took < 300*time.Millisecond {
		t.Errorf("connected after %s, before the agent started", took)
	}
	if _, err := c.Keys(ctx); err != nil {
		t.Errorf("Keys through the late agent: %v", err)
	}

	// The wait is bounded: no agent ever comes.
	start = time.Now()
	_, err = agent.Dial(ctx, filepath.Join(agenttest.SocketDir(t), "never.sock"), agent.WithWaitForAgent(400*time.Millisecond))
	if err == nil || !strings.Contains(err.Error(), "after waiting 400ms") {
		t.Errorf("Dial with no agent: %v", err)
	}
	if took := time.Since(start); took < 400*time.Millisecond || took > 400*time.Millisecond+fastFail {
		t.Errorf("waiting 400ms took %s", took)
	}
}
