package worker

import (
	"bufio"
	"crypto"
	"crypto/rsa"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/hsmagent/hsmagent/agent/core"
)

// Options configure the agent's side of the worker.
type Options struct {
	// Command is the worker's argv: this binary and its worker command.
	Command []string
	// Init says which token to open; its PIN is left empty and taken
	// from PIN at each start, so that a changed PIN file is read again.
	Init Init
	PIN  func() (string, error)
	// Logger gets a line when a worker dies or is killed and when another
	// serves again; nil means slog.Default().
	Logger *slog.Logger
	// KillAfter is how long a call may go unanswered before the worker is
	// killed and replaced; 0 means DefaultKillAfter.
	KillAfter time.Duration
	// RestartMin and RestartMax bound the wait before another start after
	// a worker died (doubling); 0 means 100 ms and 5 s.
	RestartMin, RestartMax time.Duration
	// StartTimeout bounds a worker's start: opening the token, logging in;
	// 0 means 30 s.
	StartTimeout time.Duration
	// OnEnd, if set, is told of each worker that ended (not at Close): its
	// pid, how it exited, whether the agent killed it, and how many calls
	// it had in flight (they failed). OnStart is told of each worker that
	// replaced one. For the audit trail and metrics; they must not block.
	OnEnd   func(pid int, exit string, killed bool, inFlight int)
	OnStart func(pid int)
}

// DefaultKillAfter is the default Options.KillAfter: well past the HSM
// timeout, which answers the caller long before.
const DefaultKillAfter = 10 * time.Second

// Store is the worker's token as the agent's core.KeyStore. Calls made
// while no worker runs wait for the next one (up to KillAfter); calls
// in flight when a worker dies fail as Unavailable.
type Store struct {
	o     Options
	log   *slog.Logger
	label string // the token's, from the first start

	mu     sync.Mutex
	cur    *proc
	up     chan struct{} // closed when cur is set again
	closed bool
	keys   map[string]crypto.PublicKey // the last listing's, for Signer

	stop chan struct{}
}

var _ core.KeyStore = (*Store)(nil)

// Start starts a worker and waits for it to have opened the token (the
// error of a wrong PIN, say, is the worker's).
func Start(o Options) (*Store, error) {
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	if o.KillAfter <= 0 {
		o.KillAfter = DefaultKillAfter
	}
	if o.RestartMin <= 0 {
		o.RestartMin = 100 * time.Millisecond
	}
	if o.RestartMax <= 0 {
		o.RestartMax = 5 * time.Second
	}
	if o.StartTimeout <= 0 {
		o.StartTimeout = 30 * time.Second
	}
	s := &Store{o: o, log: o.Logger, up: make(chan struct{}), stop: make(chan struct{})}
	p, ia, err := s.spawn()
	if err != nil {
		return nil, err
	}
	s.label = ia.TokenLabel
	s.install(p)
	go s.watchStuck()
	return s, nil
}

// TokenLabel is the label of the token the worker opened.
func (s *Store) TokenLabel() string { return s.label }

// Close stops the worker and starts no other.
func (s *Store) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	p := s.cur
	close(s.stop)
	s.mu.Unlock()
	if p != nil {
		p.end(errors.New("hsm: the agent is stopping"), false)
	}
	return nil
}

// proc is one worker process and the calls it has been sent.
type proc struct {
	cmd   *exec.Cmd
	conn  net.Conn // frames: the start, listings
	signs *packets // SOCK_SEQPACKET: signatures, a packet each
	pid   int

	wmu  sync.Mutex
	wbuf []byte

	// One goroutine reads the answers and completes each call in place:
	// a caller that waits is woken once, and one that gave a callback
	// (SignAsync) needs no goroutine at all while the HSM works.
	r    *bufio.Reader
	rbuf []byte

	mu      sync.Mutex
	next    uint64
	pending map[uint64]*call
	dead    chan struct{} // closed by end
	read    chan struct{} // closed when the reader has failed the calls left
	lost    int           // calls in flight when the worker ended
	why     error
	once    sync.Once
	exited  chan struct{} // closed when the process was waited for
	status  string        // how it exited
	killed  bool          // by the agent
}

type call struct {
	sent time.Time
	done func(answer, error) // called once, by the reader, without locks held
}

type answer struct {
	status byte
	body   []byte
}

