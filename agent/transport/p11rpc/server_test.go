package p11rpc

import (
	"context"
	"crypto"
	"crypto/x509"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"os"
	"strings"
	"testing"
	"time"
)

func TestVersionNegotiation(t *testing.T) {
	a := startAgent(t, nil, Options{})
	for _, tc := range []struct{ ask, want byte }{{0, 0}, {1, 1}, {2, 2}, {3, 2}, {255, 2}} {
		if c := dial(t, a.path, tc.ask); c.version != tc.want {
			t.Errorf("client asking for version %d got %d, want %d", tc.ask, c.version, tc.want)
		}
	}
}

func TestTokenIsReadOnlyWithoutLogin(t *testing.T) {
	a := startAgent(t, nil, Options{TokenLabel: "agent-x"})
	c := dial(t, a.path, 0)
	d := c.mustOK(6, func(e *encoder) { e.Ulong(slotID) })
	label, _ := d.array()
	d.array()
	d.array()
	serial, _ := d.array()
	flags := d.u64()
	if strings.TrimRight(string(label), " ") != "agent-x" || len(label) != 32 {
		t.Errorf("label %q", label)
	}
	if want := uint64(ckfTokenInitialized | ckfWriteProtected); flags&want != want || flags&0x4 != 0 {
		t.Errorf("token flags %#x: want initialized and write-protected, login not required", flags)
	}
	if again := New(nil, Options{TokenLabel: "agent-x"}).serial(); strings.TrimRight(string(serial), " ") != again {
		t.Errorf("serial %q is not stable (%q)", serial, again)
	}
}

func TestWritesAndUnknownCallsAreRefused(t *testing.T) {
	a := startAgent(t, nil, Options{})
	c := dial(t, a.path, 1)
	s := c.openSession()
	for _, tc := range []struct {
		name string
		id   uint32
		args func(e *encoder)
		want uint64
	}{
		{"C_CreateObject", 20, func(e *encoder) { e.Ulong(s); e.Attrs(nil) }, ckrTokenWriteProtected},
		{"C_DestroyObject", 22, func(e *encoder) { e.Ulong(s); e.Ulong(1) }, ckrTokenWriteProtected},
		{"C_SetAttributeValue", 25, func(e *encoder) { e.Ulong(s); e.Ulong(1); e.Attrs(nil) }, ckrTokenWriteProtected},
		{"C_GenerateKeyPair", 59, nil, ckrTokenWriteProtected},
		{"C_InitToken", 9, nil, ckrTokenWriteProtected},
		{"C_SetPIN", 15, nil, ckrSessionReadOnly},
		{"C_GenerateRandom", 64, nil, ckrRandomNoRNG},
		{"C_Encrypt", 30, nil, ckrFunctionNotSupported},
		{"C_LoginUser (3.0)", 66, nil, ckrFunctionNotSupported},
		{"an id past the table", 4000, nil, ckrFunctionNotSupported},
		{"C_Login as security officer", 18, func(e *encoder) { e.Ulong(s); e.Ulong(ckuSO); e.Bytes([]byte("x"), 0) }, ckrUserTypeInvalid},
		{"C_Logout before C_Login", 19, func(e *encoder) { e.Ulong(s) }, ckrUserNotLoggedIn},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c.t = t
			e := newEncoder(tc.id, calls[tc.id].request, c.version)
			if tc.args != nil {
				tc.args(e)
			}
			if _, ok := calls[tc.id]; ok {
				if _, rv := c.call(tc.id, tc.args); rv != tc.want {
					t.Fatalf("rv %#x, want %#x", rv, tc.want)
				}
				return
			}
			if err := c.send(e.b); err != nil {
				t.Fatal(err)
			}
			f, err := readFrame(c.conn, MaxMessage)
			if err != nil {
				t.Fatal(err)
			}
			d, id, _ := newDecoder(f.body, 0)
			if id != 0 || d.expect("u") != nil {
				t.Fatalf("answer id %d, want an error answer", id)
			}
			if rv := d.Ulong(); rv != tc.want {
				t.Fatalf("rv %#x, want %#x", rv, tc.want)
			}
		})
	}
	// A read-write session opens (crypto11 opens no other), says so, and
	// writes in it are refused all the same.
	c.t = t
	rw := c.mustOK(10, func(e *encoder) { e.Ulong(slotID); e.Ulong(ckfSerialSession | ckfRWSession) }).Ulong()
	d := c.mustOK(13, func(e *encoder) { e.Ulong(rw) })
	if d.Ulong(); d.Ulong() != 2 || d.Ulong()&ckfRWSession == 0 {
		t.Error("a read-write session does not say so")
	}
	if _, rv := c.call(20, func(e *encoder) { e.Ulong(rw); e.Attrs(nil) }); rv != ckrTokenWriteProtected {
		t.Errorf("C_CreateObject in a read-write session: %#x, want CKR_TOKEN_WRITE_PROTECTED", rv)
	}
	// Any PIN logs in, and the session says so.
	c.mustOK(18, func(e *encoder) { e.Ulong(s); e.Ulong(ckuUser); e.Bytes([]byte("not the HSM's PIN"), 0) })
	d = c.mustOK(13, func(e *encoder) { e.Ulong(s) })
	if d.Ulong(); d.Ulong() != cksROUser {
		t.Error("session not in the user's state after C_Login")
	}
}

