package softhsmtest

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"errors"
	"log/slog"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hsmagent/hsmagent/agent"
	"github.com/hsmagent/hsmagent/agent/bench"
	"github.com/hsmagent/hsmagent/agent/server"
	"github.com/hsmagent/hsmagent/hsm"
	"github.com/miekg/pkcs11"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

// lockedBuffer collects the agent's and the token's log lines from their goroutines.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

func (b *lockedBuffer) count(s string) int { return strings.Count(b.String(), s) }

// faultAgent is an agent serving a fresh token through the fault module, and a Go client of it.
type faultAgent struct {
	fm     *FaultModule
	agent  *Agent
	client *agent.Client
	signer crypto.Signer // through the agent
	logs   *lockedBuffer // the agent's log and the token's outage lines
	audit  *lockedBuffer
	health healthpb.HealthClient
}

const faultKey = "fault-agent-key"

func startFaultAgent(t *testing.T, opts server.Options) *faultAgent {
	t.Helper()
	fa := &faultAgent{fm: NewFaultModule(t, New(t)), logs: &lockedBuffer{}, audit: &lockedBuffer{}}
	log := slog.New(slog.NewTextHandler(fa.logs, nil))
	cfg := fa.fm.Config()
	cfg.Logger = log
	tok, err := hsm.Open(cfg)
	if err != nil {
		t.Fatal(err)
	}
	// Cleanups run last in first out: release hung calls, then stop the agent, then close.
	t.Cleanup(func() { tok.Close() })
	if _, err := tok.GenerateKey(faultKey, hsm.ECDSAP256, nil); err != nil {
		t.Fatal(err)
	}
	opts.Logger = log
	opts.Audit = slog.New(slog.NewTextHandler(fa.audit, nil))
	fa.agent = StartAgent(t, tok, opts)
	t.Cleanup(fa.fm.Reset)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	fa.client, err = agent.Dial(ctx, fa.agent.Socket)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { fa.client.Close() })
	if fa.signer, err = fa.client.Signer(ctx, faultKey); err != nil {
		t.Fatal(err)
	}
	conn, err := grpc.NewClient("unix://"+fa.agent.Socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	fa.health = healthpb.NewHealthClient(conn)
	return fa
}

// sign signs through the agent and checks a signature it returns.
func (fa *faultAgent) sign(t *testing.T) error {
	digest := sha256.Sum256([]byte("through the agent and the fault module"))
	sig, err := fa.signer.Sign(rand.Reader, digest[:], crypto.SHA256)
	if err == nil && !ecdsa.VerifyASN1(fa.signer.Public().(*ecdsa.PublicKey), digest[:], sig) {
		t.Error("a signature made through the agent does not verify")
	}
	return err
}

func (fa *faultAgent) serving(t *testing.T) bool {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	h, err := fa.health.Check(ctx, &healthpb.HealthCheckRequest{})
	if err != nil {
		t.Fatalf("health check: %v", err)
	}
	return h.Status == healthpb.HealthCheckResponse_SERVING
}

// waitSigns waits until a signature through the agent succeeds.
func (fa *faultAgent) waitSigns(t *testing.T, within time.Duration) {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		err := fa.sign(t)
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the agent does not sign %s later: %v", within, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func callCode(err error) string {
	var ce *agent.CallError
	if errors.As(err, &ce) {
		return ce.Code
	}
	return ""
}

