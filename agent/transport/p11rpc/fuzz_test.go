package p11rpc

import (
	"bytes"
	"errors"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/hsmagent/hsmagent/agent/core"
	"github.com/hsmagent/hsmagent/agent/keytype"
	"github.com/hsmagent/hsmagent/agent/transport/listen"
)

// FuzzDecodeRequest feeds a connection's handler one message body at a
// version, after a session and a search: whatever the bytes, the answer is
// a body or a *MalformedError, never a panic. Its seeds in testdata are
// messages Debian's p11-kit 0.24.1 client sent (captured with strace).
func FuzzDecodeRequest(f *testing.F) {
	store := core.NewMemoryStore()
	for label, kt := range map[string]keytype.Type{"ec": keytype.ECDSAP256, "rsa": keytype.RSA2048} {
		if _, err := store.Generate(label, kt); err != nil {
			f.Fatal(err)
		}
	}
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	c, err := core.New(store, core.Options{Logger: quiet})
	if err != nil {
		f.Fatal(err)
	}
	defer c.Close()
	srv := New(c, Options{Logger: quiet})
	for v := byte(0); v <= 2; v++ {
		e := newEncoder(42, "uMu", v)
		e.Ulong(1)
		e.Mechanism(pss(ckmSHA256RSAPKCSPSS, ckmSHA256, ckgMGF1SHA256, 32))
		e.Ulong(1)
		f.Add(v, e.b)
		e = newEncoder(24, "uufA", v)
		e.Ulong(1)
		e.Ulong(2)
		e.u32(1)
		e.u32(ckaModulus)
		e.u32(0)
		f.Add(v, e.b)
	}
	f.Fuzz(func(t *testing.T, version byte, body []byte) {
		if version > maxVersion {
			version %= maxVersion + 1
		}
		cn := &conn{srv: srv, pc: &listen.Conn{Peer: core.Peer{UID: os.Getuid()}}, ctx: t.Context(), version: version,
			sessions: map[uint64]*session{1: {}}, objects: map[uint64]*object{}, handles: map[string]uint64{}}
		if cn.refresh() != ckrOK {
			t.Fatal("listing failed")
		}
		out, err := cn.handle(body)
		var me *MalformedError
		if err != nil && !errors.As(err, &me) {
			t.Fatalf("error %v is not a MalformedError", err)
		}
		if err == nil && len(out) < 8 {
			t.Fatalf("answer of %d bytes", len(out))
		}
		// The same bytes as a frame: bounded, never more read than said.
		readFrame(bytes.NewReader(body), MaxMessage)
	})
}

// TestRealClientMessages decodes the messages Debian's p11-kit-client.so
// 0.24.1 sent (the fuzz seeds): each is answered, none is malformed.
func TestRealClientMessages(t *testing.T) {
	files, err := filepath.Glob("testdata/fuzz/FuzzDecodeRequest/p11kit-*")
	if err != nil || len(files) == 0 {
		t.Fatalf("no seeds: %v", err)
	}
	a := startAgent(t, nil, Options{})
	for _, name := range files {
		t.Run(filepath.Base(name), func(t *testing.T) {
			raw, err := os.ReadFile(name)
			if err != nil {
				t.Fatal(err)
			}
			lines := strings.Split(string(raw), "\n")
			body, err := strconv.Unquote(strings.TrimSuffix(strings.TrimPrefix(lines[2], "[]byte("), ")"))
			if err != nil {
				t.Fatal(err)
			}
			cn := &conn{srv: a.srv, pc: &listen.Conn{Peer: core.Peer{UID: os.Getuid()}}, ctx: t.Context(),
				sessions: map[uint64]*session{1: {}}, objects: map[uint64]*object{}, handles: map[string]uint64{}}
			cn.refresh()
			if _, err := cn.handle([]byte(body)); err != nil {
				t.Fatalf("a message of p11-kit 0.24.1 did not decode: %v", err)
			}
		})
	}
}
