package server_test

import (
	"bufio"
	"bytes"
	"io"
	"net"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hsmagent/hsmagent/agent/agenttest"
	"github.com/hsmagent/hsmagent/agent/server"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// h2Conn is a raw HTTP/2 client that opens calls by hand and notes how the
// agent ends each stream (RST_STREAM, or trailers with END_STREAM) and the
// connection (GOAWAY, or closing it).
type h2Conn struct {
	mu     sync.Mutex // serialises writes, guards ended
	fr     *http2.Framer
	ended  map[uint32]string // stream id -> "rst" or "trailers"
	closed chan struct{}
}

func dialH2(t *testing.T, socket string) *h2Conn {
	t.Helper()
	c, err := net.Dial("unix", socket)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	h := &h2Conn{fr: http2.NewFramer(c, bufio.NewReader(c)), ended: map[uint32]string{}, closed: make(chan struct{})}
	h.fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	if _, err := io.WriteString(c, http2.ClientPreface); err != nil {
		t.Fatal(err)
	}
	if err := h.fr.WriteSettings(); err != nil {
		t.Fatal(err)
	}
	go h.read()
	return h
}

func (h *h2Conn) read() {
	defer close(h.closed)
	for {
		f, err := h.fr.ReadFrame()
		if err != nil {
			return
		}
		h.mu.Lock()
		switch f := f.(type) {
		case *http2.SettingsFrame:
			if !f.IsAck() {
				h.fr.WriteSettingsAck()
			}
		case *http2.PingFrame:
			if !f.IsAck() {
				h.fr.WritePing(true, f.Data)
			}
		case *http2.RSTStreamFrame:
			h.ended[f.StreamID] = "rst"
		case *http2.MetaHeadersFrame:
			if f.StreamEnded() {
				h.ended[f.StreamID] = "trailers"
			}
		case *http2.GoAwayFrame:
			h.ended[0] = "goaway"
		}
		h.mu.Unlock()
	}
}

// open sends the headers of a call to method on stream id, with extra
// headers, split into frames of at most 16 KiB; no message follows.
func (h *h2Conn) open(t *testing.T, id uint32, method string, extra ...hpack.HeaderField) {
	t.Helper()
	var hb bytes.Buffer
	enc := hpack.NewEncoder(&hb)
	for _, f := range [][2]string{{":method", "POST"}, {":scheme", "http"}, {":path", "/hsmagent.v1.Agent/" + method},
		{":authority", "localhost"}, {"content-type", "application/grpc"}, {"te", "trailers"}} {
		enc.WriteField(hpack.HeaderField{Name: f[0], Value: f[1]})
	}
	for _, f := range extra {
		enc.WriteField(f)
	}
	block := hb.Bytes()
	h.mu.Lock()
	defer h.mu.Unlock()
	const maxFrame = 16 << 10
	first := block[:min(len(block), maxFrame)]
	block = block[len(first):]
	if err := h.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: first, EndHeaders: len(block) == 0}); err != nil {
		return // the agent closed the connection
	}
	for len(block) > 0 {
		part := block[:min(len(block), maxFrame)]
		block = block[len(part):]
		if err := h.fr.WriteContinuation(id, len(block) == 0, part); err != nil {
			return
		}
	}
}

func (h *h2Conn) endedAs(id uint32) string {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.ended[id]
}

func (h *h2Conn) isClosed() bool {
	select {
	case <-h.closed:
		return true
	default:
		return false
	}
}

// TestOversizedHeadersRefused: a call whose headers exceed the agent's small
// header list limit is refused (its stream reset or its connection closed)
// instead of being held with its headers until the call ends, and calls
// with ordinary headers go on. gRPC's default limit (16 MiB) let a caller
// with no rule make the agent hold hundreds of MiB.
func TestOversizedHeadersRefused(t *testing.T) {
	a := agenttest.Start(t, newMemStore(t), server.Options{})
	const streams = 16
	pad := hpack.HeaderField{Name: "x-pad", Value: strings.Repeat("a", 1<<20)} // 1 MiB
	var ms runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&ms)
	before := ms.HeapInuse
	conns := make([]*h2Conn, streams)
	for i := range conns {
		conns[i] = dialH2(t, a.Socket)
		conns[i].open(t, 1, "Sign", pad)
	}
	for i, h := range conns {
		waitFor(t, func() bool { return h.isClosed() || h.endedAs(1) != "" || h.endedAs(0) != "" })
		t.Logf("call %d with a 1 MiB header: closed=%v stream=%q conn=%q", i, h.isClosed(), h.endedAs(1), h.endedAs(0))
	}
	runtime.GC()
	runtime.ReadMemStats(&ms)
	if grew := int64(ms.HeapInuse) - int64(before); grew > 8<<20 {
		t.Errorf("heap grew %d MiB with %d refused 1 MiB headers; want them dropped", grew>>20, streams)
	}
	stillSignsOverConn(t, a.Socket, nil)
}

// TestSilentCallsEnded: calls whose headers came but whose request never
// does (unary Sign, SignStream) are ended at the handshake timeout, the
// unary one with a "no-request" audit record, instead of being held open
// (gRPC's idle timeout does not count a connection with a call open).
func TestSilentCallsEnded(t *testing.T) {
	defer server.SetHandshakeTimeout(300 * time.Millisecond)()
	audit := &jsonAudit{}
	a := agenttest.Start(t, newMemStore(t), server.Options{Audit: audit.logger()})
	h := dialH2(t, a.Socket)
	h.open(t, 1, "Sign")
	h.open(t, 3, "SignStream")
	h.open(t, 5, "ListKeys")
	deadline := time.Now().Add(5 * time.Second)
	for _, id := range []uint32{1, 3, 5} {
		for h.endedAs(id) == "" && time.Now().Before(deadline) {
			time.Sleep(20 * time.Millisecond)
		}
		if h.endedAs(id) == "" {
			t.Errorf("stream %d: still open 5 s after headers with no request (handshake timeout 300ms)", id)
		}
	}
	waitFor(t, func() bool { return len(audit.records(t, "msg", "sign", "result", "no-request")) == 1 })
	if n := len(audit.records(t, "result", "no-request")); n != 3 {
		t.Errorf("%d no-request audit records; want 3 (sign, sign-stream, list):\n%s", n, audit)
	}
	if n := len(audit.records(t, "result", "malformed")); n != 0 {
		t.Errorf("%d malformed records for calls that sent nothing; want 0:\n%s", n, audit)
	}
}