func TestObjectsAndAttributes(t *testing.T) {
	a := startAgent(t, nil, Options{})
	c := dial(t, a.path, 0)
	s := c.openSession()
	if all := c.find(s); len(all) != 6 {
		t.Fatalf("%d objects, want 6 (2 keys: private, public, certificate)", len(all))
	}
	priv := c.find(s, ulongAttr(ckaClass, ckoPrivateKey), bytesAttr(ckaLabel, []byte("rsa-key")))
	if len(priv) != 1 {
		t.Fatalf("found %d RSA private keys, want 1", len(priv))
	}
	if again := c.find(s, ulongAttr(ckaClass, ckoPrivateKey), bytesAttr(ckaLabel, []byte("rsa-key"))); again[0] != priv[0] {
		t.Errorf("the handle changed across searches: %d, then %d", priv[0], again[0])
	}
	for _, tc := range []struct {
		name string
		typ  uint32
		room uint32
		want Attribute
		rv   uint64
	}{
		{"a CK_BBOOL", ckaSign, 1, boolAttr(ckaSign, true), ckrOK},
		{"not extractable", ckaExtractable, 1, boolAttr(ckaExtractable, false), ckrOK},
		{"a CK_ULONG", ckaKeyType, 8, ulongAttr(ckaKeyType, ckkRSA), ckrOK},
		{"the length of a byte array", ckaModulus, 0, Attribute{Type: ckaModulus, Room: 256, Value: []byte{}}, ckrOK},
		{"a sensitive attribute", ckaPrivateExponent, 256, Attribute{Type: ckaPrivateExponent, Unavailable: true}, ckrAttributeSensitive},
		{"an attribute the object has not", ckaECPoint, 100, Attribute{Type: ckaECPoint, Unavailable: true}, ckrAttributeTypeInvalid},
		{"too little room", ckaModulus, 10, Attribute{Type: ckaModulus, Unavailable: true}, ckrBufferTooSmall},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, rv := c.attrs(s, priv[0], []Attribute{{Type: tc.typ, Room: tc.room}})
			if rv != tc.rv {
				t.Errorf("rv %#x, want %#x", rv, tc.rv)
			}
			g := got[0]
			if g.Type != tc.want.Type || g.Unavailable != tc.want.Unavailable || g.Room != tc.want.Room ||
				string(g.Value) != string(tc.want.Value) {
				t.Errorf("got %+v, want %+v", g, tc.want)
			}
		})
	}
	cert := c.find(s, ulongAttr(ckaClass, ckoCertificate), bytesAttr(ckaLabel, []byte("ec-key")))
	got, rv := c.attrs(s, cert[0], []Attribute{{Type: ckaValue, Room: 4096}})
	if rv != ckrOK {
		t.Fatalf("rv %#x", rv)
	}
	if _, err := x509.ParseCertificate(got[0].Value); err != nil {
		t.Errorf("CKA_VALUE of the certificate: %v", err)
	}
}

