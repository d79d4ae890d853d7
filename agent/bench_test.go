package agent_test

import (
	"context"
	"crypto"
	"crypto/sha256"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/hsmagent/hsmagent/agent/agenttest"
	"github.com/hsmagent/hsmagent/agent/bench"
	"github.com/hsmagent/hsmagent/agent/keytype"
	"github.com/hsmagent/hsmagent/agent/server"
	"github.com/hsmagent/hsmagent/hsm"
	softhsmtest "github.com/hsmagent/hsmagent/softhsm-test"
)

// BenchmarkSign compares an ECDSA P-256 signature made in-process through
// crypto11 with the same key used through the agent, at 8 callers per CPU
// (go test -bench Sign -cpu 1 gives the 8-caller figure of the product target).
func BenchmarkSign(b *testing.B) {
	fx := softhsmtest.New(b)
	tok := fx.Open(b)
	if _, err := tok.GenerateKey("ec", hsm.ECDSAP256, nil); err != nil {
		b.Fatal(err)
	}
	local, err := tok.Signer("ec")
	if err != nil {
		b.Fatal(err)
	}
	a := softhsmtest.StartAgent(b, tok, server.Options{Audit: discardLogger()})
	client := dialB(b, a.Socket)
	remote, err := client.Signer(context.Background(), "ec")
	if err != nil {
		b.Fatal(err)
	}
	digest := sha256.Sum256([]byte("bench"))
	for name, s := range map[string]crypto.Signer{"in-process": local, "agent": remote} {
		b.Run(name, func(b *testing.B) {
			b.SetParallelism(8)
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					if _, err := s.Sign(nil, digest[:], crypto.SHA256); err != nil {
						b.Error(err)
						return
					}
				}
			})
		})
	}
}

// BenchmarkTLS13Handshake compares full TLS 1.3 handshakes with the server key
// in-process and through the agent.
func BenchmarkTLS13Handshake(b *testing.B) {
	fx := softhsmtest.New(b)
	tok := fx.Open(b)
	if _, err := tok.GenerateKey("ec", hsm.ECDSAP256, nil); err != nil {
		b.Fatal(err)
	}
	local, _ := tok.Signer("ec")
	a := softhsmtest.StartAgent(b, tok, server.Options{Audit: discardLogger()})
	remote, err := dialB(b, a.Socket).Signer(context.Background(), "ec")
	if err != nil {
		b.Fatal(err)
	}
	for name, s := range map[string]crypto.Signer{"in-process": local, "agent": remote} {
		b.Run(name, func(b *testing.B) {
			r, err := bench.Handshakes(context.Background(), name, s, 8, handshakePhase)
			if err != nil {
				b.Fatal(err)
			}
			b.ReportMetric(r.PerSecond, "handshakes/s")
			b.ReportMetric(float64(r.P99.Microseconds()), "p99-µs")
		})
	}
}

// The benchmarks below compare the agent with in-process signing on the
// network-HSM shape: every signature waits about 2 ms. Each runs a fixed
// number of callers (not GOMAXPROCS-based), reports ns/op as the inverse of
// throughput and p50-µs per call. Same signer on both sides, so the
// difference is the agent path. Profile with e.g.
//
//	go test ./agent -run XXX -bench 'SignSlow/32' -count 6 -cpuprofile cpu.out
func BenchmarkSignSlow(b *testing.B) {
	store := server.NewMemoryStore()
	if _, err := store.Generate("ec", keytype.ECDSAP256); err != nil {
		b.Fatal(err)
	}
	slow := slowStore{store, netLatency}
	local, err := slow.Signer("ec")
	if err != nil {
		b.Fatal(err)
	}
	a := agenttest.Start(b, slow, server.Options{Audit: discardLogger()})
	remote, err := dialB(b, a.Socket).Signer(context.Background(), "ec")
	if err != nil {
		b.Fatal(err)
	}
	compareCallers(b, local, remote)
}

// BenchmarkSignFault is BenchmarkSignSlow on SoftHSM through the fault
// module with 2 ms per C_Sign: crypto11 and the hsm package included.
func BenchmarkSignFault(b *testing.B) { benchFault(b, false) }

// BenchmarkSignNetwork is the off-host shape of a network HSM: the fault
// module answers the benchmark's one digest from its replay table after
// 2 ms, without SoftHSM, so that this host spends on a signature only what
// the caller, crypto11 and the agent do.
func BenchmarkSignNetwork(b *testing.B) { benchFault(b, true) }

