package p11rpc

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/binary"
	"io"
	"log/slog"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hsmagent/hsmagent/agent/core"
	"github.com/hsmagent/hsmagent/agent/keytype"
	"github.com/hsmagent/hsmagent/agent/transport/listen"
)

// testClient speaks the protocol as p11-kit's client does, at any version:
// the tests' own client, for what Debian's p11-kit-client.so (version 0)
// cannot send.
type testClient struct {
	t       testing.TB
	conn    net.Conn
	version byte
	code    uint32
}

func dial(t testing.TB, path string, version byte) *testClient {
	t.Helper()
	conn, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := conn.Write([]byte{version}); err != nil {
		t.Fatal(err)
	}
	var v [1]byte
	if _, err := io.ReadFull(conn, v[:]); err != nil {
		t.Fatalf("version answer: %v", err)
	}
	c := &testClient{t: t, conn: conn, version: v[0]}
	c.mustOK(1, func(e *encoder) {
		e.Bytes([]byte(handshake), 0)
		e.Byte(0)
		e.Bytes([]byte{0}, 0)
	})
	return c
}

// call sends call id with args and returns the answer's decoder (its
// signature read) and the error code of an error answer.
func (c *testClient) call(id uint32, args func(e *encoder)) (*decoder, uint64) {
	c.t.Helper()
	e := newEncoder(id, calls[id].request, c.version)
	if args != nil {
		args(e)
	}
	if err := c.send(e.b); err != nil {
		c.t.Fatalf("call %d: %v", id, err)
	}
	f, err := readFrame(c.conn, MaxMessage)
	if err != nil {
		c.t.Fatalf("call %d: reading the answer: %v", id, err)
	}
	if f.code != c.code {
		c.t.Fatalf("call %d: answer has code %d, want %d", id, f.code, c.code)
	}
	d, got, err := newDecoder(f.body, c.version)
	if err != nil {
		c.t.Fatal(err)
	}
	if got == 0 {
		if err := d.expect("u"); err != nil {
			c.t.Fatal(err)
		}
		rv := d.Ulong()
		if err := d.done(); err != nil {
			c.t.Fatal(err)
		}
		return nil, rv
	}
	if got != id {
		c.t.Fatalf("answer to call %d has id %d", id, got)
	}
	if err := d.expect(calls[id].response); err != nil {
		c.t.Fatal(err)
	}
	return d, ckrOK
}

func (c *testClient) send(body []byte) error {
	c.code++
	h := make([]byte, headerSize, headerSize+6+len(body))
	binary.BigEndian.PutUint32(h[0:], c.code)
	binary.BigEndian.PutUint32(h[4:], 6)
	binary.BigEndian.PutUint32(h[8:], uint32(len(body)))
	_, err := c.conn.Write(append(append(h, "client"...), body...))
	return err
}

func (c *testClient) mustOK(id uint32, args func(e *encoder)) *decoder {
	c.t.Helper()
	d, rv := c.call(id, args)
	if rv != ckrOK {
		c.t.Fatalf("call %d: rv %#x", id, rv)
	}
	return d
}

func (c *testClient) done(d *decoder) {
	c.t.Helper()
	if err := d.done(); err != nil {
		c.t.Fatal(err)
	}
}

func (c *testClient) openSession() uint64 {
	d := c.mustOK(10, func(e *encoder) { e.Ulong(slotID); e.Ulong(ckfSerialSession) })
	h := d.Ulong()
	c.done(d)
	return h
}

// find returns the handles of the objects that match template.
func (c *testClient) find(s uint64, template ...Attribute) []uint64 {
	c.t.Helper()
	c.mustOK(26, func(e *encoder) { e.Ulong(s); e.Attrs(template) })
	var out []uint64
	for {
		d := c.mustOK(27, func(e *encoder) { e.Ulong(s); e.u32(3) })
		if d.u8() != 1 {
			c.t.Fatal("C_FindObjects answered without an array")
		}
		n := d.u32()
		for range n {
			out = append(out, d.u64())
		}
		if n == 0 {
			break
		}
	}
	c.mustOK(28, func(e *encoder) { e.Ulong(s) })
	return out
}

// attrs reads the attributes of template (types with room) of object h.
func (c *testClient) attrs(s, h uint64, template []Attribute) ([]Attribute, uint64) {
	c.t.Helper()
	d := c.mustOK(24, func(e *encoder) {
		e.Ulong(s)
		e.Ulong(h)
		e.u32(uint32(len(template)))
		for _, a := range template {
			e.u32(a.Type)
			e.u32(a.Room)
		}
	})
	out := d.Attrs()
	rv := d.Ulong()
	c.done(d)
	return out, rv
}

