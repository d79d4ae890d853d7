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
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

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
// open, and answers requests until conn ends. Signatures come on signs, a
// SOCK_SEQPACKET socket, a request or an answer per packet: a goroutine
// per session the agent may keep busy waits in a blocking read of it, so
// that the kernel wakes one thread per request, which makes the HSM call
// and writes the answer, with no goroutine hand-off in the worker. (One
// reader handing requests to the sessions cost a wake-up of the Go
// scheduler per request on the way in, and readers taking turns at a
// stream socket queued those wake-ups one behind the other.) The other
// requests (key listings) come on conn, in frames.
func Serve(conn io.ReadWriter, signs *os.File, pid int, open Opener) error {
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
	s := &served{store: store, w: w, signers: map[string]crypto.Signer{}, signs: signs, ended: make(chan struct{})}
	s.spare = make(chan struct{}, max(in.MaxSessions, 1))
	fd := int(signs.Fd()) // Fd puts it in blocking mode: the reads below block their thread
	for i := range max(in.MaxSessions, 1) {
		go s.serveSigns(fd, i >= minReaders)
	}
	for {
		msg, err := readFrame(r, nil) // each request its own buffer: the reader moves on
		if errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed) {
			return nil // the agent is gone, or done
		}
		if err != nil {
			return err
		}
		go s.handle(msg, w.answer) // rare: listings, and the agent bounds them
	}
}

// minReaders is how many of the session goroutines wait in a read of the
// signatures socket when none is busy; readBlockedLong is how long a read
// may have waited for its request before its goroutine, once done, parks
// instead of reading again.
//
// A goroutine waiting in a read holds its scheduler slot (P) in a system
// call, and the kernel wakes the waiting readers in turn, oldest first: with
// every session's goroutine waiting there, each read waits for as many
// requests as there are sessions, past 10 ms at low rates (66 sessions at
// 450 signatures/s: 145 ms). The runtime's monitor takes back each slot
// held that long in a system call, and each time it does it starts polling
// again at its shortest interval (20 µs), walking every P: a sixth of the
// worker's CPU on the network shape. So the readers are as many as the
// requests need: a goroutine whose read waited long parks after its
// signature while others read, and a reader that takes a request and leaves
// no other reading wakes a parked one first.
const (
	minReaders      = 2
	readBlockedLong = 4 * time.Millisecond
	yieldEvery      = 4 * time.Millisecond // see serveSigns: under the monitor's 10 ms
)

// serveSigns answers the requests of the signatures socket until it fails.
// A goroutine started parked waits to be woken before reading.
func (s *served) serveSigns(fd int, parked bool) {
	in := make([]byte, maxPacket)
	var out []byte
	reply := func(typ byte, id uint64, status byte, body []byte) error {
		body = body[:min(len(body), maxPacket-header-1)] // an error's text, cut to fit
		out = appendAnswer(out[:0], typ, id, status, body)
		_, err := syscall.Write(fd, out) // a packet is written whole: no lock
		return err
	}
	if parked && !s.park() {
		return
	}
	yielded := time.Now()
	for {
		s.reading.Add(1)
		began := time.Now()
		n, err := syscall.Read(fd, in)
		waited := time.Since(began)
		left := s.reading.Add(-1)
		if err == syscall.EINTR {
			continue
		}
		if err != nil || n == 0 {
			s.endOnce.Do(func() { close(s.ended) }) // the parked ones end too
			return                                  // the agent is gone: the reader of conn ends the worker
		}
		if left == 0 {
			s.wakeSpare() // another reads while this one signs
		}
		if n < header {
			reply(0, 0, statusFailed, []byte("worker: a request shorter than its header"))
		} else {
			s.handle(in[:n], reply)
		}
		if waited > readBlockedLong && !s.parkIfRead() {
			return
		}
		if now := time.Now(); now.Sub(yielded) > yieldEvery {
			// A goroutine that only ever waits in system calls and C never
			// passes through the scheduler, so the runtime's monitor takes
			// it for one that has run 10 ms without a break: it asks it to
			// stop, takes its P, and polls again at its shortest interval,
			// half of the worker's CPU at one caller. A pass through the
			// scheduler now and then tells it otherwise.
			runtime.Gosched()
			yielded = now
		}
	}
}

// parkIfRead parks the calling goroutine if another reads (there are then
// minReaders-1 others at least, as minReaders is 2); false: the socket has
// failed, end.
func (s *served) parkIfRead() bool {
	s.rmu.Lock()
	if s.reading.Load() < minReaders-1 {
		s.rmu.Unlock()
		return true // none other reads: this one does
	}
	s.parked++
	s.rmu.Unlock()
	return s.wait()
}

