package p11rpc

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"hash"
	"io"
	"log/slog"
	"net"
	"sync"
	"time"

	"github.com/hsmagent/hsmagent/agent/agentpb"
	"github.com/hsmagent/hsmagent/agent/core"
	"github.com/hsmagent/hsmagent/agent/transport/listen"
)

// Core is what the transport asks of the signing core.
type Core interface {
	List(ctx context.Context, p core.Peer) (*agentpb.ListKeysResponse, string, error)
	Sign(ctx context.Context, p core.Peer, req *agentpb.SignRequest) core.Answer
	RefusedCall(ctx context.Context, p core.Peer, ev core.Event, o core.Outcome, code core.Code)
}

// Transport is the name the audit records of this transport carry.
const Transport = "pkcs11"

// Options configure a Server; zero values take the defaults.
type Options struct {
	// TokenLabel is the token's label (at most 32 bytes), "hsmagent" by
	// default; its serial number is derived from it, so both stay the same
	// across restarts.
	TokenLabel string
	// MaxSessions bounds the sessions of one connection (default 64); a
	// session has at most one search and one signature under way.
	MaxSessions int
	// IdleTimeout closes a connection that sent nothing for this long
	// (default an hour: p11-kit's client keeps one connection for the
	// program's life and does not reconnect).
	IdleTimeout time.Duration
	// Handshake bounds the wait for the client's version byte (default 10 s).
	Handshake time.Duration
	// Logger gets the reasons of refusals; nil means slog.Default().
	Logger *slog.Logger
}

const (
	DefaultTokenLabel  = "hsmagent"
	DefaultMaxSessions = 64
	DefaultIdleTimeout = time.Hour
	slotID             = 1
	writeTimeout       = 10 * time.Second
)

// Server serves the PKCS#11 connections of an Admitted listener.
type Server struct {
	core  Core
	opts  Options
	log   *slog.Logger
	conns connSet
}

