//go:build !linux

package server

import "errors"

// peerOf fails: the agent relies on SO_PEERCRED and SO_PEERGROUPS, which
// other systems spell differently (LOCAL_PEERCRED, getpeereid) or lack.
func peerOf(int) (Peer, error) {
	return Peer{}, errors.New("agent: peer credentials need Linux (SO_PEERCRED)")
}
