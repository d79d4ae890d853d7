package server_test

import (
	"bufio"
	"context"
	"crypto/ecdsa"
	"crypto/rsa"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"regexp"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/hsmagent/hsmagent/agent/agentpb"
	"github.com/hsmagent/hsmagent/agent/agenttest"
	"github.com/hsmagent/hsmagent/agent/internal/wire"
	"github.com/hsmagent/hsmagent/agent/keytype"
	"github.com/hsmagent/hsmagent/agent/server"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// rawCodec sends the fuzzer's bytes as the message itself, so that the
// server's own decoding is under test too. It registers as "proto": the
// content-subtype the agent knows.
type rawCodec struct{}

func (rawCodec) Marshal(v any) ([]byte, error) {
	b, ok := v.(*[]byte)
	if !ok {
		return nil, fmt.Errorf("rawCodec: cannot marshal %T", v)
	}
	return *b, nil
}

func (rawCodec) Unmarshal(data []byte, v any) error {
	b, ok := v.(*[]byte)
	if !ok {
		return fmt.Errorf("rawCodec: cannot unmarshal into %T", v)
	}
	*b = append((*b)[:0], data...)
	return nil
}

func (rawCodec) Name() string { return "proto" }

// fuzzAgent starts one in-memory agent for a fuzz worker, with a good
// request to prove after each input that it still serves.
func fuzzAgent(f *testing.F) (*server.MemoryStore, *grpc.ClientConn, agentpb.AgentClient) {
	store := server.NewMemoryStore()
	for label, kt := range map[string]keytype.Type{"ec": keytype.ECDSAP256, "rsa": keytype.RSA2048} {
		if _, err := store.Generate(label, kt); err != nil {
			f.Fatal(err)
		}
	}
	a := agenttest.Start(f, store, server.Options{})
	conn, err := grpc.NewClient("unix://"+a.Socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { conn.Close() })
	return store, conn, agentpb.NewAgentClient(conn)
}

func stillServes(t *testing.T, api agentpb.AgentClient) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	digest := sha256.Sum256([]byte("still"))
	if _, err := api.Sign(ctx, &agentpb.SignRequest{Key: "ec", Digest: digest[:], Hash: agentpb.Hash_HASH_SHA256}); err != nil {
		t.Fatalf("a good request fails after the fuzz input: %v", err)
	}
}

// signSeeds are well-formed and malformed requests the mutator starts from.
func signSeeds() []*agentpb.SignRequest {
	d32, d48, d64 := make([]byte, 32), make([]byte, 48), make([]byte, 64)
	return []*agentpb.SignRequest{
		{Key: "ec", Digest: d32, Hash: agentpb.Hash_HASH_SHA256},
		{Key: "ec", Digest: d48, Hash: agentpb.Hash_HASH_SHA384},
		{Key: "rsa", Digest: d64, Hash: agentpb.Hash_HASH_SHA512, Padding: agentpb.Padding_PADDING_PKCS1V15},
		{Key: "rsa", Digest: d32, Hash: agentpb.Hash_HASH_SHA256, Padding: agentpb.Padding_PADDING_PSS},
		{Key: "rsa", Digest: d32, Hash: agentpb.Hash_HASH_SHA256, Padding: agentpb.Padding_PADDING_PSS, PssSaltLength: 222},
		{Key: "rsa", Digest: d32, Hash: agentpb.Hash_HASH_SHA256, Padding: agentpb.Padding_PADDING_PSS, PssSaltLength: -1},
		{Key: "ec", Digest: d32, Hash: agentpb.Hash_HASH_SHA256, Padding: agentpb.Padding_PADDING_PSS},
		{Key: "missing", Digest: d32, Hash: agentpb.Hash_HASH_SHA256},
		{Key: "ec", Digest: make([]byte, 20), Hash: 99},
		{},
	}
}

// checkSigned verifies a signature the agent returned for req.
func checkSigned(t *testing.T, store *server.MemoryStore, req *agentpb.SignRequest, sig []byte) {
	t.Helper()
	if err := signedFor(store, req, sig); err != nil {
		t.Fatal(err)
	}
}

