package softhsmtest

import (
	"os"
	"testing"

	"github.com/hsmagent/hsmagent/agent/agenttest"
	"github.com/hsmagent/hsmagent/agent/server"
	"github.com/hsmagent/hsmagent/hsm"
	"github.com/hsmagent/hsmagent/hsm/hsmstore"
)

// SocketDir returns a short-lived directory for sockets (see agenttest.SocketDir).
func SocketDir(tb testing.TB) string {
	tb.Helper()
	return agenttest.SocketDir(tb)
}

// Agent is an agent server running in the test process on a real Unix socket.
type Agent = agenttest.Agent

// StartAgent serves the token's keys on a new socket until the test ends. A
// nil opts.Logger discards logs.
func StartAgent(tb testing.TB, tok *hsm.Token, opts server.Options) *Agent {
	tb.Helper()
	return agenttest.Start(tb, hsmstore.New(tok), opts)
}

// StartAgentAt is StartAgent on a given socket path and mode.
func StartAgentAt(tb testing.TB, path string, mode os.FileMode, tok *hsm.Token, opts server.Options) *Agent {
	tb.Helper()
	return agenttest.StartAt(tb, path, mode, hsmstore.New(tok), opts)
}
