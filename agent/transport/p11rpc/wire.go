package p11rpc

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// Bounds of what a connection may send. A PKCS#11 client sends small
// messages (a digest, a template); multi-part signing sends its data in
// parts, each one message.
const (
	MaxMessage      = 256 << 10 // a message's options and body together
	maxOptions      = 1 << 10   // the client names itself ("client") there
	maxAttributes   = 256       // in one template
	maxNesting      = 4         // attribute arrays inside attribute arrays
	maxVersion      = 2         // the highest protocol version served
	headerSize      = 12
	nullArrayLength = 0xffffffff // a byte array's length field for a NULL pointer
)

// handshake is what C_Initialize carries to say it is this protocol.
const handshake = "PRIVATE-GNOME-KEYRING-PKCS11-PROTOCOL-V-1"

// MalformedError is a message that does not decode: its connection is closed.
type MalformedError struct{ Msg string }

func (e *MalformedError) Error() string { return "p11rpc: malformed message: " + e.Msg }

func malformed(format string, args ...any) error {
	return &MalformedError{Msg: fmt.Sprintf(format, args...)}
}

// frame is one message as the transport carries it: a 12-byte header (the
// call code, which the answer echoes, the options' length and the body's),
// then the options and the body.
type frame struct {
	code    uint32
	options []byte
	body    []byte
}

// readFrame reads one frame of at most max bytes after its header.
func readFrame(r io.Reader, max int) (frame, error) {
	var h [headerSize]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		return frame{}, err
	}
	f := frame{code: binary.BigEndian.Uint32(h[0:])}
	optLen, bodyLen := binary.BigEndian.Uint32(h[4:]), binary.BigEndian.Uint32(h[8:])
	if optLen > maxOptions {
		return frame{}, malformed("options of %d bytes (at most %d)", optLen, maxOptions)
	}
	if uint64(optLen)+uint64(bodyLen) > uint64(max) {
		return frame{}, malformed("message of %d bytes (at most %d)", uint64(optLen)+uint64(bodyLen), max)
	}
	buf := make([]byte, int(optLen)+int(bodyLen))
	if _, err := io.ReadFull(r, buf); err != nil {
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return frame{}, err
	}
	f.options, f.body = buf[:optLen], buf[optLen:]
	return f, nil
}

// writeFrame writes body as the answer to the message with code.
func writeFrame(w io.Writer, code uint32, body []byte) error {
	buf := make([]byte, headerSize, headerSize+len(body))
	binary.BigEndian.PutUint32(buf[0:], code)
	binary.BigEndian.PutUint32(buf[8:], uint32(len(body)))
	_, err := w.Write(append(buf, body...))
	return err
}

// decoder reads a message body: the call id, the signature, then the
// arguments, each checked against the signature in order.
type decoder struct {
	b       []byte
	sig     string // what is left of the signature to read
	version byte
	err     error
}

// newDecoder reads body's call id; expect then reads its signature.
func newDecoder(body []byte, version byte) (*decoder, uint32, error) {
	d := &decoder{b: body, version: version}
	id := d.u32()
	if d.err != nil {
		return nil, 0, d.err
	}
	return d, id, nil
}

// expect reads the signature, which must be sig.
func (d *decoder) expect(sig string) error {
	s, null := d.array()
	if d.err != nil {
		return d.err
	}
	if null || string(s) != sig {
		return malformed("signature %q where %q was expected", s, sig)
	}
	d.sig = sig
	return nil
}

func (d *decoder) fail(format string, args ...any) {
	if d.err == nil {
		d.err = malformed(format, args...)
	}
}

// part consumes code from the signature.
func (d *decoder) part(code string) bool {
	if d.err != nil {
		return false
	}
	if len(d.sig) < len(code) || d.sig[:len(code)] != code {
		d.fail("reading %q where the signature has %q", code, d.sig)
		return false
	}
	d.sig = d.sig[len(code):]
	return true
}

// done checks that the whole signature was read and nothing is left over.
func (d *decoder) done() error {
	if d.err == nil && d.sig != "" {
		d.fail("signature %q not read", d.sig)
	}
	if d.err == nil && len(d.b) != 0 {
		d.fail("%d bytes after the arguments", len(d.b))
	}
	return d.err
}

func (d *decoder) take(n int) []byte {
	if d.err != nil {
		return nil
	}
	if n < 0 || n > len(d.b) {
		d.fail("%d bytes needed, %d left", n, len(d.b))
		return nil
	}
	v := d.b[:n]
	d.b = d.b[n:]
	return v
}

func (d *decoder) u8() byte {
	if v := d.take(1); v != nil {
		return v[0]
	}
	return 0
}

func (d *decoder) u32() uint32 {
	if v := d.take(4); v != nil {
		return binary.BigEndian.Uint32(v)
	}
	return 0
}

func (d *decoder) u64() uint64 {
	if v := d.take(8); v != nil {
		return binary.BigEndian.Uint64(v)
	}
	return 0
}

