//go:build !linux

package main

import "errors"

// harden is implemented for Linux only: an agent holding a PIN must not run
// where its core files and debugger access cannot be turned off.
func harden() error {
	return errors.New("hardening: no core-dump and ptrace protection on this system; hsmagent serve runs on Linux only")
}
