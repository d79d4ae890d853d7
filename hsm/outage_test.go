package hsm_test

import (
	"bytes"
	"crypto"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hsmagent/hsmagent/hsm"
	softhsmtest "github.com/hsmagent/hsmagent/softhsm-test"
	"github.com/miekg/pkcs11"
)

// syncBuffer is a log destination safe for the token's recovery goroutine.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

func outageToken(t *testing.T) (*softhsmtest.FaultModule, *hsm.Token, crypto.Signer, *syncBuffer) {
	t.Helper()
	fm := softhsmtest.NewFaultModule(t, softhsmtest.New(t))
	logs := &syncBuffer{}
	cfg := fm.Config()
	cfg.Logger = slog.New(slog.NewTextHandler(logs, nil))
	tok, err := hsm.Open(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tok.Close() })
	if _, err := tok.GenerateKey("outage", hsm.ECDSAP256, nil); err != nil {
		t.Fatal(err)
	}
	s, err := tok.Signer("outage")
	if err != nil {
		t.Fatal(err)
	}
	return fm, tok, s, logs
}

func sign(s crypto.Signer) error {
	digest := sha256.Sum256([]byte("outage"))
	_, err := s.Sign(rand.Reader, digest[:], crypto.SHA256)
	return err
}

// TestTokenOutage removes the token under an open Token: operations fail
// fast with an UnavailableError, the module is reloaded at a backed-off rate
// rather than once per call, the outage is logged once each way, and the
// token signs again by itself once it is back.
func TestTokenOutage(t *testing.T) {
	fm, _, s, logs := outageToken(t)
	fm.RemoveToken()
	inits := fm.Stats("initialize").Calls

	start := time.Now()
	calls := 0
	for time.Since(start) < 2*time.Second {
		err := sign(s)
		calls++
		var ue *hsm.UnavailableError
		switch {
		case err == nil:
			t.Fatal("signed with the token removed")
		case calls > 1 && !errors.As(err, &ue):
			t.Fatalf("sign %d with the token removed: %v; want an *hsm.UnavailableError", calls, err)
		}
		if calls > 1 {
			if !errors.Is(err, hsm.ErrUnavailable) || !ue.Unavailable() {
				t.Errorf("UnavailableError does not match ErrUnavailable or report Unavailable(): %v", err)
			}
			if msg := err.Error(); !strings.Contains(msg, "is unavailable (") || !strings.Contains(msg, "retrying") {
				t.Errorf("unavailable error: %q", msg)
			}
		}
		time.Sleep(5 * time.Millisecond)
	}
	// 100 ms doubling: attempts near 0.1, 0.3, 0.7 and 1.5 s, plus the first
	// reopen (which also lists the slots to explain its failure).
	t.Logf("%d signatures, %d C_Initialize calls in 2s with the token removed", calls, fm.Stats("initialize").Calls-inits)
	if n := fm.Stats("initialize").Calls - inits; n > 10 {
		t.Errorf("%d C_Initialize calls in 2s of %d signatures with the token removed; want a backed-off few", n, calls)
	}
	if n := strings.Count(logs.String(), "HSM token unavailable"); n != 1 {
		t.Errorf("%d 'HSM token unavailable' lines, want 1:\n%s", n, logs)
	}

	fm.RestoreToken()
	deadline := time.Now().Add(hsm.DefaultReopenMax + 3*time.Second)
	for sign(s) != nil {
		if time.Now().After(deadline) {
			t.Fatalf("still unavailable %s after RestoreToken", hsm.DefaultReopenMax+3*time.Second)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if n := strings.Count(logs.String(), "HSM token available again"); n != 1 {
		t.Errorf("%d 'HSM token available again' lines, want 1:\n%s", n, logs)
	}
}

// TestTokenPersistentDeviceError: a device that fails every signature is
// not reopened for each of them.
func TestTokenPersistentDeviceError(t *testing.T) {
	fm, _, s, _ := outageToken(t)
	fm.FailWhile(pkcs11.CKR_DEVICE_ERROR)
	inits := fm.Calls("initialize")
	start := time.Now()
	for time.Since(start) < time.Second {
		err := sign(s)
		if err == nil {
			t.Fatal("signed while every C_Sign fails")
		}
		if n := strings.Count(err.Error(), "the HSM reported a device error"); n != 1 {
			t.Fatalf("device error explained %d times: %v", n, err)
		}
		time.Sleep(2 * time.Millisecond)
	}
	t.Logf("%d reopens in 1s of failing signatures", fm.Calls("initialize")-inits)
	if n := fm.Calls("initialize") - inits; n > 6 {
		t.Errorf("%d reopens in 1s of failing signatures; want a backed-off few", n)
	}
	fm.ClearFail()
	if err := sign(s); err != nil {
		t.Errorf("sign after ClearFail: %v", err)
	}
}

// TestErrorExplainedOnce: the words for a PKCS#11 code appear once in an
// error, however many layers explained it.
func TestErrorExplainedOnce(t *testing.T) {
	fm, _, s, _ := outageToken(t)
	fm.FailNext(pkcs11.CKR_KEY_HANDLE_INVALID, 2)
	err := sign(s)
	if err == nil {
		t.Fatal("signed through two injected errors")
	}
	if n := strings.Count(err.Error(), "the key handle is no longer valid"); n != 1 {
		t.Errorf("key handle error explained %d times: %v", n, err)
	}
}