// New returns a Server of c.
func New(c Core, opts Options) *Server {
	if opts.TokenLabel == "" {
		opts.TokenLabel = DefaultTokenLabel
	}
	if len(opts.TokenLabel) > 32 {
		opts.TokenLabel = opts.TokenLabel[:32]
	}
	if opts.MaxSessions <= 0 {
		opts.MaxSessions = DefaultMaxSessions
	}
	if opts.IdleTimeout <= 0 {
		opts.IdleTimeout = DefaultIdleTimeout
	}
	if opts.Handshake <= 0 {
		opts.Handshake = 10 * time.Second
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	return &Server{core: c, opts: opts, log: opts.Logger}
}

// Serve accepts l's connections (those of listen.Admitted, which carry
// their caller's credentials) until l is closed.
func (s *Server) Serve(l net.Listener) error {
	if !s.conns.listening(l) {
		l.Close()
		return nil
	}
	var delay time.Duration
	for {
		c, err := l.Accept()
		if te, ok := err.(interface{ Temporary() bool }); ok && te.Temporary() {
			delay = min(max(2*delay, 5*time.Millisecond), time.Second)
			time.Sleep(delay)
			continue
		}
		if err != nil {
			if s.conns.isClosed() {
				return nil
			}
			return err
		}
		delay = 0
		pc, ok := listen.ConnOf(c)
		if !ok {
			c.Close()
			continue
		}
		go s.serveConn(pc)
	}
}

// Shutdown takes no more connections, lets each open one finish the call
// it is in, and closes what is left when ctx is done.
func (s *Server) Shutdown(ctx context.Context) { s.conns.shutdown(ctx) }

// serial is the token's serial number: the same for the same label.
func (s *Server) serial() string {
	h := sha256.Sum256([]byte(s.opts.TokenLabel))
	return hex.EncodeToString(h[:8])
}

// conn is one client's connection: the protocol version it negotiated,
// its sessions and its view of the token.
type conn struct {
	srv      *Server
	pc       *listen.Conn
	ctx      context.Context
	version  byte
	sessions map[uint64]*session
	nextSess uint64
	loggedIn bool
	objects  map[uint64]*object // the view of the last search, by handle
	handles  map[string]uint64  // object identities seen on this connection
	next     uint64             // the next object handle
	// The private keys found before that the last search no longer shows
	// (a rotation promoted another key to the label), by handle: their
	// handles still sign, with the key they were found for, for as long as
	// the core lets that key sign under the label (SignRequest.key_id).
	unlisted map[uint64]*object
}

// session is one PKCS#11 session: at most one search and one signature.
type session struct {
	rw      bool // opened read-write
	finding bool
	found   []uint64
	sign    *signOp
	digest  hash.Hash // a C_DigestInit's, under way
	parts   bool      // C_DigestUpdate was called
}

func (s *Server) serveConn(pc *listen.Conn) {
	defer pc.Close()
	ctx, cancel := context.WithCancel(core.WithTransport(context.Background(), Transport))
	defer cancel()
	if !s.conns.add(pc, cancel) {
		return
	}
	defer s.conns.remove(pc)
	c := &conn{srv: s, pc: pc, ctx: ctx, sessions: map[uint64]*session{}, objects: map[uint64]*object{},
		handles: map[string]uint64{}, unlisted: map[uint64]*object{}}
	// The client's first byte is the highest protocol version it speaks.
	pc.SetReadDeadline(time.Now().Add(s.opts.Handshake))
	var v [1]byte
	if _, err := io.ReadFull(pc, v[:]); err != nil {
		return
	}
	c.version = min(v[0], maxVersion)
	pc.SetWriteDeadline(time.Now().Add(writeTimeout))
	if _, err := pc.Write([]byte{c.version}); err != nil {
		return
	}
	r := bufio.NewReaderSize(pc, 4<<10)
	for {
		pc.SetReadDeadline(time.Now().Add(s.opts.IdleTimeout))
		if s.conns.isClosed() {
			return // after setting the deadline: Shutdown's own comes after it
		}
		f, err := readFrame(r, MaxMessage)
		if err == nil {
			var out []byte
			if out, err = c.handle(f.body); err == nil {
				pc.SetWriteDeadline(time.Now().Add(writeTimeout))
				if writeFrame(pc, f.code, out) != nil {
					return
				}
				continue
			}
		}
		var me *MalformedError
		if errors.As(err, &me) {
			s.log.Warn("pkcs11: malformed message; connection closed", "uid", pc.Peer.UID, "pid", pc.Peer.PID, "err", err)
			s.core.RefusedCall(ctx, pc.Peer, core.EventConnect, core.Malformed, core.CodeInvalidArgument)
		}
		return
	}
}

// handle answers one message's body: the answer's body, or a
// *MalformedError that ends the connection.
func (c *conn) handle(body []byte) ([]byte, error) {
	d, id, err := newDecoder(body, c.version)
	if err != nil {
		return nil, err
	}
	if id == 0 {
		return nil, malformed("call id 0 (the error answer) in a request")
	}
	if rv, ok := refused[id]; ok {
		return errorReply(rv, c.version), nil
	}
	h, ok := calls[id]
	if !ok {
		return errorReply(ckrFunctionNotSupported, c.version), nil
	}
	if err := d.expect(h.request); err != nil {
		return nil, err
	}
	e := newEncoder(id, h.response, c.version)
	rv := h.serve(c, d, e)
	if d.err != nil {
		return nil, d.err
	}
	if rv != ckrOK {
		return errorReply(rv, c.version), nil
	}
	return e.b, nil
}

func errorReply(rv uint64, version byte) []byte {
	e := newEncoder(0, "u", version)
	e.Ulong(rv)
	return e.b
}

// call is one RPC call the token answers: its signatures, and the handler
// that reads the request's arguments (checking that nothing is left over)
// and writes the answer's.
type call struct {
	request, response string
	serve             func(c *conn, d *decoder, e *encoder) uint64
}

var calls = map[uint32]call{
	1:  {"ayyay", "", (*conn).initialize},
	2:  {"", "", (*conn).finalize},
	3:  {"", "vsusv", (*conn).getInfo},
	4:  {"yfu", "au", (*conn).getSlotList},
	5:  {"u", "ssuvv", (*conn).getSlotInfo},
	6:  {"u", "ssssuuuuuuuuuuuvvs", (*conn).getTokenInfo},
	7:  {"ufu", "au", (*conn).getMechanismList},
	8:  {"uu", "uuu", (*conn).getMechanismInfo},
	10: {"uu", "u", (*conn).openSession},
	11: {"u", "", (*conn).closeSession},
	12: {"u", "", (*conn).closeAllSessions},
	13: {"u", "uuuu", (*conn).getSessionInfo},
	18: {"uuay", "", (*conn).login},
	19: {"u", "", (*conn).logout},
	24: {"uufA", "aAu", (*conn).getAttributeValue},
	26: {"uaA", "", (*conn).findObjectsInit},
	27: {"ufu", "au", (*conn).findObjects},
	28: {"u", "", (*conn).findObjectsFinal},
	37: {"uM", "", (*conn).digestInit},
	38: {"uayfy", "ay", (*conn).digest},
	39: {"uay", "", (*conn).digestUpdate},
	41: {"ufy", "ay", (*conn).digestFinal},
	42: {"uMu", "", (*conn).signInit},
	43: {"uayfy", "ay", (*conn).sign},
	44: {"uay", "", (*conn).signUpdate},
	45: {"ufy", "ay", (*conn).signFinal},
}

// refused are the calls answered without reading their arguments: those
// that would write to the token, or need what it does not have.
var refused = map[uint32]uint64{
	9:  ckrTokenWriteProtected, // C_InitToken
	14: ckrSessionReadOnly,     // C_InitPIN
	15: ckrSessionReadOnly,     // C_SetPIN
	20: ckrTokenWriteProtected, // C_CreateObject
	21: ckrTokenWriteProtected, // C_CopyObject
	22: ckrTokenWriteProtected, // C_DestroyObject
	25: ckrTokenWriteProtected, // C_SetAttributeValue
	58: ckrTokenWriteProtected, // C_GenerateKey
	59: ckrTokenWriteProtected, // C_GenerateKeyPair
	61: ckrTokenWriteProtected, // C_UnwrapKey
	62: ckrTokenWriteProtected, // C_DeriveKey
	63: ckrRandomNoRNG,         // C_SeedRandom
	64: ckrRandomNoRNG,         // C_GenerateRandom
	80: ckrTokenWriteProtected, // C_InitToken2
	81: ckrTokenWriteProtected, // C_DeriveKey2
}

func (c *conn) initialize(d *decoder, e *encoder) uint64 {
	hs := d.Bytes()
	d.Byte()
	d.Bytes()
	if d.done() == nil && string(hs) != handshake {
		d.fail("C_Initialize without the protocol's handshake")
	}
	c.reset()
	return ckrOK
}

func (c *conn) finalize(d *decoder, e *encoder) uint64 {
	if d.done() == nil {
		c.reset()
	}
	return ckrOK
}

func (c *conn) reset() {
	clear(c.sessions)
	c.loggedIn = false
}

func (c *conn) getInfo(d *decoder, e *encoder) uint64 {
	if d.done() != nil {
		return ckrOK
	}
	e.Version(2, 40)
	e.Padded("hsmagent", 32)
	e.Ulong(0)
	e.Padded("hsmagent signing agent", 32)
	e.Version(1, 0)
	return ckrOK
}

func (c *conn) getSlotList(d *decoder, e *encoder) uint64 {
	d.Byte() // token present or not: the one slot always has its token
	room := d.UlongBuffer()
	if d.done() != nil {
		return ckrOK
	}
	if room == 0 {
		e.Ulongs(nil, 1)
	} else {
		e.Ulongs([]uint64{slotID}, 1)
	}
	return ckrOK
}

func (c *conn) getSlotInfo(d *decoder, e *encoder) uint64 {
	slot := d.Ulong()
	if d.done() != nil {
		return ckrOK
	}
	if slot != slotID {
		return ckrSlotIDInvalid
	}
	e.Padded("hsmagent "+c.srv.opts.TokenLabel, 64)
	e.Padded("hsmagent", 32)
	e.Ulong(ckfTokenPresent)
	e.Version(1, 0)
	e.Version(1, 0)
	return ckrOK
}

func (c *conn) getTokenInfo(d *decoder, e *encoder) uint64 {
	slot := d.Ulong()
	if d.done() != nil {
		return ckrOK
	}
	if slot != slotID {
		return ckrSlotIDInvalid
	}
	e.Padded(c.srv.opts.TokenLabel, 32)
	e.Padded("hsmagent", 32)
	e.Padded("hsmagent", 16)
	e.Padded(c.srv.serial(), 16)
	// Initialized, read-only, and no login: the caller is known from the
	// kernel, and what it may use from the agent's rules.
	e.Ulong(ckfTokenInitialized | ckfWriteProtected | ckfUserPinInitialized)
	e.Ulong(uint64(c.srv.opts.MaxSessions))
	e.Ulong(uint64(len(c.sessions)))
	rw := 0
	for _, s := range c.sessions {
		if s.rw {
			rw++
		}
	}
	e.Ulong(uint64(c.srv.opts.MaxSessions))
	e.Ulong(uint64(rw))
	e.Ulong(255) // PIN lengths: any PIN is accepted
	e.Ulong(0)
	for range 4 {
		e.Ulong(unavailable) // memory
	}
	e.Version(1, 0)
	e.Version(1, 0)
	e.Padded("", 16) // no clock
	return ckrOK
}

func (c *conn) getMechanismList(d *decoder, e *encoder) uint64 {
	slot := d.Ulong()
	room := d.UlongBuffer()
	if d.done() != nil {
		return ckrOK
	}
	if slot != slotID {
		return ckrSlotIDInvalid
	}
	if int(room) < len(mechanisms) {
		e.Ulongs(nil, len(mechanisms)) // a query, or too small: the client tells which
	} else {
		e.Ulongs(mechanisms, len(mechanisms))
	}
	return ckrOK
}

func (c *conn) getMechanismInfo(d *decoder, e *encoder) uint64 {
	slot := d.Ulong()
	m := d.Ulong()
	if d.done() != nil {
		return ckrOK
	}
	if slot != slotID {
		return ckrSlotIDInvalid
	}
	if h, _ := hashOf(m); h != 0 {
		e.Ulong(0)
		e.Ulong(0)
		e.Ulong(ckfDigest)
		return ckrOK
	}
	info, ok := mechanismInfo[uint32(m)]
	if !ok || m > 0xffffffff {
		return ckrMechanismInvalid
	}
	if info.rsa {
		e.Ulong(2048)
		e.Ulong(4096)
		e.Ulong(ckfSign)
	} else {
		e.Ulong(256)
		e.Ulong(384)
		e.Ulong(ckfSign | ckfECFP | ckfECNamedCurve | ckfECUncompress)
	}
	return ckrOK
}

func (c *conn) openSession(d *decoder, e *encoder) uint64 {
	slot := d.Ulong()
	flags := d.Ulong()
	if d.done() != nil {
		return ckrOK
	}
	switch {
	case slot != slotID:
		return ckrSlotIDInvalid
	case flags&ckfSerialSession == 0:
		return ckrSessionParallelNotSupported
	case len(c.sessions) >= c.srv.opts.MaxSessions:
		return ckrSessionCount
	}
	c.nextSess++
	// A read-write session is taken (crypto11, for one, opens no other):
	// the token is write-protected all the same, each write is refused.
	c.sessions[c.nextSess] = &session{rw: flags&ckfRWSession != 0}
	e.Ulong(c.nextSess)
	return ckrOK
}

func (c *conn) closeSession(d *decoder, e *encoder) uint64 {
	h := d.Ulong()
	if d.done() != nil {
		return ckrOK
	}
	if c.sessions[h] == nil {
		return ckrSessionHandleInvalid
	}
	delete(c.sessions, h)
	if len(c.sessions) == 0 {
		c.loggedIn = false // the last session's close logs out
	}
	return ckrOK
}

func (c *conn) closeAllSessions(d *decoder, e *encoder) uint64 {
	slot := d.Ulong()
	if d.done() != nil {
		return ckrOK
	}
	if slot != slotID {
		return ckrSlotIDInvalid
	}
	c.reset()
	return ckrOK
}

func (c *conn) getSessionInfo(d *decoder, e *encoder) uint64 {
	h := d.Ulong()
	if d.done() != nil {
		return ckrOK
	}
	if c.sessions[h] == nil {
		return ckrSessionHandleInvalid
	}
	e.Ulong(slotID)
	state, flags := uint64(cksROPublic), uint64(ckfSerialSession)
	if c.loggedIn {
		state = cksROUser
	}
	if c.sessions[h].rw {
		state, flags = state+2, flags|ckfRWSession // CKS_RW_PUBLIC_SESSION, CKS_RW_USER_FUNCTIONS
	}
	e.Ulong(state)
	e.Ulong(flags)
	e.Ulong(0)
	return ckrOK
}

// login accepts any PIN: the agent knows the caller from the kernel, and
// never asks for the HSM's PIN. The PIN is not kept, logged or compared.
func (c *conn) login(d *decoder, e *encoder) uint64 {
	h := d.Ulong()
	user := d.Ulong()
	clear(d.Bytes())
	if d.done() != nil {
		return ckrOK
	}
	if c.sessions[h] == nil {
		return ckrSessionHandleInvalid
	}
	switch user {
	case ckuUser:
		if c.loggedIn {
			return ckrUserAlreadyLoggedIn
		}
		c.loggedIn = true
	case ckuContextSpecific:
	case ckuSO:
		return ckrUserTypeInvalid // the token has no security officer: nothing to administer
	default:
		return ckrUserTypeInvalid
	}
	return ckrOK
}

func (c *conn) logout(d *decoder, e *encoder) uint64 {
	h := d.Ulong()
	if d.done() != nil {
		return ckrOK
	}
	if c.sessions[h] == nil {
		return ckrSessionHandleInvalid
	}
	if !c.loggedIn {
		return ckrUserNotLoggedIn
	}
	c.loggedIn = false
	return ckrOK
}

func (c *conn) getAttributeValue(d *decoder, e *encoder) uint64 {
	h := d.Ulong()
	handle := d.Ulong()
	template := d.AttrBuffer()
	if d.done() != nil {
		return ckrOK
	}
	if c.sessions[h] == nil {
		return ckrSessionHandleInvalid
	}
	o := c.objects[handle]
	if o == nil {
		return ckrObjectHandleInvalid
	}
	var invalid, hidden, small bool
	out := make([]Attribute, len(template))
	for i, t := range template {
		a, ok := o.attr(t.Type)
		switch {
		case sensitive(o.class, t.Type):
			out[i], hidden = Attribute{Type: t.Type, Unavailable: true}, true
		case !ok:
			out[i], invalid = Attribute{Type: t.Type, Unavailable: true}, true
		case t.Room == 0: // a query of the length
			out[i] = Attribute{Type: t.Type, Room: a.Room}
		case t.Room < a.Room:
			out[i], small = Attribute{Type: t.Type, Unavailable: true}, true
		default:
			out[i] = a
		}
	}
	e.Attrs(out)
	switch {
	case invalid:
		e.Ulong(ckrAttributeTypeInvalid)
	case hidden:
		e.Ulong(ckrAttributeSensitive)
	case small:
		e.Ulong(ckrBufferTooSmall)
	default:
		e.Ulong(ckrOK)
	}
	return ckrOK
}

func (c *conn) findObjectsInit(d *decoder, e *encoder) uint64 {
	h := d.Ulong()
	template := d.Attrs()
	if d.done() != nil {
		return ckrOK
	}
	s := c.sessions[h]
	if s == nil {
		return ckrSessionHandleInvalid
	}
	if s.finding {
		return ckrOperationActive
	}
	if rv := c.refresh(); rv != ckrOK {
		return rv
	}
	s.finding, s.found = true, nil
	for handle := uint64(1); handle <= c.next; handle++ {
		if o := c.objects[handle]; o != nil && o.matches(template) {
			s.found = append(s.found, handle)
		}
	}
	return ckrOK
}

// refresh lists the caller's keys again (the core audits the listing):
// objects come and go with the keys the caller may use.
func (c *conn) refresh() uint64 {
	resp, _, err := c.srv.core.List(c.ctx, c.pc.Peer)
	if err != nil {
		c.srv.log.Warn("pkcs11: listing the keys failed", "uid", c.pc.Peer.UID, "err", err)
		return ckrDeviceError
	}
	objects := make(map[uint64]*object)
	for _, k := range resp.Keys {
		objs, err := objectsOf(k)
		if err != nil {
			c.srv.log.Debug("pkcs11: key not shown", "err", err)
			continue
		}
		for _, o := range objs {
			id := o.identity()
			handle, ok := c.handles[id]
			if !ok {
				if len(c.handles) >= maxHandles {
					clear(c.handles) // a connection that saw this many keys change: handles start again
				}
				c.next++
				handle = c.next
				c.handles[id] = handle
			}
			objects[handle] = o
		}
	}
	for handle, o := range c.objects {
		if o.class == ckoPrivateKey && objects[handle] == nil {
			if len(c.unlisted) >= maxHandles {
				clear(c.unlisted)
			}
			c.unlisted[handle] = o
		}
	}
	for handle := range objects {
		delete(c.unlisted, handle)
	}
	c.objects = objects
	return ckrOK
}

// maxHandles bounds the object identities a connection remembers.
const maxHandles = 1 << 14

func (c *conn) findObjects(d *decoder, e *encoder) uint64 {
	h := d.Ulong()
	room := d.UlongBuffer()
	if d.done() != nil {
		return ckrOK
	}
	s := c.sessions[h]
	if s == nil {
		return ckrSessionHandleInvalid
	}
	if !s.finding {
		return ckrOperationNotInitialized
	}
	n := min(int(room), len(s.found))
	out := append([]uint64{}, s.found[:n]...)
	s.found = s.found[n:]
	e.Ulongs(out, n)
	return ckrOK
}

func (c *conn) findObjectsFinal(d *decoder, e *encoder) uint64 {
	h := d.Ulong()
	if d.done() != nil {
		return ckrOK
	}
	s := c.sessions[h]
	if s == nil {
		return ckrSessionHandleInvalid
	}
	if !s.finding {
		return ckrOperationNotInitialized
	}
	s.finding, s.found = false, nil
	return ckrOK
}

func (c *conn) signInit(d *decoder, e *encoder) uint64 {
	h := d.Ulong()
	m := d.Mechanism()
	if m.Unknown {
		return ckrMechanismInvalid // its parameter, and the key after it, were not read
	}
	key := d.Ulong()
	if d.done() != nil {
		return ckrOK
	}
	s := c.sessions[h]
	if s == nil {
		return ckrSessionHandleInvalid
	}
	if m.Null {
		s.sign = nil // a NULL mechanism cancels the signature under way
		return ckrOK
	}
	if s.sign != nil {
		return ckrOperationActive
	}
	o := c.objects[key]
	if o == nil {
		o = c.unlisted[key]
	}
	if o == nil {
		return ckrKeyHandleInvalid
	}
	op, rv := newSignOp(m, o)
	if rv != ckrOK {
		return rv
	}
	s.sign = op
	return ckrOK
}

// signing returns the session's signature under way.
func (c *conn) signing(h uint64) (*session, uint64) {
	s := c.sessions[h]
	if s == nil {
		return nil, ckrSessionHandleInvalid
	}
	if s.sign == nil {
		return nil, ckrOperationNotInitialized
	}
	return s, ckrOK
}

func (c *conn) sign(d *decoder, e *encoder) uint64 {
	h := d.Ulong()
	data := d.Bytes()
	room, query := d.ByteBuffer()
	if d.done() != nil {
		return ckrOK
	}
	s, rv := c.signing(h)
	if rv != ckrOK {
		return rv
	}
	if s.sign.parts {
		return ckrOperationActive // C_SignUpdate began it: C_SignFinal ends it
	}
	return c.finish(s, data, room, query, e)
}

func (c *conn) signUpdate(d *decoder, e *encoder) uint64 {
	h := d.Ulong()
	data := d.Bytes()
	if d.done() != nil {
		return ckrOK
	}
	s, rv := c.signing(h)
	if rv != ckrOK {
		return rv
	}
	s.sign.parts = true
	if rv := s.sign.update(data); rv != ckrOK {
		s.sign = nil // an error ends the operation
		return rv
	}
	return ckrOK
}

func (c *conn) signFinal(d *decoder, e *encoder) uint64 {
	h := d.Ulong()
	room, query := d.ByteBuffer()
	if d.done() != nil {
		return ckrOK
	}
	s, rv := c.signing(h)
	if rv != ckrOK {
		return rv
	}
	return c.finish(s, nil, room, query, e)
}

// finish ends s's signature with data, unless the client asked only for
// the signature's length (a NULL buffer) or gave too little room for it:
// then the length goes back and the operation stays.
func (c *conn) finish(s *session, data []byte, room uint32, query bool, e *encoder) uint64 {
	op := s.sign
	size := op.key.key.sigSize
	if query || int(room) < size {
		e.Bytes(nil, size)
		return ckrOK
	}
	s.sign = nil // whatever comes of it, the operation ends here
	if rv := op.update(data); rv != ckrOK {
		return rv
	}
	req, rv := op.request()
	if rv != ckrOK {
		return rv
	}
	a := c.srv.core.Sign(c.ctx, c.pc.Peer, req)
	if a.Err != nil {
		return ckrOf(a.Err)
	}
	sig := a.Signature
	if !op.key.key.rsa {
		var err error
		if sig, err = rawECDSA(sig, size); err != nil {
			c.srv.log.Error("pkcs11: signature not returned", "key", op.key.label, "err", err)
			return ckrDeviceError
		}
	}
	e.Bytes(sig, len(sig))
	return ckrOK
}

// connSet tracks the open connections for Shutdown.
type connSet struct {
	mu        sync.Mutex
	conns     map[*listen.Conn]context.CancelFunc
	listeners []net.Listener
	closed    bool
	wg        sync.WaitGroup
}

func (s *connSet) add(pc *listen.Conn, cancel context.CancelFunc) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return false
	}
	if s.conns == nil {
		s.conns = map[*listen.Conn]context.CancelFunc{}
	}
	s.conns[pc] = cancel
	s.wg.Add(1)
	return true
}

