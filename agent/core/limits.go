package core

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"syscall"
	"time"

	"golang.org/x/time/rate"
)

// Bounds of the WatchKeys streams: a Go client holds one; each is a
// goroutine and what gRPC holds for a watcher that does not read. Root and
// the agent's own user are exempt per uid and keep the last eighth.
const (
	maxWatchers       = 512
	maxWatchersPerUID = 32
)

// Audit results of refusals decided by the limits.
const (
	resultTooManyWatchers       = "too-many-watchers"        // WatchKeys refused: the agent holds its maximum of them
	resultTooManyWatchersForUID = "too-many-watchers-uid"    // WatchKeys refused: this uid holds its maximum of them
	resultCallerBusy            = "caller-busy"              // refused: this uid has its share of signatures waiting or in flight
	resultTooManyConns          = "too-many-connections"     // refused at accept: the agent holds its maximum of connections
	resultTooManyForUID         = "too-many-connections-uid" // refused at accept: this uid holds its maximum of connections
	resultTooFastForUID         = "connection-rate-uid"      // refused at accept: this uid connects faster than its rate
	resultTooManyStreams        = "too-many-streams"         // SignStream refused: the agent holds its maximum of them
	resultTooManyStreamsForUID  = "too-many-streams-uid"     // SignStream refused: this uid holds its maximum of them
)

const (
	// limitQuiet is how long a limit must go without refusing before the
	// log says it has cleared; shorter would log twice per refusal when a
	// flood hovers at the limit.
	limitQuiet = 10 * time.Second
	// refusalRefill is how often a uid earns one more full refusal record
	// once its burst is spent; summaryInterval is how often the refusals
	// counted meanwhile are written as summaries.
	refusalRefill   = time.Second
	summaryInterval = time.Second
	// fdReserve is kept free of connections for the HSM module, the audit
	// log and the listener.
	fdReserve = 64
)

// limitLog writes one line when a limit is first hit and one when it has
// gone limitQuiet without refusing, with the count refused meanwhile: never
// a line per refused request.
type limitLog struct {
	log   *slog.Logger
	mu    sync.Mutex
	hits  map[limitKey]*limitHit
	timer *time.Timer
}

type limitKey struct {
	name string
	uid  int // -1: the limit for all callers together
}

type limitHit struct {
	last    time.Time
	refused int64
}

func newLimitLog(log *slog.Logger) *limitLog {
	return &limitLog{log: log, hits: make(map[limitKey]*limitHit)}
}

// hit records a refusal by the limit name (for uid, or -1) set at max.
func (l *limitLog) hit(name string, uid, max int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	k := limitKey{name, uid}
	h := l.hits[k]
	if h == nil {
		h = &limitHit{}
		l.hits[k] = h
		l.log.Warn("limit reached: refusing more until it clears", limitAttrs(k, slog.Int("max", max))...)
		if l.timer == nil {
			l.timer = time.AfterFunc(limitQuiet, l.sweep)
		}
	}
	h.last = time.Now()
	h.refused++
}

func (l *limitLog) sweep() {
	l.mu.Lock()
	defer l.mu.Unlock()
	for k, h := range l.hits {
		if time.Since(h.last) >= limitQuiet {
			l.log.Info("limit cleared", limitAttrs(k, slog.Int64("refused", h.refused))...)
			delete(l.hits, k)
		}
	}
	l.timer = nil
	if len(l.hits) > 0 {
		l.timer = time.AfterFunc(limitQuiet, l.sweep)
	}
}

func limitAttrs(k limitKey, a slog.Attr) []any {
	attrs := []any{"limit", k.name}
	if k.uid >= 0 {
		attrs = append(attrs, "uid", k.uid)
	}
	return append(attrs, a)
}

// refusalAudit bounds the audit records of refusals per uid: a burst of full
// records, then one more per refusalRefill; the refusals beyond are counted
// per (uid, event, reason) and written as one "refusals suppressed" record
// per summaryInterval. A refused request costs a map update, not a write.
type refusalAudit struct {
	audit *auditLog
	msg   string // of the summaries
	burst int
	mu    sync.Mutex
	uids  map[int]*refusals
	timer *time.Timer
}

type refusals struct {
	tokens     *rate.Limiter
	suppressed map[refusalKey]int64
}

type refusalKey struct {
	event  Event
	reason string
}

func newRefusalAudit(audit *auditLog, msg string, burst int) *refusalAudit {
	return &refusalAudit{audit: audit, msg: msg, burst: burst, uids: make(map[int]*refusals)}
}