// park parks the calling goroutine, started so; false as for parkIfRead.
func (s *served) park() bool {
	s.rmu.Lock()
	s.parked++
	s.rmu.Unlock()
	return s.wait()
}

func (s *served) wait() bool {
	select {
	case <-s.spare:
		return true
	case <-s.ended:
		return false
	}
}

// wakeSpare wakes a parked session goroutine, if one is parked. A reader
// that left none reading calls it after counting itself out of reading,
// and parkIfRead counts under rmu: either this sees the parked one, or
// that one sees no reader and does not park.
func (s *served) wakeSpare() {
	s.rmu.Lock()
	if s.parked > 0 {
		s.parked--
		s.spare <- struct{}{} // room for every session: never blocks
	}
	s.rmu.Unlock()
}

// handle answers one request with answer.
func (s *served) handle(msg []byte, answer func(typ byte, id uint64, status byte, body []byte) error) {
	typ, id, body := parseHeader(msg)
	switch typ {
	case msgKeys:
		s.keys(id, answer)
	case msgSign:
		req, err := parseSign(body)
		if err != nil {
			answer(msgSign, id, statusFailed, []byte(err.Error()))
			return
		}
		s.sign(id, req, answer)
	case msgGenerate, msgDelete, msgSetChain, msgPromote:
		s.admin(typ, id, body)
	default:
		answer(typ, id, statusFailed, []byte(fmt.Sprintf("worker: unknown message type %d", typ)))
	}
}

// answerer writes answers. One writer at a time; answers that come while
// it writes wait in pend and leave together in its next write, so that
// under load a system call carries many answers.
type answerer struct {
	w io.Writer

	mu      sync.Mutex
	pend    []byte // framed answers not yet written
	spare   []byte // the buffer last written, reused
	writing bool
	err     error // the last write's
}

func (a *answerer) answer(typ byte, id uint64, status byte, body []byte) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.pend = appendFramed(a.pend, typ, id, status, body)
	if a.writing {
		return nil // the writer takes it
	}
	a.writing = true
	for len(a.pend) > 0 && a.err == nil {
		out := a.pend
		a.pend = a.spare[:0]
		a.mu.Unlock()
		_, err := a.w.Write(out)
		a.mu.Lock()
		a.spare, a.err = out, err
	}
	a.writing = false
	a.pend = a.pend[:0] // after a failed write nothing more can be sent
	return a.err
}

type served struct {
	store core.KeyStore
	w     *answerer
	signs *os.File // kept: its finalizer would close the descriptor the sessions read

	reading atomic.Int32  // session goroutines in, or about to enter, a read of signs
	rmu     sync.Mutex    // orders parking with wakeSpare
	parked  int           // session goroutines parked, under rmu
	spare   chan struct{} // a parked session goroutine takes a value: read
	endOnce sync.Once
	ended   chan struct{} // closed when a reader has seen the socket fail

	mu      sync.Mutex
	signers map[string]crypto.Signer // by label and fingerprint: a warm handle per key
}

func (s *served) keys(id uint64, answer func(typ byte, id uint64, status byte, body []byte) error) {
	keys, err := s.store.Keys()
	if err != nil {
		answer(msgKeys, id, errorStatus(err), []byte(err.Error()))
		return
	}
	out := make([]wireKey, 0, len(keys))
	for _, k := range keys {
		spki, err := x509.MarshalPKIXPublicKey(k.Public)
		if err != nil {
			answer(msgKeys, id, statusFailed, []byte(fmt.Sprintf("worker: key %q: %v", k.Label, err)))
			return
		}
		wk := wireKey{Label: k.Label, ID: k.ID, Public: spki}
		for _, c := range k.Chain {
			wk.Chain = append(wk.Chain, c.Raw)
		}
		out = append(out, wk)
	}
	b, _ := json.Marshal(out)
	answer(msgKeys, id, statusOK, b)
}

func (s *served) sign(id uint64, req *signRequest, answer func(typ byte, id uint64, status byte, body []byte) error) {
	signer, err := s.signer(req.Label, req.Fingerprint)
	if err != nil {
		answer(msgSign, id, errorStatus(err), []byte(err.Error()))
		return
	}
	sig, err := signer.Sign(rand.Reader, req.Digest, req.opts())
	if err != nil {
		answer(msgSign, id, errorStatus(err), []byte(err.Error()))
		return
	}
	answer(msgSign, id, statusOK, sig)
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
