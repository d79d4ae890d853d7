package agent

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"syscall"
	"time"
)

// WithWaitForAgent makes Dial wait up to d for an agent that is not there
// yet (no socket, connection refused, permission denied as the directory is
// being set up), retrying until the socket accepts: for processes that may
// start before the agent. Without it, Dial fails at once on these errors.
func WithWaitForAgent(d time.Duration) Option {
	return func(c *Client) { c.waitForAgent = d }
}

// retryEvery is how often Dial retries the socket while waiting for the agent.
const retryEvery = 50 * time.Millisecond

// reach connects to the socket once before gRPC does, so that the errors
// that no retry will fix (no socket, permission denied, nothing listening)
// are reported at once and precisely instead of as a timeout. With a wait,
// they are retried until the wait or ctx ends.
func reach(ctx context.Context, path string, wait time.Duration) error {
	var deadline time.Time
	if wait > 0 {
		deadline = time.Now().Add(wait)
	}
	for {
		err := predial(ctx, path)
		if err == nil || !permanent(err) {
			return nil // connected, or a transient error gRPC's retries may cure
		}
		if wait <= 0 {
			return explain(path, err)
		}
		left := time.Until(deadline)
		if left <= 0 {
			return fmt.Errorf("%w (after waiting %s for the agent)", explain(path, err), wait)
		}
		t := time.NewTimer(min(retryEvery, left))
		select {
		case <-ctx.Done():
			t.Stop()
			return fmt.Errorf("%w (%v while waiting for the agent)", explain(path, err), ctx.Err())
		case <-t.C:
		}
	}
}

func predial(ctx context.Context, path string) error {
	d := net.Dialer{Timeout: time.Second}
	conn, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return err
	}
	return conn.Close()
}

func permanent(err error) bool {
	return errors.Is(err, syscall.ENOENT) || errors.Is(err, syscall.ENOTDIR) ||
		errors.Is(err, syscall.EACCES) || errors.Is(err, syscall.EPERM) ||
		errors.Is(err, syscall.ECONNREFUSED)
}

// explain turns a failed connection into an error that says what to fix.
func explain(path string, err error) error {
	switch {
	case errors.Is(err, syscall.ENOENT), errors.Is(err, syscall.ENOTDIR):
		return fmt.Errorf("agent: no agent socket at %q: is 'hsmagent serve' running, with this socket path?", path)
	case errors.Is(err, syscall.ECONNREFUSED):
		return fmt.Errorf("agent: connection refused at %q: no agent listens there (it stopped, or died and left its socket)", path)
	case errors.Is(err, syscall.EACCES), errors.Is(err, syscall.EPERM):
		return fmt.Errorf("agent: permission denied connecting to %q: %s; %s", path, permissionFacts(path), callerFacts())
	}
	return fmt.Errorf("agent: connecting to %q: %w", path, err)
}

// permissionFacts names the file that refused: the socket (write access is
// needed) or, when even its attributes cannot be read, a directory above it.
func permissionFacts(path string) string {
	if _, err := os.Lstat(path); err == nil {
		return "socket " + describe(path) + "; connecting needs write permission on it"
	}
	for dir := filepath.Dir(path); ; dir = filepath.Dir(dir) {
		if _, err := os.Lstat(dir); err == nil {
			return "directory " + describe(dir) + " cannot be searched (x permission), so the socket in it cannot be reached"
		}
		if dir == filepath.Dir(dir) {
			break
		}
	}
	return "no directory above the socket could be examined"
}
