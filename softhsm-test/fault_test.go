package softhsmtest

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"math/big"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hsmagent/hsmagent/hsm"
	"github.com/miekg/pkcs11"
)

// faultSigner opens a fresh token through the fault module and generates an
// ECDSA P-256 key in it.
func faultSigner(t *testing.T) (*FaultModule, *hsm.Token, crypto.Signer) {
	t.Helper()
	return faultSignerSessions(t, 0)
}

// faultSignerSessions is faultSigner with crypto11's session cap set (0: its default).
func faultSignerSessions(t *testing.T, maxSessions int) (*FaultModule, *hsm.Token, crypto.Signer) {
	t.Helper()
	fm := NewFaultModule(t, New(t))
	cfg := fm.Config()
	cfg.MaxSessions = maxSessions
	tok, err := hsm.Open(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tok.Close() })
	if _, err := tok.GenerateKey("fault-key", hsm.ECDSAP256, nil); err != nil {
		t.Fatal(err)
	}
	s, err := tok.Signer("fault-key")
	if err != nil {
		t.Fatal(err)
	}
	return fm, tok, s
}

// signOnce signs a fixed message and checks the signature when there is one.
func signOnce(t *testing.T, s crypto.Signer) error {
	digest := sha256.Sum256([]byte("through the fault module"))
	sig, err := s.Sign(rand.Reader, digest[:], crypto.SHA256)
	if err == nil && !ecdsa.VerifyASN1(s.Public().(*ecdsa.PublicKey), digest[:], sig) {
		t.Errorf("signature made through the fault module does not verify")
	}
	return err
}

func isCode(err error, code uint) bool {
	var rv pkcs11.Error
	return errors.As(err, &rv) && rv == pkcs11.Error(code)
}

func TestFaultModuleForwardsAndCounts(t *testing.T) {
	fm, _, s := faultSigner(t)
	for _, op := range []string{"initialize", "slots", "tokeninfo", "open", "login", "find", "attr", "generate"} {
		if fm.Calls(op) == 0 {
			t.Errorf("no %s call reached SoftHSM while opening the token and generating a key", op)
		}
	}
	signs, inits := fm.Calls("sign"), fm.Calls("signinit")
	for i := 0; i < 3; i++ {
		if err := signOnce(t, s); err != nil {
			t.Fatal(err)
		}
	}
	// One C_SignInit and one C_Sign each: the length query before C_Sign is not counted.
	if got := fm.Calls("sign") - signs; got != 3 {
		t.Errorf("C_Sign forwarded %d times for 3 signatures", got)
	}
	if got := fm.Calls("signinit") - inits; got != 3 {
		t.Errorf("C_SignInit forwarded %d times for 3 signatures", got)
	}
	if st := fm.Stats("sign"); st.Calls != st.Forwarded || st.Failed != 0 || st.Hung != 0 {
		t.Errorf("sign counters with no faults set: %+v", st)
	}
}

func TestFaultSignLatency(t *testing.T) {
	fm, _, s := faultSigner(t)
	fm.SetSignLatency(20 * time.Millisecond)
	start := time.Now()
	if err := signOnce(t, s); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d < 20*time.Millisecond {
		t.Errorf("a signature with 20ms of latency took %s", d)
	}
}

// TestFaultLatencyOverlaps checks that the module does not serialise callers
// while they wait: 16 signatures of 50 ms each, made at once, must take far
// less than 16 x 50 ms.
func TestFaultLatencyOverlaps(t *testing.T) {
	fm, _, s := faultSigner(t)
	fm.SetSignLatency(50 * time.Millisecond)
	const n = 16
	errs := make(chan error, n)
	start := time.Now()
	var wg sync.WaitGroup
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			digest := sha256.Sum256([]byte("overlap"))
			_, err := s.Sign(rand.Reader, digest[:], crypto.SHA256)
			errs <- err
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	if elapsed < 50*time.Millisecond || elapsed >= 8*50*time.Millisecond {
		t.Errorf("%d concurrent signatures with 50ms of latency took %s; want at least 50ms and well under %s",
			n, elapsed, n*50*time.Millisecond)
	}
}

