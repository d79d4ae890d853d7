// Package core is the agent's signing core, with no transport in it: who
// the caller is (Peer), what it may use (Policy), the gate in front of the
// HSM, the audit trail, the limits that keep one local user from denying
// the agent to the others, and the stream engine. Transports (the gRPC
// service, the framed signing connection) read a caller's credentials,
// decode its requests, call the core and write its answers; each outcome
// is mapped to audit, metrics and wire code once, in this package.
package core

import (
	"context"
	"crypto"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"
)

// Options configure a Core. Zero values take the defaults below.
type Options struct {
	// Logger receives operational logs; nil means slog.Default().
	Logger *slog.Logger
	// Audit receives one record per decision, numbered by a seq field; nil
	// means Logger. A record it fails to write fails the request it
	// records, and requests are refused until the trail can be written again.
	Audit *slog.Logger
	// AuditFailOpen keeps signing while the audit trail cannot be written.
	AuditFailOpen bool
	// AuditChain, when set, is the sink under Audit (an AuditFile): each
	// record then carries the hash of the line before it.
	AuditChain Chain
	// AuditSigningKey names a key of the store that signs a checkpoint of
	// the chain every AuditCheckpointEvery (default a minute), on
	// Checkpoint and on Close; "" signs none. The key is the agent's own:
	// no caller sees it or signs with it, whatever the rules say.
	AuditSigningKey      string
	AuditCheckpointEvery time.Duration
	// Policy says who may use which key; nil means only the agent's own user and root.
	Policy *Policy
	// Observer is told of signatures, reloads and health, for metrics; nil: nobody.
	Observer Observer
	// Now is the clock of the certificate expiry warnings; nil means time.Now.
	Now func() time.Time

	MaxInFlight          int           // signatures inside the key store at once
	MaxWaiting           int           // signatures queued behind them
	HSMTimeout           time.Duration // bound of each signature inside the key store
	MaxSignaturesPerUID  int           // one uid's signatures waiting or in the HSM
	AuditRefusalBurst    int           // refusal records of one uid before rationing
	MaxConnections       int           // open connections of all callers
	MaxConnectionsPerUID int           // open connections of one uid
	ConnectionRatePerUID int           // connections per second of one uid
	MaxSignStreams       int           // signature streams open at once
	MaxSignStreamsPerUID int           // signature streams of one uid
	StreamSendTimeout    time.Duration // a stream whose client reads nothing ends after this

	// ExpiryCheckEvery is how often the certificates are looked at again
	// (default daily); AuditProbeEvery how often a failed trail is tried
	// again (default a second). Tests shorten them.
	ExpiryCheckEvery time.Duration
	AuditProbeEvery  time.Duration
}

// Defaults of the Options. A network HSM answers in milliseconds and gets
// its throughput from many sessions at once, so the default admits many
// operations; a CPU-bound token such as SoftHSM gains nothing past its
// cores but loses little either. A Go client holds two connections (gRPC,
// and its signing connection): the connection limits are twice what the
// clients they are meant to fit need.
const (
	DefaultMaxInFlight          = 64
	DefaultMaxWaiting           = 1024
	DefaultHSMTimeout           = 3 * time.Second
	DefaultMaxConnections       = 2048
	DefaultMaxConnectionsPerUID = 128
	DefaultStreamSendTimeout    = 30 * time.Second
	DefaultMaxSignaturesPerUID  = 256
	DefaultAuditRefusalBurst    = 32
	DefaultConnectionRatePerUID = 200
	DefaultMaxSignStreams       = 256
	DefaultMaxSignStreamsPerUID = 16
	// RetiredKeyGrace is how long after a promotion the key it retired still
	// signs for a caller that names it (SignRequest.key_id): long enough for
	// a TLS handshake that presented its certificate to complete, and no
	// longer, so that a retired key soon stops signing.
	RetiredKeyGrace = time.Minute
)

