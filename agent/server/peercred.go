package server

import (
	"context"
	"errors"
	"fmt"
	"net"

	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
)

// Peer is the process on the other end of a socket connection, as the
// kernel reports it when the connection is accepted: effective uid and gid
// and pid from SO_PEERCRED, supplementary groups from SO_PEERGROUPS. All are
// the caller's credentials at connect(2).
type Peer struct {
	UID, GID, PID int
	// Groups are the supplementary group ids the peer's process held. They
	// come from the kernel, never from the user database: a user listed in
	// /etc/group who dropped the group (setpriv --clear-groups, a service
	// without SupplementaryGroups=) does not have it, and one given a group
	// at run time does.
	Groups []int
}

// AuthType implements credentials.AuthInfo.
func (Peer) AuthType() string { return "peercred" }

// peerCredentials reads SO_PEERCRED at accept time. It adds no encryption:
// the socket never leaves the host and its file mode guards who connects.
type peerCredentials struct{}

var _ credentials.TransportCredentials = peerCredentials{}

func (peerCredentials) ClientHandshake(_ context.Context, _ string, conn net.Conn) (net.Conn, credentials.AuthInfo, error) {
	return conn, Peer{}, nil
}

func (peerCredentials) ServerHandshake(conn net.Conn) (net.Conn, credentials.AuthInfo, error) {
	switch pc := conn.(type) { // read at accept
	case *peerConn:
		return conn, connAuth{pc.peer, pc}, nil
	case *replayConn:
		return conn, connAuth{pc.peer, pc.peerConn}, nil
	}
	p, err := ReadPeer(conn)
	if err != nil {
		return nil, nil, err
	}
	return conn, p, nil
}

func (peerCredentials) Info() credentials.ProtocolInfo {
	return credentials.ProtocolInfo{SecurityProtocol: "peercred"}
}
func (c peerCredentials) Clone() credentials.TransportCredentials { return c }
func (peerCredentials) OverrideServerName(string) error           { return nil }

// ReadPeer returns the credentials of the process connected through a Unix socket.
func ReadPeer(conn net.Conn) (Peer, error) {
	uc, ok := conn.(*net.UnixConn)
	if !ok {
		return Peer{}, fmt.Errorf("agent: connection of type %T is not a Unix socket", conn)
	}
	raw, err := uc.SyscallConn()
	if err != nil {
		return Peer{}, fmt.Errorf("agent: reading peer credentials: %w", err)
	}
	var p Peer
	var credErr error
	if err := raw.Control(func(fd uintptr) { p, credErr = peerOf(int(fd)) }); err != nil {
		return Peer{}, fmt.Errorf("agent: reading peer credentials: %w", err)
	}
	return p, credErr
}

// connAuth is the AuthInfo of a connection admitted by limitListener: the
// peer, and the connection, for closing it when the peer stalls.
type connAuth struct {
	Peer
	conn *peerConn
}

func peerFrom(ctx context.Context) (Peer, error) {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return Peer{}, errors.New("agent: no peer in context")
	}
	switch cred := p.AuthInfo.(type) {
	case Peer:
		return cred, nil
	case connAuth:
		return cred.Peer, nil
	}
	return Peer{}, errors.New("agent: connection has no peer credentials")
}

// closeConn closes the connection of the call with ctx, if it can.
func closeConn(ctx context.Context) {
	if p, ok := peer.FromContext(ctx); ok {
		if a, ok := p.AuthInfo.(connAuth); ok {
			a.conn.Close()
		}
	}
}
