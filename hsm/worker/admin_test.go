package worker_test

import (
	"crypto"
	"log/slog"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/hsmagent/hsmagent/agent/keytype"

	"github.com/hsmagent/hsmagent/agent/server/storetest"
	"github.com/hsmagent/hsmagent/hsm/worker"
	softhsmtest "github.com/hsmagent/hsmagent/softhsm-test"
)

// TestWorkerContract runs the key-store contract, the Admin calls
// (generate, chains, delete) included, against the worker's store on a
// real SoftHSM token: every call crosses the worker's socketpair.
func TestWorkerContract(t *testing.T) {
	storetest.Run(t, func(t *testing.T) storetest.Store {
		tok := softhsmtest.New(t)
		cfg := tok.Config()
		s, err := worker.Start(worker.Options{
			Command:    []string{os.Args[0], childArg},
			Init:       worker.Init{ModulePath: cfg.ModulePath, TokenLabel: cfg.TokenLabel, MaxSessions: 4},
			PIN:        cfg.PIN,
			Logger:     slog.New(slog.DiscardHandler),
			RestartMin: 50 * time.Millisecond,
		})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { s.Close() })
		return s
	})
}

// TestWorkerSlowGenerationNotKilled: a key generation that takes longer
// than KillAfter (an RSA key on a slow HSM) is not taken for a stuck call:
// the worker lives and the key is made, while signatures go on beside it.
func TestWorkerSlowGenerationNotKilled(t *testing.T) {
	f := start(t, 300*time.Millisecond)
	f.fm.Hang("generate")
	done := make(chan error, 1)
	go func() {
		_, err := f.store.Generate("slow", keytype.ECDSAP256)
		done <- err
	}()
	f.fm.WaitHung("generate", 1)
	time.Sleep(time.Second) // three times KillAfter
	ec := f.signer(t, "ec")
	if _, err := ec.Sign(nil, digest[:], crypto.SHA256); err != nil {
		t.Errorf("signing beside the slow generation: %v", err)
	}
	f.fm.Release()
	if err := <-done; err != nil {
		t.Fatalf("slow generation: %v", err)
	}
	if strings.Contains(f.log.String(), "killing the HSM worker") {
		t.Errorf("the worker was killed for a slow generation:\n%s", f.log)
	}
	if _, err := f.store.Signer("slow"); err != nil {
		t.Errorf("the new key has no signer: %v", err)
	}
}
