package server

import (
	"errors"
	"net"
	"time"

	"google.golang.org/grpc"
)

// SetExpiryCheckEvery shortens the daily certificate check for a test.
func SetExpiryCheckEvery(d time.Duration) (restore func()) {
	old := expiryCheckEvery
	expiryCheckEvery = d
	return func() { expiryCheckEvery = old }
}

// ExpiryBand exposes expiryBand to the tests.
var ExpiryBand = expiryBand

// SetHandshakeTimeout shortens the time a connection has to send its first
// bytes, for the Servers made by New after the call.
func SetHandshakeTimeout(d time.Duration) (restore func()) {
	old := handshakeTimeout
	handshakeTimeout = d
	return func() { handshakeTimeout = old }
}

// ServeGRPCOnly serves l as an agent without signing connections does: gRPC
// alone, behind the same connection limits, with no muxListener to tell a
// signing connection from a gRPC one.
func (s *Server) ServeGRPCOnly(l net.Listener) error {
	err := s.grpc.Serve(&limitListener{Listener: l, s: s})
	if errors.Is(err, grpc.ErrServerStopped) {
		return nil
	}
	return err
}

// SetAuditProbeEvery shortens the retry of an audit trail that failed.
func SetAuditProbeEvery(d time.Duration) (restore func()) {
	old := auditProbeEvery
	auditProbeEvery = d
	return func() { auditProbeEvery = old }
}
