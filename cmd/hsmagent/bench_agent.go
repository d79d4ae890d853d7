package main

import (
	"context"
	"crypto"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/hsmagent/hsmagent/agent"
	"github.com/hsmagent/hsmagent/agent/bench"
	"github.com/hsmagent/hsmagent/agent/server"
	"github.com/hsmagent/hsmagent/agent/transport/p11rpc"
	"github.com/hsmagent/hsmagent/hsm"
	"github.com/urfave/cli/v2"
)

// benchAgent connects to the agent of --socket, or starts one, and returns
// the key through it and the agent's pid (for its memory); stop closes what
// it opened. p11Addr is the child agent's PKCS#11 socket as
// P11_KIT_SERVER_ADDRESS names it, when --pkcs11 asks for one.
func benchAgent(c *cli.Context, label string) (remote crypto.Signer, pid int, p11Addr string, stop func(), err error) {
	cleanup := func() {}
	socket := c.String("socket")
	if socket == "" {
		if cleanup, socket, err = startChildAgent(c); err != nil {
			return nil, 0, "", nil, err
		}
		if c.String("pkcs11") != "" {
			p11Addr = "unix:path=" + filepath.Join(filepath.Dir(socket), "pkcs11.sock")
		}
	}
	defer func() {
		if err != nil {
			cleanup()
		}
	}()
	dialCtx, cancel := context.WithTimeout(c.Context, 10*time.Second)
	client, err := agent.Dial(dialCtx, socket)
	cancel()
	if err != nil {
		return nil, 0, "", nil, err
	}
	stopChild := cleanup
	cleanup = func() { client.Close(); stopChild() }
	if remote, err = client.Signer(c.Context, label); err != nil {
		return nil, 0, "", nil, err
	}
	if pid, err = socketPeerPID(socket); err != nil {
		return nil, 0, "", nil, err
	}
	return remote, pid, p11Addr, cleanup, nil
}