// spawn starts a worker and sends it the Init.
func (s *Store) spawn() (*proc, initAnswer, error) {
	var ia initAnswer
	conn, theirs, err := socketPair(syscall.SOCK_STREAM, "hsm-worker")
	if err != nil {
		return nil, ia, err
	}
	defer theirs.Close()
	signs, theirSigns, err := socketPair(syscall.SOCK_SEQPACKET, "hsm-worker signatures")
	if err != nil {
		conn.Close()
		return nil, ia, err
	}
	defer theirSigns.Close()
	sp, err := newPackets(signs)
	if err != nil {
		conn.Close()
		signs.Close()
		return nil, ia, fmt.Errorf("hsm: starting the HSM worker: %w", err)
	}
	cmd := exec.Command(s.o.Command[0], s.o.Command[1:]...)
	cmd.ExtraFiles = []*os.File{theirs, theirSigns} // fd 3, fd 4
	cmd.Stderr = os.Stderr                          // its log lines, beside the agent's
	cmd.Env = workerEnv(os.Environ())
	// The worker dies with the agent: no module runs without its supervisor.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		conn.Close()
		signs.Close()
		return nil, ia, fmt.Errorf("hsm: starting the HSM worker %s: %w", s.o.Command[0], err)
	}
	// The worker's ends are its own now: when it exits, our reads end.
	theirs.Close()
	theirSigns.Close()
	p := &proc{cmd: cmd, conn: conn, signs: sp, pid: cmd.Process.Pid, pending: map[uint64]*call{},
		dead: make(chan struct{}), exited: make(chan struct{}), read: make(chan struct{}),
		r: bufio.NewReaderSize(conn, 64<<10)}
	// p.wait, which closes conn when the worker exits, starts once the start
	// is answered: a worker that refuses its start answers, then exits, and
	// its answer must still be read.
	fail := func(why error) {
		go p.wait()
		p.end(why, true)
		<-p.exited
	}
	in := s.o.Init
	if s.o.PIN != nil {
		if in.PIN, err = s.o.PIN(); err != nil {
			fail(err)
			return nil, ia, err
		}
	}
	body, _ := json.Marshal(in)
	conn.SetDeadline(time.Now().Add(s.o.StartTimeout))
	err = writeFrame(conn, append(appendHeader(nil, msgInit, 0), body...))
	var msg []byte
	if err == nil {
		msg, err = readFrame(conn, nil)
	}
	conn.SetDeadline(time.Time{})
	if err != nil {
		fail(err)
		return nil, ia, fmt.Errorf("hsm: the HSM worker did not start (%s): %w", p.status, err)
	}
	typ, _, rest := parseHeader(msg)
	if typ != msgInit || len(rest) < 1 {
		fail(errMalformed)
		return nil, ia, fmt.Errorf("hsm: the HSM worker answered its start with message type %d", typ)
	}
	if rest[0] != statusOK {
		fail(errors.New("start refused"))
		return nil, ia, errors.New(string(rest[1:])) // the token's own error: PIN, slot, module
	}
	if err := json.Unmarshal(rest[1:], &ia); err != nil {
		fail(err)
		return nil, ia, fmt.Errorf("hsm: the HSM worker's start: %w", err)
	}
	go p.wait()
	go p.readBoth()
	return p, ia, nil
}

// socketPair makes a socketpair of type typ: our end as a net.Conn, the
// worker's as a file to hand it.
func socketPair(typ int, name string) (net.Conn, *os.File, error) {
	fds, err := syscall.Socketpair(syscall.AF_UNIX, typ|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, nil, fmt.Errorf("hsm: starting the HSM worker: %w", err)
	}
	ours, theirs := os.NewFile(uintptr(fds[0]), name), os.NewFile(uintptr(fds[1]), "agent")
	conn, err := net.FileConn(ours)
	ours.Close()
	if err != nil {
		theirs.Close()
		return nil, nil, fmt.Errorf("hsm: starting the HSM worker: %w", err)
	}
	return conn, theirs, nil
}

// workerEnv is the agent's environment without the PIN, which the worker
// gets in its Init only.
func workerEnv(env []string) []string {
	out := env[:0:0]
	for _, kv := range env {
		if !strings.HasPrefix(kv, "HSMAGENT_PIN=") {
			out = append(out, kv)
		}
	}
	return out
}

// install makes p the worker calls go to, and supervises it.
func (s *Store) install(p *proc) {
	s.mu.Lock()
	s.cur = p
	close(s.up)
	s.mu.Unlock()
	go s.supervise(p)
}

