package metrics_test

import (
	"bytes"
	"context"
	"crypto/x509"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hsmagent/hsmagent/agent/agentpb"
	"github.com/hsmagent/hsmagent/agent/agenttest"
	"github.com/hsmagent/hsmagent/agent/keytype"
	"github.com/hsmagent/hsmagent/agent/metrics"
	"github.com/hsmagent/hsmagent/agent/server"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

func promtool(t *testing.T) string {
	t.Helper()
	p, err := exec.LookPath("promtool")
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal("promtool is missing: apt-get install prometheus")
		}
		t.Skip("promtool is not installed (apt-get install prometheus)")
	}
	return p
}

// TestScrape: after signatures and refusals, the endpoint has the counts,
// the expiry of the stored certificate, the HSM state, no unbounded label
// (a made-up key label counts as "other"), and promtool accepts it.
func TestScrape(t *testing.T) {
	store := server.NewMemoryStore()
	if _, err := store.Generate("ec", keytype.ECDSAP256); err != nil {
		t.Fatal(err)
	}
	signer, _ := store.Signer("ec")
	notAfter := time.Now().Add(40 * 24 * time.Hour).Truncate(time.Second)
	cert := agenttest.SelfSigned(t, signer, "ec", notAfter)
	store.SetChain("ec", []*x509.Certificate{cert})

	var a *agenttest.Agent
	m := metrics.NewAgent(func() (int, int) { return a.Server.HSMLoad() })
	a = agenttest.Start(t, store, server.Options{Observer: m})
	m.Reopened(true)     // as hsm.Config.OnReopen reports
	m.WorkerEnded(false) // as hsm/worker's OnEnd reports
	l, err := metrics.Listen(filepath.Join(agenttest.SocketDir(t), "metrics.sock"))
	if err != nil {
		t.Fatal(err)
	}
	go metrics.Serve(l, m.Handler())
	defer l.Close()

	conn, err := grpc.NewClient("unix://"+a.Socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	api := agentpb.NewAgentClient(conn)
	good := &agentpb.SignRequest{Key: "ec", Digest: make([]byte, 32), Hash: agentpb.Hash_HASH_SHA256}
	for range 3 {
		if _, err := api.Sign(context.Background(), good); err != nil {
			t.Fatal(err)
		}
	}
	for _, label := range []string{"made-up-1", "made-up-2"} {
		api.Sign(context.Background(), &agentpb.SignRequest{Key: label, Digest: make([]byte, 32), Hash: agentpb.Hash_HASH_SHA256})
	}
	api.Sign(context.Background(), &agentpb.SignRequest{Key: "ec", Digest: make([]byte, 3), Hash: agentpb.Hash_HASH_SHA256})

	hc := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (netConn, error) {
		var d netDialer
		return d.DialContext(ctx, "unix", l.Addr().String())
	}}}
	resp, err := hc.Get("http://agent/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	text := string(body)
	for _, want := range []string{
		`hsmagent_signatures_total{key="ec",result="ok"} 3`,
		`hsmagent_signatures_total{key="other",result="NotFound"} 2`,
		`hsmagent_signatures_total{key="ec",result="InvalidArgument"} 1`,
		`hsmagent_sign_failures_total{reason="NotFound"} 2`,
		`hsmagent_sign_duration_seconds_count{key="ec"} 3`,
		`hsmagent_hsm_serving 1`,
		`hsmagent_hsm_in_flight 0`,
		`hsmagent_keys 1`,
		`hsmagent_hsm_reopens_total{result="failed"} 0`,
		`hsmagent_hsm_reopens_total{result="ok"} 1`,
		`hsmagent_hsm_worker_ends_total{how="crashed"} 1`,
		`hsmagent_hsm_worker_ends_total{how="killed"} 0`,
		`hsmagent_certificate_expiry_timestamp_seconds{key="ec"} ` + formatFloat(notAfter.Unix()),
	} {
		if !strings.Contains(text, want) {
			t.Errorf("metrics lack %q", want)
		}
	}
	if strings.Contains(text, "made-up") {
		t.Error("a caller's made-up label reached a metric label")
	}
	// The expiry series follows the keys: gone after the key is deleted.
	store.Delete("ec")
	if err := a.Server.Reload(nil); err != nil {
		t.Fatal(err)
	}
	resp, _ = hc.Get("http://agent/metrics")
	body2, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if strings.Contains(string(body2), `hsmagent_certificate_expiry_timestamp_seconds{key="ec"}`) {
		t.Error("a deleted key keeps its expiry series")
	}

	cmd := exec.Command(promtool(t), "check", "metrics")
	cmd.Stdin = bytes.NewReader(body)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Errorf("promtool check metrics: %v\n%s", err, out)
	}
}