// TestFaultFailNext uses PKCS#11 directly, so that each C_Sign is one call:
// the next two fail with the injected code and the third succeeds, on the
// same session, which shows that a failed C_Sign ended the operation.
func TestFaultFailNext(t *testing.T) {
	tok := New(t)
	fm := NewFaultModule(t, tok)
	p := pkcs11.New(fm.Path)
	if p == nil {
		t.Fatalf("cannot load %s", fm.Path)
	}
	if err := p.Initialize(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Finalize(); p.Destroy() })
	session := rawLogin(t, p, tok)
	pub, priv := rawECKey(t, p, session)

	fm.FailNext(pkcs11.CKR_DEVICE_ERROR, 2)
	before := fm.Stats("sign")
	digest := sha256.Sum256([]byte("fail next"))
	for i := 0; i < 3; i++ {
		if err := p.SignInit(session, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_ECDSA, nil)}, priv); err != nil {
			t.Fatalf("C_SignInit %d: %v", i+1, err)
		}
		sig, err := p.Sign(session, digest[:])
		if i < 2 {
			if !isCode(err, pkcs11.CKR_DEVICE_ERROR) {
				t.Errorf("C_Sign %d: got %v, want CKR_DEVICE_ERROR", i+1, err)
			}
			continue
		}
		if err != nil {
			t.Fatalf("C_Sign 3 after two injected failures: %v", err)
		}
		r, s := new(big.Int).SetBytes(sig[:len(sig)/2]), new(big.Int).SetBytes(sig[len(sig)/2:])
		if !ecdsa.Verify(pub, digest[:], r, s) {
			t.Error("signature after the injected failures does not verify")
		}
	}
	after := fm.Stats("sign")
	if after.Failed-before.Failed != 2 || after.Forwarded-before.Forwarded != 1 {
		t.Errorf("sign counters went from %+v to %+v; want 2 failed, 1 forwarded", before, after)
	}
}

// TestFaultErrorsThroughHSM shows how the hsm package meets injected errors:
// a device error counts as a lost session, so the token is reopened and the
// signature tried once more; a general error is returned as it is.
func TestFaultErrorsThroughHSM(t *testing.T) {
	// crypto11 keeps one session for itself and pools the rest; with a pool
	// of one, every signature reuses the same session. (Its default pool
	// opens a new session for each Get until it holds MaxSessions-1.)
	fm, _, s := faultSignerSessions(t, 2)

	inits := fm.Calls("initialize")
	fm.FailNext(pkcs11.CKR_DEVICE_ERROR, 1)
	if err := signOnce(t, s); err != nil {
		t.Errorf("one device error: the retry after reopening should have signed: %v", err)
	}
	if fm.Calls("initialize") != inits+1 {
		t.Errorf("one device error: C_Initialize calls went from %d to %d, want one reopen", inits, fm.Calls("initialize"))
	}

	fm.FailNext(pkcs11.CKR_DEVICE_ERROR, 2)
	if err := signOnce(t, s); !isCode(err, pkcs11.CKR_DEVICE_ERROR) {
		t.Errorf("two device errors: got %v, want CKR_DEVICE_ERROR", err)
	}
	if err := signOnce(t, s); err != nil {
		t.Errorf("after the two device errors: %v", err)
	}

	inits = fm.Calls("initialize")
	fm.FailNext(pkcs11.CKR_GENERAL_ERROR, 1)
	if err := signOnce(t, s); !isCode(err, pkcs11.CKR_GENERAL_ERROR) {
		t.Errorf("a general error: got %v, want CKR_GENERAL_ERROR", err)
	}
	// The same session signs next: its signing operation must have ended.
	if err := signOnce(t, s); err != nil {
		t.Errorf("after a general error: %v", err)
	}
	if fm.Calls("initialize") != inits {
		t.Errorf("a general error reopened the token")
	}
}

func TestFaultFailWhileByName(t *testing.T) {
	fm := NewFaultModule(t, New(t))
	fm.Set("fail", "CKR_PIN_INCORRECT")
	fm.Set("fail_ops", "login")
	for i := 0; i < 2; i++ {
		tok, err := hsm.Open(fm.Config())
		if !isCode(err, pkcs11.CKR_PIN_INCORRECT) {
			if tok != nil {
				tok.Close()
			}
			t.Fatalf("open %d while logins fail: got %v, want CKR_PIN_INCORRECT", i+1, err)
		}
	}
	if st := fm.Stats("login"); st.Failed != 2 || st.Forwarded != 0 {
		t.Errorf("login counters: %+v; want 2 failed, none forwarded", st)
	}
	fm.ClearFail()
	tok, err := hsm.Open(fm.Config())
	if err != nil {
		t.Fatalf("open after ClearFail: %v", err)
	}
	tok.Close()
}