func signedFor(store *server.MemoryStore, req *agentpb.SignRequest, sig []byte) error {
	signer, err := store.Signer(req.Key)
	if err != nil {
		return fmt.Errorf("signed with key %q, which the store does not hold", req.Key)
	}
	hash, _ := wire.GoHash(req.Hash)
	switch pub := signer.Public().(type) {
	case *ecdsa.PublicKey:
		err = nil
		if !ecdsa.VerifyASN1(pub, req.Digest, sig) {
			err = errors.New("ECDSA verification failed")
		}
	case *rsa.PublicKey:
		if req.Padding == agentpb.Padding_PADDING_PSS {
			err = rsa.VerifyPSS(pub, hash, req.Digest, sig, &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthAuto})
		} else {
			err = rsa.VerifyPKCS1v15(pub, hash, req.Digest, sig)
		}
	}
	if err != nil {
		return fmt.Errorf("signature for %v does not verify: %v", req, err)
	}
	return nil
}

// requestCodes are the answers a request may get: anything else (Internal
// from the store, Unknown from a panic recovered by gRPC) is a finding.
var requestCodes = map[codes.Code]bool{
	codes.OK: true, codes.InvalidArgument: true, codes.NotFound: true, codes.PermissionDenied: true,
}

// FuzzSign sends mutated SignRequest bytes to a real agent over its socket:
// each gets OK with a signature that verifies, or a refusal with a message,
// and the agent keeps serving.
func FuzzSign(f *testing.F) {
	for _, req := range signSeeds() {
		b, err := proto.Marshal(req)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Add([]byte{0xff, 0xff, 0xff})
	store, conn, api := fuzzAgent(f)
	f.Fuzz(func(t *testing.T, data []byte) {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		var reply []byte
		err := conn.Invoke(ctx, "/hsmagent.v1.Agent/Sign", &data, &reply, grpc.ForceCodec(rawCodec{}))
		code := status.Code(err)
		var req agentpb.SignRequest
		decodeErr := proto.Unmarshal(data, &req)
		switch {
		case len(data) > wire.MaxRequestSize:
			if code != codes.ResourceExhausted {
				t.Fatalf("%d-byte request: %v, want ResourceExhausted", len(data), err)
			}
		case decodeErr != nil:
			if code != codes.Internal || !strings.Contains(status.Convert(err).Message(), "unmarshal") {
				t.Fatalf("undecodable request: %v, want gRPC's decoding error", err)
			}
		case !requestCodes[code]:
			t.Fatalf("request %v: unexpected answer %v", &req, err)
		case code != codes.OK && !strings.HasPrefix(status.Convert(err).Message(), "agent: "):
			t.Fatalf("request %v: refusal without the agent's prefix: %v", &req, err)
		case code == codes.OK:
			var resp agentpb.SignResponse
			if err := proto.Unmarshal(reply, &resp); err != nil {
				t.Fatal(err)
			}
			checkSigned(t, store, &req, resp.Signature)
		}
		stillServes(t, api)
	})
}

// FuzzSignStream sends mutated SignStreamRequest bytes, count times over
// one stream: every item gets one result with a known code, the stream ends
// cleanly or with a refusal, and the agent keeps serving.
func FuzzSignStream(f *testing.F) {
	var items []*agentpb.SignStreamItem
	for i, req := range signSeeds() {
		items = append(items, &agentpb.SignStreamItem{Id: uint64(i), Request: req})
		b, err := proto.Marshal(&agentpb.SignStreamRequest{Items: items[i:]})
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b, uint8(1))
	}
	all, _ := proto.Marshal(&agentpb.SignStreamRequest{Items: items})
	f.Add(all, uint8(3))
	f.Add([]byte{}, uint8(2))
	f.Add([]byte{0x0a, 0x00}, uint8(1)) // one empty item
	store, conn, api := fuzzAgent(f)
	desc := &grpc.StreamDesc{StreamName: "SignStream", ServerStreams: true, ClientStreams: true}
	f.Fuzz(func(t *testing.T, data []byte, count uint8) {
		n := int(count%4) + 1
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		stream, err := conn.NewStream(ctx, desc, "/hsmagent.v1.Agent/SignStream", grpc.ForceCodec(rawCodec{}))
		if err != nil {
			t.Fatal(err)
		}
		for range n {
			if err := stream.SendMsg(&data); err != nil {
				break // the server ended the stream: its status comes with RecvMsg
			}
		}
		stream.CloseSend()
		var msg agentpb.SignStreamRequest
		decodeErr := proto.Unmarshal(data, &msg)
		// Ids need not be unique: a result answers one of the items with its id.
		want := map[uint64][]*agentpb.SignRequest{}
		wantCount := 0
		if decodeErr == nil {
			for _, it := range msg.Items {
				req := it.Request
				if req == nil {
					req = &agentpb.SignRequest{}
				}
				want[it.Id] = append(want[it.Id], req)
			}
			wantCount = n * len(msg.Items)
		}
		got := 0
		var end error
		for {
			var reply []byte
			if end = stream.RecvMsg(&reply); end != nil {
				break
			}
			var resp agentpb.SignStreamResponse
			if err := proto.Unmarshal(reply, &resp); err != nil {
				t.Fatal(err)
			}
			for _, r := range resp.Results {
				got++
				reqs, ok := want[r.Id]
				if !ok {
					t.Fatalf("result for id %d, which was not asked", r.Id)
				}
				checkStreamResult(t, store, r, reqs)
			}
		}
		code := status.Code(end)
		switch {
		case end == io.EOF:
			if got != wantCount {
				t.Fatalf("%d results for %d items", got, wantCount)
			}
		case len(data) > wire.MaxRequestSize && code == codes.ResourceExhausted:
		case decodeErr != nil && code == codes.Internal:
		case decodeErr == nil && len(msg.Items) > 64 && code == codes.InvalidArgument:
		case decodeErr == nil && len(msg.Items) == 0 && code == codes.InvalidArgument && got == 0:
		default:
			t.Fatalf("stream ended with %v (%d items, decode error %v)", end, len(msg.Items), decodeErr)
		}
		stillServes(t, api)
	})
}

