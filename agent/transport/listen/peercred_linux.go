package listen

import (
	"errors"
	"fmt"
	"github.com/hsmagent/hsmagent/agent/core"
	"unsafe"

	"golang.org/x/sys/unix"
)

// peerOf reads the credentials the kernel recorded when the peer connected.
func peerOf(fd int) (core.Peer, error) {
	cred, err := unix.GetsockoptUcred(fd, unix.SOL_SOCKET, unix.SO_PEERCRED)
	if err != nil {
		return core.Peer{}, fmt.Errorf("agent: reading peer credentials (SO_PEERCRED): %w", err)
	}
	groups, err := peerGroups(fd)
	if err != nil {
		return core.Peer{}, fmt.Errorf("agent: reading peer groups (SO_PEERGROUPS): %w", err)
	}
	return core.Peer{UID: int(cred.Uid), GID: int(cred.Gid), PID: int(cred.Pid), Groups: groups}, nil
}

// maxGroups is the kernel's NGROUPS_MAX: no process holds more.
const maxGroups = 65536

// peerGroups reads SO_PEERGROUPS, which x/sys/unix has no function for. The
// kernel answers ERANGE with the size it needs when the buffer is too small,
// so the buffer grows to that size and the call is repeated.
func peerGroups(fd int) ([]int, error) {
	n := 64
	for {
		buf := make([]uint32, n)
		size := uint32(4 * n) // socklen_t
		_, _, errno := unix.Syscall6(unix.SYS_GETSOCKOPT, uintptr(fd), unix.SOL_SOCKET, unix.SO_PEERGROUPS,
			uintptr(unsafe.Pointer(&buf[0])), uintptr(unsafe.Pointer(&size)), 0)
		switch {
		case errno == unix.ERANGE && n < maxGroups:
			n = min(max(int(size)/4, 2*n), maxGroups)
			continue
		case errno == unix.ENOPROTOOPT:
			// Kernels before 4.13 lack SO_PEERGROUPS. Only the primary gid is
			// then known: group rules can refuse a member, never admit a stranger.
			return nil, nil
		case errno != 0:
			return nil, errno
		case size%4 != 0 || int(size)/4 > n:
			return nil, errors.New("the kernel answered an unexpected size")
		}
		groups := make([]int, size/4)
		for i := range groups {
			groups[i] = int(buf[i])
		}
		return groups, nil
	}
}
