package metrics

import (
	"context"
	"net"
	"net/http"
	"sync"
	"time"
)

// boundedListener admits at most max connections. It waits for a place
// before it takes a connection from the kernel, so that no more than max
// descriptors are ever held; at the cap it closes the connection idle the
// longest (between requests, or accepted and silent) once one has been
// idle evictAfter, so that connections kept open with a rare request
// cannot lock the scrapers out.
type boundedListener struct {
	net.Listener
	max int

	mu    sync.Mutex
	freed *sync.Cond
	conns map[net.Conn]*connInfo
}

// evictAfter is how long a connection must have been idle to be closed for
// a new one: a scraper's connection just accepted, whose request is on its
// way, is not closed by a burst of others.
const evictAfter = time.Second

type connInfo struct {
	opened   time.Time
	idle     bool      // no request under way
	idleFrom time.Time // when it last became idle
	requests int
}

type connInfoKey struct{}

func newBoundedListener(l net.Listener, max int) *boundedListener {
	b := &boundedListener{Listener: l, max: max, conns: map[net.Conn]*connInfo{}}
	b.freed = sync.NewCond(&b.mu)
	return b
}

func (b *boundedListener) Accept() (net.Conn, error) {
	b.makeRoom()
	c, err := b.Listener.Accept()
	if err != nil {
		return nil, err
	}
	b.mu.Lock()
	now := time.Now()
	b.conns[c] = &connInfo{opened: now, idle: true, idleFrom: now}
	b.mu.Unlock()
	return c, nil
}

func (b *boundedListener) makeRoom() {
	b.mu.Lock()
	defer b.mu.Unlock()
	for len(b.conns) >= b.max {
		if victim := b.longestIdle(time.Now().Add(-evictAfter)); victim != nil {
			delete(b.conns, victim)
			victim.Close() // the server sees it closed and forgets it
			continue
		}
		// Woken when a connection ends, or to look again for one idle long enough.
		wake := time.AfterFunc(evictAfter/4, func() { b.mu.Lock(); b.freed.Broadcast(); b.mu.Unlock() })
		b.freed.Wait()
		wake.Stop()
	}
}

// longestIdle returns the connection idle the longest, if idle since before.
func (b *boundedListener) longestIdle(before time.Time) net.Conn {
	var victim net.Conn
	since := before
	for c, ci := range b.conns {
		if ci.idle && ci.idleFrom.Before(since) {
			victim, since = c, ci.idleFrom
		}
	}
	return victim
}

// connState follows each connection for the eviction (http.Server.ConnState).
func (b *boundedListener) connState(c net.Conn, st http.ConnState) {
	b.mu.Lock()
	defer b.mu.Unlock()
	ci := b.conns[c]
	switch st {
	case http.StateActive:
		if ci != nil {
			ci.idle = false
		}
	case http.StateIdle:
		if ci != nil {
			ci.idle, ci.idleFrom = true, time.Now()
		}
	case http.StateClosed, http.StateHijacked:
		delete(b.conns, c)
		b.freed.Broadcast()
	}
}

func (b *boundedListener) connContext(ctx context.Context, c net.Conn) context.Context {
	b.mu.Lock()
	defer b.mu.Unlock()
	return context.WithValue(ctx, connInfoKey{}, b.conns[c])
}

// limitRequests closes a connection after MaxRequestsPerConnection
// requests or MaxConnectionAge, on the answer that reaches either.
func (b *boundedListener) limitRequests(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if ci, ok := r.Context().Value(connInfoKey{}).(*connInfo); ok && ci != nil {
			b.mu.Lock()
			ci.requests++
			last := ci.requests >= MaxRequestsPerConnection || time.Since(ci.opened) >= MaxConnectionAge
			b.mu.Unlock()
			if last {
				w.Header().Set("Connection", "close")
			}
		}
		h.ServeHTTP(w, r)
	})
}
