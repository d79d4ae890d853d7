package softhsmtest

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/sha256"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hsmagent/hsmagent/agent"
	"google.golang.org/grpc/codes"
)

// containedAgent is the hsmagent binary serving a token through the fault
// module, with its PKCS#11 calls in the worker process (the default).
type containedAgent struct {
	fm     *FaultModule
	d      *daemon
	audit  string
	signer crypto.Signer
}

func startContainedAgent(t *testing.T) *containedAgent {
	t.Helper()
	fx := New(t)
	fx.ok(t, fx.args([]string{"keys", "generate"}, "--label", "contained", "--type", "ecdsa-p256")...)
	fm := NewFaultModule(t, fx)
	ca := &containedAgent{fm: fm, audit: filepath.Join(t.TempDir(), "audit.jsonl")}
	d := &daemon{socket: filepath.Join(SocketDir(t), "run", "agent.sock")}
	cmd := exec.Command(binary, append([]string{"serve", "--socket", d.socket, "--audit-log", ca.audit, "--log-format", "json",
		"--hsm-timeout", "1s", "--hsm-kill-after", "2s"}, fx.tokenArgs()...)...)
	cmd.Env = fm.Env()
	ca.d = fx.runDaemon(t, d, cmd)
	t.Cleanup(fm.Reset) // before the daemon's cleanup: no call stays hung
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	client, err := agent.Dial(ctx, d.socket)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { client.Close() })
	if ca.signer, err = client.Signer(ctx, "contained"); err != nil {
		t.Fatal(err)
	}
	if _, err := ca.sign(); err != nil {
		t.Fatalf("a signature before any fault: %v", err)
	}
	return ca
}

var containedDigest = sha256.Sum256([]byte("contained"))

func (ca *containedAgent) sign() ([]byte, error) {
	return ca.signer.Sign(nil, containedDigest[:], crypto.SHA256)
}

// expectUnavailable wants the signature in flight during the fault refused
// with Unavailable.
func (ca *containedAgent) expectUnavailable(t *testing.T, what string) {
	t.Helper()
	_, err := ca.sign()
	var ce *agent.CallError
	if !errors.As(err, &ce) || ce.StatusCode != codes.Unavailable {
		t.Fatalf("the signature in flight when %s: %v; want Unavailable", what, err)
	}
}

// signsAgain wants a valid signature within d, and returns how long service
// was down since from.
func (ca *containedAgent) signsAgain(t *testing.T, from time.Time, d time.Duration) time.Duration {
	t.Helper()
	for {
		sig, err := ca.sign()
		if err == nil {
			if !ecdsa.VerifyASN1(ca.signer.Public().(*ecdsa.PublicKey), containedDigest[:], sig) {
				t.Fatal("the signature after the fault does not verify")
			}
			return time.Since(from)
		}
		if time.Since(from) > d {
			t.Fatalf("no signature within %v of the fault: %v\n%s", d, err, ca.d.logText())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// expectAlive wants the agent's own process running still.
func (ca *containedAgent) expectAlive(t *testing.T) {
	t.Helper()
	if err := syscall.Kill(ca.d.cmd.Process.Pid, 0); err != nil || ca.d.cmd.ProcessState != nil {
		t.Fatalf("the agent's process is gone: %v", err)
	}
	if _, err := os.Stat(ca.d.socket); err != nil {
		t.Fatalf("the agent's socket is gone: %v", err)
	}
}

// logLine waits for a line of the agent's log that contains want (the
// worker's crash report can overflow the daemon's line channel: the text
// is read instead).
func (ca *containedAgent) logLine(t *testing.T, want string) string {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		for _, line := range strings.Split(ca.d.logText(), "\n") {
			if strings.Contains(line, want) {
				return line
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("the agent did not log %q:\n%s", want, ca.d.logText())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (ca *containedAgent) auditResults(t *testing.T) string {
	t.Helper()
	b, err := os.ReadFile(ca.audit)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// TestModuleCrashContained: a module that dies of SIGSEGV in C_Sign takes
// the worker with it, not the agent: the caller of the signature in flight
// gets Unavailable, its audit record says hsm-down, the log says how the
// worker died, and signatures are valid again within seconds.
func TestModuleCrashContained(t *testing.T) {
	ca := startContainedAgent(t)
	ca.fm.Set("crash", "1")
	begin := time.Now()
	ca.expectUnavailable(t, "the module crashed")
	ca.fm.Set("crash", "")
	down := ca.signsAgain(t, begin, 5*time.Second)
	t.Logf("service stopped for %v after the module crashed", down.Round(time.Millisecond))
	ca.expectAlive(t)
	ended := ca.logLine(t, "the HSM worker ended")
	if !strings.Contains(ended, `"exit":"signal`) && !strings.Contains(ended, `"exit":"exit status`) {
		t.Errorf("the log does not say how the worker ended: %s", ended)
	}
	ca.logLine(t, "the HSM worker serves again")
	if audit := ca.auditResults(t); !strings.Contains(audit, `"result":"hsm-down"`) ||
		!strings.Contains(audit, `"msg":"hsm worker ended"`) || !strings.Contains(audit, `"in_flight_failed":1`) ||
		!strings.Contains(audit, `"msg":"hsm worker started"`) {
		t.Errorf("the audit trail does not say what happened (hsm-down, worker ended with 1 in flight, worker started):\n%s", audit)
	}
}

// TestModuleHangContained: a C_Sign that never returns is answered at the
// HSM timeout as before; past hsm_kill_after its worker is killed and
// replaced, so the agent signs again without a restart.
func TestModuleHangContained(t *testing.T) {
	ca := startContainedAgent(t)
	ca.fm.Set("hang", "forever")
	begin := time.Now()
	ca.expectUnavailable(t, "the module hung")
	if d := time.Since(begin); d > 2*time.Second {
		t.Errorf("the hung signature was answered after %v; want the HSM timeout, 1s", d)
	}
	ca.fm.Set("hang", "")
	down := ca.signsAgain(t, begin, 10*time.Second)
	t.Logf("service stopped for %v after the module hung (hsm_timeout 1s, hsm_kill_after 2s)", down.Round(time.Millisecond))
	ca.expectAlive(t)
	ca.logLine(t, "killing the HSM worker")
	ca.logLine(t, "the HSM worker serves again")
	if audit := ca.auditResults(t); !strings.Contains(audit, `"result":"timeout"`) || !strings.Contains(audit, `"killed":true`) {
		t.Errorf("no timeout record for the hung signature:\n%s", audit)
	}
}
