package server

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"syscall"
	"time"
)

// Listen creates the agent's Unix socket at path with the given file mode.
// A missing parent directory is created with mode 0750. A socket file left by
// an agent that died is replaced; one with a live listener is refused. The
// socket file is removed when the listener is closed.
func Listen(path string, mode os.FileMode) (net.Listener, error) {
	if path == "" {
		return nil, errors.New("agent: no socket path; pass --socket or set HSMAGENT_SOCKET")
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o750); err != nil {
		return nil, fmt.Errorf("agent: creating socket directory: %w", err)
	}
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode()&os.ModeSocket == 0 {
			return nil, fmt.Errorf("agent: %q exists and is not a socket; remove it or choose another path", path)
		}
		if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
			c.Close()
			return nil, fmt.Errorf("agent: another agent is listening on %q", path)
		}
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("agent: removing stale socket: %w", err)
		}
	}
	// Create the socket with the final mode so that no wider window exists.
	old := syscall.Umask(int(0o777 &^ mode.Perm()))
	l, err := net.Listen("unix", path)
	syscall.Umask(old)
	if err != nil {
		return nil, fmt.Errorf("agent: listening on %q: %w", path, err)
	}
	if err := os.Chmod(path, mode.Perm()); err != nil {
		l.Close()
		return nil, fmt.Errorf("agent: setting mode of %q: %w", path, err)
	}
	return l, nil
}
