package softhsmtest

import (
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
)

// ChildPIDs lists this process's child processes (each thread's: a child
// belongs to the thread that forked it).
func ChildPIDs(tb testing.TB) []int {
	tb.Helper()
	tasks, err := filepath.Glob("/proc/self/task/*/children")
	if err != nil || len(tasks) == 0 {
		tb.Fatalf("no /proc/self/task/*/children: %v", err)
	}
	var pids []int
	for _, task := range tasks {
		b, err := os.ReadFile(task)
		if err != nil {
			continue // the thread has ended
		}
		for _, f := range strings.Fields(string(b)) {
			n, _ := strconv.Atoi(f)
			pids = append(pids, n)
		}
	}
	return pids
}

// NewChild is the one child process started since ChildPIDs gave before
// (the HSM worker a store started); the test fails unless there is one.
func NewChild(tb testing.TB, before []int) int {
	tb.Helper()
	var pids []int
	for _, pid := range ChildPIDs(tb) {
		if !slices.Contains(before, pid) {
			pids = append(pids, pid)
		}
	}
	if len(pids) != 1 {
		tb.Fatalf("new child processes: %v; want one", pids)
	}
	return pids[0]
}