// TestFaultEnvironmentAndOverride sets a failure through the environment,
// which the module reads when it is loaded, and lifts it in the control file.
func TestFaultEnvironmentAndOverride(t *testing.T) {
	fm := NewFaultModule(t, New(t))
	t.Setenv("HSMAGENT_FAULT_FAIL", "0x30")
	t.Setenv("HSMAGENT_FAULT_FAIL_OPS", "open")
	if _, err := hsm.Open(fm.Config()); !isCode(err, pkcs11.CKR_DEVICE_ERROR) {
		t.Fatalf("open with HSMAGENT_FAULT_FAIL=0x30 for open: got %v, want CKR_DEVICE_ERROR", err)
	}
	fm.Set("fail", "none")
	tok, err := hsm.Open(fm.Config())
	if err != nil {
		t.Fatalf("open with fail=none in the control file: %v", err)
	}
	tok.Close()
}

func TestFaultHang(t *testing.T) {
	fm, _, s := faultSigner(t)
	fm.Hang()
	t.Cleanup(fm.Release) // before the token closes, even if the test fails
	signs := fm.Calls("sign")
	done := make(chan error, 1)
	go func() { done <- signOnce(t, s) }()

	fm.WaitHung("sign", 1)
	select {
	case err := <-done:
		t.Fatalf("a sign returned while hung: %v", err)
	case <-time.After(100 * time.Millisecond):
	}
	if got := fm.Calls("sign"); got != signs {
		t.Errorf("%d C_Sign reached SoftHSM while hung", got-signs)
	}

	fm.Release()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("sign after Release: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("sign still hung 10s after Release")
	}
	if got := fm.Calls("sign"); got != signs+1 {
		t.Errorf("%d C_Sign reached SoftHSM after Release, want 1", got-signs)
	}
	if st := fm.Stats("sign"); st.Hung != 1 || st.Waiting != 0 {
		t.Errorf("sign counters after Release: %+v", st)
	}
}

func TestFaultRemoveToken(t *testing.T) {
	fm, _, s := faultSigner(t)
	label := fm.Config().TokenLabel
	fm.RemoveToken()

	// A token already open loses its sessions and cannot be reopened.
	if err := signOnce(t, s); err == nil {
		t.Error("signed with the token removed")
	}
	infos, err := hsm.ListTokens(fm.Path)
	if err != nil {
		t.Fatal(err)
	}
	if len(infos) != 0 {
		t.Errorf("tokens listed with the token removed: %+v", infos)
	}
	if tok, err := hsm.Open(fm.Config()); err == nil {
		tok.Close()
		t.Error("hsm.Open succeeded with the token removed")
	} else if !strings.Contains(err.Error(), "not found") {
		t.Errorf("hsm.Open with the token removed: %v", err)
	}

	fm.RestoreToken()
	infos, err = hsm.ListTokens(fm.Path)
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, info := range infos {
		found = found || info.Label == label
	}
	if !found {
		t.Errorf("token %q not listed after RestoreToken: %+v", label, infos)
	}
	// The open token recovers by itself: its next reopen attempt comes at
	// most ReopenMin (plus jitter) after the last, and fails fast until then.
	deadline := time.Now().Add(2 * time.Second)
	for {
		err := signOnce(t, s)
		if err == nil {
			break
		}
		if !errors.Is(err, hsm.ErrUnavailable) || time.Now().After(deadline) {
			t.Errorf("sign after RestoreToken: %v", err)
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestFaultInChildProcess drives the hsmagent binary through the module with
// FaultModule.Env: its calls add to the shared counters, and a fail count
// applies afresh in each process.
func TestFaultInChildProcess(t *testing.T) {
	tok := New(t)
	fm := NewFaultModule(t, tok)
	listed := func() (result, bool) {
		r := tok.hsmagentEnv(t, fm.Env(), "tokens", "--json")
		return r, r.code == 0 && strings.Contains(r.stdout, `"label": "`+tok.Label+`"`)
	}
	if r, ok := listed(); !ok {
		t.Fatalf("tokens through the fault module: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	if fm.Calls("slots") == 0 || fm.Calls("tokeninfo") == 0 {
		t.Errorf("the child's calls were not counted: slots %+v, tokeninfo %+v", fm.Stats("slots"), fm.Stats("tokeninfo"))
	}

	fm.FailNext(pkcs11.CKR_DEVICE_ERROR, 1, "slots")
	for i := 0; i < 2; i++ {
		if r, ok := listed(); ok || r.code == 0 || !strings.Contains(r.stderr, "CKR_DEVICE_ERROR") {
			t.Errorf("child %d with its first C_GetSlotList failing: exit %d\n%s%s", i+1, r.code, r.stdout, r.stderr)
		}
	}
	fm.ClearFail()

	fm.RemoveToken()
	if r, ok := listed(); ok {
		t.Errorf("tokens with the token removed: %s", r.stdout)
	}
	fm.RestoreToken()
	if r, ok := listed(); !ok {
		t.Errorf("tokens after RestoreToken: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
}

// rawLogin opens a session on tok's slot and logs in.
func rawLogin(t *testing.T, p *pkcs11.Ctx, tok *Token) pkcs11.SessionHandle {
	t.Helper()
	slots, err := p.GetSlotList(true)
	if err != nil {
		t.Fatal(err)
	}
	for _, slot := range slots {
		info, err := p.GetTokenInfo(slot)
		if err != nil || info.Label != tok.Label {
			continue
		}
		session, err := p.OpenSession(slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
		if err != nil {
			t.Fatal(err)
		}
		if err := p.Login(session, pkcs11.CKU_USER, tok.PIN); err != nil {
			t.Fatal(err)
		}
		return session
	}
	t.Fatalf("token %q not found", tok.Label)
	return 0
}

// rawECKey generates a session P-256 key pair and returns its public half.
func rawECKey(t *testing.T, p *pkcs11.Ctx, session pkcs11.SessionHandle) (*ecdsa.PublicKey, pkcs11.ObjectHandle) {
	t.Helper()
	p256 := []byte{0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07} // OID 1.2.840.10045.3.1.7
	pubH, privH, err := p.GenerateKeyPair(session,
		[]*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_EC_KEY_PAIR_GEN, nil)},
		[]*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_EC_PARAMS, p256), pkcs11.NewAttribute(pkcs11.CKA_VERIFY, true)},
		[]*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_SIGN, true)})
	if err != nil {
		t.Fatal(err)
	}
	attrs, err := p.GetAttributeValue(session, pubH, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_EC_POINT, nil)})
	if err != nil {
		t.Fatal(err)
	}
	// CKA_EC_POINT is a DER OCTET STRING around the uncompressed point (65 bytes for P-256).
	point := attrs[0].Value
	if len(point) != 67 || point[0] != 0x04 || point[1] != 65 {
		t.Fatalf("unexpected CKA_EC_POINT % x", point)
	}
	pub, err := ecdsa.ParseUncompressedPublicKey(elliptic.P256(), point[2:])
	if err != nil {
		t.Fatal(err)
	}
	return pub, privH
}

