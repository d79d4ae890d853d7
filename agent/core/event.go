package core

import (
	"context"
	"log/slog"
)

// Event is the kind of call an audit record is about: the record's msg.
type Event uint8

const (
	EventSign       Event = iota // one signature
	EventSignStream              // a stream of signatures, as a whole
	EventList                    // a key listing
	EventWatch                   // a key watch
	EventConnect                 // a connection, refused at accept
	EventAdmin                   // an operation of the Admin service (admin.go)
)

var eventNames = [...]string{EventSign: "sign", EventSignStream: "sign-stream", EventList: "list", EventWatch: "watch", EventConnect: "connect", EventAdmin: "admin"}

// String is the event's name in the audit trail.
func (e Event) String() string { return eventNames[e] }

// RefusedCall records a call that ended before any request in it was
// looked at (malformed, or its request never came), with its outcome and
// the code the client got. Rationed like other refusals.
func (c *Core) RefusedCall(ctx context.Context, p Peer, ev Event, o Outcome, code Code) {
	if ev == EventSign {
		c.observer.Signed("", o, 0)
	}
	if !c.refusals.allow(p.UID, ev, o.String()) {
		return
	}
	c.audit.write(ctx, slog.LevelWarn, ev.String(),
		slog.Int("uid", p.UID), slog.Int("gid", p.GID), slog.Int("pid", p.PID),
		slog.String("result", o.String()), slog.String("code", code.String()),
		slog.String("request_id", newRequestID()))
}
