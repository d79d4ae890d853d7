package worker_test

import (
	"crypto"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	softhsmtest "github.com/hsmagent/hsmagent/softhsm-test"
)

// TestWorkerReadersFollowLoad: the worker's session goroutines wait in a
// read of the signatures socket only as many as the requests need. After
// a burst on every session, signatures one at a time leave one to three
// threads in that read (all 16 stayed there, before), and the next burst
// still finds every session.
func TestWorkerReadersFollowLoad(t *testing.T) {
	const sessions = 16
	before := softhsmtest.ChildPIDs(t)
	f := startSessions(t, 0, sessions)
	pid := softhsmtest.NewChild(t, before)
	ec := f.signer(t, "ec")
	burst := func() time.Duration {
		t.Helper()
		begin := time.Now()
		var wg sync.WaitGroup
		for range sessions {
			wg.Go(func() {
				if _, err := ec.Sign(nil, digest[:], crypto.SHA256); err != nil {
					t.Error(err)
				}
			})
		}
		wg.Wait()
		return time.Since(begin)
	}
	const latency = 50 * time.Millisecond
	f.fm.SetSignLatency(latency)
	if d := burst(); d > 4*latency {
		t.Fatalf("%d signatures of %v on %d sessions took %v: they did not overlap", sessions, latency, sessions, d)
	}
	f.fm.SetSignLatency(5 * time.Millisecond)
	for range 3 * sessions {
		if _, err := ec.Sign(nil, digest[:], crypto.SHA256); err != nil {
			t.Fatal(err)
		}
	}
	if n := readersOf(t, pid); n < 1 || n > 3 {
		t.Fatalf("%d threads read the signatures socket after signatures one at a time; want 1 to 3", n)
	}
	f.fm.SetSignLatency(latency)
	if d := burst(); d > 4*latency {
		t.Fatalf("%d signatures of %v after a quiet spell took %v: the parked sessions were not woken", sessions, latency, d)
	}
}

// readersOf counts the threads of process pid waiting in read(2) on fd 4,
// the signatures socket, from /proc/PID/task/*/syscall (the call's number,
// then its arguments).
func readersOf(t *testing.T, pid int) int {
	t.Helper()
	time.Sleep(20 * time.Millisecond) // the last answer's thread goes back to its read
	files, err := filepath.Glob(filepath.Join("/proc", strconv.Itoa(pid), "task", "*", "syscall"))
	if err != nil || len(files) == 0 {
		t.Fatalf("no /proc/%d/task/*/syscall: %v", pid, err)
	}
	read := map[string]string{"amd64": "0", "arm64": "63"}[runtime.GOARCH]
	if read == "" {
		t.Skipf("the number of read(2) on %s is not known here", runtime.GOARCH)
	}
	n := 0
	for _, file := range files {
		b, err := os.ReadFile(file)
		if err != nil {
			continue // the thread has ended
		}
		fs := strings.Fields(string(b))
		if len(fs) >= 2 && fs[0] == read && fs[1] == "0x4" {
			n++
		}
	}
	return n
}
