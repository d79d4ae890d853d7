package server_test

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/hsmagent/hsmagent/agent/agenttest"
	"github.com/hsmagent/hsmagent/agent/server"
)

func socketGID(t *testing.T, path string) int {
	t.Helper()
	fi, err := os.Lstat(path)
	if err != nil {
		t.Fatal(err)
	}
	return int(fi.Sys().(*syscall.Stat_t).Gid)
}

// otherGroup is a group other than this process's own that it may give
// files to: any group for root, a supplementary group otherwise.
func otherGroup(t *testing.T) int {
	t.Helper()
	if os.Getuid() == 0 {
		return 65534
	}
	groups, _ := os.Getgroups()
	for _, g := range groups {
		if g != os.Getgid() {
			return g
		}
	}
	t.Skip("this user has no supplementary group to give the socket to")
	return -1
}

// TestListenWithGroup: the socket gets the group, by number or by name, with
// its mode, and an unknown group is refused before anything is created.
func TestListenWithGroup(t *testing.T) {
	gid := otherGroup(t)
	path := filepath.Join(agenttest.SocketDir(t), "agent.sock")
	l, err := server.ListenWith(path, server.ListenOptions{Mode: 0o660, Group: strconv.Itoa(gid)})
	if err != nil {
		t.Fatal(err)
	}
	if got := socketGID(t, path); got != gid {
		t.Errorf("socket group %d, want %d", got, gid)
	}
	if m, _ := statMode(path); m != 0o660 {
		t.Errorf("socket mode %o", m)
	}
	l.Close()
	if os.Getuid() == 0 {
		l, err := server.ListenWith(path, server.ListenOptions{Mode: 0o660, Group: "nogroup"})
		if err != nil {
			t.Fatal(err)
		}
		if got := socketGID(t, path); got != 65534 {
			t.Errorf("group nogroup: socket group %d", got)
		}
		l.Close()
	}
	_, err = server.ListenWith(path, server.ListenOptions{Mode: 0o660, Group: "no-such-group-hsa"})
	if err == nil || !strings.Contains(err.Error(), `socket group "no-such-group-hsa"`) {
		t.Errorf("unknown group: %v", err)
	}
	if _, err := os.Lstat(path); err == nil {
		t.Error("a socket was created for an unknown group")
	}
}

// TestListenWithGroupRefused: a non-root agent cannot give its socket to a
// group it is not in; the error says what to do.
func TestListenWithGroupRefused(t *testing.T) {
	if os.Getuid() == 0 {
		t.Skip("root may give files to any group")
	}
	path := filepath.Join(agenttest.SocketDir(t), "agent.sock")
	_, err := server.ListenWith(path, server.ListenOptions{Mode: 0o660, Group: "0"})
	if err == nil || !strings.Contains(err.Error(), "must be a member of the group") {
		t.Errorf("group root as uid %d: %v", os.Getuid(), err)
	}
	if _, err := os.Lstat(path); err == nil {
		t.Error("the socket was left in place")
	}
}

// TestListenWithGroupSetgidDir: in a setgid directory of the group the
// socket is created with that group already (no chown is needed, which the
// shipped unit's system call filter forbids).
func TestListenWithGroupSetgidDir(t *testing.T) {
	gid := otherGroup(t)
	dir := filepath.Join(agenttest.SocketDir(t), "run")
	if err := os.Mkdir(dir, 0o750); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(dir, -1, gid); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(dir, 0o750|os.ModeSetgid); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "agent.sock")
	l, err := server.ListenWith(path, server.ListenOptions{Mode: 0o660, Group: strconv.Itoa(gid)})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if got := socketGID(t, path); got != gid {
		t.Errorf("socket group %d, want %d", got, gid)
	}
}

// TestListenCreatesReachableDir: a missing socket directory is made 0750
// whatever the umask (serve runs with 077), so the socket's group can reach it.
func TestListenCreatesReachableDir(t *testing.T) {
	old := syscall.Umask(0o077)
	defer syscall.Umask(old)
	path := filepath.Join(agenttest.SocketDir(t), "run", "agent.sock")
	l, err := server.Listen(path, 0o660)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if m, _ := statMode(filepath.Dir(path)); m != 0o750 {
		t.Errorf("socket directory mode %o, want 750", m)
	}
}

// TestInheritedListenerNotOurs: LISTEN_* meant for another process (the pid
// differs) are ignored; no LISTEN_* means no inherited socket.
func TestInheritedListenerNotOurs(t *testing.T) {
	t.Setenv("LISTEN_PID", "1")
	t.Setenv("LISTEN_FDS", "1")
	if l, err := server.InheritedListener(); l != nil || err != nil {
		t.Errorf("LISTEN_PID of another process: %v, %v", l, err)
	}
	os.Unsetenv("LISTEN_PID")
	os.Unsetenv("LISTEN_FDS")
	if l, err := server.InheritedListener(); l != nil || err != nil {
		t.Errorf("no LISTEN_*: %v, %v", l, err)
	}
	t.Setenv("LISTEN_PID", strconv.Itoa(os.Getpid()))
	t.Setenv("LISTEN_FDS", "2")
	if _, err := server.InheritedListener(); err == nil || !strings.Contains(err.Error(), "one ListenStream=") {
		t.Errorf("two sockets: %v", err)
	}
	if os.Getenv("LISTEN_PID") != "" {
		t.Error("LISTEN_PID is left in the environment")
	}
}
