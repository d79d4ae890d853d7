package softhsmtest

import (
	"bufio"
	"bytes"
	"context"
	"crypto"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509/pkix"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hsmagent/hsmagent/agent"
)

// daemon is "hsmagent serve" running as a child process.
type daemon struct {
	cmd    *exec.Cmd
	socket string
	mu     sync.Mutex
	log    bytes.Buffer
	lines  chan string
}

func (t *Token) startDaemon(tb testing.TB, extra ...string) *daemon {
	tb.Helper()
	d := &daemon{socket: filepath.Join(SocketDir(tb), "run", "agent.sock"), lines: make(chan string, 1000)}
	args := append([]string{"serve", "--socket", d.socket}, t.tokenArgs()...)
	cmd := exec.Command(binary, append(args, extra...)...)
	cmd.Env = t.Env()
	return t.runDaemon(tb, d, cmd)
}

// runDaemon starts cmd, an "hsmagent serve" however wrapped, as d and waits
// until it serves.
func (t *Token) runDaemon(tb testing.TB, d *daemon, cmd *exec.Cmd) *daemon {
	tb.Helper()
	if d.lines == nil {
		d.lines = make(chan string, 1000)
	}
	d.cmd = cmd
	stderr, err := d.cmd.StderrPipe()
	if err != nil {
		tb.Fatal(err)
	}
	if err := d.cmd.Start(); err != nil {
		tb.Fatal(err)
	}
	go func() {
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			d.mu.Lock()
			d.log.WriteString(sc.Text() + "\n")
			d.mu.Unlock()
			select {
			case d.lines <- sc.Text():
			default:
			}
		}
		close(d.lines)
	}()
	tb.Cleanup(func() {
		if d.cmd.ProcessState == nil {
			d.cmd.Process.Kill()
			d.cmd.Wait()
		}
		if strings.Contains(d.logText(), t.PIN) {
			tb.Error("the agent's log contains the PIN")
		}
	})
	d.waitFor(tb, "agent serving")
	return d
}

func (d *daemon) logText() string {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.log.String()
}

// waitFor reads log lines until one contains want.
func (d *daemon) waitFor(tb testing.TB, want string) string {
	tb.Helper()
	timeout := time.After(20 * time.Second)
	for {
		select {
		case line, ok := <-d.lines:
			if !ok {
				tb.Fatalf("agent exited before logging %q:\n%s", want, d.logText())
			}
			if strings.Contains(line, want) {
				return line
			}
		case <-timeout:
			tb.Fatalf("agent did not log %q:\n%s", want, d.logText())
		}
	}
}

func (d *daemon) signal(tb testing.TB, sig os.Signal) {
	tb.Helper()
	if err := d.cmd.Process.Signal(sig); err != nil {
		tb.Fatal(err)
	}
}

