package softhsmtest

import (
	"context"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestServeRefusesUnsafeSocketDirectory: the agent does not start with its
// socket in a directory that others can write, and says what to fix in one line.
func TestServeRefusesUnsafeSocketDirectory(t *testing.T) {
	fx := New(t)
	dir := filepath.Join(SocketDir(t), "open")
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(dir, 0o777); err != nil {
		t.Fatal(err)
	}
	// Bounded: an agent that wrongly starts would otherwise serve until the test times out.
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, binary, fx.args([]string{"serve"}, "--socket", filepath.Join(dir, "agent.sock"))...)
	cmd.Env = fx.Env()
	out, err := cmd.CombinedOutput()
	want := `socket directory "` + dir + `" is writable by others (mode 0777)`
	if ctx.Err() != nil {
		t.Fatalf("the agent started with its socket in a directory writable by others:\n%s", out)
	}
	if err == nil || !strings.Contains(string(out), want) || !strings.Contains(string(out), "/run/hsmagent") {
		t.Errorf("%v, output %q, want %q", err, out, want)
	}
}

// TestServeStopLeavesAnotherAgentsSocket is the end of issue 8's item 2: an
// agent's socket path now holds another agent's socket (here moved there by
// hand; in the issue, the second agent took it over). SIGTERM to the first
// agent must not delete it: the second agent stays reachable.
func TestServeStopLeavesAnotherAgentsSocket(t *testing.T) {
	fx := New(t)
	first := fx.startDaemon(t)
	second := fx.startDaemon(t)
	if err := os.Rename(second.socket, first.socket); err != nil {
		t.Fatal(err)
	}
	first.signal(t, syscall.SIGTERM)
	if err := first.cmd.Wait(); err != nil {
		t.Errorf("first agent's exit: %v\n%s", err, first.logText())
	}
	c, err := net.Dial("unix", first.socket)
	if err != nil {
		t.Fatalf("the second agent's socket is gone after the first agent stopped: %v", err)
	}
	c.Close()
	second.signal(t, syscall.SIGTERM)
	if err := second.cmd.Wait(); err != nil {
		t.Errorf("second agent's exit: %v\n%s", err, second.logText())
	}
}
