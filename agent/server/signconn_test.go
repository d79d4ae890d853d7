package server_test

// Signing connections (wire.Preface) attacked as a hostile local user would:
// raw bytes on the agent's real socket, no client library in the way.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hsmagent/hsmagent/agent/agentpb"
	"github.com/hsmagent/hsmagent/agent/agenttest"
	"github.com/hsmagent/hsmagent/agent/internal/wire"
	"github.com/hsmagent/hsmagent/agent/keytype"
	"github.com/hsmagent/hsmagent/agent/server"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// frameTimeout bounds each read and write of the tests' signing connections:
// an agent that should have answered and did not fails the test, not hangs it.
const frameTimeout = 10 * time.Second

// signConn is the client's end of a signing connection, byte by byte.
type signConn struct {
	requestID string // of the status, read by end
	conn      *net.UnixConn
	r         *bufio.Reader
}

func dialUnix(t testing.TB, socket string) *net.UnixConn {
	t.Helper()
	c, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: socket, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// openSignConn connects, sends the preface and checks the agent's answer.
func openSignConn(t testing.TB, socket string) *signConn {
	t.Helper()
	c := &signConn{conn: dialUnix(t, socket)}
	c.r = bufio.NewReader(c.conn)
	c.write(t, []byte(wire.Preface))
	c.expectPreface(t)
	return c
}

func (c *signConn) expectPreface(t testing.TB) {
	t.Helper()
	c.conn.SetReadDeadline(time.Now().Add(frameTimeout))
	head := make([]byte, len(wire.Preface))
	if n, err := io.ReadFull(c.r, head); err != nil || string(head) != wire.Preface {
		t.Fatalf("the agent answered the preface with %q (%v); want %q", head[:n], err, wire.Preface)
	}
}

func (c *signConn) write(t testing.TB, b []byte) {
	t.Helper()
	c.conn.SetWriteDeadline(time.Now().Add(frameTimeout))
	if _, err := c.conn.Write(b); err != nil {
		t.Fatalf("writing to the signing connection: %v", err)
	}
}

func (c *signConn) send(t testing.TB, items ...*agentpb.SignStreamItem) {
	t.Helper()
	c.write(t, frame(t, items...))
}

// frame is a SignStreamRequest of items, framed.
func frame(t testing.TB, items ...*agentpb.SignStreamItem) []byte {
	t.Helper()
	b, err := wire.AppendFrame(nil, &agentpb.SignStreamRequest{Items: items})
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// rawFrame frames body as it is.
func rawFrame(body []byte) []byte {
	return append(binary.BigEndian.AppendUint32(nil, uint32(len(body))), body...)
}

// items are n requests req with the ids first, first+1, ...
func items(first uint64, n int, req *agentpb.SignRequest) []*agentpb.SignStreamItem {
	var its []*agentpb.SignStreamItem
	for i := range n {
		its = append(its, &agentpb.SignStreamItem{Id: first + uint64(i), Request: req})
	}
	return its
}

func (c *signConn) next() (*agentpb.SignStreamResponse, error) {
	c.conn.SetReadDeadline(time.Now().Add(frameTimeout))
	m := &agentpb.SignStreamResponse{}
	_, err := wire.ReadFrame(c.r, wire.MaxMessageSize, nil, m)
	return m, err
}

// end reads the agent's frames up to its status (the result of id
// wire.StatusID: the tests' items have others), returns the results before
// it and the status, and checks that the agent then closed the connection.
func (c *signConn) end(t testing.TB) ([]*agentpb.SignStreamResult, *status.Status) {
	t.Helper()
	var results []*agentpb.SignStreamResult
	for {
		m, err := c.next()
		if err != nil {
			t.Fatalf("reading up to the agent's status: %v (after %d results)", err, len(results))
		}
		for _, r := range m.Results {
			if r.Id != wire.StatusID {
				results = append(results, r)
				continue
			}
			if len(m.Results) != 1 {
				t.Errorf("the status came in a frame of %d results; want it alone", len(m.Results))
			}
			c.expectClosed(t)
			c.requestID = r.RequestId
			return results, status.New(codes.Code(r.Code), r.Message)
		}
	}
}

// expectClosed reads until the agent closes the connection, and wants no
// byte before that. A reset is a close too: Linux reports one to a client
// whose last bytes the agent left unread.
func (c *signConn) expectClosed(t testing.TB) {
	t.Helper()
	c.conn.SetReadDeadline(time.Now().Add(frameTimeout))
	n, err := io.Copy(io.Discard, c.r)
	if err != nil && !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("waiting for the agent to close the connection: %v", err)
	}
	if n != 0 {
		t.Errorf("%d bytes after the status; want the connection closed", n)
	}
}

// signConnOnce signs goodEC over a new signing connection and closes it.
func signConnOnce(t testing.TB, socket string) *agentpb.SignStreamResult {
	t.Helper()
	c := openSignConn(t, socket)
	defer c.conn.Close()
	c.send(t, &agentpb.SignStreamItem{Id: 1, Request: goodEC})
	m, err := c.next()
	if err != nil || len(m.Results) != 1 || m.Results[0].Id != 1 {
		t.Fatalf("signing over a signing connection: %v, %v; want the result of item 1", m, err)
	}
	return m.Results[0]
}

// stillSignsOverConn: the agent serves a good signature on a new signing
// connection, one that verifies when store made it.
func stillSignsOverConn(t testing.TB, socket string, store *server.MemoryStore) {
	t.Helper()
	r := signConnOnce(t, socket)
	if r.Code != int32(codes.OK) {
		t.Fatalf("a good request afterwards: %v %s", codes.Code(r.Code), r.Message)
	}
	if store != nil {
		if err := signedFor(store, goodEC, r.Signature); err != nil {
			t.Fatal(err)
		}
	}
}

// jsonAudit is an audit sink of JSON records the tests look up by field.
type jsonAudit struct{ auditBuffer }

func (a *jsonAudit) logger() *slog.Logger { return slog.New(slog.NewJSONHandler(a, nil)) }

// records returns the records whose fields have the values of kv (pairs of
// field name and value, as the JSON prints them).
func (a *jsonAudit) records(t testing.TB, kv ...string) []map[string]any {
	t.Helper()
	a.mu.Lock()
	data := bytes.Clone(a.buf.Bytes())
	a.mu.Unlock()
	var out []map[string]any
	for _, line := range bytes.Split(bytes.TrimSpace(data), []byte("\n")) {
		if len(line) == 0 {
			continue
		}
		var rec map[string]any
		if err := json.Unmarshal(line, &rec); err != nil {
			t.Fatalf("audit line %q: %v", line, err)
		}
		match := true
		for i := 0; i+1 < len(kv); i += 2 {
			if v, ok := rec[kv[i]]; !ok || jsonString(v) != kv[i+1] {
				match = false
				break
			}
		}
		if match {
			out = append(out, rec)
		}
	}
	return out
}

func (a *jsonAudit) String() string {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.buf.String()
}

func jsonString(v any) string {
	if s, ok := v.(string); ok {
		return s
	}
	b, _ := json.Marshal(v)
	return string(b)
}

// TestSignConnMalformedFrame: a frame the agent cannot take (too long, or
// not a SignStreamRequest) ends the connection with an InvalidArgument
// status after the results of the requests before it, leaves a "malformed"
// audit record with the code the client got, and the agent goes on serving.
func TestSignConnMalformedFrame(t *testing.T) {
	for _, tc := range []struct {
		name    string
		bad     []byte
		wantMsg string
	}{
		{"one byte over MaxRequestSize", binary.BigEndian.AppendUint32(nil, wire.MaxRequestSize+1),
			"a frame of 16385 bytes; at most 16384"},
		{"a length of 4 GiB", []byte{0xff, 0xff, 0xff, 0xff}, "a frame of 4294967295 bytes"},
		{"MaxRequestSize+1 bytes sent whole", rawFrame(bytes.Repeat([]byte{0x0a}, wire.MaxRequestSize+1)),
			"a frame of 16385 bytes"},
		{"garbage", rawFrame([]byte{0xff, 0xff, 0xff, 0xff}), "not a SignStreamRequest"},
		// items[0].request.key = "\xff\xfe": protobuf refuses a string that is not UTF-8.
		{"a key that is not UTF-8", rawFrame([]byte{0x0a, 0x06, 0x12, 0x04, 0x0a, 0x02, 0xff, 0xfe}),
			"not a SignStreamRequest"},
		{"an item cut short", rawFrame([]byte{0x0a, 0x10, 0x08}), "not a SignStreamRequest"},
		// Nothing to sign never blocks the reader: refused, not looped on.
		{"an empty frame", rawFrame(nil), "no signatures"},
		{"a frame of an unknown field only", rawFrame([]byte{0x78, 0x01}), "no signatures"},
		// Its result would read as the connection's status.
		{"an item of id 0", frame(t, &agentpb.SignStreamItem{Id: 0, Request: goodEC}), "reserved for the connection's status"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			store := newMemStore(t)
			audit := &jsonAudit{}
			a := agenttest.Start(t, store, server.Options{Audit: audit.logger()})
			c := openSignConn(t, a.Socket)
			// A good request first, then the bad frame in the same write.
			c.write(t, append(frame(t, &agentpb.SignStreamItem{Id: 1, Request: goodEC}), tc.bad...))
			results, st := c.end(t)
			if len(results) != 1 || results[0].Id != 1 || results[0].Code != 0 {
				t.Errorf("results before the status: %v; want item 1 signed", results)
			} else if err := signedFor(store, goodEC, results[0].Signature); err != nil {
				t.Error(err)
			}
			if st.Code() != codes.InvalidArgument || !strings.HasPrefix(st.Message(), "agent: ") || !strings.Contains(st.Message(), tc.wantMsg) {
				t.Errorf("status %v %q; want InvalidArgument \"agent: ...%s...\"", st.Code(), st.Message(), tc.wantMsg)
			}
			waitFor(t, func() bool { return len(audit.records(t, "msg", "sign-stream")) >= 1 })
			recs := audit.records(t, "msg", "sign-stream", "result", "malformed")
			if len(recs) != 1 || jsonString(recs[0]["code"]) != "InvalidArgument" {
				t.Errorf("audit records of the malformed frame: %v; want one with code InvalidArgument:\n%s", recs, audit)
			}
			stillSignsOverConn(t, a.Socket, store)
		})
	}
}