// FuzzPolicy builds access rules from fuzzed keys, users and groups (one per
// line) and asks Policy.Allowed about a fuzzed label: errors are one line
// with the agent's prefix, and a pattern of literals, *, ** and ? decides as
// the documented semantics (checked against a regular expression) say.
func FuzzPolicy(f *testing.F) {
	for _, s := range [][4]string{
		{"*", "4242", "", "any/thing"},
		{"d1-ppr-*", "4242", "", "d1-ppr-mtls"},
		{"d1-ppr-*", "4242", "", "d1-ppr-a/b"},
		{"d1/**", "", "4242", "d1/ppr/mtls"},
		{"a**b\na?c", "root", "", "a/x/b"},
		{"[a-z]x\n[^0-9]y\n\\*", "0", "root", "*"},
		{"[", "1", "", "x"},
		{"[z-a]", "1", "", "x"},
		{"a\\", "1", "", "a"},
		{"", "1", "", "x"},
		{"k", "", "", "k"},
		{"k", "no-such-user-here", "", "k"},
		{"k", "-1", "", "k"},
	} {
		f.Add(s[0], s[1], s[2], s[3])
	}
	f.Fuzz(func(t *testing.T, keys, users, groups, label string) {
		lines := func(s string) []string {
			if s == "" {
				return nil
			}
			return strings.Split(s, "\n")
		}
		rule := server.Rule{Keys: lines(keys), Users: lines(users), Groups: lines(groups)}
		p, err := server.NewPolicy([]server.Rule{rule})
		if err != nil {
			if msg := err.Error(); strings.Contains(msg, "\n") || !strings.HasPrefix(msg, "agent: access rule 1") {
				t.Fatalf("error %q: want one line starting with \"agent: access rule 1\"", msg)
			}
			return
		}
		p.Allowed(server.Peer{UID: 4242, GID: 4242, Groups: []int{4242}}, label)
		if !p.Allowed(server.Peer{UID: 0}, label) {
			t.Fatal("root refused")
		}
		for _, pattern := range rule.Keys {
			re, ok := patternRegexp(pattern)
			if !ok || !utf8.ValidString(label) {
				continue
			}
			one, err := server.NewPolicy([]server.Rule{{Keys: []string{pattern}, Users: []string{"4242"}}})
			if err != nil {
				t.Fatalf("pattern %q accepted in one rule, refused alone: %v", pattern, err)
			}
			want := re.MatchString(label)
			if got := one.Allowed(server.Peer{UID: 4242, GID: 4242}, label); got != want {
				t.Fatalf("pattern %q, label %q: allowed %v, want %v (%s)", pattern, label, got, want, re)
			}
			if one.Allowed(server.Peer{UID: 4243, GID: 4243}, label) {
				t.Fatalf("pattern %q allows a uid it does not name", pattern)
			}
		}
	})
}

