package server_test

import (
	"bufio"
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hsmagent/hsmagent/agent/agentpb"
	"github.com/hsmagent/hsmagent/agent/agenttest"
	"github.com/hsmagent/hsmagent/agent/server"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
)

func needSetpriv(t *testing.T) {
	t.Helper()
	needOtherUsers(t)
}

// openFDs counts this process's open file descriptors.
func openFDs(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Skip("no /proc/self/fd")
	}
	return len(ents)
}

// TestConnectionFlood: 2,000 connections held open by nobody cost the agent
// no more than its limits allow, are logged once, and root keeps signing
// on new connections meanwhile (issue 8, item 3).
func TestConnectionFlood(t *testing.T) {
	needSetpriv(t)
	tests := []struct {
		name          string
		opts          server.Options
		held, limitOf string // the most nobody may hold, and the limit logged
	}{
		// The connection rate is another limit (TestConnectionRatePerUID): out of the way here.
		{"per uid", server.Options{MaxConnections: 512, MaxConnectionsPerUID: 32, ConnectionRatePerUID: 1 << 20}, "32", `limit="connections per uid" uid=65534`},
		{"in total", server.Options{MaxConnections: 64, MaxConnectionsPerUID: 10000, ConnectionRatePerUID: 1 << 20}, "56", `limit=connections`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := agenttest.SocketDir(t)
			if err := os.Chmod(dir, 0o755); err != nil {
				t.Fatal(err)
			}
			logs, audit := &auditBuffer{}, &auditBuffer{}
			tt.opts.Logger = slog.New(slog.NewTextHandler(logs, nil))
			tt.opts.Audit = slog.New(slog.NewTextHandler(audit, nil))
			a := agenttest.StartAt(t, filepath.Join(dir, "agent.sock"), 0o666, newMemStore(t), tt.opts)
			bin := copyTestBinary(t, dir)
			fdsBefore := openFDs(t)

			cmd := clientAs(bin, "hold", a.Socket, nobody, "HSMAGENT_TEST_CONNS=2000")
			stdin, err := cmd.StdinPipe()
			if err != nil {
				t.Fatal(err)
			}
			stdout, err := cmd.StdoutPipe()
			if err != nil {
				t.Fatal(err)
			}
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			defer cmd.Wait()
			defer stdin.Close()
			line, _ := bufio.NewReader(stdout).ReadString('\n')
			t.Logf("flooder: %s", strings.TrimSpace(line))
			waitFor(t, func() bool { return logs.count("limit reached") > 0 })

			var worst time.Duration
			for range 20 {
				start := time.Now()
				conn, err := grpc.NewClient("unix://"+a.Socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
				if err != nil {
					t.Fatal(err)
				}
				_, err = agentpb.NewAgentClient(conn).Sign(context.Background(), goodEC)
				conn.Close()
				d := time.Since(start)
				worst = max(worst, d)
				if err != nil {
					t.Fatalf("root's signature during the flood: %v", err)
				}
				if d > 2*time.Second {
					t.Errorf("root's signature took %v during the flood", d)
				}
			}
			held, _ := strconv.Atoi(tt.held)
			fds := openFDs(t) - fdsBefore
			t.Logf("during the flood: agent process +%d fds, root's slowest signature (new connection each) %v", fds, worst)
			if fds > held+16 {
				t.Errorf("the agent holds %d more fds during the flood; want at most %d", fds, held+16)
			}
			if n := logs.count("limit reached"); n != 1 {
				t.Errorf("%d 'limit reached' lines; want 1:\n%s", n, logs.buf.String())
			}
			if logs.count(tt.limitOf) == 0 {
				t.Errorf("the log does not name %s:\n%s", tt.limitOf, logs.buf.String())
			}
			if n := audit.count("msg=connect"); n == 0 || n > server.DefaultAuditRefusalBurst+5 {
				t.Errorf("%d connection refusal records; want a few", n)
			}
		})
	}
}

