package softhsmtest

import (
	"encoding/json"
	"strings"
	"testing"
	"time"
)

// TestBenchSeveralConcurrencies runs a short "hsmagent bench" at two
// concurrencies through the fault module (1 ms per signature) and checks
// that the table and the JSON give every phase at each, with the ratios.
func TestBenchSeveralConcurrencies(t *testing.T) {
	fx := New(t)
	fx.ok(t, fx.args([]string{"keys", "generate"}, "--label", "bk", "--type", "ecdsa-p256")...)
	fm := NewFaultModule(t, fx)
	fm.SetSignLatency(time.Millisecond)
	bench := func(extra ...string) result {
		r := fx.hsmagentEnv(t, fm.Env(), fx.args([]string{"bench"},
			append([]string{"--key", "bk", "--duration", "200ms", "--concurrency", "1,4"}, extra...)...)...)
		if r.code != 0 {
			t.Fatalf("hsmagent bench: exit %d\n%s%s", r.code, r.stdout, r.stderr)
		}
		return r
	}

	out := bench().stdout
	for _, want := range []string{"sign in-process", "sign via agent", "TLS 1.3 handshake via agent",
		"1 caller: agent/in-process signatures", "4 callers: agent/in-process signatures", "through the agent",
		"1 caller: this machine's floor", "with the three on one CPU"} {
		if !strings.Contains(out, want) {
			t.Errorf("bench output lacks %q:\n%s", want, out)
		}
	}

	var report struct {
		Results []struct {
			Name        string  `json:"name"`
			Concurrency int     `json:"concurrency"`
			Ops         int     `json:"ops"`
			P50         int64   `json:"p50"`
			P99         int64   `json:"p99"`
			PerSecond   float64 `json:"perSecond"`
		} `json:"results"`
		Runs []struct {
			Concurrency  int     `json:"concurrency"`
			SignRatio    float64 `json:"signRatio"`
			TLSRatio     float64 `json:"tlsRatio"`
			SignP50Added int64   `json:"signP50Added"`
			Floor        *int64  `json:"floorP50Added"`
			FloorOneCPU  *int64  `json:"floorOneCpuP50Added"`
		} `json:"runs"`
		SignRatio float64 `json:"signRatio"`
	}
	r := bench("--json")
	if err := json.Unmarshal([]byte(r.stdout), &report); err != nil {
		t.Fatalf("bench --json: %v\n%s", err, r.stdout)
	}
	if len(report.Results) != 8 || len(report.Runs) != 2 {
		t.Fatalf("bench --json at 1,4: %d results and %d runs, want 8 and 2:\n%s", len(report.Results), len(report.Runs), r.stdout)
	}
	for i, res := range report.Results {
		if want := []int{1, 4}[i/4]; res.Concurrency != want || res.Ops == 0 || res.P50 <= 0 || res.P99 < res.P50 {
			t.Errorf("result %d: %+v; want concurrency %d with ops and p50 <= p99", i, res, want)
		}
	}
	for i, run := range report.Runs {
		if run.Concurrency != []int{1, 4}[i] || run.SignRatio <= 0 || run.TLSRatio <= 0 {
			t.Errorf("run %d: %+v", i, run)
		}
	}
	// The machine's floor is measured at one caller only.
	if report.Runs[0].Floor == nil || report.Runs[0].FloorOneCPU == nil || report.Runs[1].Floor != nil || report.Runs[1].FloorOneCPU != nil {
		t.Errorf("floorP50Added: want it at 1 caller only:\n%s", r.stdout)
	}
	if report.SignRatio != report.Runs[0].SignRatio {
		t.Errorf("top-level signRatio %v is not the first run's %v", report.SignRatio, report.Runs[0].SignRatio)
	}
	if fm.Calls("sign") == 0 {
		t.Error("the bench did not sign through the fault module")
	}
}