// sign signs data with key through C_Sign (after a length query), or in
// parts through C_SignUpdate and C_SignFinal.
func (c *testClient) sign(s, key uint64, m Mechanism, data []byte, parts bool) ([]byte, uint64) {
	c.t.Helper()
	if _, rv := c.call(42, func(e *encoder) { e.Ulong(s); e.Mechanism(m); e.Ulong(key) }); rv != ckrOK {
		return nil, rv
	}
	if parts {
		for len(data) > 0 {
			n := min(len(data), 7)
			if _, rv := c.call(44, func(e *encoder) { e.Ulong(s); e.Bytes(data[:n], 0) }); rv != ckrOK {
				return nil, rv
			}
			data = data[n:]
		}
		d := c.mustOK(45, func(e *encoder) { e.Ulong(s); e.u32(1024) })
		return c.signature(d)
	}
	// A length query leaves the operation under way.
	d := c.mustOK(43, func(e *encoder) { e.Ulong(s); e.Bytes(data, 0); e.u32(0) })
	if d.u8() != 0 {
		c.t.Fatal("a length query got a signature")
	}
	size := d.u32()
	d.sig = ""
	c.done(d)
	d, rv := c.call(43, func(e *encoder) { e.Ulong(s); e.Bytes(data, 0); e.u32(size) })
	if rv != ckrOK {
		return nil, rv
	}
	return c.signature(d)
}

func (c *testClient) signature(d *decoder) ([]byte, uint64) {
	c.t.Helper()
	sig := d.Bytes()
	c.done(d)
	if sig == nil {
		c.t.Fatal("no signature in the answer")
	}
	return append([]byte(nil), sig...), ckrOK
}

// testAgent is a core over a MemoryStore with an EC and an RSA key, served
// by a Server on a real socket; audit holds the audit records.
type testAgent struct {
	path  string
	core  *core.Core
	srv   *Server
	keys  map[string]crypto.Signer
	audit *syncBuffer
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func startAgent(t testing.TB, policy *core.Policy, opts Options) *testAgent {
	t.Helper()
	store := core.NewMemoryStore()
	a := &testAgent{keys: map[string]crypto.Signer{}, audit: &syncBuffer{}}
	for label, kt := range map[string]keytype.Type{"ec-key": keytype.ECDSAP256, "rsa-key": keytype.RSA2048} {
		if _, err := store.Generate(label, kt); err != nil {
			t.Fatal(err)
		}
		s, err := store.Signer(label)
		if err != nil {
			t.Fatal(err)
		}
		a.keys[label] = s
		if err := store.SetChain(label, []*x509.Certificate{selfSigned(t, s, label)}); err != nil {
			t.Fatal(err)
		}
	}
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	c, err := core.New(store, core.Options{Logger: quiet, Audit: slog.New(slog.NewJSONHandler(a.audit, nil)), Policy: policy})
	if err != nil {
		t.Fatal(err)
	}
	dir, err := os.MkdirTemp("", "p11")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	a.path = filepath.Join(dir, "pkcs11.sock")
	l, err := listen.Listen(a.path, 0o666)
	if err != nil {
		t.Fatal(err)
	}
	opts.Logger = quiet
	a.core, a.srv = c, New(c, opts)
	done := make(chan error, 1)
	go func() { done <- a.srv.Serve(listen.Admitted(l, c)) }()
	t.Cleanup(func() {
		a.srv.Shutdown(t.Context())
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
		c.Close()
	})
	return a
}

func selfSigned(t testing.TB, s crypto.Signer, cn string) *x509.Certificate {
	t.Helper()
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(4242), Subject: pkix.Name{CommonName: cn},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, s.Public(), s)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return cert
}

// verify checks a PKCS#11 signature of digest (made with hash h) against pub.
func verify(t testing.TB, pub crypto.PublicKey, h crypto.Hash, digest, sig []byte, pss bool) {
	t.Helper()
	switch pub := pub.(type) {
	case *ecdsa.PublicKey:
		half := len(sig) / 2
		r, s := new(big.Int).SetBytes(sig[:half]), new(big.Int).SetBytes(sig[half:])
		if len(sig) != 64 || !ecdsa.Verify(pub, digest, r, s) {
			t.Fatalf("ECDSA signature of %d bytes does not verify", len(sig))
		}
	case *rsa.PublicKey:
		var err error
		if pss {
			err = rsa.VerifyPSS(pub, h, digest, sig, &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthAuto})
		} else {
			err = rsa.VerifyPKCS1v15(pub, h, digest, sig)
		}
		if err != nil {
			t.Fatalf("RSA signature does not verify: %v", err)
		}
	}
}

func hasLine(log, sub1, sub2 string) bool {
	for _, l := range strings.Split(log, "\n") {
		if strings.Contains(l, sub1) && strings.Contains(l, sub2) {
			return true
		}
	}
	return false
}
