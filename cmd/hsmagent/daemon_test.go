package main

import (
	"context"
	"io"
	"log/slog"
	"net"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestDaemonTellsSystemd: with NOTIFY_SOCKET set (as systemd's Type=notify
// does) the daemon sends READY=1 once serving, WATCHDOG=1 pings while
// healthy and none while not, and STOPPING=1 on SIGTERM.
func TestDaemonTellsSystemd(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "notify")
	l, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: sock, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	t.Setenv("NOTIFY_SOCKET", sock)
	t.Setenv("WATCHDOG_USEC", "100000") // ping every 50 ms
	t.Setenv("WATCHDOG_PID", "")
	healthy := make(chan bool, 1)
	healthy <- true
	isHealthy := func() bool { h := <-healthy; healthy <- h; return h }
	stop := make(chan struct{})
	d := daemon{
		name:     "test",
		log:      slog.New(slog.NewTextHandler(io.Discard, nil)),
		serve:    func() error { <-stop; return nil },
		shutdown: func(context.Context) error { close(stop); return nil },
		healthy:  isHealthy,
	}
	done := make(chan error, 1)
	go func() { done <- d.run("ready") }()

	read := func(timeout time.Duration) string {
		l.SetReadDeadline(time.Now().Add(timeout))
		buf := make([]byte, 256)
		n, err := l.Read(buf)
		if err != nil {
			return ""
		}
		return string(buf[:n])
	}
	if got := read(5 * time.Second); got != "READY=1" {
		t.Fatalf("first notification %q, want READY=1", got)
	}
	if got := read(2 * time.Second); got != "WATCHDOG=1" {
		t.Fatalf("no watchdog ping while healthy: %q", got)
	}
	<-healthy
	healthy <- false
	for read(200*time.Millisecond) != "" { // pings sent before the switch
	}
	if got := read(300 * time.Millisecond); got != "" {
		t.Errorf("watchdog pinged while unhealthy: %q", got)
	}
	syscall.Kill(syscall.Getpid(), syscall.SIGTERM)
	if got := read(5 * time.Second); !strings.Contains(got, "STOPPING=1") {
		t.Errorf("on SIGTERM: %q, want STOPPING=1", got)
	}
	if err := <-done; err != nil {
		t.Errorf("run: %v", err)
	}
}
