package server_test

import (
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hsmagent/hsmagent/agent/agenttest"
	"github.com/hsmagent/hsmagent/agent/server"
)

// TestListenNeverChmodsThroughSymlink is the race from the security review:
// whoever can write the socket directory swaps the fresh socket for a symlink
// to a private file, hoping that the agent's chmod follows it. An attacker
// goroutine replaces every socket it sees while Listen runs again and again;
// the private file's mode must never change.
func TestListenNeverChmodsThroughSymlink(t *testing.T) {
	dir := agenttest.SocketDir(t)
	path := filepath.Join(dir, "agent.sock")
	target := filepath.Join(agenttest.SocketDir(t), "secret")
	if err := os.WriteFile(target, []byte("private"), 0o600); err != nil {
		t.Fatal(err)
	}
	var stop atomic.Bool
	var swaps atomic.Int64
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for !stop.Load() {
			if fi, err := os.Lstat(path); err == nil && fi.Mode()&os.ModeSocket != 0 {
				os.Remove(path)
				os.Symlink(target, path)
				swaps.Add(1)
			}
		}
	}()
	defer func() { stop.Store(true); wg.Wait() }()

	deadline := time.Now().Add(10 * time.Second)
	starts, listened := 0, 0
	for ; starts < 2000 && time.Now().Before(deadline); starts++ {
		os.Remove(path) // a fresh start: the attacker's last symlink is gone
		if l, err := server.Listen(path, 0o666); err == nil {
			listened++
			l.Close()
		}
		if mode, err := statMode(target); err != nil || mode != 0o600 {
			t.Fatalf("after %d starts the private file has mode %o (%v): a chmod followed the symlink", starts+1, mode, err)
		}
	}
	stop.Store(true)
	wg.Wait()
	t.Logf("%d starts (%d listened), %d sockets swapped for a symlink; private file untouched", starts, listened, swaps.Load())
	// Failed and raced starts leave nothing behind but, at most, the attacker's symlink.
	entries, _ := os.ReadDir(dir)
	for _, e := range entries {
		if e.Name() != "agent.sock" {
			t.Errorf("left behind in the socket directory: %s", e.Name())
		}
	}
}