// patternRegexp translates a key pattern made of literals, \x, *, ** and ?
// into a regular expression, or says it cannot (classes, bad escapes,
// invalid UTF-8): an independent reading of Rule's documentation.
func patternRegexp(p string) (*regexp.Regexp, bool) {
	if !utf8.ValidString(p) || strings.Contains(p, "[") {
		return nil, false
	}
	if p == "*" {
		return regexp.MustCompile(`(?s)^.*$`), true
	}
	var b strings.Builder
	b.WriteString(`(?s)^`)
	for i := 0; i < len(p); {
		switch {
		case strings.HasPrefix(p[i:], "**"):
			b.WriteString(`.*`)
			i += len(p[i:]) - len(strings.TrimLeft(p[i:], "*"))
		case p[i] == '*':
			b.WriteString(`[^/]*`)
			i++
		case p[i] == '?':
			b.WriteString(`[^/]`)
			i++
		case p[i] == '\\':
			if i+1 == len(p) {
				return nil, false
			}
			r, n := utf8.DecodeRuneInString(p[i+1:])
			b.WriteString(regexp.QuoteMeta(string(r)))
			i += 1 + n
		default:
			r, n := utf8.DecodeRuneInString(p[i:])
			b.WriteString(regexp.QuoteMeta(string(r)))
			i += n
		}
	}
	b.WriteString(`$`)
	return regexp.MustCompile(b.String()), true
}

// signConnPlan is what a fuzzed client sends on a signing connection, and
// what the agent must answer.
type signConnPlan struct {
	send    []byte                            // the preface, then the data completed to a frame's end, then an oversized frame's length
	asked   map[uint64][]*agentpb.SignRequest // the items of the frames the agent takes, by id
	items   int                               // how many
	tooMany bool                              // a message of more than 64 items ends it: the results of the items before it may be lost
	wantMsg string                            // in the status
}

// planSignConn reads data as the agent does: frames, the last one completed
// with zeros, up to the first the agent refuses; with none refused, an
// oversized frame's length follows, so that the agent always ends the
// connection with a status rather than wait for more.
func planSignConn(data []byte) signConnPlan {
	p := signConnPlan{send: []byte(wire.Preface), asked: map[uint64][]*agentpb.SignRequest{}}
	rest := data
	take := func(n int) []byte {
		b := make([]byte, n)
		copy(b, rest)
		rest = rest[min(n, len(rest)):]
		p.send = append(p.send, b...)
		return b
	}
	refused := func(msg string) signConnPlan {
		p.wantMsg = msg
		p.send = append(p.send, rest...) // left unread
		return p
	}
	for len(rest) > 0 {
		n := binary.BigEndian.Uint32(take(4))
		if n > wire.MaxRequestSize {
			return refused(fmt.Sprintf("a frame of %d bytes", n))
		}
		var m agentpb.SignStreamRequest
		if err := proto.Unmarshal(take(int(n)), &m); err != nil {
			return refused("not a SignStreamRequest")
		}
		for _, it := range m.Items {
			if it.Id == wire.StatusID {
				return refused("reserved for the connection's status")
			}
		}
		if len(m.Items) == 0 {
			return refused("no signatures")
		}
		if len(m.Items) > 64 {
			p.tooMany = true
			return refused(fmt.Sprintf("%d signatures in one message", len(m.Items)))
		}
		for _, it := range m.Items {
			req := it.Request
			if req == nil {
				req = &agentpb.SignRequest{}
			}
			p.asked[it.Id] = append(p.asked[it.Id], req)
			p.items++
		}
	}
	p.send = append(p.send, 0xff, 0xff, 0xff, 0xff)
	p.wantMsg = "a frame of 4294967295 bytes"
	return p
}