// allow reports whether a refusal of uid's event for reason gets its own
// record; if not, it is counted for the next summary.
func (a *refusalAudit) allow(uid int, event Event, reason string) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	r := a.uids[uid]
	if r == nil {
		r = &refusals{tokens: rate.NewLimiter(rate.Every(refusalRefill), a.burst), suppressed: make(map[refusalKey]int64)}
		a.uids[uid] = r
	}
	if a.timer == nil { // also forgets idle uids, so the map stays small
		a.timer = time.AfterFunc(summaryInterval, a.flush)
	}
	if r.tokens.Allow() {
		return true
	}
	r.suppressed[refusalKey{event, reason}]++
	return false
}

// flush writes the summaries and forgets the uids whose burst is whole again.
func (a *refusalAudit) flush() {
	a.mu.Lock()
	defer a.mu.Unlock()
	now := time.Now()
	for uid, r := range a.uids {
		for k, n := range r.suppressed {
			a.audit.write(context.Background(), slog.LevelWarn, a.msg,
				slog.Int("uid", uid), slog.String("event", k.event.String()), slog.String("reason", k.reason),
				slog.Int64("count", n))
		}
		clear(r.suppressed)
		if r.tokens.TokensAt(now) >= float64(a.burst) {
			delete(a.uids, uid)
		}
	}
	a.timer = nil
	if len(a.uids) > 0 {
		a.timer = time.AfterFunc(summaryInterval, a.flush)
	}
}

// stop writes what is counted: on shutdown no refusal goes unrecorded.
func (a *refusalAudit) stop() {
	a.mu.Lock()
	if a.timer != nil {
		a.timer.Stop()
	}
	a.mu.Unlock()
	a.flush()
	a.mu.Lock()
	if a.timer != nil {
		a.timer.Stop()
		a.timer = nil
	}
	a.mu.Unlock()
}

// connLimits counts the open connections, in total and per uid.
// Root and the agent's own user are exempt from the per-uid limit, and the
// last eighth of the total is kept for them, so that their signatures keep
// working while other users hold every connection they may.
type connLimits struct {
	max, perUID, reserve int
	mu                   sync.Mutex
	total                int
	byUID                map[int]int
}

func newConnLimits(max, perUID int) *connLimits {
	return &connLimits{max: max, perUID: perUID, reserve: max / 8, byUID: make(map[int]int)}
}

// privileged reports whether uid is root or the agent's own user, whom the
// per-uid limits exempt and the reserves are kept for.
func privileged(uid int) bool { return uid == 0 || uid == agentUID }

// agentUID is the agent's effective uid.
var agentUID = os.Geteuid()

func (c *connLimits) exempt(uid int) bool { return privileged(uid) }

// overLimit is which of a connLimits' limits refused a caller.
type overLimit uint8

const (
	withinLimits overLimit = iota
	overTotal              // the limit of all callers together
	overPerUID             // the caller's uid's limit
)

// admit counts a connection of uid, or says which limit refuses it.
func (c *connLimits) admit(uid int) overLimit {
	c.mu.Lock()
	defer c.mu.Unlock()
	switch {
	case c.exempt(uid) && c.total >= c.max:
		return overTotal
	case !c.exempt(uid) && c.total >= c.max-c.reserve:
		return overTotal
	case !c.exempt(uid) && c.byUID[uid] >= c.perUID:
		return overPerUID
	}
	c.total++
	c.byUID[uid]++
	return withinLimits
}

func (c *connLimits) release(uid int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.total--
	if c.byUID[uid]--; c.byUID[uid] <= 0 {
		delete(c.byUID, uid)
	}
}

// AdmitConn counts a connection of p, or refuses it (false): over the
// connection rate of its uid, or the open-connection limits. A refusal is
// logged once per limit and audited, rationed. release gives the place back.
func (c *Core) AdmitConn(p Peer) (release func(), ok bool) {
	if !c.connRate.allow(p.UID) {
		// Closed before anything is spent on it: a caller that redials
		// as fast as it can wore the agent down one refusal at a time.
		c.refuseConn(p, resultTooFastForUID)
		return nil, false
	}
	switch c.conns.admit(p.UID) {
	case overTotal:
		c.refuseConn(p, resultTooManyConns)
		return nil, false
	case overPerUID:
		c.refuseConn(p, resultTooManyForUID)
		return nil, false
	}
	return func() { c.conns.release(p.UID) }, true
}