func TestSignMechanisms(t *testing.T) {
	a := startAgent(t, nil, Options{})
	data := []byte("the data the client signs, longer than one part")
	for version := byte(0); version <= 2; version++ {
		c := dial(t, a.path, version)
		s := c.openSession()
		for _, tc := range []struct {
			name   string
			key    string
			mech   Mechanism
			hash   crypto.Hash
			input  func(digest []byte) []byte // the data the mechanism takes
			pss    bool
			parts  bool
			wantRV uint64
		}{
			{name: "CKM_ECDSA", key: "ec-key", mech: Mechanism{Type: ckmECDSA}, hash: crypto.SHA256},
			{name: "CKM_ECDSA in parts", key: "ec-key", mech: Mechanism{Type: ckmECDSA}, hash: crypto.SHA256, parts: true},
			{name: "CKM_ECDSA_SHA256", key: "ec-key", mech: Mechanism{Type: ckmECDSASHA256}, hash: crypto.SHA256},
			{name: "CKM_ECDSA_SHA384 in parts", key: "ec-key", mech: Mechanism{Type: ckmECDSASHA384}, hash: crypto.SHA384, parts: true},
			{name: "CKM_ECDSA_SHA512", key: "ec-key", mech: Mechanism{Type: ckmECDSASHA512}, hash: crypto.SHA512},
			{name: "CKM_RSA_PKCS", key: "rsa-key", mech: Mechanism{Type: ckmRSAPKCS}, hash: crypto.SHA256},
			{name: "CKM_RSA_PKCS SHA-512", key: "rsa-key", mech: Mechanism{Type: ckmRSAPKCS}, hash: crypto.SHA512},
			{name: "CKM_SHA256_RSA_PKCS", key: "rsa-key", mech: Mechanism{Type: ckmSHA256RSAPKCS}, hash: crypto.SHA256},
			{name: "CKM_SHA384_RSA_PKCS in parts", key: "rsa-key", mech: Mechanism{Type: ckmSHA384RSAPKCS}, hash: crypto.SHA384, parts: true},
			{name: "CKM_SHA512_RSA_PKCS", key: "rsa-key", mech: Mechanism{Type: ckmSHA512RSAPKCS}, hash: crypto.SHA512},
			{name: "CKM_RSA_PKCS_PSS", key: "rsa-key", mech: pss(ckmRSAPKCSPSS, ckmSHA256, ckgMGF1SHA256, 32), hash: crypto.SHA256, pss: true},
			{name: "CKM_SHA256_RSA_PKCS_PSS", key: "rsa-key", mech: pss(ckmSHA256RSAPKCSPSS, ckmSHA256, ckgMGF1SHA256, 32), hash: crypto.SHA256, pss: true},
			{name: "CKM_SHA384_RSA_PKCS_PSS", key: "rsa-key", mech: pss(ckmSHA384RSAPKCSPSS, ckmSHA384, ckgMGF1SHA384, 48), hash: crypto.SHA384, pss: true},
			{name: "CKM_SHA512_RSA_PKCS_PSS in parts", key: "rsa-key", mech: pss(ckmSHA512RSAPKCSPSS, ckmSHA512, ckgMGF1SHA512, 64), hash: crypto.SHA512, pss: true, parts: true},
			{name: "PSS with another MGF", key: "rsa-key", mech: pss(ckmSHA256RSAPKCSPSS, ckmSHA256, ckgMGF1SHA512, 32), wantRV: ckrMechanismParamInvalid},
			{name: "an RSA mechanism on an EC key", key: "ec-key", mech: Mechanism{Type: ckmSHA256RSAPKCS}, wantRV: ckrKeyTypeInconsistent},
			{name: "a mechanism the token has not", key: "ec-key", mech: Mechanism{Type: 0x1085 /* AES_CBC_PAD */, Param: make([]byte, 16)}, wantRV: ckrMechanismInvalid},
		} {
			t.Run(tc.name, func(t *testing.T) {
				c.t = t
				key := c.find(s, ulongAttr(ckaClass, ckoPrivateKey), bytesAttr(ckaLabel, []byte(tc.key)))[0]
				h := tc.hash
				if h == 0 {
					h = crypto.SHA256
				}
				hh := h.New()
				hh.Write(data)
				digest := hh.Sum(nil)
				in := data
				switch tc.mech.Type {
				case ckmECDSA, ckmRSAPKCSPSS:
					in = digest
				case ckmRSAPKCS:
					in = digestInfo(t, h, digest)
				}
				sig, rv := c.sign(s, key, tc.mech, in, tc.parts)
				if rv != tc.wantRV {
					t.Fatalf("version %d: rv %#x, want %#x", version, rv, tc.wantRV)
				}
				if rv == ckrOK {
					verify(t, a.keys[tc.key].Public(), h, digest, sig, tc.pss)
				}
			})
		}
	}
	if !hasLine(a.audit.String(), `"msg":"sign"`, `"transport":"pkcs11"`) {
		t.Errorf("no sign record names the transport:\n%s", a.audit.String())
	}
}

