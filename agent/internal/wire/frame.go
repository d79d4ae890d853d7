package wire

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"sync"

	"google.golang.org/protobuf/proto"
)

// Preface opens a signing connection: the client sends it as the first bytes
// on the agent's socket, and the agent answers with it before the first
// frame. A gRPC client opens with the HTTP/2 preface instead, which differs
// from the first byte, so that one socket serves both.
//
// On a signing connection each message is a frame: its length as 4 bytes
// big-endian, then the message. The client sends SignStreamRequests and the
// agent SignStreamResponses, as on the SignStream call, without HTTP/2's
// framing, flow control and goroutine hand-offs (a signature through the
// agent is a round trip of a few tens of microseconds on a 2 ms HSM call).
// The agent ends the connection with a result of id 0 whose code and
// message are the stream's status, then closes it.
const Preface = "HSMAGSN1"

// StatusID is the result id of the connection's final status.
const StatusID = 0

// FrameError is a frame the reader refused: too large or not a message.
type FrameError struct{ Msg string }

func (e *FrameError) Error() string { return e.Msg }

// AppendFrame appends m as a frame to b.
func AppendFrame(b []byte, m proto.Message) ([]byte, error) {
	start := len(b)
	b = append(b, 0, 0, 0, 0)
	b, err := proto.MarshalOptions{}.MarshalAppend(b, m)
	if err != nil {
		return nil, err
	}
	binary.BigEndian.PutUint32(b[start:], uint32(len(b)-start-4))
	return b, nil
}

// ReadFrame reads one frame of at most max bytes into m. It returns io.EOF
// at a clean end between frames, a *FrameError for a frame refused, and the
// reader's error otherwise.
func ReadFrame(r *bufio.Reader, max int, buf []byte, m proto.Message) ([]byte, error) {
	var head [4]byte
	if _, err := io.ReadFull(r, head[:]); err != nil {
		return buf, err
	}
	n := binary.BigEndian.Uint32(head[:])
	if n > uint32(max) {
		return buf, &FrameError{fmt.Sprintf("a frame of %d bytes; at most %d", n, max)}
	}
	if cap(buf) < int(n) {
		buf = make([]byte, n)
	}
	buf = buf[:n]
	if _, err := io.ReadFull(r, buf); err != nil {
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return buf, err
	}
	if err := proto.Unmarshal(buf, m); err != nil {
		return buf, &FrameError{fmt.Sprintf("a frame that is not a %s: %v", m.ProtoReflect().Descriptor().Name(), err)}
	}
	return buf, nil
}

// FrameWriter writes frames to w, one whole frame per Write call, so that
// writes from several goroutines never interleave.
type FrameWriter struct {
	W   io.Writer
	mu  sync.Mutex
	buf []byte
}

// WriteFrame writes m as one frame.
func (f *FrameWriter) WriteFrame(m proto.Message) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	var err error
	if f.buf, err = AppendFrame(f.buf[:0], m); err != nil {
		return err
	}
	_, err = f.W.Write(f.buf)
	return err
}

// WriteRaw writes b (the preface) in one Write call.
func (f *FrameWriter) WriteRaw(b []byte) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	_, err := f.W.Write(b)
	return err
}

// TakeBatch takes off the front of *queue the items of one message: at
// most maxItems of them and maxBytes of message (3 bytes each for the
// repeated field's tag and length), and at least one.
func TakeBatch[T proto.Message](queue *[]T, maxItems, maxBytes int) []T {
	q := *queue
	n, size := 0, 0
	for n < len(q) && n < maxItems {
		if size += proto.Size(q[n]) + 3; size > maxBytes && n > 0 {
			break
		}
		n++
	}
	batch := make([]T, n)
	copy(batch, q)
	*queue = append(q[:0], q[n:]...)
	return batch
}
