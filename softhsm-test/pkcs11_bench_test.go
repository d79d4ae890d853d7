package softhsmtest

import (
	"context"
	"crypto"
	"crypto/rand"
	"crypto/sha256"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/hsmagent/hsmagent/agent"
	"github.com/hsmagent/hsmagent/agent/server"
	"github.com/hsmagent/hsmagent/hsm"
	"github.com/miekg/pkcs11"
)

// BenchmarkPKCS11 measures one caller's ECDSA P-256 signatures on SoftHSM
// four ways: in the process that holds the token, through the agent's Go
// client, and through the agent's PKCS#11 socket with p11-kit-client.so
// loaded in this process (what OpenSSL or Java do), and through p11-kit's
// own server.
//
//	go test -run '^$' -bench 'PKCS11/(in-process|go-client|pkcs11)$' -benchtime 2000x ./softhsm-test
//	go test -run '^$' -bench 'PKCS11/p11-kit-server$' -benchtime 2000x ./softhsm-test
//
// The last is the peer: p11-kit's own server forwarding SoftHSM. A process
// loads p11-kit-client.so once, so each of the two PKCS#11 runs needs its own.
func BenchmarkPKCS11(b *testing.B) {
	module := p11KitClient(b)
	fx := New(b)
	tok, err := hsm.Open(fx.Config())
	if err != nil {
		b.Fatal(err)
	}
	defer tok.Close()
	if _, err := tok.GenerateKey("ec", hsm.ECDSAP256, nil); err != nil {
		b.Fatal(err)
	}
	a := StartAgent(b, tok, server.Options{})
	p11sock := filepath.Join(filepath.Dir(a.Socket), "pkcs11.sock")
	l, err := server.Listen(p11sock, 0o600)
	if err != nil {
		b.Fatal(err)
	}
	go a.Server.ServePKCS11(l)
	digest := sha256.Sum256([]byte("bench"))

	b.Run("in-process", func(b *testing.B) {
		s, err := tok.Signer("ec")
		if err != nil {
			b.Fatal(err)
		}
		benchSign(b, s, digest[:])
	})
	b.Run("go-client", func(b *testing.B) {
		c, err := agent.Dial(context.Background(), a.Socket)
		if err != nil {
			b.Fatal(err)
		}
		defer c.Close()
		s, err := c.Signer(context.Background(), "ec")
		if err != nil {
			b.Fatal(err)
		}
		benchSign(b, s, digest[:])
	})
	b.Run("pkcs11", func(b *testing.B) { benchP11(b, module, p11sock, "") })
	// The peer: p11-kit's own server forwarding SoftHSM (login with the PIN
	// at the client, one uid, no rules or audit).
	b.Run("p11-kit-server", func(b *testing.B) {
		sock := filepath.Join(filepath.Dir(a.Socket), "p11kit.sock")
		os.Remove(sock) // a server killed before left it
		cmd := exec.Command("p11-kit", "server", "-f", "-n", sock, "-p", fx.ModulePath, "pkcs11:token="+fx.Label)
		cmd.Env = fx.Env()
		if err := cmd.Start(); err != nil {
			b.Fatal(err)
		}
		defer func() { cmd.Process.Kill(); cmd.Wait() }()
		for i := 0; i < 100; i++ { // until it listens
			if c, err := net.Dial("unix", sock); err == nil {
				c.Close()
				break
			}
			time.Sleep(20 * time.Millisecond)
		}
		benchP11(b, module, sock, fx.PIN)
	})
}

// benchP11 signs b.N times through p11-kit-client.so on sock, after a
// login with pin if it is set.
var p11Socket string // the socket p11-kit-client.so connected to first

func benchP11(b *testing.B, module, sock, pin string) {
	// p11-kit-client.so keeps the first address it connected to in this
	// process: another socket later finds no slot.
	if p11Socket != "" && p11Socket != sock {
		b.Skip("p11-kit-client.so connected to another socket in this process: run this benchmark alone (-bench 'PKCS11/NAME$')")
	}
	p11Socket = sock
	os.Setenv("P11_KIT_SERVER_ADDRESS", "unix:path="+sock)
	defer os.Unsetenv("P11_KIT_SERVER_ADDRESS")
	ctx := pkcs11.New(module)
	if err := ctx.Initialize(); err != nil {
		b.Fatal(err)
	}
	defer ctx.Destroy()
	defer ctx.Finalize()
	slots, err := ctx.GetSlotList(true)
	if err != nil || len(slots) != 1 {
		b.Fatalf("slots %v: %v", slots, err)
	}
	sh, err := ctx.OpenSession(slots[0], pkcs11.CKF_SERIAL_SESSION)
	if err != nil {
		b.Fatal(err)
	}
	if pin != "" {
		if err := ctx.Login(sh, pkcs11.CKU_USER, pin); err != nil {
			b.Fatal(err)
		}
	}
	ctx.FindObjectsInit(sh, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PRIVATE_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, "ec")})
	keys, _, err := ctx.FindObjects(sh, 2)
	ctx.FindObjectsFinal(sh)
	if err != nil || len(keys) != 1 {
		b.Fatalf("keys %v: %v", keys, err)
	}
	digest := sha256.Sum256([]byte("bench"))
	mech := []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_ECDSA, nil)}
	b.ResetTimer()
	for range b.N {
		if err := ctx.SignInit(sh, mech, keys[0]); err != nil {
			b.Fatal(err)
		}
		if sig, err := ctx.Sign(sh, digest[:]); err != nil || len(sig) != 64 {
			b.Fatalf("signature of %d bytes: %v", len(sig), err)
		}
	}
}

func benchSign(b *testing.B, s crypto.Signer, digest []byte) {
	b.ResetTimer()
	for range b.N {
		if _, err := s.Sign(rand.Reader, digest, crypto.SHA256); err != nil {
			b.Fatal(err)
		}
	}
}
