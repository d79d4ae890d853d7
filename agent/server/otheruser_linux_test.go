package server_test

import (
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

// needOtherUsers skips a test that runs clients as other users where that
// cannot be done (not root, no setpriv), and fails it under CI, which runs
// as root with util-linux: there a skip would hide a test that did not run.
func needOtherUsers(t *testing.T) {
	t.Helper()
	why := ""
	if os.Getuid() != 0 {
		why = "needs root to run clients as other users with setpriv"
	} else if _, err := exec.LookPath("setpriv"); err != nil {
		why = "setpriv (util-linux) is not installed"
	}
	if why == "" {
		return
	}
	if os.Getenv("CI") != "" {
		t.Fatal(why + "; CI must run this test")
	}
	t.Skip(why)
}

// nobody are the setpriv options for uid and gid 65534 without other groups.
var nobody = []string{"--reuid=65534", "--regid=65534", "--clear-groups"}

// clientAs runs bin, a copy of the test binary, in one of its client modes
// (see TestMain) under setpriv with ids, against the agent on socket.
func clientAs(bin, mode, socket string, ids []string, env ...string) *exec.Cmd {
	args := append(append(append([]string{}, ids...), bin), "-test.run=^$")
	cmd := exec.Command("setpriv", args...)
	cmd.Env = append(append(os.Environ(), helperEnv+"="+mode, "HSMAGENT_TEST_SOCKET="+socket), env...)
	return cmd
}

// copyTestBinary puts the test binary where other users can run it.
func copyTestBinary(t *testing.T, dir string) string {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(self)
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "client")
	if err := os.WriteFile(bin, data, 0o755); err != nil {
		t.Fatal(err)
	}
	return bin
}
