package softhsmtest

import (
	"context"
	"crypto"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hsmagent/hsmagent/agent"
)

// TestServeSocketActivation starts the built binary the way systemd does with
// hsmagent.socket: the listening socket as fd 3, LISTEN_FDS=1 and LISTEN_PID
// set to the agent's own pid (by a shell that then execs it), no --socket.
// The agent serves signatures on that socket, says so in its log, and leaves
// the socket file in place when it stops, as it is systemd's.
func TestServeSocketActivation(t *testing.T) {
	fx := New(t)
	fx.ok(t, fx.args([]string{"keys", "generate"}, "--label", "web", "--type", "ecdsa-p256")...)
	path := filepath.Join(SocketDir(t), "agent.sock")
	ul, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	ul.SetUnlinkOnClose(false)
	f, err := ul.File()
	if err != nil {
		t.Fatal(err)
	}
	args := append([]string{"-c", `LISTEN_PID=$$ LISTEN_FDS=1 exec "$@"`, "sh", binary, "serve"}, fx.tokenArgs()...)
	cmd := exec.Command("sh", args...)
	cmd.Env = fx.Env()
	cmd.ExtraFiles = []*os.File{f}
	d := fx.runDaemon(t, &daemon{socket: path}, cmd)
	// The agent holds its own copy; ours must not be what serves.
	f.Close()
	ul.Close()
	if !strings.Contains(d.logText(), "using the socket passed by systemd") || !strings.Contains(d.logText(), "socket="+path) {
		t.Errorf("the log does not name the inherited socket:\n%s", d.logText())
	}

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := agent.Dial(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	signer, err := c.Signer(ctx, "web")
	if err != nil {
		t.Fatal(err)
	}
	digest := sha256.Sum256([]byte("activated"))
	if _, err := signer.Sign(rand.Reader, digest[:], crypto.SHA256); err != nil {
		t.Fatalf("signing through the inherited socket: %v", err)
	}
	c.Close()

	d.signal(t, syscall.SIGTERM)
	if err := d.cmd.Wait(); err != nil {
		t.Fatalf("agent exit: %v\n%s", err, d.logText())
	}
	if fi, err := os.Lstat(path); err != nil || fi.Mode()&os.ModeSocket == 0 {
		t.Errorf("the agent removed systemd's socket file: %v", err)
	}
}

// TestServeSocketActivationRefusesNonStream: fd 3 must be a listening Unix
// stream socket; a TCP listener there is refused with a precise error.
func TestServeSocketActivationRefusesNonStream(t *testing.T) {
	fx := New(t)
	tl, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer tl.Close()
	f, err := tl.File()
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	args := append([]string{"-c", `LISTEN_PID=$$ LISTEN_FDS=1 exec "$@"`, "sh", binary, "serve"}, fx.tokenArgs()...)
	cmd := exec.Command("sh", args...)
	cmd.Env = fx.Env()
	cmd.ExtraFiles = []*os.File{f}
	out, err := cmd.CombinedOutput()
	if err == nil || !strings.Contains(string(out), "not a Unix stream socket") {
		t.Errorf("agent with a TCP socket as fd 3: %v\n%s", err, out)
	}
}

// TestServeHardened proves the process hardening of a running agent from
// outside, the way an attacker with the agent's uid would meet it:
//   - /proc/PID/limits shows a core file size of 0, soft and hard;
//   - /proc/PID/status shows umask 0077;
//   - the agent is not dumpable: the kernel gives its /proc/PID files to
//     root instead of the agent's uid, and refuses the same uid reading
//     /proc/PID/environ (and ptrace attach: the same check). Run as root,
//     the test runs the agent as nobody, as root bypasses these checks; a
//     plain process run the same way shows the contrast (files owned by
//     nobody);
//   - the audit log is created 0600.
func TestServeHardened(t *testing.T) {
	const nobody = 65534
	asRoot := os.Getuid() == 0
	fx := New(t)
	dir := t.TempDir()
	if asRoot {
		// Everything the agent needs, given to nobody.
		dir = SocketDir(t)
		var err error
		if fx, err = Create(filepath.Join(dir, "hsm"), fx.ModulePath, "hardened"); err != nil {
			t.Fatal(err)
		}
		for _, p := range []string{dir, filepath.Join(dir, "hsm")} {
			if err := os.Chmod(p, 0o755); err != nil {
				t.Fatal(err)
			}
		}
		chownR(t, filepath.Join(dir, "hsm"), nobody)
		if err := os.Mkdir(filepath.Join(dir, "out"), 0o755); err != nil {
			t.Fatal(err)
		}
		chownR(t, filepath.Join(dir, "out"), nobody)
	} else if err := os.Mkdir(filepath.Join(dir, "out"), 0o755); err != nil {
		t.Fatal(err)
	}
	audit := filepath.Join(dir, "out", "audit.jsonl")
	socket := filepath.Join(dir, "out", "run", "agent.sock")
	if len(socket) > 100 {
		socket = filepath.Join(SocketDir(t), "agent.sock")
	}
	args := append([]string{"serve", "--socket", socket, "--audit-log", audit}, fx.tokenArgs()...)
	cmd := exec.Command(binary, args...)
	if asRoot {
		cmd = exec.Command("setpriv", append([]string{"--reuid=65534", "--regid=65534", "--clear-groups", binary}, args...)...)
	}
	cmd.Env = append(fx.Env(), "SOFTHSM2_CONF="+fx.ConfPath)
	d := fx.runDaemon(t, &daemon{socket: socket}, cmd)
	pid := d.cmd.Process.Pid // setpriv execs the agent: same pid

	limits, err := os.ReadFile(fmt.Sprintf("/proc/%d/limits", pid))
	if err != nil {
		t.Fatal(err)
	}
	if !regexp.MustCompile(`(?m)^Max core file size\s+0\s+0\s`).Match(limits) {
		t.Errorf("core files are not off:\n%s", limits)
	}
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	if !regexp.MustCompile(`(?m)^Umask:\s+0077$`).Match(status) {
		t.Errorf("umask is not 0077:\n%s", status)
	}
	agentUID := os.Getuid()
	if asRoot {
		agentUID = nobody
	}
	if m := regexp.MustCompile(`(?m)^Uid:\s+(\d+)`).FindSubmatch(status); m == nil || string(m[1]) != strconv.Itoa(agentUID) {
		t.Fatalf("the agent does not run as uid %d:\n%s", agentUID, status)
	}
	if owner := procOwner(t, pid); owner != 0 {
		t.Errorf("/proc/%d/environ belongs to uid %d: the agent is dumpable (a non-dumpable process's /proc files belong to root)", pid, owner)
	}
	if asRoot {
		// Contrast: a dumpable process of the same user owns its /proc files.
		sleeper := exec.Command("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "sleep", "30")
		if err := sleeper.Start(); err != nil {
			t.Fatal(err)
		}
		defer func() { sleeper.Process.Kill(); sleeper.Wait() }()
		time.Sleep(100 * time.Millisecond)
		if owner := procOwner(t, sleeper.Process.Pid); owner != nobody {
			t.Errorf("control: a plain process of nobody has /proc files of uid %d, so the check above proves nothing", owner)
		}
	} else if _, err := os.ReadFile(fmt.Sprintf("/proc/%d/environ", pid)); !errors.Is(err, fs.ErrPermission) {
		t.Errorf("reading the agent's environment as its own user: %v, want permission denied", err)
	}
	if fi, err := os.Stat(audit); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("audit log: %v, mode %v; want 0600", err, fi.Mode())
	}
}

func procOwner(t *testing.T, pid int) int {
	t.Helper()
	fi, err := os.Stat(fmt.Sprintf("/proc/%d/environ", pid))
	if err != nil {
		t.Fatal(err)
	}
	return int(fi.Sys().(*syscall.Stat_t).Uid)
}

func chownR(t *testing.T, root string, uid int) {
	t.Helper()
	err := filepath.WalkDir(root, func(p string, _ fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		return os.Lchown(p, uid, uid)
	})
	if err != nil {
		t.Fatal(err)
	}
}

// TestServeSocketGroup: socket_group in the config gives the socket to that
// group (first gate); HSMAGENT_SOCKET_GROUP overrides the file.
func TestServeSocketGroup(t *testing.T) {
	gid := -1
	if os.Getuid() == 0 {
		gid = 65534
	} else {
		groups, _ := os.Getgroups()
		for _, g := range groups {
			if g != os.Getgid() {
				gid = g
			}
		}
		if gid < 0 {
			t.Skip("this user has no supplementary group to give the socket to")
		}
	}
	fx := New(t)
	config := filepath.Join(t.TempDir(), "agent.yaml")
	if err := os.WriteFile(config, []byte(fmt.Sprintf("socket_group: %q\nsocket_mode: \"0660\"\n", strconv.Itoa(gid))), 0o600); err != nil {
		t.Fatal(err)
	}
	d := fx.startDaemon(t, "--config", config)
	fi, err := os.Lstat(d.socket)
	if err != nil {
		t.Fatal(err)
	}
	if got := int(fi.Sys().(*syscall.Stat_t).Gid); got != gid || fi.Mode().Perm() != 0o660 {
		t.Errorf("socket group %d mode %o, want %d and 660", got, fi.Mode().Perm(), gid)
	}
	r := fx.hsmagentEnv(t, []string{"HSMAGENT_SOCKET_GROUP=no-such-group-hsa"}, append([]string{"serve", "--config", config, "--socket", d.socket + "2"}, fx.tokenArgs()...)...)
	if r.code == 0 || !strings.Contains(r.stderr, `socket group "no-such-group-hsa"`) {
		t.Errorf("HSMAGENT_SOCKET_GROUP of an unknown group: exit %d\n%s", r.code, r.stderr)
	}
}

// TestCommandsFailFast: a command that talks to the agent fails in under a
// second, with the cause, when there is no socket or nothing listens on it
// (it used to wait 10 s and guess).
func TestCommandsFailFast(t *testing.T) {
	fx := New(t)
	dir := SocketDir(t)
	stale := filepath.Join(dir, "stale.sock")
	ul, err := net.ListenUnix("unix", &net.UnixAddr{Name: stale, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	ul.SetUnlinkOnClose(false)
	ul.Close()
	claims := filepath.Join(dir, "claims.json")
	if err := os.WriteFile(claims, []byte(`{"sub":"x"}`), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ socket, want string }{
		{filepath.Join(dir, "missing.sock"), "no agent socket at"},
		{stale, "connection refused"},
	} {
		start := time.Now()
		r := fx.hsmagent(t, "jwt", "sign", "--socket", tc.socket, "--key", "k", "--kid", "k", "--claims", claims)
		if took := time.Since(start); took > time.Second {
			t.Errorf("%s: failed after %s", tc.socket, took)
		}
		if r.code == 0 || !strings.Contains(r.stderr, tc.want) {
			t.Errorf("%s: exit %d, want %q:\n%s", tc.socket, r.code, tc.want, r.stderr)
		}
	}
}