// array is a length-prefixed byte array; null for the NULL pointer's length.
func (d *decoder) array() (v []byte, null bool) {
	n := d.u32()
	if d.err != nil {
		return nil, false
	}
	if n == nullArrayLength {
		return nil, true
	}
	if n >= 0x7fffffff {
		d.fail("byte array of %d bytes", n)
		return nil, false
	}
	return d.take(int(n)), false
}

// Ulong reads 'u': a CK_ULONG, 8 bytes whatever the client's CK_ULONG.
func (d *decoder) Ulong() uint64 {
	if !d.part("u") {
		return 0
	}
	return d.u64()
}

// Byte reads 'y'.
func (d *decoder) Byte() byte {
	if !d.part("y") {
		return 0
	}
	return d.u8()
}

// Bytes reads 'ay': a presence byte, then the array, or only a length for
// an array the client did not give.
func (d *decoder) Bytes() []byte {
	if !d.part("ay") {
		return nil
	}
	if d.u8() == 0 {
		d.u32()
		return nil
	}
	v, _ := d.array()
	return v
}

// String reads 'z', a string.
func (d *decoder) String() string {
	if !d.part("z") {
		return ""
	}
	v, _ := d.array()
	return string(v)
}

// ByteBuffer reads 'fy', the room the client has for an output byte array:
// 0 is a NULL pointer, a query of the length. Clients before 0.25 send the
// room alone; a presence byte before it is accepted too (the buffer is
// then the last argument, and its size tells the two apart).
func (d *decoder) ByteBuffer() (room uint32, null bool) {
	if !d.part("fy") {
		return 0, false
	}
	if d.sig == "" && len(d.b) == 5 {
		null = d.u8() != 0
	}
	room = d.u32()
	if room == nullArrayLength {
		// p11-kit 0.25 sends a buffer of no room so, a NULL one as 0.
		return 0, false
	}
	return room, null || room == 0
}

// UlongBuffer reads 'fu', the number of CK_ULONGs the client has room for.
func (d *decoder) UlongBuffer() uint32 {
	if !d.part("fu") {
		return 0
	}
	return d.u32()
}

// AttrBuffer reads 'fA', the template of a C_GetAttributeValue: each
// attribute's type and the room for its value (0: a query of its length).
// As for 'fy', the presence bytes of newer clients are accepted when the
// template is the last argument.
func (d *decoder) AttrBuffer() []Attribute {
	if !d.part("fA") {
		return nil
	}
	n := d.u32()
	if d.err != nil {
		return nil
	}
	if n > maxAttributes {
		d.fail("template of %d attributes (at most %d)", n, maxAttributes)
		return nil
	}
	flags := d.sig == "" && len(d.b) == 1+9*int(n)
	if flags {
		d.u8()
	}
	attrs := make([]Attribute, 0, n)
	for i := uint32(0); i < n && d.err == nil; i++ {
		a := Attribute{Type: d.u32()}
		null := false
		if flags {
			null = d.u8() != 0
		}
		a.Room = d.u32()
		if null {
			a.Room = 0
		}
		attrs = append(attrs, a)
	}
	return attrs
}

// Attrs reads 'aA', a template with values.
func (d *decoder) Attrs() []Attribute {
	if !d.part("aA") {
		return nil
	}
	return d.attrList(0)
}

func (d *decoder) attrList(depth int) []Attribute {
	n := d.u32()
	if d.err != nil {
		return nil
	}
	if n > maxAttributes {
		d.fail("template of %d attributes (at most %d)", n, maxAttributes)
		return nil
	}
	attrs := make([]Attribute, 0, min(n, 16))
	for i := uint32(0); i < n && d.err == nil; i++ {
		attrs = append(attrs, d.attribute(depth))
	}
	return attrs
}

// attribute reads one attribute: its type, whether it is valid, its length
// and its value encoded by the type's kind.
func (d *decoder) attribute(depth int) Attribute {
	a := Attribute{Type: d.u32()}
	if d.u8() == 0 {
		a.Unavailable = true
		return a
	}
	a.Room = d.u32()
	switch kindOf(a.Type) {
	case kindBool:
		a.Value = []byte{d.u8()}
	case kindUlong:
		a.Value = d.take(8)
	case kindAttrs:
		if depth >= maxNesting {
			d.fail("attribute arrays nested deeper than %d", maxNesting)
			return a
		}
		a.Nested = d.attrList(depth + 1)
		a.Value = nil
	case kindMechs:
		n := d.u32()
		if n > maxAttributes {
			d.fail("mechanism array of %d entries", n)
			return a
		}
		a.Value = d.take(8 * int(n))
	default: // byte arrays and dates
		a.Value, _ = d.array()
	}
	if a.Value == nil && kindOf(a.Type) != kindAttrs {
		a.Value = []byte{}
	}
	return a
}

