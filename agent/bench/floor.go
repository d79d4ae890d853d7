package bench

import (
	"os"
	"os/exec"
	"slices"
	"time"
)

// The roles of the processes in Floor's chain, as the agent's are: the
// relay stands where the agent does, the HSM end where its HSM worker does.
const (
	RoleRelay = "relay" // passes each message on and its answer back
	RoleHSM   = "hsm"   // answers each message after the wait
)

// floorMessage is about the size of a signing request on the agent's sockets.
const floorMessage = 256

// FloorResult compares a wait made in the caller's own thread with the same
// wait made two processes away, each median over the same rounds: with the
// processes where the kernel puts them, and with all three on one CPU.
type FloorResult struct {
	Wait        time.Duration `json:"wait"`
	Alone       time.Duration `json:"aloneP50"`
	Chain       time.Duration `json:"chainP50"`
	ChainOneCPU time.Duration `json:"chainOneCpuP50"`
}

// Added is what crossing the processes adds to the median.
func (r FloorResult) Added() time.Duration { return r.Chain - r.Alone }

// AddedOneCPU is what crossing them adds when they share one CPU.
func (r FloorResult) AddedOneCPU() time.Duration { return r.ChainOneCPU - r.Alone }

// Spawn starts a process of the chain, with up as its fd 3 (towards the
// caller) and, for the relay, down as its fd 4 (towards the HSM end), running
// ServePeer. It must start the process from the calling thread (as os/exec
// does), which then passes on its CPU affinity. The function it returns
// waits for the process to exit.
type Spawn func(role string, wait time.Duration, up, down *os.File) (exited func() error, err error)

// StartPeer starts cmd, a program that calls ServeInheritedPeer, as a
// process of the chain: up and down (nil but for the relay) become its fds
// 3 and 4. It returns cmd.Wait.
func StartPeer(cmd *exec.Cmd, up, down *os.File) (exited func() error, err error) {
	cmd.ExtraFiles = []*os.File{up}
	if down != nil {
		cmd.ExtraFiles = append(cmd.ExtraFiles, down)
	}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	return cmd.Wait, nil
}

// ServeInheritedPeer is ServePeer on the sockets StartPeer gave this process.
func ServeInheritedPeer(role string, wait time.Duration) error {
	var down *os.File
	if role == RoleRelay {
		down = os.NewFile(4, "down")
	}
	return ServePeer(role, wait, os.NewFile(3, "up"), down)
}

func median(d []time.Duration) time.Duration {
	slices.Sort(d)
	return d[len(d)/2]
}
