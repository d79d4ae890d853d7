package server_test

import (
	"bufio"
	"bytes"
	"crypto"
	"encoding/binary"
	"io"
	"log/slog"
	"net"
	"os"
	"runtime"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hsmagent/hsmagent/agent/agentpb"
	"github.com/hsmagent/hsmagent/agent/agenttest"
	"github.com/hsmagent/hsmagent/agent/server"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	"google.golang.org/protobuf/proto"
)

// fastStore signs instantly with a fixed 256-byte "signature", so that a
// test can make many without spending the CPU on cryptography.
type fastStore struct {
	*server.MemoryStore
	calls atomic.Int64
}

func (s *fastStore) Signer(label string) (crypto.Signer, error) {
	inner, err := s.MemoryStore.Signer(label)
	if err != nil {
		return nil, err
	}
	return &fastSigner{Signer: inner, calls: &s.calls}, nil
}

type fastSigner struct {
	crypto.Signer
	calls *atomic.Int64
}

func (s *fastSigner) Sign(io.Reader, []byte, crypto.SignerOpts) ([]byte, error) {
	s.calls.Add(1)
	return bytes.Repeat([]byte{1}, 256), nil
}

// stalledConn is a raw HTTP/2 client that announces a stream window of 0
// (it will never accept a byte of response) and opens streams of
// SignStream requests. It answers SETTINGS and PING so that the connection
// itself stays healthy, and notes when the server ends it.
type stalledConn struct {
	conn   net.Conn
	mu     sync.Mutex // serialises writes
	fr     *http2.Framer
	closed chan struct{} // the server closed the connection
}

func dialStalled(t *testing.T, socket string) *stalledConn {
	t.Helper()
	c, err := net.Dial("unix", socket)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	s := &stalledConn{conn: c, fr: http2.NewFramer(c, bufio.NewReader(c)), closed: make(chan struct{})}
	s.fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	if _, err := io.WriteString(c, http2.ClientPreface); err != nil {
		t.Fatal(err)
	}
	if err := s.fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 0}); err != nil {
		t.Fatal(err)
	}
	go s.read()
	return s
}

func (s *stalledConn) read() {
	defer close(s.closed)
	for {
		f, err := s.fr.ReadFrame()
		if err != nil {
			return
		}
		s.mu.Lock()
		switch f := f.(type) {
		case *http2.SettingsFrame:
			if !f.IsAck() {
				s.fr.WriteSettingsAck()
			}
		case *http2.PingFrame:
			if !f.IsAck() {
				s.fr.WritePing(true, f.Data)
			}
		}
		s.mu.Unlock()
	}
}

// open starts stream id and sends it n signature requests for key.
func (s *stalledConn) open(t *testing.T, id uint32, n int, key string) {
	t.Helper()
	var hb bytes.Buffer
	enc := hpack.NewEncoder(&hb)
	for _, h := range [][2]string{{":method", "POST"}, {":scheme", "http"}, {":path", "/hsmagent.v1.Agent/SignStream"},
		{":authority", "localhost"}, {"content-type", "application/grpc"}, {"te", "trailers"}} {
		enc.WriteField(hpack.HeaderField{Name: h[0], Value: h[1]})
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: hb.Bytes(), EndHeaders: true}); err != nil {
		t.Fatal(err)
	}
	for sent := 0; sent < n; {
		msg := &agentpb.SignStreamRequest{}
		for ; sent < n && len(msg.Items) < 64; sent++ {
			msg.Items = append(msg.Items, &agentpb.SignStreamItem{Id: uint64(sent), Request: goodEC})
		}
		b, err := proto.Marshal(msg)
		if err != nil {
			t.Fatal(err)
		}
		frame := binary.BigEndian.AppendUint32([]byte{0}, uint32(len(b)))
		if err := s.fr.WriteData(id, false, append(frame, b...)); err != nil {
			t.Fatal(err)
		}
	}
}

// rss is the resident memory of this process, in KiB.
func rss(t *testing.T) int {
	t.Helper()
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Skip("no /proc/self/status")
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, err := strconv.Atoi(strings.TrimSuffix(strings.TrimSpace(rest), " kB"))
			if err != nil {
				t.Fatal(err)
			}
			return kb
		}
	}
	t.Fatal("no VmRSS in /proc/self/status")
	return 0
}

// TestStalledStreamsBounded: SignStream clients that never read (window 0)
// make the agent hold a bounded amount of memory per stream, and their
// connections are closed after the stream send timeout, which frees it.
func TestStalledStreamsBounded(t *testing.T) {
	const streamsPerConn, perStream = 16, 1024
	conns := 16
	if raceEnabled {
		conns = 4
	}
	store := &fastStore{MemoryStore: newMemStore(t)}
	logs := &auditBuffer{}
	a := agenttest.Start(t, store, server.Options{StreamSendTimeout: 10 * time.Second, MaxConnections: 4096,
		MaxSignaturesPerUID: 1 << 20, MaxWaiting: 1 << 20, // every stream fills its window with signatures
		Logger: slog.New(slog.NewTextHandler(logs, nil)), Audit: slog.New(slog.NewTextHandler(io.Discard, nil))})
	runtime.GC()
	debug.FreeOSMemory()
	before := rss(t)
	var clients []*stalledConn
	for range conns {
		c := dialStalled(t, a.Socket)
		for i := range streamsPerConn {
			c.open(t, uint32(2*i+1), perStream, "ec")
		}
		clients = append(clients, c)
	}
	// Wait until the agent has taken all it will: calls stop growing.
	for last := int64(-1); ; {
		time.Sleep(300 * time.Millisecond)
		n := store.calls.Load()
		if n == last {
			break
		}
		last = n
	}
	peak := rss(t) - before
	runtime.GC()
	debug.FreeOSMemory()
	held := rss(t) - before
	streams := conns * streamsPerConn
	perStreamKB := held / streams
	t.Logf("%d stalled streams: %d signatures made, RSS +%d KiB at the peak, +%d KiB held (%d KiB a stream)", streams, store.calls.Load(), peak, held, perStreamKB)
	// gRPC alone holds up to 64 KiB of unsent responses per stream, and
	// this process's RSS counts the test's clients too.
	if perStreamKB > 512 && !raceEnabled {
		t.Errorf("a stalled stream holds %d KiB; want at most 512", perStreamKB)
	}
	deadline := time.After(30 * time.Second)
	for i, c := range clients {
		select {
		case <-c.closed:
		case <-deadline:
			t.Fatalf("connection %d not closed 30s after its streams stalled (timeout 10s)", i)
		}
	}
	waitFor(t, func() bool { return logs.count("stream send timeout") >= 1 })
	if n := logs.count(`limit reached: refusing more until it clears" limit="stream send timeout"`); n != 1 {
		t.Errorf("%d 'limit reached' lines for %d stalled streams; want 1:\n%s", n, streams, logs.buf.String())
	}
	runtime.GC()
	debug.FreeOSMemory()
	t.Logf("RSS after the connections were closed: +%d KiB", rss(t)-before)
}
