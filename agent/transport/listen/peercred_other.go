//go:build !linux

package listen

import (
	"errors"

	"github.com/hsmagent/hsmagent/agent/core"
)

// peerOf fails: the agent relies on SO_PEERCRED and SO_PEERGROUPS, which
// other systems spell differently (LOCAL_PEERCRED, getpeereid) or lack.
func peerOf(int) (core.Peer, error) {
	return core.Peer{}, errors.New("agent: peer credentials need Linux (SO_PEERCRED)")
}