func benchFault(b *testing.B, replay bool) {
	fm := softhsmtest.NewFaultModule(b, softhsmtest.New(b))
	fm.SetReplay(replay)
	tok, err := hsm.Open(fm.Config())
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { tok.Close() })
	if _, err := tok.GenerateKey("ec", hsm.ECDSAP256, nil); err != nil {
		b.Fatal(err)
	}
	fm.SetSignLatency(netLatency)
	local, err := tok.Signer("ec")
	if err != nil {
		b.Fatal(err)
	}
	a := softhsmtest.StartAgent(b, tok, server.Options{Audit: discardLogger()})
	remote, err := dialB(b, a.Socket).Signer(context.Background(), "ec")
	if err != nil {
		b.Fatal(err)
	}
	compareCallers(b, local, remote)
}

const netLatency = 2 * time.Millisecond

func compareCallers(b *testing.B, local, remote crypto.Signer) {
	digest := sha256.Sum256([]byte("bench"))
	for _, callers := range []int{1, 32} {
		for _, side := range []struct {
			name string
			s    crypto.Signer
		}{{"in-process", local}, {"agent", remote}} {
			b.Run(fmt.Sprintf("%d/%s", callers, side.name), func(b *testing.B) {
				softhsmtest.RunCallers(b, callers, func() error {
					_, err := side.s.Sign(nil, digest[:], crypto.SHA256)
					return err
				})
			})
		}
	}
}

// slowStore makes every signature of its store wait lat first, like a
// network HSM's round trip.
type slowStore struct {
	server.KeyStore
	lat time.Duration
}

func (s slowStore) Signer(label string) (crypto.Signer, error) {
	sg, err := s.KeyStore.Signer(label)
	if err != nil {
		return nil, err
	}
	return slowSigner{sg, s.lat}, nil
}

type slowSigner struct {
	crypto.Signer
	lat time.Duration
}

func (s slowSigner) Sign(r io.Reader, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	time.Sleep(s.lat)
	return s.Signer.Sign(r, digest, opts)
}

// BenchmarkSocketRoundTrip is the floor under any agent in a process of its
// own: 100 bytes to another process over a Unix socket and back, with no
// gRPC, protobuf or HSM. It reports the CPU of both processes per round
// trip (cpu-µs/op here, echo-cpu-µs/op there), to compare with the agent
// path's CPU per signature beyond in-process (BenchmarkSignFault).
func BenchmarkSocketRoundTrip(b *testing.B) {
	conn, echoCPU := startEcho(b)
	buf := make([]byte, 100)
	roundTrip := func() error {
		if _, err := conn.Write(buf); err != nil {
			return err
		}
		_, err := io.ReadFull(conn, buf)
		return err
	}
	echo0 := echoCPU()
	softhsmtest.RunCallers(b, 1, roundTrip)
	b.ReportMetric(float64((echoCPU()-echo0).Nanoseconds())/1e3/float64(b.N), "echo-cpu-µs/op")
}

// BenchmarkSocketRoundTripIdle is the same round trip after 2 ms of
// nothing, as a caller of an HSM that takes 2 ms meets it: both
// processes' threads have gone to sleep, and each message must wake one.
// It reports the median round trip (p50-µs); a signature through the
// agent and its HSM worker crosses between processes four times, twice
// this round trip.
func BenchmarkSocketRoundTripIdle(b *testing.B) {
	conn, _ := startEcho(b)
	buf := make([]byte, 100)
	rtts := make([]time.Duration, 0, b.N)
	for b.Loop() {
		time.Sleep(2 * time.Millisecond)
		start := time.Now()
		if _, err := conn.Write(buf); err != nil {
			b.Fatal(err)
		}
		if _, err := io.ReadFull(conn, buf); err != nil {
			b.Fatal(err)
		}
		rtts = append(rtts, time.Since(start))
	}
	slices.Sort(rtts)
	b.ReportMetric(float64(rtts[len(rtts)/2].Nanoseconds())/1e3, "p50-µs")
}

// startEcho starts the test binary as an echo server in a process of its
// own and connects to it; echoCPU reads that process's CPU time.
func startEcho(b *testing.B) (conn net.Conn, echoCPU func() time.Duration) {
	sock := filepath.Join(b.TempDir(), "echo.sock")
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), helperEnv+"=echo", "HSMAGENT_TEST_ECHO="+sock)
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		var err error
		if conn, err = net.Dial("unix", sock); err == nil {
			break
		} else if time.Now().After(deadline) {
			b.Fatal(err)
		}
	}
	b.Cleanup(func() { conn.Close() })
	echoCPU = func() time.Duration {
		st, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", cmd.Process.Pid))
		if err != nil {
			b.Skip("no /proc: ", err)
		}
		f := strings.Fields(string(st[strings.LastIndexByte(string(st), ')')+2:]))
		utime, _ := strconv.Atoi(f[11]) // utime and stime, fields 14 and 15 of stat(5), in clock ticks (100 Hz)
		stime, _ := strconv.Atoi(f[12])
		return time.Duration(utime+stime) * 10 * time.Millisecond
	}
	return conn, echoCPU
}