func (c *Core) refuseConn(p Peer, reason string) {
	switch reason {
	case resultTooManyConns:
		c.limits.hit("connections", -1, c.conns.max)
	case resultTooFastForUID:
		c.limits.hit("connections per second per uid", p.UID, c.connRate.perSecond)
	default:
		c.limits.hit("connections per uid", p.UID, c.conns.perUID)
	}
	if c.refusals.allow(p.UID, EventConnect, reason) {
		c.audit.write(context.Background(), slog.LevelWarn, EventConnect.String(),
			slog.Int("uid", p.UID), slog.Int("gid", p.GID), slog.Int("pid", p.PID), slog.String("result", reason))
	}
}

// fdLimit clamps max connections below the open-file limit (which the Go
// runtime has raised from its soft to its hard value at start), leaving
// fdReserve descriptors for everything else.
func fdLimit(want int, log *slog.Logger) int {
	var rl syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl); err != nil || rl.Cur > 1<<30 {
		return want
	}
	if room := int(rl.Cur) - fdReserve; room < want {
		room = max(room, 1)
		log.Warn(fmt.Sprintf("the open-file limit (RLIMIT_NOFILE %d) is below max connections plus %d; lowering max connections", rl.Cur, fdReserve),
			"max_connections", room)
		return room
	}
	return want
}

// admitStream counts a SignStream of p, the agent's most expensive call to
// keep open (its results wait in memory for a client that may never read),
// or refuses it: a budget across all uids on top of each uid's, with the
// same reserve for root and the agent's own user as connections have.
func (c *Core) admitStream(ctx context.Context, p Peer) (release func(), err error) {
	why := c.streams.admit(p.UID)
	if why == withinLimits {
		return func() { c.streams.release(p.UID) }, nil
	}
	reason, limit := c.overBudget(ctx, p, streamBudget, c.streams, why)
	return nil, Errorf(CodeResourceExhausted, "agent: %d sign streams are open (%s); close some, or sign with unary Sign calls", limit, reason)
}

// refuseWatch answers a WatchKeys over the watcher limits.
func (c *Core) refuseWatch(ctx context.Context, p Peer, rid string, why overLimit) error {
	reason, limit := c.overBudget(ctx, p, watchBudget, c.watchers, why, slog.String("request_id", rid))
	return &Error{Code: CodeResourceExhausted, RequestID: rid,
		Msg: fmt.Sprintf("agent: %d key watchers are open (%s); close some", limit, reason)}
}

// budget names a kind of long call counted by a connLimits: its audit
// event, the limits' names in the log, and the audit results of refusals.
type budget struct {
	event                 Event
	name                  string
	overTotal, overForUID string
}

var (
	streamBudget = budget{EventSignStream, "sign streams", resultTooManyStreams, resultTooManyStreamsForUID}
	watchBudget  = budget{EventWatch, "key watchers", resultTooManyWatchers, resultTooManyWatchersForUID}
)

// overBudget logs (once per limit) and audits (rationed) a call refused by
// l for why, and returns the audit result and the limit it hit.
func (c *Core) overBudget(ctx context.Context, p Peer, b budget, l *connLimits, why overLimit, attrs ...slog.Attr) (reason string, limit int) {
	reason, limit = b.overTotal, l.max
	if why == overPerUID {
		reason, limit = b.overForUID, l.perUID
		c.limits.hit(b.name+" per uid", p.UID, limit)
	} else {
		c.limits.hit(b.name, -1, limit)
	}
	if c.refusals.allow(p.UID, b.event, reason) {
		c.audit.write(ctx, slog.LevelWarn, b.event.String(), append([]slog.Attr{slog.Int("uid", p.UID), slog.Int("gid", p.GID),
			slog.Int("pid", p.PID), slog.String("result", reason)}, attrs...)...)
	}
	return reason, limit
}

// connRate bounds how fast one uid other than root and the agent's own may
// open connections: the open-connection limits bound how many it holds,
// not how often it opens them.
type connRate struct {
	perSecond int
	mu        sync.Mutex
	byUID     map[int]*rate.Limiter
}

func newConnRate(perSecond int) *connRate {
	return &connRate{perSecond: perSecond, byUID: map[int]*rate.Limiter{}}
}

// allow reports whether uid may open a connection now (bursts of twice
// the rate pass).
func (r *connRate) allow(uid int) bool {
	if privileged(uid) {
		return true
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	l := r.byUID[uid]
	if l == nil {
		if len(r.byUID) >= 1024 { // forget the uids whose bucket is full again
			now := time.Now()
			for u, old := range r.byUID {
				if old.TokensAt(now) >= float64(old.Burst()) {
					delete(r.byUID, u)
				}
			}
		}
		l = rate.NewLimiter(rate.Limit(r.perSecond), 2*r.perSecond)
		r.byUID[uid] = l
	}
	return l.Allow()
}