// FuzzSignConn sends arbitrary bytes after a signing connection's preface:
// the agent answers each item of the frames it takes at most once, with a
// known code (all of them unless a message of too many items ended the
// connection), then ends the connection with an InvalidArgument status
// that says why, and keeps serving.
func FuzzSignConn(f *testing.F) {
	valid := func(its ...*agentpb.SignStreamItem) []byte {
		b, err := wire.AppendFrame(nil, &agentpb.SignStreamRequest{Items: its})
		if err != nil {
			f.Fatal(err)
		}
		return b
	}
	var seedItems []*agentpb.SignStreamItem
	for i, req := range signSeeds() {
		seedItems = append(seedItems, &agentpb.SignStreamItem{Id: uint64(i + 1), Request: req})
	}
	all := valid(seedItems...)
	for _, seed := range [][]byte{
		nil,
		all,
		append(valid(seedItems[:2]...), valid(seedItems[2:]...)...),
		valid(&agentpb.SignStreamItem{Id: 0, Request: seedItems[0].Request}), // id 0, the status's
		valid(items(1, 65, goodEC)...),
		{0, 0, 0, 0},             // an empty message
		{0xff, 0xff, 0xff, 0xff}, // 4 GiB
		{0, 0},                   // half a length
		{0, 0, 0, 10, 0x0a},      // a frame cut short
		rawFrame([]byte{0xff, 0xff}),
		append(all, binary.BigEndian.AppendUint32(nil, wire.MaxRequestSize+1)...),
	} {
		f.Add(seed)
	}
	store := newMemStore(f)
	a := agenttest.Start(f, store, server.Options{})
	f.Fuzz(func(t *testing.T, data []byte) {
		p := planSignConn(data)
		c := &signConn{conn: dialUnix(t, a.Socket)}
		c.r = bufio.NewReader(c.conn)
		c.conn.SetWriteDeadline(time.Now().Add(frameTimeout))
		go c.conn.Write(p.send) // the agent may close before it has read all: that is its answer
		c.expectPreface(t)
		var frames []*agentpb.SignStreamResponse
		for {
			m, err := c.next()
			if errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET) {
				break
			}
			if err != nil {
				t.Fatalf("after %d frames: %v", len(frames), err)
			}
			frames = append(frames, m)
		}
		if len(frames) == 0 {
			t.Fatal("the agent closed the connection without a status")
		}
		end := frames[len(frames)-1]
		if len(end.Results) != 1 || end.Results[0].Id != wire.StatusID || len(end.Results[0].Signature) != 0 {
			t.Fatalf("the connection ended without a status: last frame %v", end)
		}
		st := end.Results[0]
		if codes.Code(st.Code) != codes.InvalidArgument || !strings.HasPrefix(st.Message, "agent: ") || !strings.Contains(st.Message, p.wantMsg) {
			t.Fatalf("status %v %q; want InvalidArgument \"agent: ...%s...\"", codes.Code(st.Code), st.Message, p.wantMsg)
		}
		answered := map[uint64]int{}
		total := 0
		for _, fr := range frames[:len(frames)-1] {
			for _, r := range fr.Results {
				reqs := p.asked[r.Id]
				answered[r.Id]++
				total++
				if answered[r.Id] > len(reqs) {
					t.Fatalf("%d results for id %d, asked %d times", answered[r.Id], r.Id, len(reqs))
				}
				checkStreamResult(t, store, r, reqs)
			}
		}
		if !p.tooMany && total != p.items {
			t.Fatalf("%d results for %d items", total, p.items)
		}
		stillSignsOverConn(t, a.Socket, store)
	})
}

// checkStreamResult fails t unless r is a known answer to one of reqs (the
// requests sent under its id): a refusal with a code a request may get and
// the agent's prefix, or a signature that verifies for one of them.
func checkStreamResult(t *testing.T, store *server.MemoryStore, r *agentpb.SignStreamResult, reqs []*agentpb.SignRequest) {
	t.Helper()
	switch {
	case !requestCodes[codes.Code(r.Code)]:
		t.Fatalf("item %d: unexpected code %v: %s", r.Id, codes.Code(r.Code), r.Message)
	case r.Code != 0 && !strings.HasPrefix(r.Message, "agent: "):
		t.Fatalf("item %d: refusal without the agent's prefix: %q", r.Id, r.Message)
	case r.Code == 0:
		var errs []error
		for _, req := range reqs {
			errs = append(errs, signedFor(store, req, r.Signature))
		}
		if !slices.Contains(errs, nil) {
			t.Fatalf("item %d: %v", r.Id, errors.Join(errs...))
		}
	}
}
