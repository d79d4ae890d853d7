package server

import (
	"os"

	"github.com/hsmagent/hsmagent/agent/internal/wire"
)

// Bounds and defaults that the command line shares with the server,
// declared once and imported where needed. (The defaults of Options stand
// beside what they bound: the HSM's in gate.go, the callers' in limits.go.)
const (
	// MaxLabel is the longest key label, in bytes, that the agent takes in
	// a request; the client refuses a longer one before sending it.
	MaxLabel = wire.MaxLabel

	// DefaultSocketMode is the agent socket's permission bits unless the
	// operator chooses others: its owner and group may connect.
	DefaultSocketMode os.FileMode = 0o660
)