// TestAgentFaultLatency: with 50 ms per C_Sign, 16 clients signing at once
// overlap in the HSM's sessions instead of queueing behind each other.
func TestAgentFaultLatency(t *testing.T) {
	fa := startFaultAgent(t, server.Options{})
	fa.fm.SetSignLatency(50 * time.Millisecond)
	const n = 16
	errs := make(chan error, n)
	start := time.Now()
	for i := 0; i < n; i++ {
		go func() { errs <- fa.sign(t) }()
	}
	for i := 0; i < n; i++ {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	elapsed := time.Since(start)
	t.Logf("%d concurrent signatures through the agent at 50ms each: %s", n, elapsed)
	if elapsed >= 6*50*time.Millisecond {
		t.Errorf("%d concurrent signatures at 50ms each took %s through the agent; want well under %s", n, elapsed, n*50*time.Millisecond)
	}
}

// TestAgentFaultHang: a hung HSM fails the caller with Unavailable within
// the HSM timeout, turns health NOT_SERVING and makes later requests fail
// fast without reaching the module; after Release the agent serves again,
// and the log says each once.
func TestAgentFaultHang(t *testing.T) {
	const timeout = 300 * time.Millisecond
	fa := startFaultAgent(t, server.Options{HSMTimeout: timeout})
	if err := fa.sign(t); err != nil {
		t.Fatal(err)
	}
	fa.fm.Hang()
	t.Cleanup(fa.fm.Release)
	forwarded, received := fa.fm.Calls("sign"), fa.fm.Stats("sign").Calls

	start := time.Now()
	err := fa.sign(t)
	if d := time.Since(start); callCode(err) != "Unavailable" || d > timeout+time.Second {
		t.Fatalf("sign with the HSM hung: %v after %s; want Unavailable within %s", err, d, timeout)
	}
	if fa.serving(t) {
		t.Error("health SERVING with an operation stuck in the HSM")
	}
	for i := 0; i < 5; i++ {
		start := time.Now()
		err := fa.sign(t)
		if d := time.Since(start); callCode(err) != "Unavailable" || d > 100*time.Millisecond {
			t.Errorf("sign %d while stuck: %v after %s; want Unavailable at once", i+1, err, d)
		}
	}
	if st := fa.fm.Stats("sign"); st.Forwarded != forwarded || st.Calls != received+1 {
		t.Errorf("while hung, %d C_Sign reached the module and %d SoftHSM; want 1 and 0", st.Calls-received, st.Forwarded-forwarded)
	}

	fa.fm.Release()
	deadline := time.Now().Add(5 * time.Second)
	for !fa.serving(t) {
		if time.Now().After(deadline) {
			t.Fatal("health not SERVING 5s after Release")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err := fa.sign(t); err != nil {
		t.Errorf("sign after Release: %v", err)
	}
	if a, b := fa.logs.count("stopped answering"), fa.logs.count("answers again"); a != 1 || b != 1 {
		t.Errorf("%d 'stopped answering' and %d 'answers again' lines, want 1 each:\n%s", a, b, fa.logs)
	}
	if !strings.Contains(fa.audit.String(), "result=timeout") || !strings.Contains(fa.audit.String(), "result=hsm-down") {
		t.Errorf("audit lacks the timeout and the fast refusals:\n%s", fa.audit)
	}
}

// TestAgentFaultErrorBurst: five device errors in a row cost the clients a
// few failed calls, not a reload of the module per call, and signing
// resumes by itself.
func TestAgentFaultErrorBurst(t *testing.T) {
	fa := startFaultAgent(t, server.Options{})
	if err := fa.sign(t); err != nil {
		t.Fatal(err)
	}
	inits, opens := fa.fm.Calls("initialize"), fa.fm.Calls("open")
	fa.fm.FailNext(pkcs11.CKR_DEVICE_ERROR, 5)
	failed := 0
	deadline := time.Now().Add(5 * time.Second)
	for ok := 0; ok < 3; {
		err := fa.sign(t)
		switch code := callCode(err); {
		case err == nil:
			ok++
		case code == "Internal" || code == "Unavailable":
			failed++
		default:
			t.Fatalf("sign during a burst of device errors: %v; want Internal or Unavailable", err)
		}
		if time.Now().After(deadline) {
			t.Fatalf("still failing 5s after a burst of 5 device errors (%d failures)", failed)
		}
		time.Sleep(5 * time.Millisecond)
	}
	reinits, reopens := fa.fm.Calls("initialize")-inits, fa.fm.Calls("open")-opens
	t.Logf("a burst of 5 device errors: %d failed calls, %d C_Initialize, %d C_OpenSession", failed, reinits, reopens)
	if failed == 0 || failed > 5 {
		t.Errorf("%d calls failed in a burst of 5 device errors; want 1 to 5", failed)
	}
	if reinits > 5 || reopens > 20 {
		t.Errorf("%d C_Initialize and %d C_OpenSession for a burst of 5 device errors", reinits, reopens)
	}
	if n := fa.logs.count(`"signing failed"`) + fa.logs.count("msg=\"signing failed\""); n > 2 {
		t.Errorf("%d 'signing failed' lines for one burst, want at most 2 (one a second):\n%s", n, fa.logs)
	}
}

// TestAgentFaultTokenGone: with the token pulled out, clients get
// Unavailable naming the token, the module is reloaded at a backed-off rate
// whatever the request rate, the log says it once, and the agent signs again
// by itself when the token is back.
func TestAgentFaultTokenGone(t *testing.T) {
	fa := startFaultAgent(t, server.Options{})
	if err := fa.sign(t); err != nil {
		t.Fatal(err)
	}
	label := fa.fm.Config().TokenLabel
	fa.fm.RemoveToken()
	inits := fa.fm.Stats("initialize").Calls
	start := time.Now()
	requests := 0
	for time.Since(start) < 2*time.Second {
		err := fa.sign(t)
		requests++
		if callCode(err) != "Unavailable" || !strings.Contains(err.Error(), label) {
			t.Fatalf("sign %d with the token gone: %v; want Unavailable naming token %q", requests, err, label)
		}
		time.Sleep(50 * time.Millisecond) // 20 requests a second
	}
	n := fa.fm.Stats("initialize").Calls - inits
	t.Logf("token gone for 2s, %d requests: %d C_Initialize; last error: %v", requests, n, fa.sign(t))
	if n > 10 {
		t.Errorf("%d C_Initialize in 2s of %d requests with the token gone; want at most 10", n, requests)
	}
	if c := fa.logs.count("HSM token unavailable"); c != 1 {
		t.Errorf("%d 'HSM token unavailable' lines, want 1:\n%s", c, fa.logs)
	}
	if c := fa.logs.count("level=ERROR"); c > 2 {
		t.Errorf("%d ERROR lines for one outage:\n%s", c, fa.logs)
	}
	if !strings.Contains(fa.audit.String(), "result=hsm-down") {
		t.Errorf("audit lacks hsm-down:\n%s", fa.audit)
	}

	fa.fm.RestoreToken()
	restored := time.Now()
	fa.waitSigns(t, hsm.DefaultReopenMax+2*time.Second)
	t.Logf("signing again %s after the token came back", time.Since(restored).Round(time.Millisecond))
	if c := fa.logs.count("HSM token available again"); c != 1 {
		t.Errorf("%d 'HSM token available again' lines, want 1:\n%s", c, fa.logs)
	}
	if !fa.serving(t) {
		t.Error("health not SERVING after the token came back")
	}
}

// TestAgentFaultSessionLostMidStream: a session invalidated while many
// signatures share the client's stream is reopened and retried; every call
// succeeds or fails cleanly, and later calls succeed.
func TestAgentFaultSessionLostMidStream(t *testing.T) {
	fa := startFaultAgent(t, server.Options{})
	const workers, each = 8, 40
	var wg sync.WaitGroup
	var mu sync.Mutex
	var failures []error
	started := make(chan struct{})
	var once sync.Once
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < each; i++ {
				if i == 5 {
					once.Do(func() { close(started) })
				}
				if err := fa.sign(t); err != nil {
					if c := callCode(err); c != "Internal" && c != "Unavailable" {
						t.Errorf("sign mid-stream: %v; want success, Internal or Unavailable", err)
					}
					mu.Lock()
					failures = append(failures, err)
					mu.Unlock()
				}
			}
		}()
	}
	<-started
	inits := fa.fm.Calls("initialize")
	fa.fm.FailNext(pkcs11.CKR_SESSION_HANDLE_INVALID, 1)
	wg.Wait()
	t.Logf("%d of %d signatures failed around a lost session; %d reopen(s); %d C_Sign failed in the module",
		len(failures), workers*each, fa.fm.Calls("initialize")-inits, fa.fm.Stats("sign").Failed)
	if len(failures) > 1 {
		t.Errorf("%d signatures failed for one lost session: %v", len(failures), failures[0])
	}
	for i := 0; i < 5; i++ {
		if err := fa.sign(t); err != nil {
			t.Errorf("sign after the lost session: %v", err)
		}
	}
}

// TestAgentFaultTLSHandshake: a TLS 1.3 handshake whose server key is in the
// agent fails with a clear error within the HSM timeout while the HSM hangs,
// and a new handshake succeeds once it is released.
func TestAgentFaultTLSHandshake(t *testing.T) {
	const timeout = 300 * time.Millisecond
	fa := startFaultAgent(t, server.Options{HSMTimeout: timeout})
	cert, pool, err := bench.SelfSigned(fa.signer)
	if err != nil {
		t.Fatal(err)
	}
	handshake := func() (serverErr, clientErr error) {
		c1, c2 := net.Pipe()
		defer c1.Close()
		defer c2.Close()
		srv := tls.Server(c1, &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS13})
		cli := tls.Client(c2, &tls.Config{RootCAs: pool, ServerName: "localhost", MinVersion: tls.VersionTLS13})
		done := make(chan error, 1)
		go func() {
			err := srv.Handshake()
			c1.Close() // the client is not left waiting for a server that gave up
			done <- err
		}()
		clientErr = cli.Handshake()
		return <-done, clientErr
	}
	if s, c := handshake(); s != nil || c != nil {
		t.Fatalf("handshake before the hang: server %v, client %v", s, c)
	}

	fa.fm.Hang()
	t.Cleanup(fa.fm.Release)
	start := time.Now()
	s, c := handshake()
	d := time.Since(start)
	t.Logf("handshake with the HSM hung: %s; server: %v; client: %v", d.Round(time.Millisecond), s, c)
	if s == nil || c == nil {
		t.Fatalf("handshake succeeded with the HSM hung: server %v, client %v", s, c)
	}
	// crypto/tls keeps only the text of the signer's error.
	if !strings.Contains(s.Error(), "did not answer within") || !strings.Contains(s.Error(), "(Unavailable)") {
		t.Errorf("server's handshake error with the HSM hung: %v; want the agent's Unavailable", s)
	}
	if d > timeout+time.Second {
		t.Errorf("handshake with the HSM hung failed after %s; want within %s", d, timeout)
	}

	fa.fm.Release()
	deadline := time.Now().Add(5 * time.Second)
	for {
		s, c := handshake()
		if s == nil && c == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("handshake 5s after Release: server %v, client %v", s, c)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
