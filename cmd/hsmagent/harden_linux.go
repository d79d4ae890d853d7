package main

import (
	"fmt"

	"golang.org/x/sys/unix"
)

// harden keeps the PIN and the HSM sessions in this process's memory out of
// reach: no core file (RLIMIT_CORE 0, soft and hard, so no child of ours can
// raise it again), not dumpable (no ptrace attach or /proc/PID/mem by the
// same user, /proc/PID files owned by root), and files created from now on
// are private to the agent's user (umask 077; the socket's mode is set
// explicitly). prlimit64 and prctl are in systemd's @system-service set
// without @resources, which the shipped unit filters out.
func harden() error {
	if err := unix.Prlimit(0, unix.RLIMIT_CORE, &unix.Rlimit{Cur: 0, Max: 0}, nil); err != nil {
		return fmt.Errorf("hardening: setting RLIMIT_CORE to 0: %w", err)
	}
	if err := unix.Prctl(unix.PR_SET_DUMPABLE, 0, 0, 0, 0); err != nil {
		return fmt.Errorf("hardening: prctl PR_SET_DUMPABLE 0: %w", err)
	}
	unix.Umask(0o077)
	return nil
}