// Core serves signatures and key lists to Peers; it is safe for
// concurrent use by any number of transports.
type Core struct {
	store    KeyStore
	log      *slog.Logger
	audit    *auditLog
	observer Observer
	expiry   *expiryWatch // warns in the log before certificates expire

	keyChanges keyChanges    // reloads after a key was replaced in the store (keychange.go)
	gate       *gate         // admits signatures into the key store
	conns      *connLimits   // admits connections
	connRate   *connRate     // bounds how fast each uid connects
	watchers   *connLimits   // admits WatchKeys streams
	streams    *connLimits   // admits signature streams
	limits     *limitLog     // logs each limit once when hit and once when cleared
	refusals   *refusalAudit // bounds the audit records of refusals
	listings   *refusalAudit // bounds the audit records of listings
	stallAfter time.Duration // StreamSendTimeout
	workers    *workers
	checkEvery time.Duration // ExpiryCheckEvery

	auditKey   string        // AuditSigningKey
	auditSig   crypto.Signer // its signer, nil without one
	checkedSeq uint64        // seq the last checkpoint written covers; 0: none yet (serialised by checkMu)
	checkMu    sync.Mutex
	checkpoint time.Duration // AuditCheckpointEvery

	healthMu sync.Mutex // orders health reports
	onHealth []func(serving bool)

	reloadMu sync.Mutex // serialises reloads
	adminMu  sync.Mutex // serialises the Admin operations that change the store (admin.go)
	state    atomic.Pointer[state]
	stopping chan struct{} // closed by Drain: ends watches, drains streams
	stopOnce sync.Once
}

// New loads the store's keys and returns a core ready for transports.
func New(store KeyStore, opts Options) (*Core, error) {
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.Audit == nil {
		opts.Audit = opts.Logger
	}
	if opts.Policy == nil {
		var err error
		if opts.Policy, err = NewPolicy(nil); err != nil {
			return nil, err
		}
	}
	if opts.Observer == nil {
		opts.Observer = nopObserver{}
	}
	orDefault(&opts.MaxInFlight, DefaultMaxInFlight)
	orDefault(&opts.MaxWaiting, DefaultMaxWaiting)
	orDefault(&opts.HSMTimeout, DefaultHSMTimeout)
	orDefault(&opts.MaxConnections, DefaultMaxConnections)
	orDefault(&opts.MaxConnectionsPerUID, DefaultMaxConnectionsPerUID)
	orDefault(&opts.StreamSendTimeout, DefaultStreamSendTimeout)
	orDefault(&opts.MaxSignaturesPerUID, DefaultMaxSignaturesPerUID)
	orDefault(&opts.AuditRefusalBurst, DefaultAuditRefusalBurst)
	orDefault(&opts.MaxSignStreams, DefaultMaxSignStreams)
	orDefault(&opts.MaxSignStreamsPerUID, DefaultMaxSignStreamsPerUID)
	orDefault(&opts.ConnectionRatePerUID, DefaultConnectionRatePerUID)
	orDefault(&opts.ExpiryCheckEvery, 24*time.Hour)
	orDefault(&opts.AuditProbeEvery, time.Second)
	orDefault(&opts.AuditCheckpointEvery, time.Minute)
	opts.MaxConnections = fdLimit(opts.MaxConnections, opts.Logger)
	c := &Core{store: store, log: opts.Logger, stopping: make(chan struct{}), stallAfter: opts.StreamSendTimeout,
		observer: opts.Observer, checkEvery: opts.ExpiryCheckEvery}
	c.audit = newAuditLog(opts.Audit, opts.Logger, opts.AuditFailOpen, opts.AuditProbeEvery, c.setAuditWritable)
	c.audit.chain = opts.AuditChain
	c.auditKey, c.checkpoint = opts.AuditSigningKey, opts.AuditCheckpointEvery
	if opts.AuditFailOpen {
		opts.Logger.Warn("audit_fail_open is set: if the audit trail cannot be written, signatures go on WITHOUT audit records")
	}
	c.limits = newLimitLog(opts.Logger)
	c.refusals = newRefusalAudit(c.audit, "refusals suppressed", opts.AuditRefusalBurst)
	// Listings cost a caller nothing either, and have their own ration so
	// that a client listing often does not use up its refusals' records.
	c.listings = newRefusalAudit(c.audit, "listings suppressed", opts.AuditRefusalBurst)
	c.conns = newConnLimits(opts.MaxConnections, opts.MaxConnectionsPerUID)
	c.connRate = newConnRate(opts.ConnectionRatePerUID)
	c.streams = newConnLimits(opts.MaxSignStreams, opts.MaxSignStreamsPerUID)
	c.watchers = newConnLimits(maxWatchers, maxWatchersPerUID)
	c.gate = newGate(opts.MaxInFlight, opts.MaxWaiting, opts.MaxSignaturesPerUID, opts.HSMTimeout, opts.Logger, c.limits, c.setHSMServing)
	// As many idle workers as signatures the HSM takes at once.
	c.workers = newWorkers(opts.MaxInFlight)
	c.expiry = newExpiryWatch(opts.Now, opts.Logger)
	if err := c.load(opts.Policy); err != nil {
		return nil, err
	}
	if c.auditKey != "" { // after load: a store may know its keys from a listing
		if opts.AuditChain == nil {
			return nil, errors.New("agent: audit_signing_key needs an audit_log file: checkpoints sign the chain of its lines")
		}
		var err error
		if c.auditSig, err = store.Signer(c.auditKey); err != nil {
			return nil, fmt.Errorf("agent: audit_signing_key %q: %w", c.auditKey, err)
		}
	}
	return c, nil
}