// startChildAgent runs "hsmagent serve" on a temporary socket with the same
// token selection. The PIN must come from a file, the environment or the URI:
// a prompted PIN is not handed to another process.
func startChildAgent(c *cli.Context) (stop func(), socket string, err error) {
	if c.String("pin-file") == "" && os.Getenv("HSMAGENT_PIN") == "" && !strings.Contains(c.String("uri"), "pin-source") {
		return nil, "", usagef("bench starts its own agent only with --pin-file, HSMAGENT_PIN or a URI pin-source; or pass --socket of a running agent")
	}
	dir, err := os.MkdirTemp("", "hsmagent-bench")
	if err != nil {
		return nil, "", err
	}
	socket = filepath.Join(dir, "agent.sock")
	self, err := os.Executable()
	if err != nil {
		return nil, "", err
	}
	args := []string{"serve", "--socket", socket, "--log-level", "warn"}
	if c.String("pkcs11") != "" {
		args = append(args, "--pkcs11-socket", filepath.Join(dir, "pkcs11.sock"))
	}
	for _, f := range []string{"module", "token", "token-serial", "uri", "pin-file"} {
		if v := c.String(f); v != "" {
			args = append(args, "--"+f, v)
		}
	}
	if c.Bool("allow-insecure-pin-file") {
		args = append(args, "--allow-insecure-pin-file")
	}
	cmd := exec.Command(self, args...)
	cmd.Stderr = c.App.ErrWriter
	// The audit log of a benchmark is millions of lines: send it nowhere.
	cmd.Env = append(os.Environ(), "HSMAGENT_AUDIT_LOG=/dev/null")
	if err := cmd.Start(); err != nil {
		return nil, "", fmt.Errorf("starting the agent: %w", err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	stop = func() {
		cmd.Process.Signal(os.Interrupt)
		<-exited
		os.RemoveAll(dir)
	}
	deadline := time.After(30 * time.Second)
	for {
		if conn, err := net.Dial("unix", socket); err == nil {
			conn.Close()
			return stop, socket, nil
		}
		select {
		case <-exited:
			os.RemoveAll(dir)
			return nil, "", errors.New("the child agent exited; see its message above")
		case <-deadline:
			stop()
			return nil, "", errors.New("the child agent did not start within 30s")
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// socketPeerPID finds the agent's pid from its socket with SO_PEERCRED.
func socketPeerPID(socket string) (int, error) {
	conn, err := net.Dial("unix", socket)
	if err != nil {
		return 0, fmt.Errorf("connecting to %q: %w", socket, err)
	}
	defer conn.Close()
	p, err := server.ReadPeer(conn)
	if err != nil {
		return 0, err
	}
	return p.PID, nil
}

// rssSampler records the largest resident set of a process while running.
type rssSampler struct {
	pid  int
	mu   sync.Mutex
	peak int64
}

func (s *rssSampler) start() (stop func()) {
	done := make(chan struct{})
	finished := make(chan struct{})
	go func() {
		defer close(finished)
		t := time.NewTicker(50 * time.Millisecond)
		defer t.Stop()
		for {
			s.sample()
			select {
			case <-done:
				return
			case <-t.C:
			}
		}
	}()
	return func() { close(done); <-finished }
}

func (s *rssSampler) sample() {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", s.pid))
	if err != nil {
		return
	}
	for _, line := range strings.Split(string(data), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			if err == nil {
				s.mu.Lock()
				s.peak = max(s.peak, kb*1024)
				s.mu.Unlock()
			}
		}
	}
}

func (s *rssSampler) max() int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.peak
}

// pkcs11Signer opens the agent's PKCS#11 token through p11-kit's client
// module at addr (or P11_KIT_SERVER_ADDRESS) and returns label's signer,
// for the PKCS#11 phase. The token asks for no PIN; crypto11 logs in with
// one all the same, and the agent takes any.
func pkcs11Signer(module, addr, label string) (crypto.Signer, func(), error) {
	if addr != "" {
		os.Setenv("P11_KIT_SERVER_ADDRESS", addr)
	} else if os.Getenv("P11_KIT_SERVER_ADDRESS") == "" {
		return nil, nil, usagef("--pkcs11 with --socket needs P11_KIT_SERVER_ADDRESS=unix:path=PATH of the agent's pkcs11_socket")
	}
	tok, err := hsm.Open(hsm.Config{ModulePath: module, TokenLabel: p11rpc.DefaultTokenLabel,
		PIN: func() (string, error) { return "any", nil }, MaxSessions: 32}) // under the connection's 64
	if err != nil {
		return nil, nil, fmt.Errorf("--pkcs11: %w", err)
	}
	s, err := tok.Signer(label)
	if err != nil {
		tok.Close()
		return nil, nil, fmt.Errorf("--pkcs11: %w", err)
	}
	return s, func() { tok.Close() }, nil
}

// floorPeerCommand is the argv[1] of a process of bench's floor
// (bench.Floor): not a command of the CLI; argv[2] is its role, argv[3] its
// wait, fds 3 and 4 its sockets.
const floorPeerCommand = "bench-floor-peer"

// spawnFloorPeer starts a process of the floor's chain: this binary again.
func spawnFloorPeer(role string, wait time.Duration, up, down *os.File) (func() error, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(self, floorPeerCommand, role, wait.String())
	cmd.Stderr = os.Stderr
	return bench.StartPeer(cmd, up, down)
}

func runFloorPeer(role, wait string) int {
	d, err := time.ParseDuration(wait)
	if err != nil {
		fmt.Fprintf(os.Stderr, "hsmagent %s: wait %q: %v (this command is started by 'hsmagent bench')\n", floorPeerCommand, wait, err)
		return 2
	}
	if err := bench.ServeInheritedPeer(role, d); err != nil {
		fmt.Fprintf(os.Stderr, "hsmagent %s: %v (this command is started by 'hsmagent bench')\n", floorPeerCommand, err)
		return 1
	}
	return 0
}