// TestSignaturesFairPerUID: a caller with its share of signatures waiting
// is refused at once, and another uid's signature still gets through.
func TestSignaturesFairPerUID(t *testing.T) {
	store := newStallingStore(t)
	a, bin := stalledAgentForNobody(t, store, server.Options{MaxInFlight: 4, MaxWaiting: 64, MaxSignaturesPerUID: 8})
	api, _ := rawClient(t, a.Socket)

	// Root floods: 8 get in, the other 92 are refused at once.
	var wg sync.WaitGroup
	var mu sync.Mutex
	codesSeen := map[codes.Code]int{}
	for range 100 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, err := api.Sign(context.Background(), goodEC)
			mu.Lock()
			codesSeen[status.Code(err)]++
			mu.Unlock()
			if status.Code(err) == codes.ResourceExhausted && !strings.Contains(err.Error(), "uid 0 already has 8 signatures") {
				t.Errorf("flood refusal: %v", err)
			}
		}()
	}
	waitFor(t, func() bool { mu.Lock(); defer mu.Unlock(); return codesSeen[codes.ResourceExhausted] == 92 })

	// nobody's one signature waits behind root's 8, not behind 100.
	cmd := clientAs(bin, "sign-message", a.Socket, nobody, "HSMAGENT_TEST_KEY=ec")
	out := make(chan string, 1)
	go func() {
		b, err := cmd.CombinedOutput()
		out <- fmt.Sprintf("%s%v", b, err)
	}()
	time.Sleep(300 * time.Millisecond) // let it queue
	store.release()
	if got := strings.TrimSpace(<-out); got != "OK<nil>" && !strings.HasPrefix(got, "OK ") {
		t.Errorf("nobody's signature during root's flood: %q", got)
	}
	wg.Wait()
	if codesSeen[codes.OK] != 8 {
		t.Errorf("root's results: %v; want 8 OK, 92 ResourceExhausted", codesSeen)
	}
}

