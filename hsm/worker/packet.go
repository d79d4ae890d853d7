package worker

import (
	"net"
	"syscall"
	"unsafe"
)

// packets is the agent's end of the signatures socket, read and written
// with raw system calls. The socket is non-blocking, so neither call waits
// in the kernel; made the ordinary way, each would tell the scheduler it
// is in a system call, and the runtime's monitor, finding a P there for
// one of its ticks (20 µs, and a write that wakes the worker's thread can
// take that long on a virtual machine), hands the P to another thread (a
// thread wake-up) and stays awake polling at its shortest interval. A raw
// call keeps its P and tells no one. When the socket is full or empty the
// call waits in the netpoller as any other.
type packets struct {
	conn net.Conn
	raw  syscall.RawConn
}

func newPackets(conn net.Conn) (*packets, error) {
	sc, ok := conn.(syscall.Conn)
	if !ok {
		return nil, syscall.EINVAL
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return nil, err
	}
	return &packets{conn: conn, raw: raw}, nil
}

// write sends b, a whole packet.
func (s *packets) write(b []byte) error {
	if len(b) == 0 {
		return syscall.EINVAL
	}
	var werr error
	err := s.raw.Write(func(fd uintptr) bool {
		for {
			_, _, e := syscall.RawSyscall(syscall.SYS_WRITE, fd, uintptr(unsafe.Pointer(&b[0])), uintptr(len(b)))
			switch e {
			case 0:
				werr = nil
				return true
			case syscall.EINTR:
				continue
			case syscall.EAGAIN:
				return false // wait until it can be written
			default:
				werr = e
				return true
			}
		}
	})
	if err != nil {
		return err
	}
	return werr
}

// read receives a packet into b; 0 bytes is the other end closed.
func (s *packets) read(b []byte) (int, error) {
	var n int
	var rerr error
	err := s.raw.Read(func(fd uintptr) bool {
		for {
			r, _, e := syscall.RawSyscall(syscall.SYS_READ, fd, uintptr(unsafe.Pointer(&b[0])), uintptr(len(b)))
			switch e {
			case 0:
				n, rerr = int(r), nil
				return true
			case syscall.EINTR:
				continue
			case syscall.EAGAIN:
				return false // wait for a packet
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

func (s *packets) Close() error { return s.conn.Close() }