// TestFaultReplay: with replay on, the first signature of a digest is made
// by SoftHSM and every later one of the same key and digest is answered
// from the module's table after the sign latency, without SoftHSM (its
// C_Sign is not forwarded again) and valid; a new digest is signed for
// real; turned off, every signature goes to SoftHSM again.
func TestFaultReplay(t *testing.T) {
	fm, _, s := faultSigner(t)
	fm.SetReplay(true)
	fm.SetSignLatency(5 * time.Millisecond)
	pub := s.Public().(*ecdsa.PublicKey)
	sign := func(msg string) time.Duration {
		t.Helper()
		digest := sha256.Sum256([]byte(msg))
		start := time.Now()
		sig, err := s.Sign(rand.Reader, digest[:], crypto.SHA256)
		d := time.Since(start)
		if err != nil {
			t.Fatal(err)
		}
		if !ecdsa.VerifyASN1(pub, digest[:], sig) {
			t.Fatalf("signature of %q does not verify", msg)
		}
		return d
	}
	before := fm.Stats("sign")
	sign("one")
	for range 20 {
		if d := sign("one"); d < 5*time.Millisecond {
			t.Errorf("a replayed signature took %v; want at least the 5ms latency", d)
		}
	}
	st := fm.Stats("sign")
	if fwd, rep := st.Forwarded-before.Forwarded, st.Replayed-before.Replayed; fwd != 1 || rep != 20 {
		t.Errorf("21 signatures of one digest: %d forwarded to SoftHSM, %d replayed; want 1 and 20", fwd, rep)
	}
	inits := fm.Stats("signinit").Forwarded
	sign("two")
	if st2 := fm.Stats("sign"); st2.Forwarded-st.Forwarded != 1 {
		t.Errorf("a new digest: %d forwarded; want 1", st2.Forwarded-st.Forwarded)
	}
	if n := fm.Stats("signinit").Forwarded - inits; n != 1 {
		t.Errorf("C_SignInit forwarded %d times for one new digest; want 1 (at the miss)", n)
	}
	fm.SetReplay(false)
	st = fm.Stats("sign")
	sign("one")
	if st2 := fm.Stats("sign"); st2.Forwarded-st.Forwarded != 1 || st2.Replayed != st.Replayed {
		t.Errorf("replay off: %+v -> %+v; want the signature forwarded", st, st2)
	}
}