func pss(m uint32, h, mgf, salt uint64) Mechanism {
	return Mechanism{Type: m, PSS: &PSSParams{Hash: h, MGF: mgf, SaltLength: salt}}
}

func digestInfo(t testing.TB, h crypto.Hash, digest []byte) []byte {
	prefix := map[crypto.Hash][]byte{
		crypto.SHA256: {0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01, 0x05, 0x00, 0x04, 0x20},
		crypto.SHA512: {0x30, 0x51, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x03, 0x05, 0x00, 0x04, 0x40},
	}[h]
	if prefix == nil {
		t.Fatalf("no DigestInfo prefix for %v", h)
	}
	return append(append([]byte{}, prefix...), digest...)
}

// A NULL mechanism cancels the signature under way, in both of the
// encodings p11-kit has used, in every version.
func TestNullMechanismCancels(t *testing.T) {
	a := startAgent(t, nil, Options{})
	for version := byte(0); version <= 2; version++ {
		c := dial(t, a.path, version)
		s := c.openSession()
		key := c.find(s, ulongAttr(ckaClass, ckoPrivateKey), bytesAttr(ckaLabel, []byte("ec-key")))[0]
		init := func(m Mechanism) uint64 {
			_, rv := c.call(42, func(e *encoder) { e.Ulong(s); e.Mechanism(m); e.Ulong(key) })
			return rv
		}
		if rv := init(Mechanism{Type: ckmECDSA}); rv != ckrOK {
			t.Fatalf("version %d: C_SignInit: %#x", version, rv)
		}
		if rv := init(Mechanism{Type: ckmECDSA}); rv != ckrOperationActive {
			t.Fatalf("version %d: a second C_SignInit: %#x, want CKR_OPERATION_ACTIVE", version, rv)
		}
		for _, cancel := range []struct {
			name string
			enc  func(e *encoder)
		}{
			{"0xffffffff (p11-kit 0.25.3 on)", func(e *encoder) { e.Mechanism(Mechanism{Null: true}) }},
			{"the type 0 alone (p11-kit 0.25.0-0.25.2)", func(e *encoder) { e.u32(oldNullMechanism) }},
		} {
			if _, rv := c.call(42, func(e *encoder) { e.Ulong(s); cancel.enc(e); e.Ulong(key) }); rv != ckrOK {
				t.Fatalf("version %d: cancelling with %s: %#x", version, cancel.name, rv)
			}
			if rv := init(Mechanism{Type: ckmECDSA}); rv != ckrOK {
				t.Fatalf("version %d: C_SignInit after cancelling with %s: %#x", version, cancel.name, rv)
			}
		}
	}
}

