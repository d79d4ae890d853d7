package softhsmtest

import (
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/hsmagent/hsmagent/hsm"
)

// TestFaultSleepCounters: the module counts its latency sleeps and what
// they took, so that a process's wake-up delay can be read beside another's;
// a %p in HSMAGENT_FAULT_STATS gives each process a file of its own.
func TestFaultSleepCounters(t *testing.T) {
	fm := NewFaultModule(t, New(t))
	own := filepath.Join(t.TempDir(), "fault.%p.stats")
	t.Setenv("HSMAGENT_FAULT_STATS", own) // before this process loads its copy
	tok, err := hsm.Open(fm.Config())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tok.Close() })
	if _, err := tok.GenerateKey("fault-key", hsm.ECDSAP256, nil); err != nil {
		t.Fatal(err)
	}
	s, err := tok.Signer("fault-key")
	if err != nil {
		t.Fatal(err)
	}
	const latency, n = 3 * time.Millisecond, 5
	fm.SetSignLatency(latency)
	for range n {
		if err := signOnce(t, s); err != nil {
			t.Fatal(err)
		}
	}
	path := filepath.Join(filepath.Dir(own), "fault."+strconv.Itoa(os.Getpid())+".stats")
	all, err := readFaultStats(path)
	if err != nil {
		t.Fatal(err)
	}
	st := all["sign"]
	if st.Calls != n || st.Slept != n {
		t.Fatalf("%s: sign calls %d, slept %d; want %d and %d", path, st.Calls, st.Slept, n, n)
	}
	if st.SleptNS < n*int(latency) || st.LateNS < 0 || st.LateNS != st.SleptNS-n*int(latency) {
		t.Fatalf("%s: slept %v in all, late %v; want at least %v, and late the difference", path,
			time.Duration(st.SleptNS), time.Duration(st.LateNS), n*latency)
	}
	if got := fm.Stats("sign"); got.Calls != 0 {
		t.Fatalf("the shared stats file %s counted %d sign calls; this process counts in its own", fm.StatsFile, got.Calls)
	}
}
