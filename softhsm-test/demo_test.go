package softhsmtest

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// TestDemo runs demo.sh, what `make demo` runs, on its own throwaway token
// and checks each step reached its end: nothing else runs the demo, and a
// fresh machine's first impression must not rot.
func TestDemo(t *testing.T) {
	if testing.Short() {
		t.Skip("the demo takes about 10 s")
	}
	dir := filepath.Dir(binary)
	build := exec.Command("go", "build", "-o", dir+"/", "./cmd/mtls-get", "./cmd/echo-backend")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("building the demo's helpers: %v\n%s", err, out)
	}
	cmd := exec.Command("bash", "demo.sh", binary)
	var env []string // the demo makes its own token: none of the caller's settings
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "HSMAGENT_") && !strings.HasPrefix(kv, "SOFTHSM2_CONF=") {
			env = append(env, kv)
		}
	}
	cmd.Env = append(env, "NO_COLOR=1")
	out, err := cmd.CombinedOutput()
	text := string(out)
	if err != nil {
		t.Fatalf("demo.sh: %v\n%s", err, text)
	}
	for _, want := range []string{
		"== done: the agent stopped cleanly and the private key never left the token",
		"through the agent at ", // the rotation's commands, with no PIN
		"promoted the successor of key \"d1-ppr-mtls\"",
		"backend: X-D1-Client-Subject: CN=TLSMA-ECDSA/DEMOISSUER/PPR",
	} {
		if !strings.Contains(text, want) {
			t.Errorf("the demo's output lacks %q:\n%s", want, text)
		}
	}
	// Two mTLS requests accepted by openssl s_server -Verify: before and after the rotation.
	if n := len(regexp.MustCompile(`(?m)^HTTP 200 ok from https://localhost:`).FindAllString(text, -1)); n != 2 {
		t.Errorf("%d mTLS requests answered, want 2 (before and after the rotation):\n%s", n, text)
	}
}
