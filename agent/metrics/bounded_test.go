package metrics_test

import (
	"bufio"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/hsmagent/hsmagent/agent/agenttest"
	"github.com/hsmagent/hsmagent/agent/metrics"
)

// keepAlive opens a connection to addr, makes one request on it and keeps
// it open, as a client that scrapes rarely would.
func keepAlive(t *testing.T, addr string) net.Conn {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	fmt.Fprintf(c, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	return c
}

// TestServeNotBlindedByIdleConnections: MaxConnections keep-alive
// connections held open do not lock out a scrape: the new connection takes
// the place of the one idle the longest. (With a plain cap, every scrape
// waited until their idle timeout.)
func TestServeNotBlindedByIdleConnections(t *testing.T) {
	l, err := metrics.Listen("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go metrics.Serve(l, metrics.NewAgent(nil).Handler())
	for range metrics.MaxConnections {
		keepAlive(t, l.Addr().String())
	}
	time.Sleep(1200 * time.Millisecond) // idle long enough to give way
	client := &http.Client{Timeout: 3 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := client.Get("http://" + l.Addr().String() + "/metrics")
	if err != nil {
		t.Fatalf("scrape with %d idle keep-alive connections open: %v", metrics.MaxConnections, err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Errorf("scrape: %s", resp.Status)
	}
}

// TestServeRequestCap: a keep-alive connection is closed by the answer to
// its MaxRequestsPerConnection-th request.
func TestServeRequestCap(t *testing.T) {
	l, err := metrics.Listen("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go metrics.Serve(l, http.NotFoundHandler())
	c, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	r := bufio.NewReader(c)
	for i := 1; i <= metrics.MaxRequestsPerConnection; i++ {
		fmt.Fprintf(c, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		resp, err := http.ReadResponse(r, nil)
		if err != nil {
			t.Fatalf("request %d: %v", i, err)
		}
		resp.Body.Close()
		if last := i == metrics.MaxRequestsPerConnection; resp.Close != last {
			t.Fatalf("request %d: Connection: close is %v; want %v", i, resp.Close, last)
		}
	}
}

// TestListenWith: the agent's metrics refuse TCP unless allowed (every
// local user could read key labels there), and a metrics socket is 0600
// without a group, 0660 with one.
func TestListenWith(t *testing.T) {
	if _, err := metrics.ListenWith("127.0.0.1:0", metrics.ListenOptions{}); !errors.Is(err, metrics.ErrTCPNotAllowed) {
		t.Errorf("TCP without the opt-in: %v; want ErrTCPNotAllowed", err)
	}
	dir := agenttest.SocketDir(t)
	for _, tc := range []struct {
		group string
		mode  os.FileMode
	}{{"", 0o600}, {fmt.Sprint(os.Getgid()), 0o660}} {
		path := filepath.Join(dir, "m"+tc.group+".sock")
		l, err := metrics.ListenWith(path, metrics.ListenOptions{Group: tc.group})
		if err != nil {
			t.Fatal(err)
		}
		fi, err := os.Stat(path)
		l.Close()
		if err != nil || fi.Mode().Perm() != tc.mode {
			t.Errorf("group %q: socket mode %v %v; want %v", tc.group, fi.Mode().Perm(), err, tc.mode)
		}
	}
}