// Mechanism reads 'M'. A NULL mechanism (an operation cancelled) is the
// type 0xffffffff alone.
func (d *decoder) Mechanism() Mechanism {
	if !d.part("M") {
		return Mechanism{}
	}
	m := Mechanism{Type: d.u32()}
	if d.err != nil || m.Type == nullMechanism {
		m.Null = m.Type == nullMechanism
		return m
	}
	if m.Type == oldNullMechanism && (d.sig == "u" && len(d.b) == 8 || d.sig == "" && len(d.b) == 0) {
		// p11-kit 0.25.0-0.25.2 sent a NULL mechanism as the type 0
		// alone (CKM_RSA_PKCS_KEY_PAIR_GEN, never an operation's).
		m.Null = true
		return m
	}
	if d.version >= 2 {
		if noParameter(m.Type) || d.u8() == 0 {
			return m
		}
	}
	if !signs(m.Type) && !noParameter(m.Type) {
		// Not one the agent signs with, and whose parameter it cannot tell
		// the length of: answered CKR_MECHANISM_INVALID, the rest unread.
		m.Unknown = true
		d.b, d.sig = nil, ""
		return m
	}
	switch {
	case isPSS(m.Type):
		m.PSS = &PSSParams{Hash: d.u64(), MGF: d.u64(), SaltLength: d.u64()}
	case d.version < 2 && noParameter(m.Type):
		// A NULL array, or one the caller gave anyway: either way no parameter.
		if p, _ := d.array(); len(p) > 0 {
			m.Param = p
		}
	default:
		m.Param, _ = d.array()
	}
	return m
}

// encoder writes a message body: the call id and signature, then the values.
type encoder struct {
	b       []byte
	version byte
}

func newEncoder(id uint32, sig string, version byte) *encoder {
	e := &encoder{version: version}
	e.u32(id)
	e.array([]byte(sig))
	return e
}

func (e *encoder) u8(v byte)    { e.b = append(e.b, v) }
func (e *encoder) u32(v uint32) { e.b = binary.BigEndian.AppendUint32(e.b, v) }
func (e *encoder) u64(v uint64) { e.b = binary.BigEndian.AppendUint64(e.b, v) }

func (e *encoder) array(v []byte) {
	if v == nil {
		e.u32(nullArrayLength)
		return
	}
	e.u32(uint32(len(v)))
	e.b = append(e.b, v...)
}

// Ulong writes 'u'.
func (e *encoder) Ulong(v uint64) { e.u64(v) }

// Byte writes 'y'.
func (e *encoder) Byte(v byte) { e.u8(v) }

// Version writes 'v'.
func (e *encoder) Version(major, minor byte) { e.u8(major); e.u8(minor) }

// Padded writes 's': s padded with spaces to n bytes (cut to n).
func (e *encoder) Padded(s string, n int) {
	p := make([]byte, n)
	for i := range p {
		p[i] = ' '
	}
	copy(p, s)
	e.array(p)
}

// Bytes writes 'ay'. A nil v with length n is the answer to a query of the
// length, or to a buffer that is too small.
func (e *encoder) Bytes(v []byte, n int) {
	if v == nil {
		e.u8(0)
		e.u32(uint32(n))
		return
	}
	e.u8(1)
	e.array(v)
}

// Ulongs writes 'au'; with only n set (v nil), just the count.
func (e *encoder) Ulongs(v []uint64, n int) {
	if v == nil {
		e.u8(0)
		e.u32(uint32(n))
		return
	}
	e.u8(1)
	e.u32(uint32(len(v)))
	for _, x := range v {
		e.u64(x)
	}
}

// Attrs writes 'aA'.
func (e *encoder) Attrs(attrs []Attribute) {
	e.u32(uint32(len(attrs)))
	for _, a := range attrs {
		e.attribute(a)
	}
}

// attribute writes one attribute. Its length field is the length of the
// value in the client's memory (a CK_ULONG is 8 bytes there, a CK_BBOOL 1);
// the value is then written by its kind, and a value the client only asked
// the length of is written as the kind's NULL.
func (e *encoder) attribute(a Attribute) {
	e.u32(a.Type)
	if a.Unavailable {
		e.u8(0)
		return
	}
	e.u8(1)
	e.u32(a.Room)
	switch kindOf(a.Type) {
	case kindBool:
		v := byte(0)
		if len(a.Value) > 0 {
			v = a.Value[0]
		}
		e.u8(v)
	case kindUlong:
		var v uint64
		if len(a.Value) == 8 {
			v = binary.BigEndian.Uint64(a.Value)
		}
		e.u64(v)
	case kindAttrs:
		e.Attrs(a.Nested)
	case kindMechs:
		e.u32(uint32(len(a.Value) / 8))
		e.b = append(e.b, a.Value...)
	default:
		e.array(a.Value)
	}
}

// Mechanism writes 'M', as a client of version e.version does (for the
// test clients).
func (e *encoder) Mechanism(m Mechanism) {
	if m.Null {
		e.u32(nullMechanism)
		return
	}
	e.u32(m.Type)
	if e.version >= 2 {
		if noParameter(m.Type) {
			return
		}
		if m.PSS == nil && m.Param == nil {
			e.u8(0)
			return
		}
		e.u8(1)
	}
	switch {
	case m.PSS != nil:
		e.u64(m.PSS.Hash)
		e.u64(m.PSS.MGF)
		e.u64(m.PSS.SaltLength)
	default:
		e.array(m.Param)
	}
}
