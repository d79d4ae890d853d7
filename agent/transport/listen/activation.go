package listen

import (
	"fmt"
	"net"
	"os"
	"strconv"

	"golang.org/x/sys/unix"
)

// listenFDsStart is the first file descriptor systemd passes (SD_LISTEN_FDS_START).
const listenFDsStart = 3

// InheritedListener returns the listening socket that systemd passed to this
// process (socket activation: LISTEN_PID is this process and LISTEN_FDS is
// 1), or nil, nil when there is none. It must be a listening Unix stream
// socket. The LISTEN_* variables are removed from the environment so that
// child processes do not take the socket for theirs.
//
// Closing the listener leaves the socket file in place: it is systemd's,
// which keeps it (and queues connections on it) while the agent restarts.
func InheritedListener() (net.Listener, error) {
	pid, fds := os.Getenv("LISTEN_PID"), os.Getenv("LISTEN_FDS")
	if pid == "" || fds == "" {
		return nil, nil
	}
	if pid != strconv.Itoa(os.Getpid()) {
		return nil, nil // meant for the process that started us
	}
	for _, v := range []string{"LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"} {
		os.Unsetenv(v)
	}
	n, err := strconv.Atoi(fds)
	if err != nil || n < 1 {
		return nil, fmt.Errorf("agent: socket activation: LISTEN_FDS=%q is not a positive number", fds)
	}
	if n != 1 {
		return nil, fmt.Errorf("agent: socket activation: systemd passed %d sockets; the socket unit must have one ListenStream= line", n)
	}
	fd := listenFDsStart
	unix.CloseOnExec(fd)
	listening, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ACCEPTCONN)
	if err != nil {
		return nil, fmt.Errorf("agent: socket activation: file descriptor %d is not a socket: %w", fd, err)
	}
	if listening != 1 {
		return nil, fmt.Errorf("agent: socket activation: file descriptor %d is a socket that does not listen", fd)
	}
	f := os.NewFile(uintptr(fd), "LISTEN_FDS socket")
	defer f.Close() // FileListener holds a duplicate
	l, err := net.FileListener(f)
	if err != nil {
		return nil, fmt.Errorf("agent: socket activation: file descriptor %d: %w", fd, err)
	}
	ul, ok := l.(*net.UnixListener)
	if !ok || ul.Addr().Network() != "unix" {
		l.Close()
		return nil, fmt.Errorf("agent: socket activation: the inherited socket is %s %q, not a Unix stream socket (ListenStream=/path)", l.Addr().Network(), l.Addr())
	}
	ul.SetUnlinkOnClose(false)
	return ul, nil
}
