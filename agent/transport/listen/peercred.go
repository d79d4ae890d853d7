package listen

import (
	"fmt"
	"net"

	"github.com/hsmagent/hsmagent/agent/core"
)

// ReadPeer returns the credentials of the process connected through a Unix socket.
func ReadPeer(conn net.Conn) (core.Peer, error) {
	uc, ok := conn.(*net.UnixConn)
	if !ok {
		return core.Peer{}, fmt.Errorf("agent: connection of type %T is not a Unix socket", conn)
	}
	raw, err := uc.SyscallConn()
	if err != nil {
		return core.Peer{}, fmt.Errorf("agent: reading peer credentials: %w", err)
	}
	var p core.Peer
	var credErr error
	if err := raw.Control(func(fd uintptr) { p, credErr = peerOf(int(fd)) }); err != nil {
		return core.Peer{}, fmt.Errorf("agent: reading peer credentials: %w", err)
	}
	return p, credErr
}