// supervise waits for p to die, fails its calls in flight (end does), and
// starts another worker, with backoff, until one runs or the store closes.
func (s *Store) supervise(p *proc) {
	<-p.dead
	// At once, so that calls wait for the next worker instead of finding
	// this one dead again and again.
	s.mu.Lock()
	if !s.closed {
		s.cur, s.up = nil, make(chan struct{})
	}
	s.mu.Unlock()
	<-p.exited
	<-p.read
	s.mu.Lock()
	closed := s.closed
	s.mu.Unlock()
	if closed {
		return
	}
	p.mu.Lock()
	inFlight := p.lost
	p.mu.Unlock()
	s.log.Error("the HSM worker ended; starting another: signatures in flight failed, the others wait for it",
		"pid", p.pid, "exit", p.status, "killed", p.killed, "in_flight", inFlight, "err", p.why)
	if s.o.OnEnd != nil {
		s.o.OnEnd(p.pid, p.status, p.killed, inFlight)
	}
	wait := s.o.RestartMin
	for {
		select {
		case <-s.stop:
			return
		case <-time.After(wait):
		}
		next, _, err := s.spawn()
		if err == nil {
			s.mu.Lock()
			if s.closed {
				s.mu.Unlock()
				next.end(errors.New("hsm: the agent is stopping"), false)
				return
			}
			s.mu.Unlock()
			s.log.Info("the HSM worker serves again: token opened and logged in", "pid", next.pid)
			s.install(next)
			if s.o.OnStart != nil {
				s.o.OnStart(next.pid)
			}
			return
		}
		s.log.Error("starting the HSM worker failed; trying again", "err", err, "retry_in", 2*wait)
		wait = min(2*wait, s.o.RestartMax)
	}
}

// watchStuck kills a worker with a call unanswered for KillAfter.
func (s *Store) watchStuck() {
	t := time.NewTicker(min(time.Second, s.o.KillAfter/4))
	defer t.Stop()
	for {
		select {
		case <-s.stop:
			return
		case <-t.C:
		}
		s.mu.Lock()
		p := s.cur
		s.mu.Unlock()
		if p == nil {
			continue
		}
		if oldest := p.oldest(); !oldest.IsZero() && time.Since(oldest) > s.o.KillAfter {
			s.log.Error("an HSM call has not returned; killing the HSM worker and starting another",
				"pid", p.pid, "stuck_for", time.Since(oldest).Round(time.Millisecond), "kill_after", s.o.KillAfter)
			p.end(fmt.Errorf("an HSM call did not return within %v", s.o.KillAfter), true)
		}
	}
}

// worker returns the worker to send a call to, waiting up to KillAfter
// for one while another is started.
func (s *Store) worker() (*proc, error) {
	s.mu.Lock()
	p, up, closed := s.cur, s.up, s.closed
	s.mu.Unlock()
	if closed {
		return nil, unavailableError{"hsm: the agent is stopping"}
	}
	if p != nil {
		return p, nil
	}
	select {
	case <-up:
		return s.worker()
	case <-time.After(s.o.KillAfter):
		return nil, unavailableError{"hsm: the HSM worker is being restarted; try again"}
	case <-s.stop:
		return nil, unavailableError{"hsm: the agent is stopping"}
	}
}

// call sends a request built by msg for id and waits for its answer. A
// call not yet sent when its worker dies is sent to the next one.
func (s *Store) call(msg func(b []byte, id uint64) []byte, sign bool) (answer, error) {
	return s.send(msg, sign, 0)
}

// callGrace is call for a request that may take grace longer than
// KillAfter before the worker counts as stuck (an RSA key generated).
func (s *Store) callGrace(msg func(b []byte, id uint64) []byte, grace time.Duration) (answer, error) {
	return s.send(msg, false, grace)
}

func (s *Store) send(msg func(b []byte, id uint64) []byte, sign bool, grace time.Duration) (answer, error) {
	type result struct {
		a   answer
		err error
	}
	got := make(chan result, 1)
	done := func(a answer, err error) { got <- result{a, err} }
	for {
		p, err := s.worker()
		if err != nil {
			return answer{}, err
		}
		if p.start(msg, sign, grace, done) {
			r := <-got
			return r.a, r.err
		}
		// p died before the request left: it never reached the HSM.
	}
}

