package worker_test

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/rsa"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hsmagent/hsmagent/agent/core"
	"github.com/hsmagent/hsmagent/hsm"
	"github.com/hsmagent/hsmagent/hsm/hsmstore"
	"github.com/hsmagent/hsmagent/hsm/worker"
	softhsmtest "github.com/hsmagent/hsmagent/softhsm-test"
)

// The test binary is its own worker when started with childArg, as the
// hsmagent binary is with its worker command.
const childArg = "hsm-worker-test-child"

func TestMain(m *testing.M) {
	if len(os.Args) == 2 && os.Args[1] == childArg {
		conn, err := net.FileConn(os.NewFile(3, "agent"))
		if err != nil {
			os.Exit(2)
		}
		err = worker.Serve(conn, os.NewFile(4, "signatures"), os.Getpid(), func(in worker.Init) (core.KeyStore, string, error) {
			tok, err := hsm.Open(hsm.Config{ModulePath: in.ModulePath, TokenLabel: in.TokenLabel,
				MaxSessions: in.MaxSessions, PIN: func() (string, error) { return in.PIN, nil }})
			if err != nil {
				return nil, "", err
			}
			return hsmstore.New(tok), tok.Label(), nil
		})
		if err != nil {
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

type fixture struct {
	fm    *softhsmtest.FaultModule
	store *worker.Store
	log   *lockedBuffer
}

// start makes a token with an EC and an RSA key behind the fault module
// and a worker store on it.
func start(t *testing.T, killAfter time.Duration) *fixture {
	t.Helper()
	return startSessions(t, killAfter, 4)
}

// startSessions is start with the worker's sessions given.
func startSessions(t *testing.T, killAfter time.Duration, sessions int) *fixture {
	t.Helper()
	tok := softhsmtest.New(t)
	fm := softhsmtest.NewFaultModule(t, tok)
	direct := tok.Open(t)
	for label, kt := range map[string]hsm.KeyType{"ec": hsm.ECDSAP256, "rsa": hsm.RSA2048} {
		if _, err := direct.GenerateKey(label, kt, nil); err != nil {
			t.Fatal(err)
		}
	}
	cfg := fm.Config()
	log := &lockedBuffer{}
	s, err := worker.Start(worker.Options{
		Command:    []string{os.Args[0], childArg},
		Init:       worker.Init{ModulePath: cfg.ModulePath, TokenLabel: cfg.TokenLabel, MaxSessions: sessions},
		PIN:        cfg.PIN,
		Logger:     slog.New(slog.NewTextHandler(log, nil)),
		KillAfter:  killAfter,
		RestartMin: 50 * time.Millisecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	if _, err := s.Keys(); err != nil {
		t.Fatal(err)
	}
	return &fixture{fm: fm, store: s, log: log}
}

func (f *fixture) signer(t *testing.T, label string) crypto.Signer {
	t.Helper()
	s, err := f.store.Signer(label)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

var digest = sha256.Sum256([]byte("worker"))

func TestWorkerSigns(t *testing.T) {
	f := start(t, 0)
	if got := f.store.TokenLabel(); got == "" {
		t.Error("no token label from the worker")
	}
	ec := f.signer(t, "ec")
	sig, err := ec.Sign(nil, digest[:], crypto.SHA256)
	if err != nil || !ecdsa.VerifyASN1(ec.Public().(*ecdsa.PublicKey), digest[:], sig) {
		t.Fatalf("ECDSA signature %x, %v: does not verify", sig, err)
	}
	rs := f.signer(t, "rsa")
	sig, err = rs.Sign(nil, digest[:], crypto.SHA256)
	if err != nil || rsa.VerifyPKCS1v15(rs.Public().(*rsa.PublicKey), crypto.SHA256, digest[:], sig) != nil {
		t.Fatalf("RSA PKCS #1 v1.5 signature: %v", err)
	}
	pss := &rsa.PSSOptions{Hash: crypto.SHA256, SaltLength: rsa.PSSSaltLengthEqualsHash}
	sig, err = rs.Sign(nil, digest[:], pss)
	if err != nil || rsa.VerifyPSS(rs.Public().(*rsa.PublicKey), crypto.SHA256, digest[:], sig, pss) != nil {
		t.Fatalf("RSA-PSS signature: %v", err)
	}
	if _, err := f.store.Signer("nope"); !errors.Is(err, core.ErrKeyNotFound) {
		t.Errorf("Signer of a missing label: %v; want ErrKeyNotFound", err)
	}
}

// TestWorkerHasNoPINInArgvOrEnvironment: the PIN reaches the worker in its
// init message only.
func TestWorkerHasNoPINInArgvOrEnvironment(t *testing.T) {
	tok := softhsmtest.New(t)
	pin, err := os.ReadFile(tok.PINFile)
	if err != nil {
		t.Fatal(err)
	}
	t.Setenv("HSMAGENT_PIN", strings.TrimSpace(string(pin)))
	before := softhsmtest.ChildPIDs(t) // workers of earlier tests may still be exiting
	s, err := worker.Start(worker.Options{Command: []string{os.Args[0], childArg},
		Init: worker.Init{ModulePath: tok.ModulePath, TokenLabel: tok.Label},
		PIN:  hsm.PINFromEnv("HSMAGENT_PIN"), Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	pid := softhsmtest.NewChild(t, before)
	for _, file := range []string{"cmdline", "environ"} {
		b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/" + file)
		if err != nil {
			t.Fatal(err)
		}
		if strings.Contains(string(b), strings.TrimSpace(string(pin))) {
			t.Errorf("the worker's %s holds the PIN", file)
		}
	}
}

func TestWorkerWrongPIN(t *testing.T) {
	tok := softhsmtest.New(t)
	_, err := worker.Start(worker.Options{Command: []string{os.Args[0], childArg},
		Init: worker.Init{ModulePath: tok.ModulePath, TokenLabel: tok.Label},
		PIN:  func() (string, error) { return "not-the-pin", nil }, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err == nil || !strings.Contains(err.Error(), "PIN") || strings.Contains(err.Error(), "not-the-pin") {
		t.Fatalf("Start with a wrong PIN: %v; want the token's refusal, naming the PIN but not showing it", err)
	}
}

// TestWorkerCrash: a module that dies of SIGSEGV inside C_Sign takes the
// worker with it; the signature in flight fails as Unavailable, and the
// next worker signs within a few seconds.
func TestWorkerCrash(t *testing.T) {
	f := start(t, 0)
	ec := f.signer(t, "ec")
	f.fm.Set("crash", "1")
	_, err := ec.Sign(nil, digest[:], crypto.SHA256)
	var u interface{ Unavailable() bool }
	if !errors.As(err, &u) || !u.Unavailable() {
		t.Fatalf("signature in flight when the module crashed: %v; want an Unavailable error", err)
	}
	f.fm.Set("crash", "")
	signsAgainWithin(t, ec, 5*time.Second)
	if !strings.Contains(f.log.String(), "segmentation") && !strings.Contains(f.log.String(), "exit status 2") {
		t.Errorf("the log does not say how the worker died:\n%s", f.log)
	}
}

// TestWorkerHangsForever: a C_Sign that never returns is killed with its
// worker after KillAfter; the caller gets Unavailable, the next worker signs.
func TestWorkerHangsForever(t *testing.T) {
	f := start(t, 500*time.Millisecond)
	ec := f.signer(t, "ec")
	f.fm.Set("hang", "forever")
	begin := time.Now()
	_, err := ec.Sign(nil, digest[:], crypto.SHA256)
	var u interface{ Unavailable() bool }
	if !errors.As(err, &u) || !u.Unavailable() {
		t.Fatalf("signature stuck in the module: %v; want an Unavailable error", err)
	}
	if d := time.Since(begin); d < 500*time.Millisecond {
		t.Errorf("answered after %v, before the kill bound", d)
	}
	f.fm.Set("hang", "")
	signsAgainWithin(t, ec, 5*time.Second)
	if !strings.Contains(f.log.String(), "killing the HSM worker") {
		t.Errorf("the log does not say the worker was killed:\n%s", f.log)
	}
}

// TestWorkerWaitingCallsRetried: calls made while a worker restarts wait
// for the next one instead of failing.
func TestWorkerWaitingCallsRetried(t *testing.T) {
	f := start(t, 0)
	ec := f.signer(t, "ec")
	f.fm.Set("crash", "1")
	if _, err := ec.Sign(nil, digest[:], crypto.SHA256); err == nil {
		t.Fatal("signed through a crashing module")
	}
	f.fm.Set("crash", "")
	// The restart is under way: these wait for it.
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, err := ec.Sign(nil, digest[:], crypto.SHA256)
			errs <- err
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Errorf("a call made during the restart: %v", err)
		}
	}
}

func signsAgainWithin(t *testing.T, s crypto.Signer, d time.Duration) {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		sig, err := s.Sign(nil, digest[:], crypto.SHA256)
		if err == nil {
			if !ecdsa.VerifyASN1(s.Public().(*ecdsa.PublicKey), digest[:], sig) {
				t.Fatal("the new worker's signature does not verify")
			}
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("no signature within %v after the worker died: %v", d, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

type lockedBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// TestWorkerConcurrentCallers: many callers at once, each taking its turn
// reading the worker's answers, all get theirs (a caller that took the
// reader's turn after its answer had been delivered once read on for
// ever, and its call stuck until the worker was killed).
func TestWorkerConcurrentCallers(t *testing.T) {
	f := start(t, 0)
	ec := f.signer(t, "ec")
	const callers, each = 32, 500
	var wg sync.WaitGroup
	errs := make(chan error, callers)
	for range callers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range each {
				start := time.Now()
				if _, err := ec.Sign(nil, digest[:], crypto.SHA256); err != nil {
					errs <- err
					return
				}
				if d := time.Since(start); d > 2*time.Second {
					errs <- fmt.Errorf("a signature took %v", d)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

// TestWorkerCrashLoopBacksOff: a module that crashes at every start (in
// C_Login here) is started again with backoff, not in a tight loop; calls
// meanwhile fail as Unavailable within KillAfter; once the module behaves,
// a worker serves again by itself.
func TestWorkerCrashLoopBacksOff(t *testing.T) {
	f := start(t, time.Second)
	ec := f.signer(t, "ec")
	f.fm.Set("crash_ops", "sign,login")
	f.fm.Set("crash", "1")
	if _, err := ec.Sign(nil, digest[:], crypto.SHA256); err == nil {
		t.Fatal("signed through a crashing module")
	}
	begin := time.Now()
	_, err := ec.Sign(nil, digest[:], crypto.SHA256) // waits for a worker that never comes up
	var u interface{ Unavailable() bool }
	if !errors.As(err, &u) || !u.Unavailable() || time.Since(begin) > 3*time.Second {
		t.Fatalf("a call during the crash loop: %v after %v; want Unavailable within about KillAfter (1s)", err, time.Since(begin))
	}
	time.Sleep(time.Second)
	// Started at 50 ms, doubling: about 6 starts in 2.5 s, never dozens.
	if n := strings.Count(f.log.String(), "starting the HSM worker failed"); n < 2 || n > 8 {
		t.Errorf("%d failed starts in about 2.5 s; want a few, spaced by the backoff:\n%s", n, f.log)
	}
	f.fm.Set("crash", "")
	signsAgainWithin(t, ec, 8*time.Second) // the backoff has reached at most RestartMax (5 s)
}
