package listen

import (
	"net"
	"sync"

	"github.com/hsmagent/hsmagent/agent/core"
)

// Admitter decides on a connection from its caller's credentials, before
// anything is read from it (the core's connection limits and rate).
type Admitter interface {
	AdmitConn(p core.Peer) (release func(), ok bool)
}

// Admitted reads each connection's peer credentials at accept and closes,
// before anything is spent on it, a connection a refuses. The connections
// it returns are *Conn.
func Admitted(l net.Listener, a Admitter) net.Listener { return &admitted{Listener: l, a: a} }

type admitted struct {
	net.Listener
	a Admitter
}

func (l *admitted) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		uc, ok := c.(*net.UnixConn)
		if !ok {
			return c, nil // the transport's handshake refuses it with the reason
		}
		p, err := ReadPeer(uc)
		if err != nil {
			c.Close()
			continue
		}
		release, ok := l.a.AdmitConn(p)
		if !ok {
			c.Close()
			continue
		}
		return &Conn{UnixConn: uc, Peer: p, release: release}, nil
	}
}

// Conn is an admitted connection: it carries the credentials read at
// accept and gives its place back when closed.
type Conn struct {
	*net.UnixConn
	Peer    core.Peer
	once    sync.Once
	release func()
}

func (c *Conn) Close() error {
	c.once.Do(c.release)
	return c.UnixConn.Close()
}

// ConnOf returns the admitted connection under c: c itself, or the one a
// Mux read the first bytes of.
func ConnOf(c net.Conn) (*Conn, bool) {
	switch c := c.(type) {
	case *Conn:
		return c, true
	case *replayConn:
		return c.Conn, true
	}
	return nil, false
}
