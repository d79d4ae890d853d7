package agent_test

import (
	"os"
	"os/exec"
	"testing"
)

// TestClientPackagesBuildWithoutCgo: Go services use the client library, the
// D1 profiles and the proxy without the HSM's cgo dependencies, so they can
// still be built as static binaries.
func TestClientPackagesBuildWithoutCgo(t *testing.T) {
	if testing.Short() {
		t.Skip("builds packages")
	}
	cmd := exec.Command("go", "build", "-o", os.DevNull, "github.com/hsmagent/hsmagent/agent", "github.com/hsmagent/hsmagent/agent/d1", "github.com/hsmagent/hsmagent/agent/proxy")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("CGO_ENABLED=0 go build: %v\n%s", err, out)
	}
}
