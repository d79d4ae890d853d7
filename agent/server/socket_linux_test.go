package server_test

import (
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hsmagent/hsmagent/agent/agenttest"
	"github.com/hsmagent/hsmagent/agent/server"
)

// TestListenKeepsBusyAgent: an agent whose accept queue is full answers a
// test connection with EAGAIN, not ECONNREFUSED. It is alive: a second Listen
// must refuse instead of deleting its socket.
func TestListenKeepsBusyAgent(t *testing.T) {
	path := filepath.Join(agenttest.SocketDir(t), "agent.sock")
	busy, err := server.Listen(path, 0o600) // never accepts
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	before, err := os.Lstat(path)
	if err != nil {
		t.Fatal(err)
	}
	conns := fillBacklog(t, path)
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	t.Logf("accept queue full after %d connections", len(conns))

	l, err := server.Listen(path, 0o600)
	if err == nil {
		l.Close()
		t.Fatal("a second Listen took over the socket of a live agent with a full accept queue")
	}
	if msg := err.Error(); !strings.Contains(msg, "may belong to a running agent") || !strings.Contains(msg, path) {
		t.Errorf("error %q", msg)
	}
	after, err := os.Lstat(path)
	if err != nil || !os.SameFile(before, after) {
		t.Errorf("the live agent's socket was removed or replaced: %v", err)
	}
}

// fillBacklog connects to path until the kernel answers EAGAIN.
func fillBacklog(t *testing.T, path string) []net.Conn {
	t.Helper()
	var conns []net.Conn
	for len(conns) < 70000 {
		c, err := net.DialTimeout("unix", path, time.Second)
		if errors.Is(err, syscall.EAGAIN) || os.IsTimeout(err) { // a loaded machine may time out first
			return conns
		}
		if err != nil {
			t.Fatalf("after %d connections: %v", len(conns), err)
		}
		conns = append(conns, c)
	}
	t.Fatal("the accept queue never filled")
	return nil
}
