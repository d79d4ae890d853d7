package worker_test

import (
	"crypto"
	"fmt"
	"io"
	"log/slog"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/hsmagent/hsmagent/hsm"
	"github.com/hsmagent/hsmagent/hsm/worker"
	softhsmtest "github.com/hsmagent/hsmagent/softhsm-test"
)

// BenchmarkWorker is what the worker process costs a signature: the same
// key signed in this process and through a worker, on the off-host shape
// of a network HSM (the fault module answers a signature it has made once
// after 2 ms, without SoftHSM), at 1 and 32 callers.
func BenchmarkWorker(b *testing.B) {
	tok := softhsmtest.New(b)
	fm := softhsmtest.NewFaultModule(b, tok)
	fm.SetReplay(true)
	direct, err := hsm.Open(fm.Config())
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { direct.Close() })
	if _, err := direct.GenerateKey("ec", hsm.ECDSAP256, nil); err != nil {
		b.Fatal(err)
	}
	fm.SetSignLatency(benchLatency)
	cfg := fm.Config()
	s, err := worker.Start(worker.Options{Command: []string{os.Args[0], childArg}, PIN: cfg.PIN,
		Init:   worker.Init{ModulePath: cfg.ModulePath, TokenLabel: cfg.TokenLabel, MaxSessions: 65},
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { s.Close() })
	if _, err := s.Keys(); err != nil {
		b.Fatal(err)
	}
	local, err := direct.Signer("ec")
	if err != nil {
		b.Fatal(err)
	}
	remote, err := s.Signer("ec")
	if err != nil {
		b.Fatal(err)
	}
	for _, callers := range []int{1, 32} {
		for name, sg := range map[string]crypto.Signer{"in-process": local, "worker": remote} {
			b.Run(fmt.Sprintf("%d/%s", callers, name), func(b *testing.B) {
				var wg sync.WaitGroup
				per := b.N / callers
				for range callers {
					wg.Add(1)
					go func() {
						defer wg.Done()
						for range max(per, 1) {
							if _, err := sg.Sign(nil, digest[:], crypto.SHA256); err != nil {
								b.Error(err)
								return
							}
						}
					}()
				}
				wg.Wait()
			})
		}
	}
}

// benchLatency is the network HSM's answer time; 0 shows the worker's own
// cost per signature with nothing to overlap it.
var benchLatency = 2 * time.Millisecond