func (s *connSet) remove(pc *listen.Conn) {
	s.mu.Lock()
	delete(s.conns, pc)
	s.mu.Unlock()
	s.wg.Done()
}

func (s *connSet) listening(l net.Listener) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.listeners = append(s.listeners, l)
	return !s.closed
}

func (s *connSet) isClosed() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.closed
}

func (s *connSet) shutdown(ctx context.Context) {
	s.mu.Lock()
	s.closed = true
	for _, l := range s.listeners {
		l.Close()
	}
	for pc := range s.conns {
		pc.SetReadDeadline(time.Now()) // a connection between calls ends now
	}
	s.mu.Unlock()
	done := make(chan struct{})
	go func() { s.wg.Wait(); close(done) }()
	select {
	case <-done:
		return
	case <-ctx.Done():
	}
	s.mu.Lock()
	for pc, cancel := range s.conns {
		cancel()
		pc.Close()
	}
	s.mu.Unlock()
	<-done
}

// The digests are the agent's own (no HSM): clients such as Java's
// SunPKCS11 sign RSA-PSS with CKM_RSA_PKCS_PSS only if the token also
// digests with the PSS hash.

func (c *conn) digestInit(d *decoder, e *encoder) uint64 {
	h := d.Ulong()
	m := d.Mechanism()
	if m.Unknown {
		return ckrMechanismInvalid
	}
	if d.done() != nil {
		return ckrOK
	}
	s := c.sessions[h]
	if s == nil {
		return ckrSessionHandleInvalid
	}
	if m.Null {
		s.digest = nil
		return ckrOK
	}
	if s.digest != nil {
		return ckrOperationActive
	}
	alg, _ := hashOf(uint64(m.Type))
	if alg == 0 || m.PSS != nil || len(m.Param) > 0 {
		return ckrMechanismInvalid
	}
	s.digest, s.parts = alg.New(), false
	return ckrOK
}

