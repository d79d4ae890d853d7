// Package softhsmtest makes throwaway SoftHSM tokens for tests, and holds the
// end-to-end tests that drive the hsmagent binary against them.
//
// Each token lives in its own temporary directory with its own softhsm2.conf;
// SOFTHSM2_CONF is set for the test (so tests using it cannot run in parallel)
// and passed to child processes through Token.Env.
//
// When SoftHSM is not installed, tests skip with the reason, except under CI
// (CI=true), where a missing SoftHSM fails the run. With -short they skip.
package softhsmtest

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/hsmagent/hsmagent/hsm"
	"github.com/miekg/pkcs11"
)

// Token is an initialised SoftHSM token in a temporary directory.
type Token struct {
	Dir        string // holds softhsm2.conf, tokens/ and the PIN file
	ConfPath   string
	ModulePath string
	Label      string
	PIN        string
	SOPIN      string
	PINFile    string // the user PIN, mode 0600
}

// ModulePath returns SoftHSM's PKCS#11 library, or skips the test (fails it
// under CI). With -short it always skips: the short run is the fast set that
// needs no SoftHSM.
func ModulePath(tb testing.TB) string {
	tb.Helper()
	if testing.Short() {
		tb.Skip("-short: SoftHSM tests skipped")
	}
	p := hsm.DefaultModulePath()
	_, utilErr := exec.LookPath("softhsm2-util")
	if p != "" && utilErr == nil {
		return p
	}
	msg := "SoftHSM is not installed (libsofthsm2.so or softhsm2-util missing): run 'make deps' or apt-get install softhsm2"
	if os.Getenv("CI") != "" {
		tb.Fatal(msg)
	}
	tb.Skip(msg)
	return ""
}

// New creates a directory with a softhsm2.conf, points SOFTHSM2_CONF at it
// for the rest of the test and initialises a token with a random label and PINs.
func New(tb testing.TB) *Token {
	tb.Helper()
	module := ModulePath(tb)
	dir := tb.TempDir()
	tok, err := Create(dir, module, "test-"+randomHex(4))
	if err != nil {
		tb.Fatal(err)
	}
	tb.Setenv("SOFTHSM2_CONF", tok.ConfPath)
	return tok
}

// Create sets up a SoftHSM configuration in dir and initialises a token
// labelled label in it. It does not touch the process environment.
func Create(dir, module, label string) (*Token, error) {
	tok := &Token{
		Dir:        dir,
		ConfPath:   filepath.Join(dir, "softhsm2.conf"),
		ModulePath: module,
		Label:      label,
		PIN:        randomHex(4),
		SOPIN:      randomHex(8),
		PINFile:    filepath.Join(dir, "user.pin"),
	}
	if err := os.MkdirAll(filepath.Join(dir, "tokens"), 0o700); err != nil {
		return nil, err
	}
	conf := fmt.Sprintf("directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n",
		filepath.Join(dir, "tokens"))
	if err := os.WriteFile(tok.ConfPath, []byte(conf), 0o600); err != nil {
		return nil, err
	}
	if err := os.WriteFile(tok.PINFile, []byte(tok.PIN+"\n"), 0o600); err != nil {
		return nil, err
	}
	if err := tok.InitToken(label); err != nil {
		return nil, err
	}
	return tok, nil
}

// InitToken initialises one more token, with the same PINs, in the same directory.
func (t *Token) InitToken(label string) error {
	// PINs on softhsm2-util's command line are acceptable for throwaway test
	// tokens only; hsmagent itself never takes a PIN in argv.
	cmd := exec.Command("softhsm2-util", "--init-token", "--free", "--label", label, "--so-pin", t.SOPIN, "--pin", t.PIN)
	cmd.Env = append(os.Environ(), "SOFTHSM2_CONF="+t.ConfPath)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("softhsmtest: softhsm2-util --init-token %q: %v: %s", label, err, out.String())
	}
	return nil
}

// Env is the environment for a child process that should see this token:
// the test's own, without any HSMAGENT_* setting of the shell that runs the
// tests (such as softhsm-token.sh's), which would change what is tested.
func (t *Token) Env() []string {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "HSMAGENT_") && !strings.HasPrefix(kv, "SOFTHSM2_CONF=") {
			env = append(env, kv)
		}
	}
	return append(env, "SOFTHSM2_CONF="+t.ConfPath, "HSMAGENT_MODULE="+t.ModulePath)
}

// Config selects this token with its PIN file.
func (t *Token) Config() hsm.Config {
	return hsm.Config{ModulePath: t.ModulePath, TokenLabel: t.Label, PIN: hsm.PINFromFile(t.PINFile)}
}

// Open opens the token through the hsm package and closes it when the test ends.
func (t *Token) Open(tb testing.TB) *hsm.Token {
	tb.Helper()
	tok, err := hsm.Open(t.Config())
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { tok.Close() })
	return tok
}

// Raw gives direct PKCS#11 access to the module, for tests that check what
// the token really holds or that break sessions under the code being tested.
// It tolerates a module already initialised in this process, and finalises
// it at the end of the test only if it initialised it.
func (t *Token) Raw(tb testing.TB) (*pkcs11.Ctx, uint) {
	tb.Helper()
	p := pkcs11.New(t.ModulePath)
	if p == nil {
		tb.Fatalf("softhsmtest: cannot load %q", t.ModulePath)
	}
	err := p.Initialize()
	owned := err == nil
	if err != nil && !errors.Is(err, pkcs11.Error(pkcs11.CKR_CRYPTOKI_ALREADY_INITIALIZED)) {
		tb.Fatalf("softhsmtest: C_Initialize: %v", err)
	}
	tb.Cleanup(func() {
		if owned {
			_ = p.Finalize()
		}
		p.Destroy()
	})
	slots, err := p.GetSlotList(true)
	if err != nil {
		tb.Fatal(err)
	}
	for _, s := range slots {
		info, err := p.GetTokenInfo(s)
		if err == nil && info.Label == t.Label {
			return p, s
		}
	}
	tb.Fatalf("softhsmtest: token %q not found", t.Label)
	return nil, 0
}

func randomHex(n int) string {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		panic(err)
	}
	return hex.EncodeToString(b)
}
