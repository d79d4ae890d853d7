//go:build linux

package bench_test

import (
	"context"
	"errors"
	"fmt"
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
		if err := bench.ServeInheritedPeer(role, d); err != nil {
			os.Stderr.WriteString(err.Error() + "\n")
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// peer is a process of the chain that spawnTestPeer started.
type peer struct {
	role string
	cpus string // its Cpus_allowed_list when it started
	exit error
}

// spawnTestPeer starts this test binary as a process of the chain and
// records its CPUs and how it exited.
func spawnTestPeer(t *testing.T, peers *[]*peer) bench.Spawn {
	return func(role string, wait time.Duration, up, down *os.File) (func() error, error) {
		cmd := exec.Command(os.Args[0], "-test.run=^$")
		cmd.Env = append(os.Environ(), floorPeerEnv+"="+role+","+wait.String())
		cmd.Stderr = os.Stderr
		exited, err := bench.StartPeer(cmd, up, down)
		if err != nil {
			return nil, err
		}
		p := &peer{role: role, exit: errors.New("not waited for"), cpus: cpusAllowed(t, cmd.Process.Pid)}
		*peers = append(*peers, p)
		return func() error { p.exit = exited(); return p.exit }, nil
	}
}

func cpusAllowed(t *testing.T, pid int) string {
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(status), "\n") {
		if v, ok := strings.CutPrefix(line, "Cpus_allowed_list:"); ok {
			return strings.TrimSpace(v)
		}
	}
	t.Fatalf("no Cpus_allowed_list in /proc/%d/status", pid)
	return ""
}

// TestFloorCrossesBothPeers: every round through either chain waits at its
// far end (a relay that answered by itself would come back at once), the
// second chain's processes are on one CPU, and all exit once Floor is done.
func TestFloorCrossesBothPeers(t *testing.T) {
	const wait = 2 * time.Millisecond
	var peers []*peer
	r, err := bench.Floor(context.Background(), wait, 400*time.Millisecond, spawnTestPeer(t, &peers))
	if err != nil {
		t.Fatal(err)
	}
	if r.Wait != wait || r.Alone < wait || r.Chain < wait || r.ChainOneCPU < wait {
		t.Errorf("floor %+v: want the wait %v, and at least that alone and through both chains", r, wait)
	}
	if r.Added() != r.Chain-r.Alone || r.AddedOneCPU() != r.ChainOneCPU-r.Alone {
		t.Errorf("floor %+v: Added() = %v, AddedOneCPU() = %v", r, r.Added(), r.AddedOneCPU())
	}
	roles := []string{bench.RoleRelay, bench.RoleHSM, bench.RoleRelay, bench.RoleHSM}
	if len(peers) != len(roles) {
		t.Fatalf("%d peers started, want %d", len(peers), len(roles))
	}
	for i, p := range peers {
		if p.role != roles[i] || p.exit != nil {
			t.Errorf("peer %d: %s exited %v, want %s exited cleanly once Floor returned", i, p.role, p.exit, roles[i])
		}
		if oneCPU := !strings.ContainsAny(p.cpus, ",-"); i >= 2 && !oneCPU {
			t.Errorf("peer %d of the one-CPU chain may run on CPUs %s", i, p.cpus)
		}
	}
	if self := cpusAllowed(t, os.Getpid()); peers[0].cpus != self {
		t.Errorf("the first chain's relay may run on CPUs %s, the test on %s: want the same", peers[0].cpus, self)
	}
}

// TestFloorStuckPeer: a relay that takes the message and never answers
// ends the floor with an error in bounded time, and the peers are stopped.
func TestFloorStuckPeer(t *testing.T) {
	stuck := func(role string, wait time.Duration, up, down *os.File) (func() error, error) {
		cmd := exec.Command("sleep", "60") // holds the sockets, reads nothing
		cmd.ExtraFiles = []*os.File{up}
		if err := cmd.Start(); err != nil {
			return nil, err
		}
		return func() error { cmd.Process.Kill(); return cmd.Wait() }, nil
	}
	start := time.Now()
	_, err := bench.Floor(context.Background(), time.Millisecond, time.Second, stuck)
	if err == nil || !strings.Contains(err.Error(), "gave no answer within 1.1s") {
		t.Fatalf("Floor with a stuck relay: %v", err)
	}
	if took := time.Since(start); took > 10*time.Second {
		t.Errorf("Floor with a stuck relay took %v", took)
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
	if err := bench.ServePeer(bench.RoleHSM, -time.Millisecond, os.Stdin, nil); err == nil || !strings.Contains(err.Error(), "not positive") {
		t.Errorf("ServePeer with a negative wait: %v", err)
	}
	file, err := os.Create(t.TempDir() + "/not-a-socket")
	if err != nil {
		t.Fatal(err)
	}
	defer file.Close()
	if err := bench.ServePeer(bench.RoleHSM, time.Millisecond, file, nil); err == nil || !strings.Contains(err.Error(), "is not a socket") {
		t.Errorf("ServePeer on a file: %v", err)
	}
}
