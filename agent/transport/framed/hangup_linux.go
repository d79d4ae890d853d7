package framed

import (
	"net"
	"syscall"
)

// peerHungUp waits until c has data to read or its peer has hung up, and
// reports a hang-up. It peeks, so nothing is taken from the connection; it
// holds the connection's read side meanwhile, which a reader waiting for
// the same data does not notice. It returns false when c is closed.
func peerHungUp(c *net.UnixConn) bool {
	rc, err := c.SyscallConn()
	if err != nil {
		return false
	}
	hungUp := false
	var b [1]byte
	err = rc.Read(func(fd uintptr) bool {
		n, _, rerr := syscall.Recvfrom(int(fd), b[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
		switch {
		case rerr == syscall.EAGAIN || rerr == syscall.EINTR:
			return false // nothing yet: wait until the socket is readable
		case rerr != nil || n == 0:
			hungUp = true // reset, or the end of the stream
		}
		return true
	})
	return err == nil && hungUp
}
