package server_test

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/json"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hsmagent/hsmagent/agent/agenttest"
	"github.com/hsmagent/hsmagent/agent/server"
)

const day = 24 * time.Hour

// fakeClock is a clock the test moves.
type fakeClock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *fakeClock) Now() time.Time  { c.mu.Lock(); defer c.mu.Unlock(); return c.now }
func (c *fakeClock) Set(t time.Time) { c.mu.Lock(); c.now = t; c.mu.Unlock() }

// logLines is a slog JSON sink the test reads from while the agent writes.
type logLines struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (l *logLines) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.Write(p)
}

// expiry returns the expiry warnings logged so far as "key:threshold" (or
// "key:expired") and forgets them.
func (l *logLines) expiry(t *testing.T) []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []string
	for _, line := range strings.Split(strings.TrimSpace(l.buf.String()), "\n") {
		if line == "" {
			continue
		}
		var rec struct {
			Msg       string
			Key       string
			Threshold int `json:"threshold_days"`
		}
		if err := json.Unmarshal([]byte(line), &rec); err != nil {
			t.Fatalf("log line not JSON: %q", line)
		}
		switch {
		case strings.Contains(rec.Msg, "has expired"):
			out = append(out, rec.Key+":expired")
		case rec.Threshold != 0:
			out = append(out, rec.Key+":"+itoa(rec.Threshold))
		}
	}
	l.buf.Reset()
	return out
}

func itoa(n int) string { b, _ := json.Marshal(n); return string(b) }

func withCert(t *testing.T, store *server.MemoryStore, label string, notAfter time.Time) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	cert := agenttest.SelfSigned(t, key, label, notAfter)
	if err := store.Add(label, key, []*x509.Certificate{cert}); err != nil {
		t.Fatal(err)
	}
}

// TestExpiryWarnings: the log warns at start for every certificate within
// 30 days, then once as each crosses 14, 7 and 1 days and expires (not
// every day), and again for all of them after a reload.
func TestExpiryWarnings(t *testing.T) {
	defer server.SetExpiryCheckEvery(5 * time.Millisecond)()
	start := time.Date(2030, 1, 1, 12, 0, 0, 0, time.UTC)
	clock := &fakeClock{now: start}
	store := server.NewMemoryStore()
	withCert(t, store, "a", start.Add(20*day))  // within 30 days at start
	withCert(t, store, "b", start.Add(100*day)) // far
	if _, err := store.Generate("jwt", "ecdsa-p256"); err != nil {
		t.Fatal(err)
	}
	logs := &logLines{}
	a := agenttest.Start(t, store, server.Options{Logger: slog.New(slog.NewJSONHandler(logs, nil)), Now: clock.Now})

	if got := logs.expiry(t); strings.Join(got, " ") != "a:30" {
		t.Fatalf("at start: %q, want [a:30]", got)
	}
	// Each step is a day the ticker sees; the warnings come once per band.
	steps := []struct {
		at   time.Duration // since start
		want string
	}{
		{day, ""},         // 19 days left: still the 30-day band, said already
		{6 * day, "a:14"}, // 14 days left
		{7 * day, ""},     // 13
		{13 * day, "a:7"}, // 7
		{19 * day, "a:1"}, // 1
		{20*day + time.Hour, "a:expired"},
		{21 * day, ""},
		{70 * day, "b:30"}, // 30 days left for b
	}
	for _, st := range steps {
		clock.Set(start.Add(st.at))
		var got []string
		for deadline := time.Now().Add(5 * time.Second); st.want != "" && len(got) == 0 && time.Now().Before(deadline); {
			time.Sleep(5 * time.Millisecond)
			got = logs.expiry(t)
		}
		time.Sleep(50 * time.Millisecond) // several more ticks: a band is announced once
		if got := strings.Join(append(got, logs.expiry(t)...), " "); got != st.want {
			t.Errorf("at start+%v: warnings %q, want %q", st.at, got, st.want)
		}
	}
	if err := a.Server.Reload(nil); err != nil {
		t.Fatal(err)
	}
	time.Sleep(20 * time.Millisecond)
	if got := strings.Join(logs.expiry(t), " "); got != "a:expired b:30" {
		t.Errorf("after reload: %q, want both again", got)
	}
}