// start sends a request built by msg, a signature on the signatures
// socket, anything else in a frame; done gets its answer, or the error of
// the worker's end. It reports false, and done is never called, when the
// request did not leave because p had died.
func (p *proc) start(msg func(b []byte, id uint64) []byte, sign bool, grace time.Duration, done func(answer, error)) bool {
	p.mu.Lock()
	if p.why != nil {
		p.mu.Unlock()
		return false
	}
	p.next++
	id := p.next
	p.pending[id] = &call{sent: time.Now().Add(grace), done: done} // the stuck watch counts from sent
	p.mu.Unlock()
	var err error
	if sign {
		err = p.signs.write(msg(make([]byte, 0, 256), id)) // a packet is written whole
	} else {
		p.wmu.Lock()
		p.wbuf = msg(p.wbuf[:0], id)
		err = writeFrame(p.conn, p.wbuf)
		p.wmu.Unlock()
	}
	if err == nil {
		return true
	}
	p.end(err, true)
	p.mu.Lock()
	_, unsent := p.pending[id]
	delete(p.pending, id)
	p.mu.Unlock()
	// Unless the readers failed it first (then done has its error).
	return !unsent
}

// read runs the readers of both sockets; when both have stopped, after
// p ended, it fails the calls left.
func (p *proc) readBoth() {
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); p.readFrames() }()
	go func() { defer wg.Done(); p.readSigns() }()
	wg.Wait()
	p.mu.Lock()
	calls := p.pending
	p.pending = map[uint64]*call{}
	p.lost = len(calls)
	p.mu.Unlock()
	err := p.inFlightError()
	for _, c := range calls {
		c.done(answer{}, err)
	}
	close(p.read)
}

// readFrames reads the answers in frames until the connection fails.
func (p *proc) readFrames() {
	for {
		msg, err := readFrame(p.r, p.rbuf)
		if err != nil {
			p.end(err, true)
			return
		}
		p.rbuf = msg
		if !p.complete(msg) {
			return
		}
	}
}

// readSigns reads the signatures' answers until the socket fails.
func (p *proc) readSigns() {
	buf := make([]byte, maxPacket)
	for {
		n, err := p.signs.read(buf)
		if err == nil && n == 0 {
			err = io.EOF
		}
		if err != nil {
			p.end(err, true)
			return
		}
		if !p.complete(buf[:n]) {
			return
		}
	}
}

// complete gives an answer to its call; a malformed one ends p.
func (p *proc) complete(msg []byte) bool {
	if len(msg) < header+1 {
		p.end(fmt.Errorf("%w: an answer of %d bytes", errMalformed, len(msg)), true)
		return false
	}
	typ, id, rest := parseHeader(msg)
	if typ < msgKeys || typ >= msgEnd {
		p.end(fmt.Errorf("%w: an answer of type %d", errMalformed, typ), true)
		return false
	}
	p.mu.Lock()
	c := p.pending[id]
	delete(p.pending, id)
	p.mu.Unlock()
	if c != nil {
		c.done(answer{status: rest[0], body: append([]byte(nil), rest[1:]...)}, nil)
	}
	return true
}

func (p *proc) inFlightError() error {
	return unavailableError{fmt.Sprintf("hsm: the HSM worker ended with the call in flight (%v); the agent is starting another", p.why)}
}

// oldest is when the longest-waiting call was sent, zero if none waits.
func (p *proc) oldest() time.Time {
	p.mu.Lock()
	defer p.mu.Unlock()
	var t time.Time
	for _, c := range p.pending {
		if t.IsZero() || c.sent.Before(t) {
			t = c.sent
		}
	}
	return t
}

// end stops p for why: its connection closes (the worker exits on that),
// and kill ends the process at once.
func (p *proc) end(why error, kill bool) {
	p.once.Do(func() {
		p.mu.Lock()
		p.why = why
		p.killed = kill
		p.mu.Unlock()
		p.conn.Close()
		p.signs.Close()
		if kill {
			p.cmd.Process.Kill()
		} else {
			go func() {
				select {
				case <-p.exited:
				case <-time.After(2 * time.Second):
					p.cmd.Process.Kill()
				}
			}()
		}
		close(p.dead)
	})
}

func (p *proc) wait() {
	err := p.cmd.Wait()
	p.status = "exit status 0"
	if err != nil {
		p.status = err.Error() // "signal: segmentation fault", "exit status 2"
	}
	close(p.exited)
	p.end(errors.New("the worker exited: "+p.status), false)
}

