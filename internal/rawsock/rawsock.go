// Package rawsock reads and writes a non-blocking socket with raw system
// calls, waiting in the runtime's netpoller only when the socket is empty or
// full.
//
// Made the ordinary way (net.Conn's Read and Write), each call tells the
// scheduler it is in a system call: when every scheduler slot (P) was idle
// that wakes the runtime's monitor (sysmon), a thread wake-up on the
// caller's path, and a call that outlasts one of the monitor's ticks (20 µs,
// which a write that wakes the peer's thread can take on a virtual machine)
// has its P handed to another thread. A raw call on a non-blocking socket
// never waits in the kernel, so it keeps its P and tells no one. The agent's
// signing path makes several such calls per signature, at one caller all
// after an idle spell.
package rawsock

import (
	"io"
	"syscall"
	"unsafe"
)

// Conn is a socket read and written with raw calls. Deadlines set on the
// connection it came from bound its waits, as they do the connection's own
// calls; its errors are the connection's (errors.Is(err,
// os.ErrDeadlineExceeded) for a deadline, net.ErrClosed once closed).
type Conn struct {
	raw syscall.RawConn
}

// New returns the raw calls of c, a socket from the net package (its file
// descriptor is non-blocking).
func New(c syscall.Conn) (*Conn, error) {
	raw, err := c.SyscallConn()
	if err != nil {
		return nil, err
	}
	return &Conn{raw: raw}, nil
}

// Read reads what the socket holds, up to len(b), waiting until it holds
// something; on a packet socket, one packet. 0 bytes with no error is the
// other end closed (Stream makes that io.EOF).
func (c *Conn) Read(b []byte) (int, error) {
	if len(b) == 0 {
		return 0, nil
	}
	var n int
	var rerr error
	err := c.raw.Read(func(fd uintptr) bool {
		n, rerr = 0, nil
		for {
			r, _, e := syscall.RawSyscall(syscall.SYS_READ, fd, uintptr(unsafe.Pointer(&b[0])), uintptr(len(b)))
			switch e {
			case 0:
				n = int(r)
				return true
			case syscall.EINTR:
				continue
			case syscall.EAGAIN:
				return false // wait until it can be read
			default:
				rerr = e
				return true
			}
		}
	})
	if err != nil {
		return 0, err
	}
	return n, rerr
}

// Stream is the reader of a stream socket: Read, with io.EOF at its end.
func (c *Conn) Stream() io.Reader { return streamReader{c} }

type streamReader struct{ c *Conn }

func (r streamReader) Read(b []byte) (int, error) {
	n, err := r.c.Read(b)
	if err == nil && n == 0 && len(b) > 0 {
		return 0, io.EOF
	}
	return n, err
}

// Write writes all of b, waiting while the socket is full. On a packet
// socket a write is one packet, written whole.
func (c *Conn) Write(b []byte) (int, error) { return c.write(b, true) }

// TryWrite writes what of b the socket takes now, without waiting: n <
// len(b) with no error when it is full.
func (c *Conn) TryWrite(b []byte) (int, error) { return c.write(b, false) }

func (c *Conn) write(b []byte, wait bool) (int, error) {
	var done int
	var werr error
	err := c.raw.Write(func(fd uintptr) bool {
		for done < len(b) {
			n, e := write(fd, b[done:])
			switch {
			case e == 0 && n > 0:
				done += n
			case e == 0:
				werr = io.ErrShortWrite // no socket does this: never spin on it
				return true
			case e == syscall.EINTR:
			case e == syscall.EAGAIN:
				return !wait // full: wait until it can be written, or leave the rest to the caller
			default:
				werr = e
				return true
			}
		}
		return true
	})
	if err != nil {
		return done, err
	}
	return done, werr
}

func write(fd uintptr, b []byte) (int, syscall.Errno) {
	if len(b) == 0 {
		return 0, 0
	}
	n, _, e := syscall.RawSyscall(syscall.SYS_WRITE, fd, uintptr(unsafe.Pointer(&b[0])), uintptr(len(b)))
	return int(n), e
}
