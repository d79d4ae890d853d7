package worker

import (
	"bufio"
	"crypto"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"

	"github.com/hsmagent/hsmagent/agent/core"
)

// Init is what the agent sends a new worker: which token to open, and its
// PIN, which thus never appears in the worker's argv or environment.
type Init struct {
	ModulePath  string `json:"module_path,omitempty"`
	TokenLabel  string `json:"token_label,omitempty"`
	TokenSerial string `json:"token_serial,omitempty"`
	MaxSessions int    `json:"max_sessions,omitempty"`
	PIN         string `json:"pin"`
}

// initAnswer is a worker's answer to Init.
type initAnswer struct {
	TokenLabel string `json:"token_label"`
	PID        int    `json:"pid"`
}

// wireKey is a key as a listing carries it.
type wireKey struct {
	Label  string   `json:"label"`
	ID     []byte   `json:"id,omitempty"`
	Public []byte   `json:"public"` // PKIX
	Chain  [][]byte `json:"chain,omitempty"`
}

// Opener opens the token an Init names, for Serve. label is the token's,
// for the agent's log.
type Opener func(Init) (store core.KeyStore, label string, err error)

// Serve is the worker: it reads the Init from conn, opens the token with
// open, and answers requests until conn ends. Readers take turns reading
// the connection, and the one that reads a request answers it: no
// goroutine hand-off between the socket and the HSM. There is a reader
// for each session the agent may keep busy, and one more that reads.
func Serve(conn io.ReadWriter, pid int, open Opener) error {
	r := bufio.NewReaderSize(conn, 64<<10)
	msg, err := readFrame(r, nil)
	if err != nil {
		return fmt.Errorf("worker: reading the agent's init: %w", err)
	}
	typ, id, body := parseHeader(msg)
	if typ != msgInit {
		return fmt.Errorf("worker: the agent's first message is type %d, not init", typ)
	}
	var in Init
	if err := json.Unmarshal(body, &in); err != nil {
		return fmt.Errorf("worker: the agent's init: %w", err)
	}
	w := &answerer{w: conn}
	store, label, err := open(in)
	if err != nil {
		// The agent shows the error: a wrong PIN, a missing token.
		w.answer(msgInit, id, statusFailed, []byte(err.Error()))
		return err
	}
	a, _ := json.Marshal(initAnswer{TokenLabel: label, PID: pid})
	if err := w.answer(msgInit, id, statusOK, a); err != nil {
		return err
	}
	s := &served{store: store, w: w, r: r, signers: map[string]crypto.Signer{}}
	ended := make(chan error, 1)
	for range max(in.MaxSessions, 1) + 1 {
		go s.serve(ended)
	}
	err = <-ended
	if errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed) {
		return nil // the agent is gone, or done
	}
	return err
}

// serve reads a request, when its turn comes, and answers it; the first
// read that fails ends the worker.
func (s *served) serve(ended chan<- error) {
	var buf []byte
	for {
		s.rmu.Lock()
		if s.failed {
			s.rmu.Unlock()
			return
		}
		msg, err := readFrame(s.r, buf)
		if err != nil {
			s.failed = true
			s.rmu.Unlock()
			ended <- err
			return
		}
		buf = msg // each reader its own buffer: the next cannot overwrite this request
		s.rmu.Unlock()
		typ, id, body := parseHeader(msg)
		switch typ {
		case msgKeys:
			s.keys(id)
		case msgSign:
			req, err := parseSign(body)
			if err != nil {
				s.w.answer(msgSign, id, statusFailed, []byte(err.Error()))
				continue
			}
			s.sign(id, req)
		case msgGenerate, msgDelete, msgSetChain:
			s.admin(typ, id, body)
		default:
			s.w.answer(typ, id, statusFailed, []byte(fmt.Sprintf("worker: unknown message type %d", typ)))
		}
	}
}

// answerer writes answers, one at a time.
type answerer struct {
	mu  sync.Mutex
	w   io.Writer
	buf []byte
}

func (a *answerer) answer(typ byte, id uint64, status byte, body []byte) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.buf = appendAnswer(a.buf[:0], typ, id, status, body)
	return writeFrame(a.w, a.buf)
}

type served struct {
	store core.KeyStore
	w     *answerer

	rmu    sync.Mutex // the reader's turn
	r      *bufio.Reader
	failed bool // a read failed: the worker ends

	mu      sync.Mutex
	signers map[string]crypto.Signer // by label and fingerprint: a warm handle per key
}

func (s *served) keys(id uint64) {
	keys, err := s.store.Keys()
	if err != nil {
		s.w.answer(msgKeys, id, errorStatus(err), []byte(err.Error()))
		return
	}
	out := make([]wireKey, 0, len(keys))
	for _, k := range keys {
		spki, err := x509.MarshalPKIXPublicKey(k.Public)
		if err != nil {
			s.w.answer(msgKeys, id, statusFailed, []byte(fmt.Sprintf("worker: key %q: %v", k.Label, err)))
			return
		}
		wk := wireKey{Label: k.Label, ID: k.ID, Public: spki}
		for _, c := range k.Chain {
			wk.Chain = append(wk.Chain, c.Raw)
		}
		out = append(out, wk)
	}
	b, _ := json.Marshal(out)
	s.w.answer(msgKeys, id, statusOK, b)
}

func (s *served) sign(id uint64, req *signRequest) {
	signer, err := s.signer(req.Label, req.Fingerprint)
	if err != nil {
		s.w.answer(msgSign, id, errorStatus(err), []byte(err.Error()))
		return
	}
	sig, err := signer.Sign(rand.Reader, req.Digest, req.opts())
	if err != nil {
		s.w.answer(msgSign, id, errorStatus(err), []byte(err.Error()))
		return
	}
	s.w.answer(msgSign, id, statusOK, sig)
}

// signer returns the signer of label whose public key has fingerprint fp.
func (s *served) signer(label string, fp [32]byte) (crypto.Signer, error) {
	k := label + "\x00" + string(fp[:])
	s.mu.Lock()
	signer := s.signers[k]
	s.mu.Unlock()
	if signer != nil {
		return signer, nil
	}
	signer, err := s.store.Signer(label)
	if err != nil {
		return nil, err
	}
	if Fingerprint(signer.Public()) != fp {
		return nil, keyChangedError{label}
	}
	s.mu.Lock()
	s.signers[k] = signer
	s.mu.Unlock()
	return signer, nil
}

// Fingerprint is the SHA-256 of a public key's PKIX encoding.
func Fingerprint(pub crypto.PublicKey) [32]byte {
	spki, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return [32]byte{}
	}
	return sha256.Sum256(spki)
}

// errorStatus is the status that carries err's kind to the agent.
func errorStatus(err error) byte {
	var u interface{ Unavailable() bool }
	var kc core.KeyChangedError
	switch {
	case errors.As(err, &u) && u.Unavailable():
		return statusUnavailable
	case errors.As(err, &kc) && kc.KeyChanged():
		return statusKeyChanged
	case errors.Is(err, core.ErrKeyNotFound):
		return statusNotFound
	}
	return statusFailed
}

// The errors of the agent's side, carrying the worker's kinds.
type (
	unavailableError struct{ msg string }
	keyChangedError  struct{ label string }
	remoteError      struct{ msg string }
)

func (e unavailableError) Error() string   { return e.msg }
func (unavailableError) Unavailable() bool { return true }
func (e keyChangedError) Error() string {
	return fmt.Sprintf("hsm: key %q was replaced in the token", e.label)
}
func (keyChangedError) KeyChanged() bool { return true }
func (e remoteError) Error() string      { return e.msg }
