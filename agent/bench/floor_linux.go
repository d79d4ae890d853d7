//go:build linux

package bench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"runtime"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Floor measures what crossing processes the way the agent does (the
// caller, the agent, its HSM worker) adds to a signature that waits for the
// HSM, when the processes sleep while they wait: a message goes caller → relay → HSM end, which waits and
// answers back the same way. Every process reads and writes with raw
// blocking system calls on one thread, as a C program would, so what it
// measures is the machine's cost of waking processes that sat idle through
// the wait, not the Go runtime's or the agent's. Half of d goes to a chain
// where the kernel puts it, half to one whose three processes share the CPU
// the caller starts on: a VM whose idle vCPUs halt charges tens of
// microseconds for each wake-up of another CPU, and far less for a switch
// on one. Rounds alone and through a chain alternate, so that drift in the
// machine lands on both.
func Floor(ctx context.Context, wait, d time.Duration, spawn Spawn) (FloorResult, error) {
	if wait <= 0 {
		return FloorResult{}, errors.New("bench: the floor's wait must be positive")
	}
	// One thread, as the peers have, so that the runtime moves nothing,
	// and so that the one-CPU chain's processes inherit its affinity.
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	var alone []time.Duration
	spread, err := chainRounds(ctx, wait, d/2, spawn, &alone)
	if err != nil {
		return FloorResult{}, err
	}
	var all unix.CPUSet
	if err := unix.SchedGetaffinity(0, &all); err != nil {
		return FloorResult{}, fmt.Errorf("bench: the floor's CPUs: %w", err)
	}
	one := unix.CPUSet{}
	for cpu := 0; cpu < 1024; cpu++ { // CPU_SETSIZE, a CPUSet's bits
		if all.IsSet(cpu) {
			one.Set(cpu)
			break
		}
	}
	if err := unix.SchedSetaffinity(0, &one); err != nil {
		return FloorResult{}, fmt.Errorf("bench: the floor's CPU: %w", err)
	}
	pinned, err := chainRounds(ctx, wait, d-d/2, spawn, &alone)
	if rerr := unix.SchedSetaffinity(0, &all); rerr != nil && err == nil {
		err = fmt.Errorf("bench: the floor's CPUs back: %w", rerr)
	}
	if err != nil {
		return FloorResult{}, err
	}
	return FloorResult{Wait: wait, Alone: median(alone), Chain: median(spread), ChainOneCPU: median(pinned)}, nil
}

// chainRounds starts a chain and times rounds through it for d, each after
// a round alone (appended to alone); it stops the chain before it returns.
func chainRounds(ctx context.Context, wait, d time.Duration, spawn Spawn, alone *[]time.Duration) ([]time.Duration, error) {
	caller, relayUp, err := socketPair()
	if err != nil {
		return nil, err
	}
	relayDown, hsmUp, err := socketPair()
	if err != nil {
		caller.Close()
		relayUp.Close()
		return nil, err
	}
	// A socket with a receive timeout ends a raw read on a signal (EINTR)
	// rather than restarting it: the runtime's preemption then reaches the
	// caller between reads, and a peer that stops answering (stopped, or
	// stuck) ends the floor with an error rather than holding the bench.
	patience := answerTimeout(wait)
	tv := syscall.NsecToTimeval(int64(100 * time.Millisecond))
	if err := syscall.SetsockoptTimeval(int(caller.Fd()), syscall.SOL_SOCKET, syscall.SO_RCVTIMEO, &tv); err != nil {
		caller.Close()
		relayUp.Close()
		relayDown.Close()
		hsmUp.Close()
		return nil, fmt.Errorf("bench: the floor's socket: %w", err)
	}
	// The relay ends when caller closes, and the HSM end after it.
	var started []func() error
	defer func() {
		caller.Close()
		for _, exited := range started {
			exited()
		}
	}()
	relayExited, err := spawn(RoleRelay, wait, relayUp, relayDown)
	relayUp.Close()
	relayDown.Close()
	if err != nil {
		hsmUp.Close()
		return nil, fmt.Errorf("bench: starting the floor's relay: %w", err)
	}
	started = append(started, relayExited)
	hsmExited, err := spawn(RoleHSM, wait, hsmUp, nil)
	hsmUp.Close()
	if err != nil {
		return nil, fmt.Errorf("bench: starting the floor's HSM end: %w", err)
	}
	started = append(started, hsmExited)

	msg := make([]byte, floorMessage)
	var chain []time.Duration
	for end := time.Now().Add(d); time.Now().Before(end) && ctx.Err() == nil; {
		t := time.Now()
		sleep(wait)
		*alone = append(*alone, time.Since(t))
		t = time.Now()
		if err := exchange(int(caller.Fd()), msg, t.Add(patience)); err != nil {
			if errors.Is(err, errNoAnswer) {
				return nil, fmt.Errorf("bench: the floor's chain gave no answer within %v", patience)
			}
			return nil, fmt.Errorf("bench: the floor's chain broke: %w", err)
		}
		chain = append(chain, time.Since(t))
	}
	if len(chain) == 0 {
		return nil, fmt.Errorf("bench: the floor got no round in %v", d)
	}
	return chain, nil
}

// ServePeer is a process of Floor's chain: it answers what comes on up
// until up closes.
func ServePeer(role string, wait time.Duration, up, down *os.File) error {
	if role != RoleHSM && role != RoleRelay {
		return fmt.Errorf("bench: no floor role %q (want %s or %s)", role, RoleRelay, RoleHSM)
	}
	if role == RoleHSM && wait <= 0 {
		return fmt.Errorf("bench: the floor's wait %v is not positive", wait)
	}
	if role == RoleRelay && down == nil {
		return errors.New("bench: the floor's relay needs the socket towards the HSM end")
	}
	for _, f := range []*os.File{up, down} {
		if f == nil {
			continue
		}
		if fi, err := f.Stat(); err != nil || fi.Mode()&os.ModeSocket == 0 {
			return fmt.Errorf("bench: fd %d is not a socket", f.Fd())
		}
	}
	runtime.LockOSThread()
	msg := make([]byte, floorMessage)
	for {
		if err := readFull(int(up.Fd()), msg, time.Time{}); err != nil {
			if errors.Is(err, io.EOF) {
				return nil // the caller is done
			}
			return err
		}
		if role == RoleHSM {
			sleep(wait)
		} else if err := exchange(int(down.Fd()), msg, time.Time{}); err != nil {
			return err
		}
		if err := writeAll(int(up.Fd()), msg); err != nil {
			return err
		}
	}
}

// answerTimeout is how long the caller waits for a round's answer: far
// beyond any round the machine takes.
func answerTimeout(wait time.Duration) time.Duration { return 100*wait + time.Second }

// exchange writes msg to fd and reads the answer into it by deadline.
func exchange(fd int, msg []byte, deadline time.Time) error {
	if err := writeAll(fd, msg); err != nil {
		return err
	}
	return readFull(fd, msg, deadline)
}

// errNoAnswer is a read past its deadline.
var errNoAnswer = errors.New("no answer by the deadline")

// The chain's calls are raw, as in a program without a runtime: a call
// that blocks through the runtime's entry and exit gives its scheduling
// slot away to the runtime's monitor and takes it back after, which on its
// own adds more than the machine does. The peers allocate nothing, so no
// collection waits on their reads; the caller's reads, on a socket with a
// receive timeout, come back on each signal (see chainRounds).

// readFull fills b from fd. A deadline (zero: none) needs a socket with a
// receive timeout, so that the read comes back to look at it.
func readFull(fd int, b []byte, deadline time.Time) error {
	for n := 0; n < len(b); {
		r, _, e := syscall.RawSyscall(syscall.SYS_READ, uintptr(fd), uintptr(unsafe.Pointer(&b[n])), uintptr(len(b)-n))
		switch {
		case (e == syscall.EINTR || e == syscall.EAGAIN) && !deadline.IsZero() && time.Now().After(deadline):
			return errNoAnswer
		case e == syscall.EINTR || (e == syscall.EAGAIN && !deadline.IsZero()):
		case e != 0:
			return e
		case r == 0 && n == 0:
			return io.EOF
		case r == 0:
			return io.ErrUnexpectedEOF
		default:
			n += int(r)
		}
	}
	return nil
}

func writeAll(fd int, b []byte) error {
	for n := 0; n < len(b); {
		r, _, e := syscall.RawSyscall(syscall.SYS_WRITE, uintptr(fd), uintptr(unsafe.Pointer(&b[n])), uintptr(len(b)-n))
		switch {
		case e == syscall.EINTR:
		case e != 0:
			return e
		default:
			n += int(r)
		}
	}
	return nil
}

// socketPair is a connected pair of blocking Unix stream sockets.
func socketPair() (*os.File, *os.File, error) {
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, nil, fmt.Errorf("bench: socketpair: %w", err)
	}
	return os.NewFile(uintptr(fds[0]), "floor"), os.NewFile(uintptr(fds[1]), "floor"), nil
}

// sleep waits in nanosleep, as an HSM's library does.
func sleep(d time.Duration) {
	ts := syscall.NsecToTimespec(int64(d))
	for {
		var left syscall.Timespec
		_, _, e := syscall.RawSyscall(syscall.SYS_NANOSLEEP, uintptr(unsafe.Pointer(&ts)), uintptr(unsafe.Pointer(&left)), 0)
		if e != syscall.EINTR {
			return
		}
		ts = left
	}
}
