package core

import (
	"log/slog"
	"testing"
)

// Every Admin outcome has its own audit result: records are searched by it.
func TestAdminOutcomeResults(t *testing.T) {
	seen := map[string]AdminOutcome{}
	for o := AdminDone; o <= AdminFailed; o++ {
		r := o.String()
		if r == "" {
			t.Errorf("outcome %d has no audit result", o)
		}
		if prev, ok := seen[r]; ok {
			t.Errorf("outcomes %d and %d share the audit result %q", prev, o, r)
		}
		seen[r] = o
		if want := slog.LevelWarn; o != AdminDone && o.Level() != want {
			t.Errorf("outcome %q logs at %v, want %v", r, o.Level(), want)
		}
	}
	if AdminDone.String() != "ok" || AdminDone.Level() != slog.LevelInfo {
		t.Errorf("AdminDone = %q at %v, want ok at INFO", AdminDone, AdminDone.Level())
	}
	if int(AdminFailed)+1 != len(adminResults) {
		t.Errorf("%d audit results for %d outcomes", len(adminResults), AdminFailed+1)
	}
}
