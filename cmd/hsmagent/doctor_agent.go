package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/user"
	"strconv"
	"syscall"
	"time"

	"github.com/hsmagent/hsmagent/agent"
	"github.com/hsmagent/hsmagent/agent/d1"
	"github.com/urfave/cli/v2"
)

// The agent's client is what the online checks present keys through.
var _ d1.Credentials = (*agent.Client)(nil)

// checkAgent looks at the socket, then asks the agent for its keys and
// health. The client is nil when the agent could not be dialled, the keys
// nil when it did not list them.
func checkAgent(c *cli.Context, timeout time.Duration) (*agent.Client, []agent.Key, []d1.Finding) {
	path, err := agentSocket(c) // the same socket the other commands use
	if err != nil {
		return nil, nil, []d1.Finding{{Check: d1.AgentCheck, Status: d1.Fail, Message: "no socket path",
			Fix: fmt.Sprintf("pass --socket PATH, set %s or put socket: in the config", agent.SocketEnv)}}
	}
	socket := d1.CheckSocket(statSocket(path))
	if socket.Status == d1.Fail {
		return nil, nil, []d1.Finding{socket}
	}
	client, keys, answer := askAgent(c.Context, path, timeout)
	return client, keys, []d1.Finding{socket, d1.CheckAgent(answer)}
}

func statSocket(path string) d1.SocketFile {
	fi, err := os.Stat(path)
	if err != nil {
		return d1.SocketFile{Path: path}
	}
	s := d1.SocketFile{Path: path, Found: true, Mode: fi.Mode(), Owner: "?", Group: "?"}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		s.Owner, s.Group = userName(st.Uid), groupName(st.Gid)
	}
	return s
}

// askAgent dials the agent and asks what doctor reports of it.
func askAgent(ctx context.Context, path string, timeout time.Duration) (*agent.Client, []agent.Key, d1.AgentAnswer) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	client, err := agent.Dial(ctx, path)
	if err != nil {
		return nil, nil, d1.AgentAnswer{DialErr: err}
	}
	keys, kerr := client.Keys(ctx)
	health, herr := client.Health(ctx)
	if kerr == nil && keys == nil {
		keys = []agent.Key{} // listed, and none offered
	}
	return client, keys, d1.AgentAnswer{Err: errors.Join(kerr, herr), Health: health, Version: client.AgentVersion(), Keys: len(keys)}
}

func userName(uid uint32) string {
	id := strconv.FormatUint(uint64(uid), 10)
	if u, err := user.LookupId(id); err == nil {
		return u.Username
	}
	return id
}

func groupName(gid uint32) string {
	id := strconv.FormatUint(uint64(gid), 10)
	if g, err := user.LookupGroupId(id); err == nil {
		return g.Name
	}
	return id
}
