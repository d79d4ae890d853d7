package agent_test

import (
	"os"
	"os/exec"
	"testing"
)

// TestAgentPackagesBuildWithoutCgo: Go services use the client library, the
// D1 profiles, the proxy and the in-memory agent for their tests without the
// HSM's cgo dependencies, so they can be built as static binaries. The
// server's own tests compile without cgo too: they run on the in-memory store.
func TestAgentPackagesBuildWithoutCgo(t *testing.T) {
	if testing.Short() {
		t.Skip("builds packages")
	}
	for _, args := range [][]string{
		{"build", "-o", os.DevNull, "github.com/hsmagent/hsmagent/agent/..."},
		{"test", "-c", "-o", os.DevNull, "github.com/hsmagent/hsmagent/agent/server"},
	} {
		cmd := exec.Command("go", args...)
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("CGO_ENABLED=0 go %v: %v\n%s", args, err, out)
		}
	}
}
