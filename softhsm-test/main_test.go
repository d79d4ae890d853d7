package softhsmtest

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// binary is the hsmagent built once for the end-to-end tests.
var binary string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "hsmagent-e2e-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	// Executable by the users the tests run it as, as an installed binary
	// is: the agent starts its HSM worker from it.
	if err := os.Chmod(dir, 0o755); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	binary = filepath.Join(dir, "hsmagent")
	build := exec.Command("go", "build", "-o", binary, "../cmd/hsmagent")
	build.Stdout, build.Stderr = os.Stdout, os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "building hsmagent:", err)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// result is what one run of the binary printed.
type result struct {
	stdout, stderr string
	code           int
}

// hsmagent runs the binary with the token's environment and no terminal.
func (t *Token) hsmagent(tb testing.TB, args ...string) result {
	tb.Helper()
	return t.hsmagentEnv(tb, nil, args...)
}

func (t *Token) hsmagentEnv(tb testing.TB, env []string, args ...string) result {
	tb.Helper()
	cmd := exec.Command(binary, args...)
	cmd.Env = append(t.Env(), env...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	r := result{stdout: stdout.String(), stderr: stderr.String()}
	if ee, ok := err.(*exec.ExitError); ok {
		r.code = ee.ExitCode()
	} else if err != nil {
		tb.Fatalf("running hsmagent %v: %v", args, err)
	}
	if strings.Contains(r.stdout+r.stderr, t.PIN) {
		tb.Errorf("hsmagent %v printed the PIN", args)
	}
	return r
}

// ok runs the binary and fails the test unless it exits 0.
func (t *Token) ok(tb testing.TB, args ...string) result {
	tb.Helper()
	r := t.hsmagent(tb, args...)
	if r.code != 0 {
		tb.Fatalf("hsmagent %v: exit %d\n%s", args, r.code, r.stderr)
	}
	return r
}

// tokenArgs selects the token and its PIN file.
func (t *Token) tokenArgs() []string {
	return []string{"--token", t.Label, "--pin-file", t.PINFile}
}

func (t *Token) args(cmd []string, extra ...string) []string {
	return append(append(cmd, t.tokenArgs()...), extra...)
}