func TestAlertRules(t *testing.T) {
	out, err := exec.Command(promtool(t), "check", "rules", "../../docs/alerts.yml").CombinedOutput()
	if err != nil || !strings.Contains(string(out), "SUCCESS") {
		t.Errorf("promtool check rules: %v\n%s", err, out)
	}
}

func TestListenRefusesPublicAddresses(t *testing.T) {
	for _, addr := range []string{"0.0.0.0:9464", "192.0.2.1:9464", ":9464", "nonsense"} {
		if l, err := metrics.Listen(addr); err == nil {
			l.Close()
			t.Errorf("%q accepted", addr)
		}
	}
	l, err := metrics.Listen("127.0.0.1:0")
	if err != nil {
		t.Fatalf("loopback refused: %v", err)
	}
	l.Close()
}

// countingListener counts the connections Serve accepted.
type countingListener struct {
	net.Listener
	n atomic.Int64
}

func (c *countingListener) Accept() (net.Conn, error) {
	conn, err := c.Listener.Accept()
	if err == nil {
		c.n.Add(1)
	}
	return conn, err
}

// TestServeBoundsConnections: connections that never send a request take at
// most MaxConnections of the agent's descriptors (any local user can open
// them on a loopback port).
func TestServeBoundsConnections(t *testing.T) {
	l, err := metrics.Listen("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	cl := &countingListener{Listener: l}
	go metrics.Serve(cl, metrics.NewAgent(nil).Handler())
	defer l.Close()
	var conns []net.Conn
	for range 5 * metrics.MaxConnections {
		c, err := net.Dial("tcp", l.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, c)
	}
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	time.Sleep(300 * time.Millisecond)
	if n := cl.n.Load(); n > metrics.MaxConnections {
		t.Errorf("%d idle connections accepted; at most %d may be open", n, metrics.MaxConnections)
	}
}

// TestListenSocketPathSafely: a metrics socket path is made like the agent's
// socket: a file that is not a socket is never removed, nor a live socket.
func TestListenSocketPathSafely(t *testing.T) {
	dir := agenttest.SocketDir(t)
	file := filepath.Join(dir, "not-a-socket")
	if err := os.WriteFile(file, []byte("keep me"), 0o600); err != nil {
		t.Fatal(err)
	}
	if l, err := metrics.Listen(file); err == nil {
		l.Close()
		t.Fatal("a regular file at the metrics path was replaced")
	}
	if b, err := os.ReadFile(file); err != nil || string(b) != "keep me" {
		t.Errorf("the file at the metrics path was touched: %q %v", b, err)
	}
	live := filepath.Join(dir, "metrics.sock")
	first, err := metrics.Listen(live)
	if err != nil {
		t.Fatal(err)
	}
	defer first.Close()
	go metrics.Serve(first, metrics.NewAgent(nil).Handler())
	if l, err := metrics.Listen(live); err == nil {
		l.Close()
		t.Fatal("a second listener took over a live metrics socket")
	}
	if _, err := net.Dial("unix", live); err != nil {
		t.Errorf("the first listener's socket is gone: %v", err)
	}
}
