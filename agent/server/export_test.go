package server

import (
	"net"
	"time"

	"github.com/hsmagent/hsmagent/agent/transport/listen"
)

// SetExpiryCheckEvery shortens the daily certificate check for the Servers
// made by New after the call.
func SetExpiryCheckEvery(d time.Duration) (restore func()) {
	old := expiryCheckEvery
	expiryCheckEvery = d
	return func() { expiryCheckEvery = old }
}

// SetHandshakeTimeout shortens the time a connection has to send its first
// bytes, for the Servers made by New after the call.
func SetHandshakeTimeout(d time.Duration) (restore func()) {
	old := handshakeTimeout
	handshakeTimeout = d
	return func() { handshakeTimeout = old }
}

// ServeGRPCOnly serves l as an agent without signing connections does: gRPC
// alone, behind the same connection limits, with nothing to tell a signing
// connection from a gRPC one.
func (s *Server) ServeGRPCOnly(l net.Listener) error {
	s.core.Start()
	return s.grpc.Serve(listen.Admitted(l, s.core))
}

// SetAuditProbeEvery shortens the retry of an audit trail that failed, for
// the Servers made by New after the call.
func SetAuditProbeEvery(d time.Duration) (restore func()) {
	old := auditProbeEvery
	auditProbeEvery = d
	return func() { auditProbeEvery = old }
}