// TestServeLifecycle drives the daemon as an operator would: it serves,
// refuses a second agent on its socket, follows a certificate re-imported by
// another process after SIGHUP, survives a bad reload, and stops cleanly on
// SIGTERM.
func TestServeLifecycle(t *testing.T) {
	fx := New(t)
	dir := t.TempDir()
	fx.ok(t, fx.args([]string{"keys", "generate"}, "--label", "web", "--type", "ecdsa-p256")...)
	ca := NewCA(t, "Serve Test CA")
	tok := fx.Open(t)
	k, err := tok.Key("web")
	if err != nil {
		t.Fatal(err)
	}
	tok.Close()
	now := time.Now()
	first := writePEM(t, filepath.Join(dir, "first.pem"), ca.Leaf(t, pkix.Name{CommonName: "first"}, k.Public, now.Add(-time.Hour), now.Add(48*time.Hour)))
	fx.ok(t, fx.args([]string{"cert", "import"}, "--key", "web", "--cert", first)...)

	config := filepath.Join(dir, "agent.yaml")
	os.WriteFile(config, []byte("log_format: json\naccess:\n  - keys: [\"web\"]\n    users: [\"root\"]\n"), 0o644)
	d := fx.startDaemon(t, "--config", config)

	if fi, err := os.Stat(d.socket); err != nil || fi.Mode().Perm() != 0o660 {
		t.Errorf("socket mode: %v %v", fi.Mode(), err)
	}
	if fi, err := os.Stat(filepath.Dir(d.socket)); err != nil || fi.Mode().Perm() != 0o750 {
		t.Errorf("socket directory mode: %v %v", fi.Mode(), err)
	}
	r := fx.hsmagent(t, fx.args([]string{"serve"}, "--socket", d.socket)...)
	if r.code != 1 || !strings.Contains(r.stderr, "another agent is listening") {
		t.Errorf("second agent on the same socket: exit %d, %s", r.code, r.stderr)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	client, err := agent.Dial(ctx, d.socket)
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	get := client.GetCertificate("web")
	cert, err := get(&tls.ClientHelloInfo{})
	if err != nil || cert.Leaf.Subject.CommonName != "first" {
		t.Fatalf("certificate before rotation: %v %v", cert, err)
	}
	// Sign once so the audit log has a record.
	signer, err := client.Signer(ctx, "web")
	if err != nil {
		t.Fatal(err)
	}
	digest := sha256.Sum256([]byte("audit me"))
	if _, err := signer.Sign(nil, digest[:], crypto.SHA256); err != nil {
		t.Fatal(err)
	}
	audit := d.waitFor(t, `"msg":"sign"`)
	// The client is this test process: its uid, root or not.
	for _, want := range []string{fmt.Sprintf(`"uid":%d,`, os.Getuid()), `"key":"web"`, `"hash":"HASH_SHA256"`, `"result":"ok"`, `"pid":`, `"duration":`} {
		if !strings.Contains(audit, want) {
			t.Errorf("audit record lacks %s: %s", want, audit)
		}
	}

	// Rotation: another process imports a new certificate; SIGHUP makes the
	// agent serve it, and the client's callback follows without a restart.
	second := writePEM(t, filepath.Join(dir, "second.pem"), ca.Leaf(t, pkix.Name{CommonName: "second"}, k.Public, now.Add(-time.Hour), now.Add(72*time.Hour)))
	fx.ok(t, fx.args([]string{"cert", "import"}, "--key", "web", "--cert", second)...)
	d.signal(t, syscall.SIGHUP)
	d.waitFor(t, `"msg":"reloaded"`)
	deadline := time.Now().Add(10 * time.Second)
	for {
		cert, err := get(&tls.ClientHelloInfo{})
		if err != nil {
			t.Fatal(err)
		}
		if cert.Leaf.Subject.CommonName == "second" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the client never saw the re-imported certificate")
		}
		time.Sleep(20 * time.Millisecond)
	}

	// A broken config on reload is logged and the agent keeps serving.
	os.WriteFile(config, []byte("access:\n  - keys: [\"web\"]\n    users: [\"no-such-user-hsmagent\"]\n"), 0o644)
	d.signal(t, syscall.SIGHUP)
	if line := d.waitFor(t, "reload failed"); !strings.Contains(line, "no-such-user-hsmagent") {
		t.Errorf("reload failure does not say why: %s", line)
	}
	if _, err := signer.Sign(nil, digest[:], crypto.SHA256); err != nil {
		t.Fatalf("sign after a failed reload: %v", err)
	}

	// SIGTERM: exit 0 and the socket is gone.
	d.signal(t, syscall.SIGTERM)
	if err := d.cmd.Wait(); err != nil {
		t.Errorf("agent exit after SIGTERM: %v\n%s", err, d.logText())
	}
	if _, err := os.Stat(d.socket); !os.IsNotExist(err) {
		t.Errorf("socket left behind: %v", err)
	}
	if _, err := net.Dial("unix", d.socket); err == nil {
		t.Error("socket still accepts connections")
	}
}

// TestServeRefusesWhatItCannotEnforce: unknown users in access rules and
// unknown config keys stop the agent at start-up with a clear error.
func TestServeRefusesWhatItCannotEnforce(t *testing.T) {
	fx := New(t)
	dir := t.TempDir()
	tests := []struct{ name, config, want string }{
		{"unknown user", "access:\n  - keys: [\"*\"]\n    users: [\"no-such-user-hsmagent\"]\n", `unknown user "no-such-user-hsmagent"`},
		{"misspelt key", "acess:\n  - keys: [\"*\"]\n", `line 1: unknown setting "acess"`},
		{"rule without users", "access:\n  - keys: [\"*\"]\n", "names no users or groups"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			config := filepath.Join(dir, "c.yaml")
			os.WriteFile(config, []byte(tt.config), 0o644)
			r := fx.hsmagent(t, fx.args([]string{"serve"}, "--socket", filepath.Join(SocketDir(t), "s.sock"), "--config", config)...)
			if r.code == 0 || !strings.Contains(r.stderr, tt.want) {
				t.Errorf("exit %d, stderr %q, want %q", r.code, r.stderr, tt.want)
			}
		})
	}
}
