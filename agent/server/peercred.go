package server

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os/user"
	"strconv"
	"syscall"

	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
)

// Peer is the process on the other end of a socket connection, as the
// kernel reports it (SO_PEERCRED) when the connection is accepted.
type Peer struct {
	UID, GID, PID int
	// Groups are the peer user's supplementary group ids from the user
	// database, so group rules also match members whose primary group differs.
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
	var cred *syscall.Ucred
	var credErr error
	if err := raw.Control(func(fd uintptr) {
		cred, credErr = syscall.GetsockoptUcred(int(fd), syscall.SOL_SOCKET, syscall.SO_PEERCRED)
	}); err != nil {
		return Peer{}, fmt.Errorf("agent: reading peer credentials: %w", err)
	}
	if credErr != nil {
		return Peer{}, fmt.Errorf("agent: reading peer credentials: %w", credErr)
	}
	p := Peer{UID: int(cred.Uid), GID: int(cred.Gid), PID: int(cred.Pid)}
	if u, err := user.LookupId(strconv.Itoa(p.UID)); err == nil {
		if ids, err := u.GroupIds(); err == nil {
			for _, id := range ids {
				if n, err := strconv.Atoi(id); err == nil {
					p.Groups = append(p.Groups, n)
				}
			}
		}
	}
	return p, nil
}

func peerFrom(ctx context.Context) (Peer, error) {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return Peer{}, errors.New("agent: no peer in context")
	}
	cred, ok := p.AuthInfo.(Peer)
	if !ok {
		return Peer{}, errors.New("agent: connection has no peer credentials")
	}
	return cred, nil
}
