package bench_test

import (
	"context"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/hsmagent/hsmagent/agent/bench"
)

// floorPeerEnv makes the test binary a process of the floor's chain.
const floorPeerEnv = "HSMAGENT_TEST_FLOOR_PEER"

func TestMain(m *testing.M) {
	if role := os.Getenv(floorPeerEnv); role != "" {
		role, wait, _ := strings.Cut(role, ",")
		d, _ := time.ParseDuration(wait)
		var down *os.File
		if role == bench.RoleRelay {
			down = os.NewFile(4, "down")
		}
		if err := bench.ServePeer(role, d, os.NewFile(3, "up"), down); err != nil {
			os.Stderr.WriteString(err.Error() + "\n")
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// spawnTestPeer starts this test binary as a process of the chain and
// records how it exited.
func spawnTestPeer(t *testing.T, exits map[string]error) bench.Spawn {
	return func(role string, wait time.Duration, up, down *os.File) (func() error, error) {
		cmd := exec.Command(os.Args[0], "-test.run=^$")
		cmd.Env = append(os.Environ(), floorPeerEnv+"="+role+","+wait.String())
		cmd.Stderr = os.Stderr
		cmd.ExtraFiles = []*os.File{up}
		if down != nil {
			cmd.ExtraFiles = append(cmd.ExtraFiles, down)
		}
		if err := cmd.Start(); err != nil {
			return nil, err
		}
		return func() error { exits[role] = cmd.Wait(); return exits[role] }, nil
	}
}

// TestFloorCrossesBothPeers: every round through the chain waits at its
// far end (a relay that answered by itself would come back at once), and
// both peers exit when the caller is done.
func TestFloorCrossesBothPeers(t *testing.T) {
	const wait = 2 * time.Millisecond
	exits := map[string]error{}
	r, err := bench.Floor(context.Background(), wait, 300*time.Millisecond, spawnTestPeer(t, exits))
	if err != nil {
		t.Fatal(err)
	}
	if r.Wait != wait || r.Alone < wait || r.Chain < wait {
		t.Errorf("floor %+v: want the wait %v, and at least that alone and through the chain", r, wait)
	}
	if r.Added() != r.Chain-r.Alone {
		t.Errorf("Added() = %v, want %v", r.Added(), r.Chain-r.Alone)
	}
	for _, role := range []string{bench.RoleRelay, bench.RoleHSM} {
		if err, ok := exits[role]; !ok || err != nil {
			t.Errorf("the %s peer: exited %v (waited for: %v), want a clean exit once Floor returns", role, err, ok)
		}
	}
}

func TestFloorErrors(t *testing.T) {
	if _, err := bench.Floor(context.Background(), 0, time.Second, nil); err == nil || !strings.Contains(err.Error(), "wait must be positive") {
		t.Errorf("Floor with no wait: %v", err)
	}
	failing := func(string, time.Duration, *os.File, *os.File) (func() error, error) { return nil, os.ErrPermission }
	if _, err := bench.Floor(context.Background(), time.Millisecond, time.Second, failing); err == nil || !strings.Contains(err.Error(), "starting the floor's relay") {
		t.Errorf("Floor whose relay cannot start: %v", err)
	}
	if err := bench.ServePeer("agent", time.Millisecond, os.Stdin, nil); err == nil || !strings.Contains(err.Error(), `no floor role "agent"`) {
		t.Errorf("ServePeer of an unknown role: %v", err)
	}
	if err := bench.ServePeer(bench.RoleRelay, time.Millisecond, os.Stdin, nil); err == nil {
		t.Error("ServePeer: a relay with nothing towards the HSM end served")
	}
}