func orDefault[T int | time.Duration](v *T, def T) {
	if *v <= 0 {
		*v = def
	}
}

// Start runs the core's background work (the certificate expiry check)
// until Close.
func (c *Core) Start() {
	go c.watchExpiry(c.checkEvery)
	if c.auditSig != nil {
		go c.checkpoints()
	}
}

// OnHealth adds f to what is told when the core's health changes: false
// while the HSM is stuck, or while the audit trail cannot be written and
// requests are refused for it. f is called at once with the health now.
func (c *Core) OnHealth(f func(serving bool)) {
	c.healthMu.Lock()
	defer c.healthMu.Unlock()
	c.onHealth = append(c.onHealth, f)
	f(c.serving())
}

func (c *Core) serving() bool { return c.HSMAnswering() && !c.audit.refusing() }

// HSMAnswering reports whether no operation is stuck in the HSM past the
// HSM timeout: what the agent's health and systemd's watchdog follow.
func (c *Core) HSMAnswering() bool { return c.gate.stuck.Load() == 0 }

// HSMLoad reports the signatures inside the key store now and those waiting for it.
func (c *Core) HSMLoad() (inFlight, waiting int) {
	return c.gate.slots.inFlight(), int(c.gate.waiting.Load())
}

// setHSMServing is the gate's report: false while an operation is stuck.
func (c *Core) setHSMServing(serving bool) {
	c.observer.HSMServing(serving)
	c.updateHealth()
}

// setAuditWritable is the audit trail's report: false during an outage.
func (c *Core) setAuditWritable(writable bool) {
	c.observer.AuditWritable(writable)
	c.updateHealth()
}

func (c *Core) updateHealth() {
	c.healthMu.Lock()
	defer c.healthMu.Unlock()
	serving := c.serving()
	for _, f := range c.onHealth {
		f(serving)
	}
}

// AuditEvent writes a record of something that happened to the agent
// rather than a decision on a request (an HSM worker that died, say).
func (c *Core) AuditEvent(msg string, attrs ...slog.Attr) {
	c.audit.write(context.Background(), slog.LevelWarn, msg, attrs...)
}

// Drain makes the core stop taking new work: watches end, streams answer
// what they hold and end, background reloads stop.
func (c *Core) Drain() { c.stopOnce.Do(func() { close(c.stopping) }) }

// Stopping is closed by Drain.
func (c *Core) Stopping() <-chan struct{} { return c.stopping }

func (c *Core) isStopping() bool {
	select {
	case <-c.stopping:
		return true
	default:
		return false
	}
}

// Close writes what the refusal rationing has counted and stops the audit
// trail's probe: the last step of a shutdown, after the transports.
func (c *Core) Close() {
	c.Drain()
	c.refusals.stop()
	c.listings.stop()
	c.Checkpoint("shutdown")
	c.audit.close()
}
