//go:build !linux

package framed

import "net"

// peerHungUp is not implemented here: a hang-up is noticed at the next read
// or write instead.
func peerHungUp(*net.UnixConn) bool { return false }