func TestMalformedMessageClosesOnlyItsConnection(t *testing.T) {
	a := startAgent(t, nil, Options{})
	good := dial(t, a.path, 0)
	for _, tc := range []struct {
		name string
		body []byte
	}{
		{"a signature that is not the call's", newEncoder(5, "uu", 0).b},
		{"a truncated argument", append(newEncoder(5, "u", 0).b, 0, 1)},
		{"bytes after the arguments", append(newEncoder(3, "", 0).b, 9)},
		{"the error id as a request", newEncoder(0, "u", 0).b},
	} {
		t.Run(tc.name, func(t *testing.T) {
			bad := dial(t, a.path, 0)
			if err := bad.send(tc.body); err != nil {
				t.Fatal(err)
			}
			if _, err := readFrame(bad.conn, MaxMessage); !errors.Is(err, io.EOF) {
				t.Fatalf("read after a malformed message: %v, want the connection closed", err)
			}
		})
	}
	t.Run("a message over the size bound", func(t *testing.T) {
		bad := dial(t, a.path, 0)
		h := make([]byte, headerSize)
		binary.BigEndian.PutUint32(h[8:], MaxMessage+1)
		bad.conn.Write(h)
		if _, err := readFrame(bad.conn, MaxMessage); !errors.Is(err, io.EOF) {
			t.Fatalf("read: %v, want the connection closed", err)
		}
	})
	good.t = t
	good.mustOK(3, nil) // the other connection is served still
	if !hasLine(a.audit.String(), `"result":"malformed"`, `"transport":"pkcs11"`) {
		t.Errorf("no audit record of the malformed message:\n%s", a.audit.String())
	}
}

func TestSessionBoundAndIdleTimeout(t *testing.T) {
	a := startAgent(t, nil, Options{MaxSessions: 2, IdleTimeout: 200 * time.Millisecond})
	c := dial(t, a.path, 0)
	c.openSession()
	c.openSession()
	if _, rv := c.call(10, func(e *encoder) { e.Ulong(slotID); e.Ulong(ckfSerialSession) }); rv != ckrSessionCount {
		t.Fatalf("a third session: %#x, want CKR_SESSION_COUNT", rv)
	}
	time.Sleep(400 * time.Millisecond)
	c.conn.SetDeadline(time.Now().Add(2 * time.Second))
	var b [1]byte
	if _, err := c.conn.Read(b[:]); !errors.Is(err, io.EOF) && !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("read on an idle connection: %v", err)
	} else if errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatal("the idle connection is still open")
	}
}

// The token digests with SHA-2 itself (Java signs RSA-PSS only from a
// token that also digests), in one part or several.
func TestDigest(t *testing.T) {
	a := startAgent(t, nil, Options{})
	data := []byte("digested by the agent, in parts or at once")
	for _, tc := range []struct {
		mech uint32
		hash crypto.Hash
	}{{ckmSHA256, crypto.SHA256}, {ckmSHA384, crypto.SHA384}, {ckmSHA512, crypto.SHA512}} {
		for i, parts := range []bool{false, true, false} {
			c := dial(t, a.path, byte(i))
			s := c.openSession()
			c.mustOK(37, func(e *encoder) { e.Ulong(s); e.Mechanism(Mechanism{Type: tc.mech}) })
			var d *decoder
			if parts {
				c.mustOK(39, func(e *encoder) { e.Ulong(s); e.Bytes(data[:5], 0) })
				c.mustOK(39, func(e *encoder) { e.Ulong(s); e.Bytes(data[5:], 0) })
				d = c.mustOK(41, func(e *encoder) { e.Ulong(s); e.u32(64) })
			} else {
				d = c.mustOK(38, func(e *encoder) { e.Ulong(s); e.Bytes(data, 0); e.u32(64) })
			}
			got := d.Bytes()
			c.done(d)
			h := tc.hash.New()
			h.Write(data)
			if want := h.Sum(nil); string(got) != string(want) {
				t.Errorf("%v (parts %v): %x, want %x", tc.hash, parts, got, want)
			}
			if _, rv := c.call(41, func(e *encoder) { e.Ulong(s); e.u32(64) }); rv != ckrOperationNotInitialized {
				t.Errorf("a digest after its end: %#x, want CKR_OPERATION_NOT_INITIALIZED", rv)
			}
			// Cancelled with a NULL mechanism, old encoding or new.
			c.mustOK(37, func(e *encoder) { e.Ulong(s); e.Mechanism(Mechanism{Type: tc.mech}) })
			c.mustOK(37, func(e *encoder) { e.Ulong(s); e.u32(oldNullMechanism) })
			c.mustOK(37, func(e *encoder) { e.Ulong(s); e.Mechanism(Mechanism{Type: tc.mech}) })
			c.mustOK(37, func(e *encoder) { e.Ulong(s); e.Mechanism(Mechanism{Null: true}) })
			if _, rv := c.call(41, func(e *encoder) { e.Ulong(s); e.u32(64) }); rv != ckrOperationNotInitialized {
				t.Errorf("a cancelled digest: %#x, want CKR_OPERATION_NOT_INITIALIZED", rv)
			}
		}
	}
}