// TestRefusalAuditBounded: 10,000 refusals of one uid write a handful of
// records, and the summaries count every one left out (issue 8, item 4).
func TestRefusalAuditBounded(t *testing.T) {
	audit := &auditBuffer{}
	a := agenttest.Start(t, newMemStore(t), server.Options{AuditRefusalBurst: 1,
		Audit: slog.New(slog.NewTextHandler(audit, nil))})
	api, _ := rawClient(t, a.Socket)
	const refusals = 10000
	stream, err := api.SignStream(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	bad := &agentpb.SignRequest{Key: "no-such-key", Digest: make([]byte, 32), Hash: agentpb.Hash_HASH_SHA256}
	go func() {
		for i := 0; i < refusals; i += 50 {
			msg := &agentpb.SignStreamRequest{}
			for j := range 50 {
				msg.Items = append(msg.Items, &agentpb.SignStreamItem{Id: uint64(i + j), Request: bad})
			}
			if err := stream.Send(msg); err != nil {
				return
			}
		}
		stream.CloseSend()
	}()
	got := 0
	for {
		resp, err := stream.Recv()
		if err != nil {
			break
		}
		for _, r := range resp.Results {
			if codes.Code(r.Code) != codes.NotFound {
				t.Fatalf("result %d: %v %s", r.Id, codes.Code(r.Code), r.Message)
			}
			got++
		}
	}
	if got != refusals {
		t.Fatalf("%d results of %d", got, refusals)
	}
	a.Stop() // writes the summaries still pending
	full := audit.count("msg=sign ")
	suppressed := 0
	for _, m := range regexp.MustCompile(`msg="refusals suppressed" uid=0 event=sign reason=NotFound count=(\d+)`).FindAllStringSubmatch(audit.buf.String(), -1) {
		n, _ := strconv.Atoi(m[1])
		suppressed += n
	}
	lines := strings.Count(audit.buf.String(), "\n")
	t.Logf("%d refusals: %d records (%d full), %d counted in summaries", refusals, lines, full, suppressed)
	if full+suppressed != refusals {
		t.Errorf("%d full records + %d suppressed = %d; want %d", full, suppressed, full+suppressed, refusals)
	}
	if lines > 30 {
		t.Errorf("%d audit records for %d refusals; want a handful:\n%s", lines, refusals, audit.buf.String())
	}
}

// TestHSMReserveForRoot: another uid with every signature it may have
// waiting holds at most max_sessions less an eighth of the HSM's sessions;
// root's signature takes a reserved one at once instead of queueing behind
// that uid's backlog (issue 18, item 5).
func TestHSMReserveForRoot(t *testing.T) {
	store := newStallingStore(t)
	a, bin := stalledAgentForNobody(t, store, server.Options{MaxInFlight: 8, MaxWaiting: 64, MaxSignaturesPerUID: 64})
	api, _ := rawClient(t, a.Socket)
	release := sync.OnceFunc(store.release)
	defer release()

	cmd := clientAs(bin, "sign-many", a.Socket, nobody, "HSMAGENT_TEST_KEY=ec", "HSMAGENT_TEST_N=14")
	out := make(chan string, 1)
	go func() {
		b, err := cmd.CombinedOutput()
		out <- fmt.Sprintf("%s%v", b, err)
	}()
	waitFor(t, func() bool { inHSM, waiting := a.Server.HSMLoad(); return inHSM+waiting == 14 })
	time.Sleep(100 * time.Millisecond) // would take more sessions if it could
	if n := store.calls.Load(); n != 7 {
		t.Fatalf("nobody's 14 signatures (the streams of one connection) hold %d of 8 sessions; want 7 (one kept for root and the agent's user)", n)
	}
	done := make(chan error, 1)
	go func() { _, err := api.Sign(context.Background(), goodEC); done <- err }()
	waitFor(t, func() bool { return store.calls.Load() == 8 })
	release()
	if err := <-done; err != nil {
		t.Errorf("root's signature: %v", err)
	}
	if got := strings.TrimSpace(<-out); !strings.HasPrefix(got, "ok=14") {
		t.Errorf("nobody's signatures: %q; want ok=14", got)
	}
}

// stalledAgentForNobody starts an agent on store, held (nothing signs until
// store.release), whose socket root and nobody may reach and whose rules
// let both use key "ec"; bin is the test binary where nobody can run it.
func stalledAgentForNobody(t *testing.T, store *stallingStore, opts server.Options) (*agenttest.Agent, string) {
	t.Helper()
	needSetpriv(t)
	policy, err := server.NewPolicy([]server.Rule{{Keys: []string{"ec"}, Users: []string{"0", "65534"}}})
	if err != nil {
		t.Fatal(err)
	}
	dir := agenttest.SocketDir(t)
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	opts.Policy, opts.HSMTimeout = policy, time.Minute
	a := agenttest.StartAt(t, filepath.Join(dir, "agent.sock"), 0o666, store, opts)
	store.hold()
	return a, copyTestBinary(t, dir)
}

// TestConnectionRatePerUID: a uid that redials as fast as it can is held to
// its connection rate (bursts of twice as many), the rest closed at accept
// and logged once, while root's connections are not counted (issue 18's
// reconnecting variant of the empty-frame flood: one refusal per connection
// still wore root's throughput down to 40%).
func TestConnectionRatePerUID(t *testing.T) {
	needSetpriv(t)
	dir := agenttest.SocketDir(t)
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	logs := &auditBuffer{}
	a := agenttest.StartAt(t, filepath.Join(dir, "agent.sock"), 0o666, newMemStore(t),
		server.Options{ConnectionRatePerUID: 20, MaxConnectionsPerUID: 1000, Logger: slog.New(slog.NewTextHandler(logs, nil))})
	bin := copyTestBinary(t, dir)
	out, err := clientAs(bin, "dial-rate", a.Socket, nobody, "HSMAGENT_TEST_N=200").CombinedOutput()
	if err != nil {
		t.Fatalf("%s%v", out, err)
	}
	var accepted, refused, ms int
	if _, err := fmt.Sscanf(strings.TrimSpace(string(out)), "accepted=%d refused=%d ms=%d", &accepted, &refused, &ms); err != nil {
		t.Fatalf("helper said %q", out)
	}
	// A burst of 40, then 20 a second for as long as the dialling took.
	if most := 40 + 20*(ms+999)/1000 + 5; accepted < 40 || accepted > most {
		t.Errorf("nobody redialling 200 times in %d ms: %d connections kept, %d closed; want 40 to %d kept", ms, accepted, refused, most)
	}
	if n := logs.count(`limit="connections per second per uid" uid=65534`); n != 1 {
		t.Errorf("%d 'limit reached' lines for the connection rate; want 1:\n%s", n, logs.buf.String())
	}
	for range 100 { // root is not counted
		c := dialUnix(t, a.Socket)
		c.Close()
	}
	stillSignsOverConn(t, a.Socket, nil)
}
