package worker

import (
	"net"
	"syscall"

	"github.com/hsmagent/hsmagent/internal/rawsock"
)

// packets is the agent's end of the signatures socket, read and written
// with raw system calls (see rawsock): a write that wakes the worker's
// thread would otherwise hand the agent's scheduler slot to another thread.
type packets struct {
	conn net.Conn
	raw  *rawsock.Conn
}

func newPackets(conn net.Conn) (*packets, error) {
	sc, ok := conn.(syscall.Conn)
	if !ok {
		return nil, syscall.EINVAL
	}
	raw, err := rawsock.New(sc)
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
	_, err := s.raw.Write(b)
	return err
}

// read receives a packet into b; 0 bytes is the other end closed.
func (s *packets) read(b []byte) (int, error) { return s.raw.Read(b) }

func (s *packets) Close() error { return s.conn.Close() }
