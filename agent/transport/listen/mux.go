package listen

import (
	"io"
	"net"
	"sync"
	"time"
)

// Mux routes the connections of an Admitted listener by their first bytes:
// those that open with preface go to serve, the others to Accept (for
// gRPC), with their first bytes read again.
type Mux struct {
	net.Listener // Admitted
	preface      string
	handshake    time.Duration
	serve        func(*Conn)
	grpcConns    chan net.Conn
	done         chan struct{}
	closeOnce    sync.Once
	err          error // why accepting stopped; set before done is closed
}

// NewMux starts routing l's connections. A connection must send its first
// bytes within handshake.
func NewMux(l net.Listener, preface string, handshake time.Duration, serve func(*Conn)) *Mux {
	m := &Mux{Listener: l, preface: preface, handshake: handshake, serve: serve,
		grpcConns: make(chan net.Conn), done: make(chan struct{})}
	go m.run()
	return m
}

func (m *Mux) run() {
	var delay time.Duration
	for {
		c, err := m.Listener.Accept()
		if te, ok := err.(interface{ Temporary() bool }); ok && te.Temporary() {
			// Out of file descriptors, say: try again, as gRPC's own loop would.
			delay = min(max(2*delay, 5*time.Millisecond), time.Second)
			select {
			case <-time.After(delay):
				continue
			case <-m.done:
				return
			}
		}
		if err != nil {
			m.closeWith(err)
			return
		}
		delay = 0
		go m.route(c)
	}
}

// Accept returns the next connection that is not the preface's.
func (m *Mux) Accept() (net.Conn, error) {
	select {
	case c := <-m.grpcConns:
		return c, nil
	case <-m.done:
		if m.err != nil {
			return nil, m.err
		}
		return nil, net.ErrClosed
	}
}

func (m *Mux) Close() error {
	m.closeWith(nil)
	return nil
}

func (m *Mux) closeWith(err error) {
	m.closeOnce.Do(func() {
		m.err = err
		close(m.done)
		m.Listener.Close()
	})
}

// route reads a connection's first bytes, within the handshake timeout, to
// tell a signing connection from a gRPC one.
func (m *Mux) route(c net.Conn) {
	pc, ok := c.(*Conn)
	if !ok {
		c.Close()
		return
	}
	head := make([]byte, len(m.preface))
	pc.SetReadDeadline(time.Now().Add(m.handshake))
	_, err := io.ReadFull(pc, head)
	pc.SetReadDeadline(time.Time{})
	if err != nil {
		// Closed, or silent past the handshake timeout before its first 8
		// bytes: gRPC would wait for the rest a handshake timeout more.
		pc.Close()
		return
	}
	if string(head) == m.preface {
		m.serve(pc)
		return
	}
	// gRPC reads the bytes again, and refuses what is not HTTP/2.
	select {
	case m.grpcConns <- &replayConn{Conn: pc, head: head}:
	case <-m.done:
		pc.Close()
	}
}

// replayConn is a connection whose first bytes were read to route it.
type replayConn struct {
	*Conn
	head []byte
}

func (c *replayConn) Read(b []byte) (int, error) {
	if len(c.head) > 0 {
		n := copy(b, c.head)
		c.head = c.head[n:]
		return n, nil
	}
	return c.Conn.Read(b)
}
