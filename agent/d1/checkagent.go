package d1

import (
	"fmt"
	"io/fs"
)

// SocketFile is what the file system says of the agent's socket.
type SocketFile struct {
	Path         string
	Found        bool
	Mode         fs.FileMode // with its type bits
	Owner, Group string      // names, or numeric ids where the host has no name
}

// CheckSocket checks that the agent's socket is there and not open to every
// user of the host. A failure means there is no agent to dial.
func CheckSocket(s SocketFile) Finding {
	switch {
	case !s.Found:
		return failed(SocketCheck, "", fmt.Sprintf("no socket at %q", s.Path), "start the agent (hsmagent serve, or systemctl start hsmagent) or correct the socket path")
	case s.Mode&fs.ModeSocket == 0:
		return failed(SocketCheck, "", fmt.Sprintf("%q is not a socket", s.Path), "correct the socket path")
	}
	perm := s.Mode.Perm()
	detail := fmt.Sprintf("%s: owner %s, group %s, mode %04o", s.Path, s.Owner, s.Group, perm)
	if perm&0o007 != 0 {
		return warned(SocketCheck, "", detail+": every user of the host may connect (access rules still apply)",
			`set socket_mode: "0660" and put the backend users in the socket's group`)
	}
	return passed(SocketCheck, "", "%s", detail)
}

// AgentAnswer is what the agent said when asked for its keys and health.
type AgentAnswer struct {
	DialErr error  // the agent could not be reached: nothing else was asked
	Err     error  // listing the keys or the health failed
	Health  string // "SERVING" when the agent can sign
	Version string // "" when the agent did not say
	Keys    int    // keys offered to the calling user
}

// CheckAgent checks that the agent answered and is serving.
func CheckAgent(a AgentAnswer) Finding {
	switch {
	case a.DialErr != nil:
		return failed(AgentCheck, "", a.DialErr.Error(), "start the agent (hsmagent serve) and check that this user may open the socket")
	case a.Err != nil:
		return failed(AgentCheck, "", a.Err.Error(), "see the agent's log")
	case a.Health != "SERVING":
		return failed(AgentCheck, "", "agent health is "+a.Health, "the HSM does not answer in time: see the agent's log and the HSM")
	}
	v := a.Version
	if v == "" {
		v = "unknown"
	}
	return passed(AgentCheck, "", "version %s, SERVING, %d key(s) offered to this user", v, a.Keys)
}