func (c *conn) digesting(h uint64) (*session, uint64) {
	s := c.sessions[h]
	if s == nil {
		return nil, ckrSessionHandleInvalid
	}
	if s.digest == nil {
		return nil, ckrOperationNotInitialized
	}
	return s, ckrOK
}

func (c *conn) digest(d *decoder, e *encoder) uint64 {
	h := d.Ulong()
	data := d.Bytes()
	room, query := d.ByteBuffer()
	if d.done() != nil {
		return ckrOK
	}
	s, rv := c.digesting(h)
	if rv != ckrOK {
		return rv
	}
	if s.parts {
		return ckrOperationActive
	}
	return digestOut(s, data, room, query, e)
}

func (c *conn) digestUpdate(d *decoder, e *encoder) uint64 {
	h := d.Ulong()
	data := d.Bytes()
	if d.done() != nil {
		return ckrOK
	}
	s, rv := c.digesting(h)
	if rv != ckrOK {
		return rv
	}
	s.parts = true
	s.digest.Write(data)
	return ckrOK
}

func (c *conn) digestFinal(d *decoder, e *encoder) uint64 {
	h := d.Ulong()
	room, query := d.ByteBuffer()
	if d.done() != nil {
		return ckrOK
	}
	s, rv := c.digesting(h)
	if rv != ckrOK {
		return rv
	}
	return digestOut(s, nil, room, query, e)
}

// digestOut ends s's digest, or answers its length as finish does.
func digestOut(s *session, data []byte, room uint32, query bool, e *encoder) uint64 {
	size := s.digest.Size()
	if query || int(room) < size {
		e.Bytes(nil, size)
		return ckrOK
	}
	s.digest.Write(data)
	e.Bytes(s.digest.Sum(nil), size)
	s.digest = nil
	return ckrOK
}