// TestSignConnMalformedFrameAtShutdown: a malformed frame that arrives as
// the agent shuts down ends the connection with a status all the same
// (InvalidArgument for the frame, or Unavailable for the shutdown). Under
// the race detector it also shows that the connection's end reads nothing
// the frame's reader, which Shutdown leaves running, writes unsynchronised.
func TestSignConnMalformedFrameAtShutdown(t *testing.T) {
	store := server.NewMemoryStore()
	if _, err := store.Generate("ec", keytype.ECDSAP256); err != nil {
		t.Fatal(err)
	}
	codesSeen := map[codes.Code]int{}
	for range 20 {
		a := agenttest.Start(t, store, server.Options{})
		c := openSignConn(t, a.Socket)
		go c.conn.Write([]byte{0xff, 0xff, 0xff, 0xff}) // a length of 4 GiB
		a.Stop()
		_, st := c.end(t)
		codesSeen[st.Code()]++
		if st.Code() != codes.InvalidArgument && st.Code() != codes.Unavailable {
			t.Errorf("status %v %q; want InvalidArgument or Unavailable", st.Code(), st.Message())
		}
	}
	t.Logf("statuses: %v", codesSeen)
}

// TestSignStreamTooManyItems: a message of more than 64 items is refused
// whole with InvalidArgument, over gRPC's SignStream and over a signing
// connection alike, with one sign-stream audit record that names the
// request id the client was told and no sign record (no item was looked at).
func TestSignStreamTooManyItems(t *testing.T) {
	for _, tc := range []struct {
		name string
		send func(t *testing.T, socket string, its []*agentpb.SignStreamItem) (*status.Status, string)
	}{
		{"gRPC SignStream", func(t *testing.T, socket string, its []*agentpb.SignStreamItem) (*status.Status, string) {
			api, _ := rawClient(t, socket)
			ctx, cancel := context.WithTimeout(context.Background(), frameTimeout)
			defer cancel()
			stream, err := api.SignStream(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if err := stream.Send(&agentpb.SignStreamRequest{Items: its}); err != nil {
				t.Fatal(err)
			}
			resp, err := stream.Recv()
			if err == nil {
				t.Fatalf("the agent answered %v; want the stream refused", resp)
			}
			rid := ""
			if v := stream.Trailer().Get(server.RequestIDTrailer); len(v) == 1 {
				rid = v[0]
			}
			return status.Convert(err), rid
		}},
		{"signing connection", func(t *testing.T, socket string, its []*agentpb.SignStreamItem) (*status.Status, string) {
			c := openSignConn(t, socket)
			c.send(t, its...)
			results, st := c.end(t)
			if len(results) != 0 {
				t.Errorf("%d results for a message refused whole", len(results))
			}
			return st, c.requestID
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			store := newMemStore(t)
			audit := &jsonAudit{}
			a := agenttest.Start(t, store, server.Options{Audit: audit.logger()})
			st, rid := tc.send(t, a.Socket, items(1, 65, goodEC))
			if st.Code() != codes.InvalidArgument || st.Message() != "agent: 65 signatures in one message; at most 64" || !requestIDPattern.MatchString(rid) {
				t.Fatalf("status %v %q, request id %q; want InvalidArgument \"agent: 65 signatures in one message; at most 64\" and a request id", st.Code(), st.Message(), rid)
			}
			waitFor(t, func() bool { return len(audit.records(t, "msg", "sign-stream")) >= 1 })
			recs := audit.records(t, "msg", "sign-stream")
			if len(recs) != 1 || jsonString(recs[0]["result"]) != "InvalidArgument" || jsonString(recs[0]["items"]) != "65" ||
				jsonString(recs[0]["request_id"]) != rid {
				t.Errorf("sign-stream records %v; want one with result InvalidArgument, items 65, request_id %s", recs, rid)
			}
			if recs := audit.records(t, "msg", "sign"); len(recs) != 0 {
				t.Errorf("%d sign records for items never looked at", len(recs))
			}
			stillSignsOverConn(t, a.Socket, store)
		})
	}
}

// TestSignConnHandshakeTimeout: a connection that does not send its first 8
// bytes, or sends 8 that gRPC waits to complete, is closed about one
// handshake timeout after it was accepted, not two (the mux's wait and
// gRPC's); 24 bytes that are not HTTP/2 are refused at once; none gets the
// preface back; and the agent keeps serving.
func TestSignConnHandshakeTimeout(t *testing.T) {
	const timeout = time.Second
	defer server.SetHandshakeTimeout(timeout)()
	store := newMemStore(t)
	a := agenttest.Start(t, store, server.Options{})
	cases := []struct {
		name          string
		send          string
		early, closed time.Duration // the connection ends between early and closed after it was opened
	}{
		{"silent", "", 8 * timeout / 10, 18 * timeout / 10},
		{"3 bytes of the preface", wire.Preface[:3], 8 * timeout / 10, 18 * timeout / 10},
		{"7 bytes of the preface", wire.Preface[:7], 8 * timeout / 10, 18 * timeout / 10},
		{"7 bytes of HTTP/2's preface", "PRI * H", 8 * timeout / 10, 18 * timeout / 10},
		{"8 bytes of HTTP/2's preface", "PRI * HT", 8 * timeout / 10, 18 * timeout / 10},
		{"8 bytes of neither", "GET / HT", 8 * timeout / 10, 18 * timeout / 10},
		{"24 bytes of neither", "GET / HTTP/1.1\r\nHost: x\r\n", 0, 8 * timeout / 10},
		{"the preface in lower case", strings.ToLower(wire.Preface) + "0123456789abcdef", 0, 8 * timeout / 10},
	}
	// All at once (the timeouts run together): a goroutine each.
	type outcome struct {
		got  []byte
		err  error
		took time.Duration
	}
	outcomes := make([]chan outcome, len(cases))
	for i, tc := range cases {
		outcomes[i] = make(chan outcome, 1)
		c := dialUnix(t, a.Socket)
		go func() {
			start := time.Now()
			_, err := io.WriteString(c, tc.send)
			var got []byte
			if err == nil {
				c.SetReadDeadline(time.Now().Add(frameTimeout))
				got, err = io.ReadAll(c)
			}
			outcomes[i] <- outcome{got, err, time.Since(start)}
		}()
	}
	for i, tc := range cases {
		o := <-outcomes[i]
		if o.err != nil && !errors.Is(o.err, syscall.ECONNRESET) {
			t.Errorf("%s: the connection was not closed: %v", tc.name, o.err)
			continue
		}
		if bytes.HasPrefix(o.got, []byte(wire.Preface)) {
			t.Errorf("%s: the agent answered %q with the signing preface", tc.name, tc.send)
		}
		if o.took < tc.early || o.took > tc.closed {
			t.Errorf("%s: closed %v after it was opened; want between %v and %v (handshake timeout %v)", tc.name, o.took, tc.early, tc.closed, timeout)
		}
	}
	stillSignsOverConn(t, a.Socket, store)
}

// TestSignConnNeverReads: clients that send requests without end and read
// nothing make the agent hold a bounded number of goroutines and bounded
// memory each, until it closes their connections after the stream send
// timeout; then all is freed and the agent serves others.
func TestSignConnNeverReads(t *testing.T) {
	const conns, maxInFlight = 8, 16
	store := &fastStore{MemoryStore: newMemStore(t)}
	logs := &auditBuffer{}
	a := agenttest.Start(t, store, server.Options{StreamSendTimeout: 2 * time.Second,
		MaxSignaturesPerUID: 1 << 20, MaxWaiting: 1 << 20, MaxInFlight: maxInFlight,
		Logger: slog.New(slog.NewTextHandler(logs, nil)), Audit: slog.New(slog.NewTextHandler(io.Discard, nil))})
	signConnOnce(t, a.Socket) // the agent's goroutines and buffers of a first connection
	goroutines, heap := settled()
	closed := make(chan error, conns)
	msg := frame(t, items(1, 64, goodEC)...)
	for range conns {
		c := openSignConn(t, a.Socket)
		c.conn.SetWriteDeadline(time.Time{})
		go func() {
			for {
				if _, err := c.conn.Write(msg); err != nil {
					closed <- err
					return
				}
			}
		}()
	}
	// Stalled: the agent signs no more.
	for last := int64(-1); ; {
		time.Sleep(200 * time.Millisecond)
		n := store.calls.Load()
		if n == last {
			break
		}
		last = n
	}
	g, h := settled()
	t.Logf("%d connections that never read: %d signatures, +%d goroutines, %+d KiB heap", conns, store.calls.Load(), g-goroutines, (int64(h)-int64(heap))>>10)
	// Each: its writer here, and in the agent the connection's handler, its
	// reader and the item stuck sending; at most 64 signatures in flight.
	// Beside them the agent keeps up to maxInFlight idle workers, for all
	// connections together.
	if perConn := (g - goroutines - maxInFlight) / conns; perConn > 8 {
		t.Errorf("%d goroutines per connection that never reads; want at most 8", perConn)
	}
	if perConn := (int64(h) - int64(heap)) / conns; perConn > 512<<10 {
		t.Errorf("%d KiB of heap per connection that never reads; want at most 512", perConn>>10)
	}
	deadline := time.After(20 * time.Second)
	for i := range conns {
		select {
		case <-closed:
		case <-deadline:
			t.Fatalf("%d of %d connections still open 20s after they stalled (stream send timeout 2s)", conns-i, conns)
		}
	}
	if n := logs.count(`limit="stream send timeout"`); n < 1 {
		t.Errorf("no log line of the stream send timeout:\n%s", logs.buf.String())
	}
	waitFor(t, func() bool { return runtime.NumGoroutine() <= goroutines+2 })
	r := signConnOnce(t, a.Socket)
	if r.Code != 0 {
		t.Errorf("a good request afterwards: %v %s", codes.Code(r.Code), r.Message)
	}
}

// settled returns the goroutines and the heap in use once the garbage
// collector has run.
func settled() (goroutines int, heap uint64) {
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return runtime.NumGoroutine(), ms.HeapAlloc
}

// TestSignConnsShareStreamBudget: a signing connection is a SignStream to
// the budget: gRPC streams and signing connections fill one budget, the one
// beyond it is refused either way with ResourceExhausted (a status result
// on a signing connection) and an audit record, and one closed of either
// kind makes room for the other.
func TestSignConnsShareStreamBudget(t *testing.T) {
	audit := &jsonAudit{}
	a := agenttest.Start(t, newMemStore(t), server.Options{MaxSignStreams: 4, Audit: audit.logger()})
	api, _ := rawClient(t, a.Socket)
	grpcStream := func() (context.CancelFunc, error) {
		ctx, cancel := context.WithTimeout(context.Background(), frameTimeout)
		stream, err := api.SignStream(ctx)
		if err == nil {
			err = stream.Send(&agentpb.SignStreamRequest{Items: items(1, 1, goodEC)})
		}
		var resp *agentpb.SignStreamResponse
		// io.EOF from Send means the agent ended the stream first (a
		// refusal at admission races the request): Recv has its status.
		if err == nil || err == io.EOF {
			resp, err = stream.Recv()
		}
		if err == nil && (len(resp.Results) != 1 || resp.Results[0].Code != 0) {
			err = errors.New("not signed: " + resp.String())
		}
		if err != nil {
			cancel()
			return nil, err
		}
		return cancel, nil
	}
	// signConnOrStatus returns the connection admitted, or the status that refused it.
	signConnOrStatus := func() (*signConn, *status.Status) {
		// The preface and a request in one write: a refused connection may
		// be closed before a second.
		c := &signConn{conn: dialUnix(t, a.Socket)}
		c.r = bufio.NewReader(c.conn)
		c.write(t, append([]byte(wire.Preface), frame(t, items(1, 1, goodEC)...)...))
		c.expectPreface(t)
		m, err := c.next()
		if err != nil {
			t.Fatal(err)
		}
		if len(m.Results) == 1 && m.Results[0].Id == 1 && m.Results[0].Code == 0 {
			return c, nil
		}
		if len(m.Results) != 1 || m.Results[0].Id != wire.StatusID {
			t.Fatalf("answer %v; want the result of item 1 or a status", m)
		}
		c.expectClosed(t)
		c.conn.Close()
		return nil, status.New(codes.Code(m.Results[0].Code), m.Results[0].Message)
	}
	// Fill the budget of 4, two of each.
	g1, err := grpcStream()
	if err != nil {
		t.Fatal(err)
	}
	s1, st := signConnOrStatus()
	if st != nil {
		t.Fatal(st.Err())
	}
	g2, err := grpcStream()
	if err != nil {
		t.Fatal(err)
	}
	defer g2()
	if _, st := signConnOrStatus(); st != nil {
		t.Fatal(st.Err())
	}
	// Full: the next of either kind is refused.
	if _, st := signConnOrStatus(); st == nil || st.Code() != codes.ResourceExhausted || !strings.Contains(st.Message(), "too-many-streams") {
		t.Errorf("a fifth stream, a signing connection: %v; want ResourceExhausted, too-many-streams", st)
	}
	if _, err := grpcStream(); status.Code(err) != codes.ResourceExhausted {
		t.Errorf("a fifth stream, over gRPC: %v; want ResourceExhausted", err)
	}
	if n := len(audit.records(t, "msg", "sign-stream", "result", "too-many-streams")); n != 2 {
		t.Errorf("%d audit records of streams refused; want 2:\n%s", n, audit)
	}
	// A gRPC stream ended makes room for a signing connection, and a signing
	// connection ended for a gRPC stream.
	g1()
	waitFor(t, func() bool { c, _ := signConnOrStatus(); return c != nil })
	s1.conn.Close()
	waitFor(t, func() bool {
		cancel, err := grpcStream()
		if err == nil {
			t.Cleanup(cancel)
		}
		return err == nil
	})
}

// TestSignConnShutdown: on Shutdown a signature in flight on a signing
// connection is answered, then the connection ends with Unavailable
// "shutting down"; a connection whose preface comes after Shutdown began is
// answered that status at once, none of its requests signed; and nothing
// connects any more.
func TestSignConnShutdown(t *testing.T) {
	store := newStallingStore(t)
	a := agenttest.Start(t, store, server.Options{HSMTimeout: time.Minute})
	release := sync.OnceFunc(store.release)
	t.Cleanup(release) // before the agent's Stop, should the test fail first
	// Accepted now, its preface sent after Shutdown began: the agent
	// accepts in order, so the answer to the next connection's preface
	// says that this one is accepted.
	late := &signConn{conn: dialUnix(t, a.Socket)}
	late.r = bufio.NewReader(late.conn)
	c := openSignConn(t, a.Socket)
	store.hold()
	c.send(t, &agentpb.SignStreamItem{Id: 1, Request: goodEC})
	waitFor(t, func() bool { return store.calls.Load() == 1 })
	stopped := make(chan struct{})
	go func() { a.Stop(); close(stopped) }()
	// The listener is closed early in Shutdown: nothing connects any more.
	waitFor(t, func() bool {
		nc, err := net.Dial("unix", a.Socket)
		if err == nil {
			nc.Close()
		}
		return err != nil
	})
	late.write(t, append([]byte(wire.Preface), frame(t, &agentpb.SignStreamItem{Id: 7, Request: goodEC})...))
	late.expectPreface(t)
	results, st := late.end(t)
	if len(results) != 0 || st.Code() != codes.Unavailable || st.Message() != "agent: shutting down" {
		t.Errorf("a connection whose preface came after Shutdown began: results %v, status %v %q; want none and Unavailable \"agent: shutting down\"",
			results, st.Code(), st.Message())
	}
	select {
	case <-stopped:
		t.Fatal("Shutdown returned with a signature in flight")
	default:
	}
	release()
	results, st = c.end(t)
	if len(results) != 1 || results[0].Id != 1 || results[0].Code != 0 {
		t.Errorf("the signature in flight at Shutdown: %v; want it answered", results)
	} else if err := signedFor(store.MemoryStore, goodEC, results[0].Signature); err != nil {
		t.Error(err)
	}
	if st.Code() != codes.Unavailable || st.Message() != "agent: shutting down" {
		t.Errorf("the connection's end at Shutdown: %v %q; want Unavailable \"agent: shutting down\"", st.Code(), st.Message())
	}
	select {
	case <-stopped:
	case <-time.After(frameTimeout):
		t.Fatal("Shutdown did not return after the last signature was answered")
	}
	if n := store.calls.Load(); n != 1 {
		t.Errorf("%d signatures reached the HSM; want 1: none of the late connection's", n)
	}
}

// TestSignConnDepartedClientNotSigned: a client that disconnects with
// signatures waiting for the HSM never has them sent to the HSM; they, and
// the one the HSM was making when it left, are audited as abandoned.
func TestSignConnDepartedClientNotSigned(t *testing.T) {
	store := newStallingStore(t)
	audit := &jsonAudit{}
	a := agenttest.Start(t, store, server.Options{MaxInFlight: 1, HSMTimeout: time.Minute, Audit: audit.logger()})
	release := sync.OnceFunc(store.release)
	t.Cleanup(release) // before the agent's Stop, should the test fail first
	c := openSignConn(t, a.Socket)
	store.hold()
	c.send(t, items(1, 5, goodEC)...)
	waitFor(t, func() bool { return store.calls.Load() == 1 })
	waitFor(t, func() bool { _, waiting := a.Server.HSMLoad(); return waiting == 4 })
	c.conn.Close()
	waitFor(t, func() bool { return len(audit.records(t, "msg", "sign", "result", "abandoned")) == 4 })
	release()
	waitFor(t, func() bool { return len(audit.records(t, "msg", "sign", "result", "abandoned")) == 5 })
	if n := store.calls.Load(); n != 1 {
		t.Errorf("%d signatures reached the HSM; want 1: the four waiting when the client left must not", n)
	}
	stillSignsOverConn(t, a.Socket, store.MemoryStore)
	if n := len(audit.records(t, "msg", "sign")); n != 6 {
		t.Errorf("%d sign records; want 6 (5 abandoned, 1 ok):\n%s", n, audit)
	}
}

// fullSignConn is a signing connection the agent has stopped reading:
// the HSM (one slot) holds its first signature, 63 wait for the HSM, and
// the reader waits for a slot for a 65th.
type fullSignConn struct {
	conn    *signConn
	agent   *agenttest.Agent
	store   *stallingStore
	audit   *jsonAudit
	release func() // lets the HSM answer; once
}

func newFullSignConn(t *testing.T) fullSignConn {
	t.Helper()
	f := fullSignConn{store: newStallingStore(t), audit: &jsonAudit{}}
	f.agent = agenttest.Start(t, f.store, server.Options{MaxInFlight: 1, HSMTimeout: time.Minute, Audit: f.audit.logger()})
	f.release = sync.OnceFunc(f.store.release)
	t.Cleanup(f.release) // before the agent's Stop, should the test fail first
	f.conn = openSignConn(t, f.agent.Socket)
	f.store.hold()
	f.conn.send(t, items(1, 64, goodEC)...) // the stream's 64 slots: 1 in the HSM, 63 waiting
	waitFor(t, func() bool { _, waiting := f.agent.Server.HSMLoad(); return f.store.calls.Load() == 1 && waiting == 63 })
	f.conn.send(t, items(65, 1, goodEC)...) // read, then left waiting for a slot
	time.Sleep(100 * time.Millisecond)
	return f
}

// TestSignConnDepartedWhileFull: a client that hangs up while the agent has
// stopped reading its connection (64 signatures pending, the most a stream
// may have) is noticed at once: its signatures waiting for the HSM are
// abandoned and never sent to it, not only once the next result fails to go
// out.
func TestSignConnDepartedWhileFull(t *testing.T) {
	f := newFullSignConn(t)
	c, a, store, audit, release := f.conn, f.agent, f.store, f.audit, f.release
	c.conn.Close()
	// Noticed while the HSM still holds the first: the 63 waiting leave the
	// queue, abandoned (their records are rationed: refusals cost the
	// caller nothing).
	waitFor(t, func() bool { _, waiting := a.Server.HSMLoad(); return waiting == 0 })
	if n := len(audit.records(t, "msg", "sign", "result", "abandoned")); n == 0 {
		t.Errorf("no abandoned record:\n%s", audit)
	}
	release()
	if n := store.calls.Load(); n != 1 {
		t.Errorf("%d signatures reached the HSM; want 1: none of those waiting when the client left", n)
	}
	stillSignsOverConn(t, a.Socket, store.MemoryStore)
}

// TestSignConnShutdownDeadline: at Shutdown's deadline a signing connection
// is cut off as gRPC's streams are: its signatures still waiting for the HSM
// are abandoned, and Shutdown returns, even when the connection's reader had
// already stopped (its 64 slots full as the drain began) and the HSM is hung.
func TestSignConnShutdownDeadline(t *testing.T) {
	f := newFullSignConn(t)
	a, store, audit, release := f.agent, f.store, f.audit, f.release
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	stopped := make(chan struct{})
	go func() { a.Server.Shutdown(ctx); close(stopped) }()
	select {
	case <-stopped:
	case <-time.After(5 * time.Second):
		t.Error("Shutdown did not return within 5s of its deadline of 200ms, the HSM hung")
	}
	// The 63 waiting when the connection was cut off are abandoned, not sent to the HSM.
	waitFor(t, func() bool { _, waiting := a.Server.HSMLoad(); return waiting == 0 })
	if n := len(audit.records(t, "msg", "sign", "result", "abandoned")); n == 0 {
		t.Errorf("no signature audited as abandoned:\n%s", audit)
	}
	release()
	<-stopped
	if n := store.calls.Load(); n != 1 {
		t.Errorf("%d signatures reached the HSM; want 1: none after Shutdown's deadline", n)
	}
}

// TestSignStreamEmptyMessage: a gRPC SignStream message with no items is
// refused like an empty frame on a signing connection: the request before it
// is answered, then the stream ends InvalidArgument with a malformed record.
// Without it a client looping on empty messages kept the reader spinning
// past the back-pressure that bounds real requests.
func TestSignStreamEmptyMessage(t *testing.T) {
	store := newMemStore(t)
	audit := &jsonAudit{}
	a := agenttest.Start(t, store, server.Options{Audit: audit.logger()})
	api, _ := rawClient(t, a.Socket)
	ctx, cancel := context.WithTimeout(context.Background(), frameTimeout)
	defer cancel()
	stream, err := api.SignStream(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := stream.Send(&agentpb.SignStreamRequest{Items: items(1, 1, goodEC)}); err != nil {
		t.Fatal(err)
	}
	for range 3 {
		if err := stream.Send(&agentpb.SignStreamRequest{}); err != nil {
			break // ended already
		}
	}
	var results []*agentpb.SignStreamResult
	for {
		resp, err := stream.Recv()
		if err != nil {
			if st := status.Convert(err); st.Code() != codes.InvalidArgument || !strings.Contains(st.Message(), "no signatures") {
				t.Errorf("the stream ended %v %q; want InvalidArgument, no signatures", st.Code(), st.Message())
			}
			break
		}
		results = append(results, resp.Results...)
	}
	if len(results) != 1 || results[0].Code != 0 {
		t.Errorf("results %v; want item 1 signed", results)
	}
	waitFor(t, func() bool { return len(audit.records(t, "msg", "sign-stream", "result", "malformed")) == 1 })
	stillSignsOverConn(t, a.Socket, store)
}

// TestSignConnIdleClosed: a signing connection that sends nothing for the
// idle timeout is ended with Aborted after every request on it was answered
// (a connection that only sent the preface too), so idle connections do not
// hold their place for ever (issue 18, item 8).
func TestSignConnIdleClosed(t *testing.T) {
	store := newMemStore(t)
	a := agenttest.Start(t, store, server.Options{IdleTimeout: 300 * time.Millisecond})
	for _, tc := range []struct {
		name string
		send int
	}{{"after a signature", 1}, {"after the preface only", 0}} {
		t.Run(tc.name, func(t *testing.T) {
			c := openSignConn(t, a.Socket)
			if tc.send > 0 {
				c.send(t, items(1, tc.send, goodEC)...)
			}
			start := time.Now()
			results, st := c.end(t)
			if len(results) != tc.send {
				t.Errorf("%d results before the end; want %d", len(results), tc.send)
			}
			if st.Code() != codes.Aborted || !strings.Contains(st.Message(), "sent nothing for 300ms") {
				t.Errorf("the idle connection ended %v %q; want Aborted, sent nothing for 300ms", st.Code(), st.Message())
			}
			if d := time.Since(start); d > 5*time.Second {
				t.Errorf("closed after %v with an idle timeout of 300ms", d)
			}
		})
	}
	stillSignsOverConn(t, a.Socket, store)
}