// TestListenRefusesUnsafeDirectory: a directory that someone other than the
// agent's user (or root) can write lets them replace the socket with their own
// and impersonate the agent, so Listen refuses it and says what to fix.
func TestListenRefusesUnsafeDirectory(t *testing.T) {
	root := os.Getuid() == 0
	tests := []struct {
		name   string
		root   bool // needs root to chown
		set    func(t *testing.T, base string) string
		want   string
		accept bool
	}{
		{"owned by another user", true, func(t *testing.T, base string) string {
			return mkdir(t, base, "d", 0o755, 65534)
		}, `is owned by user nobody (uid 65534), not the agent's uid 0 or root: run the agent as user nobody (uid 65534)`, false},
		{"writable by others", false, func(t *testing.T, base string) string {
			return mkdir(t, base, "d", 0o777, -1)
		}, "is writable by others (mode 0777)", false},
		{"writable by group", false, func(t *testing.T, base string) string {
			return mkdir(t, base, "d", 0o770, -1)
		}, "is writable by its group (mode 0770)", false},
		{"parent owned by another user", true, func(t *testing.T, base string) string {
			p := mkdir(t, base, "p", 0o755, 65534)
			return mkdir(t, p, "d", 0o750, -1)
		}, "is owned by user nobody (uid 65534)", false},
		{"parent writable by others without the sticky bit", false, func(t *testing.T, base string) string {
			p := mkdir(t, base, "p", 0o777, -1)
			return mkdir(t, p, "d", 0o750, -1)
		}, "is writable by others (mode 0777)", false},
		{"symlink to a directory writable by others", false, func(t *testing.T, base string) string {
			d := mkdir(t, base, "d", 0o777, -1)
			if err := os.Symlink(d, filepath.Join(base, "link")); err != nil {
				t.Fatal(err)
			}
			return filepath.Join(base, "link")
		}, "is writable by others", false},
		{"parent with the sticky bit, like /tmp", false, func(t *testing.T, base string) string {
			p := mkdir(t, base, "p", os.ModeSticky|0o777, -1)
			return mkdir(t, p, "d", 0o750, -1)
		}, "", true},
		{"path through a directory of another user, by a symlink to a safe one", true, func(t *testing.T, base string) string {
			// What the socket path goes through decides where clients
			// connect: its owner could swap the link for one to their own socket.
			safe := mkdir(t, base, "safe", 0o750, -1)
			evil := mkdir(t, base, "evil", 0o755, 65534)
			if err := os.Symlink(safe, filepath.Join(evil, "sub")); err != nil {
				t.Fatal(err)
			}
			return filepath.Join(evil, "sub", "deeper")
		}, `evil", on the socket path, is owned by user nobody (uid 65534)`, false},
		{"symlink owned by another user in a sticky directory", true, func(t *testing.T, base string) string {
			p := mkdir(t, base, "p", os.ModeSticky|0o777, -1)
			safe := mkdir(t, base, "safe", 0o750, -1)
			link := filepath.Join(p, "link")
			if err := os.Symlink(safe, link); err != nil {
				t.Fatal(err)
			}
			if err := os.Lchown(link, 65534, 65534); err != nil {
				t.Fatal(err)
			}
			return link
		}, "a symlink owned by uid 65534", false},
		{"symlink to a safe directory", false, func(t *testing.T, base string) string {
			d := mkdir(t, base, "d", 0o750, -1)
			if err := os.Symlink(d, filepath.Join(base, "link")); err != nil {
				t.Fatal(err)
			}
			return filepath.Join(base, "link")
		}, "", true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if tt.root && !root {
				t.Skip("needs root to give a directory to uid 65534")
			}
			dir := tt.set(t, agenttest.SocketDir(t))
			path := filepath.Join(dir, "agent.sock")
			l, err := server.Listen(path, 0o660)
			if tt.accept {
				if err != nil {
					t.Fatalf("refused a safe directory: %v", err)
				}
				l.Close()
				return
			}
			if err == nil {
				l.Close()
				t.Fatalf("Listen accepted the directory")
			}
			if msg := err.Error(); !strings.Contains(msg, tt.want) || strings.Contains(msg, "\n") {
				t.Errorf("error %q, want one line containing %q", msg, tt.want)
			}
			if _, err := os.Lstat(path); !os.IsNotExist(err) {
				t.Errorf("a refused Listen left %q: %v", path, err)
			}
		})
	}
}

// mkdir makes base/name with exactly mode (no umask) and, if uid >= 0, gives it to uid.
func mkdir(t *testing.T, base, name string, mode os.FileMode, uid int) string {
	t.Helper()
	d := filepath.Join(base, name)
	if err := os.Mkdir(d, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(d, mode); err != nil {
		t.Fatal(err)
	}
	if uid >= 0 {
		if err := os.Chown(d, uid, -1); err != nil {
			t.Fatal(err)
		}
	}
	return d
}

// TestCloseLeavesAnotherAgentsSocket: when the socket path has been taken
// over by another agent, closing the first listener must not delete the new
// socket (the "running agent nobody can reach").
func TestCloseLeavesAnotherAgentsSocket(t *testing.T) {
	path := filepath.Join(agenttest.SocketDir(t), "agent.sock")
	first, err := server.Listen(path, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer first.Close()
	os.Remove(path)
	second, err := server.Listen(path, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer second.Close()
	theirs, err := os.Lstat(path)
	if err != nil {
		t.Fatal(err)
	}
	first.Close()
	now, err := os.Lstat(path)
	if err != nil || !os.SameFile(theirs, now) {
		t.Fatalf("closing the first listener removed or replaced the second agent's socket: %v", err)
	}
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatalf("second agent unreachable: %v", err)
	}
	c.Close()
	second.Close()
	if _, err := os.Lstat(path); !os.IsNotExist(err) {
		t.Errorf("the second agent's socket is still there after it closed: %v", err)
	}
}