// Keys implements core.KeyStore.
func (s *Store) Keys() ([]core.Key, error) {
	a, err := s.call(func(b []byte, id uint64) []byte { return appendHeader(b, msgKeys, id) }, false)
	if err != nil {
		return nil, err
	}
	if a.status != statusOK {
		return nil, answerError(a, "")
	}
	var wks []wireKey
	if err := json.Unmarshal(a.body, &wks); err != nil {
		return nil, fmt.Errorf("hsm: the HSM worker's key list: %w", err)
	}
	keys := make([]core.Key, 0, len(wks))
	pubs := make(map[string]crypto.PublicKey, len(wks))
	for _, wk := range wks {
		pub, err := x509.ParsePKIXPublicKey(wk.Public)
		if err != nil {
			return nil, fmt.Errorf("hsm: the HSM worker's key %q: %w", wk.Label, err)
		}
		k := core.Key{Label: wk.Label, ID: wk.ID, Public: pub}
		for _, der := range wk.Chain {
			c, err := x509.ParseCertificate(der)
			if err != nil {
				return nil, fmt.Errorf("hsm: the HSM worker's certificate of key %q: %w", wk.Label, err)
			}
			k.Chain = append(k.Chain, c)
		}
		keys = append(keys, k)
		pubs[wk.Label] = pub
	}
	s.mu.Lock()
	s.keys = pubs
	s.mu.Unlock()
	return keys, nil
}

// Signer implements core.KeyStore, for a key of the last listing.
func (s *Store) Signer(label string) (crypto.Signer, error) {
	s.mu.Lock()
	pub := s.keys[label]
	s.mu.Unlock()
	if pub == nil {
		return nil, fmt.Errorf("hsm: no key labelled %q in the token%.0w", label, core.ErrKeyNotFound)
	}
	return &signer{s: s, label: label, pub: pub, fp: Fingerprint(pub)}, nil
}

// signer signs in the worker with the key its public half names.
type signer struct {
	s     *Store
	label string
	pub   crypto.PublicKey
	fp    [32]byte
}

func (k *signer) Public() crypto.PublicKey { return k.pub }

func (k *signer) Sign(_ io.Reader, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	msg, err := k.request(digest, opts)
	if err != nil {
		return nil, err
	}
	return k.result(k.s.call(msg, true))
}

// SignAsync implements core.AsyncSigner: the request is sent at once and
// done is called by the goroutine that reads the worker's answers. Only
// while no worker is up does a goroutine wait for the next, as Sign does.
func (k *signer) SignAsync(digest []byte, opts crypto.SignerOpts, done func([]byte, error)) {
	msg, err := k.request(digest, opts)
	if err != nil {
		done(nil, err)
		return
	}
	k.s.mu.Lock()
	p, closed := k.s.cur, k.s.closed
	k.s.mu.Unlock()
	if p != nil && !closed && p.start(msg, true, 0, func(a answer, err error) { done(k.result(a, err)) }) {
		return
	}
	go func() { done(k.result(k.s.call(msg, true))) }()
}

// request checks a signature's input and builds its message.
func (k *signer) request(digest []byte, opts crypto.SignerOpts) (func(b []byte, id uint64) []byte, error) {
	req := &signRequest{Label: k.label, Fingerprint: k.fp, Hash: opts.HashFunc(), Digest: digest}
	if pss, ok := opts.(*rsa.PSSOptions); ok {
		req.PSS, req.SaltLength = true, pss.SaltLength
	}
	if len(req.Label) > 255 || len(req.Digest) > 255 {
		return nil, fmt.Errorf("hsm: label or digest too long for key %q", k.label)
	}
	return func(b []byte, id uint64) []byte { return appendSign(b, id, req) }, nil
}

// result is a signature's answer as Sign returns it.
func (k *signer) result(a answer, err error) ([]byte, error) {
	if err != nil {
		return nil, err
	}
	if a.status != statusOK {
		return nil, answerError(a, k.label)
	}
	return a.body, nil
}

// answerError is the error a worker answered with, of its kind.
func answerError(a answer, label string) error {
	msg := string(a.body)
	switch a.status {
	case statusUnavailable:
		return unavailableError{msg}
	case statusKeyChanged:
		return keyChangedError{label}
	case statusNotFound:
		return fmt.Errorf("%s%.0w", msg, core.ErrKeyNotFound)
	}
	return remoteError{msg}
}