// Shutdown ends the connections waiting between calls at once, and takes
// no new ones.
func TestShutdownEndsIdleConnections(t *testing.T) {
	a := startAgent(t, nil, Options{})
	c := dial(t, a.path, 0)
	c.openSession()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	start := time.Now()
	a.srv.Shutdown(ctx)
	if d := time.Since(start); d > time.Second {
		t.Errorf("Shutdown took %v with one idle connection", d)
	}
	if _, err := readFrame(c.conn, MaxMessage); !errors.Is(err, io.EOF) {
		t.Errorf("the idle connection after Shutdown: %v, want closed", err)
	}
	if conn, err := net.Dial("unix", a.path); err == nil {
		conn.Close()
		t.Error("a connection was accepted after Shutdown")
	}
}

// Newer p11-kit clients mark NULL output buffers with a byte of their own
// ('fy', 'fA'); the last argument's size tells the two forms apart.
func TestOutputBuffersWithPresenceBytes(t *testing.T) {
	a := startAgent(t, nil, Options{})
	c := dial(t, a.path, 2)
	s := c.openSession()
	key := c.find(s, ulongAttr(ckaClass, ckoPrivateKey), bytesAttr(ckaLabel, []byte("ec-key")))[0]
	d := c.mustOK(24, func(e *encoder) {
		e.Ulong(s)
		e.Ulong(key)
		e.u32(2)
		e.u8(0) // the array is there
		e.u32(ckaKeyType)
		e.u8(0)
		e.u32(8)
		e.u32(ckaECParams)
		e.u8(1) // a NULL value: its length only
		e.u32(0)
	})
	attrs := d.Attrs()
	rv := d.Ulong()
	c.done(d)
	if rv != ckrOK || string(attrs[0].Value) != string(ulongAttr(ckaKeyType, ckkEC).Value) || attrs[1].Room != 10 {
		t.Errorf("rv %#x, attributes %+v: want CKK_EC and the length of a P-256 CKA_EC_PARAMS (10)", rv, attrs)
	}
	c.mustOK(42, func(e *encoder) { e.Ulong(s); e.Mechanism(Mechanism{Type: ckmECDSA}); e.Ulong(key) })
	d = c.mustOK(43, func(e *encoder) { e.Ulong(s); e.Bytes(make([]byte, 32), 0); e.u8(1); e.u32(0) })
	if d.u8() != 0 || d.u32() != 64 {
		t.Error("a NULL signature buffer with its presence byte did not get the length")
	}
	d.sig = ""
	c.done(d)
	d = c.mustOK(43, func(e *encoder) { e.Ulong(s); e.Bytes(make([]byte, 32), 0); e.u8(0); e.u32(64) })
	if sig := d.Bytes(); len(sig) != 64 {
		t.Errorf("signature of %d bytes, want 64", len(sig))
	}
}
