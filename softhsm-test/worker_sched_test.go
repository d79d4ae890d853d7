package softhsmtest

import (
	"crypto"
	"crypto/sha256"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/hsmagent/hsmagent/agent/core"
	"github.com/hsmagent/hsmagent/hsm"
	"github.com/hsmagent/hsmagent/hsm/worker"
)

// TestWorkerQuietAtOneCaller: the HSM worker as serve starts it (a
// scheduler slot per session) sleeps between signatures at one caller on
// the network shape: its threads block about four times a signature (the
// read that waits for it, the HSM's wait, the runtime's monitor now and
// then). Before, its session goroutines, which only ever wait in system
// calls and C, looked to the monitor like goroutines running without a
// break, and each read that waited past 10 ms held a P the monitor took
// back: either kept the monitor polling every 20 µs: 10 to 15 blocks a
// signature and half of the worker's CPU.
func TestWorkerQuietAtOneCaller(t *testing.T) {
	fm := NewFaultModule(t, New(t))
	fm.SetReplay(true)
	tok, err := hsm.Open(fm.Config())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tok.GenerateKey("ec", hsm.ECDSAP256, nil); err != nil {
		t.Fatal(err)
	}
	tok.Close()
	fm.SetSignLatency(2 * time.Millisecond)
	before := ChildPIDs(t)
	cfg := fm.Config()
	store, err := worker.Start(worker.Options{Command: []string{binary, "hsm-worker"}, PIN: cfg.PIN,
		Init: worker.Init{ModulePath: cfg.ModulePath, TokenLabel: cfg.TokenLabel, MaxSessions: core.DefaultMaxInFlight + 1}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close() })
	pid := NewChild(t, before)
	if _, err := store.Keys(); err != nil {
		t.Fatal(err)
	}
	s, err := store.Signer("ec")
	if err != nil {
		t.Fatal(err)
	}
	digest := sha256.Sum256([]byte("one caller"))
	sign := func(n int) {
		for range n {
			if _, err := s.Sign(nil, digest[:], crypto.SHA256); err != nil {
				t.Fatal(err)
			}
		}
	}
	sign(100) // the replay table, the sessions' first calls, the readers settling
	const n = 400
	b0 := blocks(t, pid)
	sign(n)
	per := float64(blocks(t, pid)-b0) / n
	t.Logf("the worker's threads blocked %.1f times a signature", per)
	if per > 6 {
		t.Fatalf("the worker's threads blocked %.1f times a signature at one caller; want at most 6", per)
	}
}

// blocks is how many times the threads of process pid have blocked
// (voluntary context switches), from /proc/PID/task/*/status.
func blocks(t *testing.T, pid int) int {
	t.Helper()
	files, err := filepath.Glob(filepath.Join("/proc", strconv.Itoa(pid), "task", "*", "status"))
	if err != nil || len(files) == 0 {
		t.Fatalf("no /proc/%d/task/*/status: %v", pid, err)
	}
	n := 0
	for _, file := range files {
		b, err := os.ReadFile(file)
		if err != nil {
			continue // the thread has ended
		}
		for _, line := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(line, "voluntary_ctxt_switches:"); ok {
				c, _ := strconv.Atoi(strings.TrimSpace(v))
				n += c
			}
		}
	}
	return n
}
