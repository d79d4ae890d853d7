package hsm

import (
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ThalesGroup/crypto11"
	"github.com/miekg/pkcs11"
)

// Token is an open, logged-in PKCS#11 token. It is safe for concurrent use.
//
// When an operation fails because the session or login was lost (the HSM was
// restarted, another process logged out, the device was pulled), Token reopens
// the module, logs in again and retries the operation once. When the reopen
// fails too, the token is unavailable: operations fail at once with an
// *UnavailableError, without touching the module, while a goroutine reopens it
// at a backed-off rate (ReopenMin doubling to ReopenMax, with jitter). The
// outage is logged once when it starts and once when it ends.
type Token struct {
	cfg        Config
	modulePath string
	log        *slog.Logger

	mu         sync.RWMutex // held for reading by every operation, for writing by reopen
	ctx        *crypto11.Context
	generation uint64 // incremented by every reopen; keys cached under an older one are looked up again
	closed     bool
	done       chan struct{} // closed by Close: stops the recovery goroutine
	down       *outage       // non-nil while the token is unavailable

	// A reopen that succeeds but does not cure the error (a device that
	// keeps failing) is not repeated for each request: the next one waits
	// until nextReopen, with a delay that doubles up to ReopenMax.
	churning   atomic.Bool // a reopen did not help; cleared by the next success
	churnDelay time.Duration
	nextReopen time.Time
}

// outage is the state of an unavailable token.
type outage struct {
	since time.Time
	cause error     // why the token went away, as the failed operation saw it
	next  time.Time // when the next reopen is attempted
}

// Open loads the module, finds the token and logs in with the configured PIN.
func Open(cfg Config) (*Token, error) {
	path, err := cfg.modulePath()
	if err != nil {
		return nil, err
	}
	if cfg.TokenLabel == "" && cfg.TokenSerial == "" {
		return nil, errors.New("hsm: no token selected; pass --token LABEL, --token-serial SERIAL or --uri")
	}
	if cfg.PIN == nil {
		return nil, errors.New("hsm: no PIN source; pass --pin-file, set HSMAGENT_PIN or run on a terminal")
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	t := &Token{cfg: cfg, modulePath: path, log: log, done: make(chan struct{})}
	ctx, err := t.configure()
	if err != nil {
		return nil, err
	}
	t.ctx = ctx
	return t, nil
}

func (t *Token) configure() (*crypto11.Context, error) {
	pin, err := t.cfg.PIN()
	if err != nil {
		return nil, err
	}
	ctx, err := t.configureWith(pin)
	if err != nil {
		return nil, t.configureError(err)
	}
	return ctx, nil
}

// configureRaw opens the token without classifying a failure: during an
// outage, listing the slots to explain it would load the module once more
// per attempt.
func (t *Token) configureRaw() (*crypto11.Context, error) {
	pin, err := t.cfg.PIN()
	if err != nil {
		return nil, err
	}
	return t.configureWith(pin)
}

func (t *Token) configureWith(pin string) (*crypto11.Context, error) {
	return crypto11.Configure(&crypto11.Config{
		Path:        t.modulePath,
		TokenLabel:  t.cfg.TokenLabel,
		TokenSerial: t.cfg.TokenSerial,
		Pin:         pin,
		MaxSessions: t.cfg.MaxSessions,
	})
}

// configureError classifies a failure to open the token without reading
// crypto11's error text: by looking at the module's slots ourselves (a module
// that does not load or initialise, a token that is not there), then by the
// PKCS#11 return code.
func (t *Token) configureError(err error) error {
	infos, listErr := ListTokens(t.modulePath)
	if listErr != nil {
		return fmt.Errorf("hsm: cannot load PKCS#11 module %q%s: %w", t.modulePath, moduleHint(t.modulePath), err)
	}
	var rv pkcs11.Error
	if errors.As(err, &rv) {
		return fmt.Errorf("hsm: opening %s: %w", t.cfg.tokenName(), explain(err))
	}
	for _, info := range infos {
		if (t.cfg.TokenLabel != "" && info.Label == t.cfg.TokenLabel) || (t.cfg.TokenSerial != "" && info.Serial == t.cfg.TokenSerial) {
			return fmt.Errorf("hsm: opening %s: %w", t.cfg.tokenName(), err)
		}
	}
	return t.tokenNotFound(infos)
}

// tokenNotFound builds the error for a missing token, naming the tokens that exist.
func (t *Token) tokenNotFound(infos []TokenInfo) error {
	var labels []string
	for _, info := range infos {
		if !info.Initialized {
			continue
		}
		labels = append(labels, fmt.Sprintf("%q (serial %s)", info.Label, info.Serial))
	}
	if len(labels) == 0 {
		return fmt.Errorf("hsm: %s not found in module %q (it has no initialised token)", t.cfg.tokenName(), t.modulePath)
	}
	return fmt.Errorf("hsm: %s not found; tokens present: %s", t.cfg.tokenName(), strings.Join(labels, ", "))
}

// Label is the label of the token as configured (or its serial when selected by serial).
func (t *Token) Label() string {
	if t.cfg.TokenLabel != "" {
		return t.cfg.TokenLabel
	}
	return t.cfg.TokenSerial
}

// Close logs out and unloads the module when no other Token uses it.
func (t *Token) Close() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return nil
	}
	t.closed = true
	close(t.done)
	if t.ctx == nil {
		return nil
	}
	return t.ctx.Close()
}

// do runs op with the current context. If op fails because the session was
// lost, the token is reopened and op runs once more. While the token is
// unavailable, do fails at once.
func (t *Token) do(op func(ctx *crypto11.Context, generation uint64) error) error {
	return t.retrying(t.mu.RLock, t.mu.RUnlock, op)
}

// doExclusive is do with the token's lock held for writing: no other call
// runs beside op (a relabelling that a signature must not see halfway).
func (t *Token) doExclusive(op func() error) error {
	return t.retrying(t.mu.Lock, t.mu.Unlock, func(*crypto11.Context, uint64) error { return op() })
}

// retrying is do and doExclusive, with t.mu taken by lock and unlock.
func (t *Token) retrying(lock, unlock func(), op func(ctx *crypto11.Context, generation uint64) error) error {
	for attempt := 0; ; attempt++ {
		lock()
		if t.closed {
			unlock()
			return errors.New("hsm: token is closed")
		}
		if t.down != nil {
			err := t.unavailable()
			unlock()
			return err
		}
		ctx, gen := t.ctx, t.generation
		err := op(ctx, gen)
		unlock()
		switch {
		case err == nil:
			if t.churning.Load() {
				t.cured()
			}
			return nil
		case !isSessionLost(err):
			return err
		case attempt > 0:
			t.reopenDidNotHelp()
			return explain(err)
		}
		if again, rerr := t.reopen(gen, err); rerr != nil {
			return rerr
		} else if !again {
			return explain(err)
		}
	}
}

// reopen replaces the context unless another caller already did since
// generation seen, and reports whether the operation should run again. When
// the module cannot be opened, the token becomes unavailable and the error
// says so.
func (t *Token) reopen(seen uint64, cause error) (again bool, err error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	switch {
	case t.closed:
		return false, errors.New("hsm: token is closed")
	case t.down != nil:
		return false, t.unavailable()
	case t.generation != seen:
		return true, nil
	case time.Now().Before(t.nextReopen):
		return false, nil // a reopen just now did not help; the caller gets op's error
	}
	t.generation++
	// Closing the last context finalises the module, which drops every session
	// the library still believes in; the new context starts from scratch.
	if t.ctx != nil {
		_ = t.ctx.Close()
	}
	ctx, err := t.configure()
	t.ctx = ctx
	t.cfg.reopened(err == nil)
	if err != nil {
		t.goDown(explain(cause), err)
		return false, t.unavailable()
	}
	return true, nil
}

// reopenDidNotHelp backs off further reopens after one that was followed by
// the same kind of error at once.
func (t *Token) reopenDidNotHelp() {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.churnDelay = min(max(2*t.churnDelay, t.cfg.reopenMin()), t.cfg.reopenMax())
	t.nextReopen = time.Now().Add(jitter(t.churnDelay))
	t.churning.Store(true)
}

// cured forgets the reopen backoff after an operation succeeded.
func (t *Token) cured() {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.churnDelay, t.nextReopen = 0, time.Time{}
	t.churning.Store(false)
}

// goDown marks the token unavailable and starts the goroutine that reopens
// it. t.mu is held for writing.
func (t *Token) goDown(cause, reopenErr error) {
	now := time.Now()
	t.down = &outage{since: now, cause: cause, next: now.Add(jitter(t.cfg.reopenMin()))}
	t.log.Error("HSM token unavailable: operations fail at once until it can be reopened",
		"token", t.Label(), "err", cause, "reopen_err", reopenErr)
	go t.recoverToken(t.down)
}

// recoverToken tries to reopen the token at a backed-off rate until it
// succeeds or the token is closed.
func (t *Token) recoverToken(o *outage) {
	delay := t.cfg.reopenMin()
	for {
		t.mu.RLock()
		wait := time.Until(o.next)
		t.mu.RUnlock()
		timer := time.NewTimer(wait)
		select {
		case <-t.done:
			timer.Stop()
			return
		case <-timer.C:
		}
		// Opened outside the lock: operations keep failing fast meanwhile,
		// even if the module takes long to answer.
		ctx, err := t.configureRaw()
		t.cfg.reopened(err == nil)
		t.mu.Lock()
		if t.closed {
			t.mu.Unlock()
			if ctx != nil {
				_ = ctx.Close()
			}
			return
		}
		if err == nil {
			t.ctx, t.down = ctx, nil
			t.generation++
			t.churnDelay, t.nextReopen = 0, time.Time{}
			t.churning.Store(false)
			// Said before the token is usable again, so the line never trails a signature.
			t.log.Info("HSM token available again", "token", t.Label(), "outage", time.Since(o.since).Round(time.Millisecond))
			t.mu.Unlock()
			return
		}
		delay = min(2*delay, t.cfg.reopenMax())
		o.next = time.Now().Add(jitter(delay))
		t.mu.Unlock()
		t.log.Debug("HSM token still unavailable", "token", t.Label(), "err", explain(err), "retry_in", time.Until(o.next).Round(time.Millisecond))
	}
}

// unavailable is the error of an operation refused during an outage. t.mu is held.
func (t *Token) unavailable() error {
	return &UnavailableError{Token: t.cfg.tokenName(), Cause: t.down.cause, Since: t.down.since, RetryIn: time.Until(t.down.next)}
}

// jitter spreads d over [0.8d, 1.2d) so that agents sharing an HSM do not reopen in step.
func jitter(d time.Duration) time.Duration {
	return d*4/5 + rand.N(d*2/5+1)
}

// TokenInfo describes a token found in a module's slots.
type TokenInfo struct {
	Label         string `json:"label"`
	Serial        string `json:"serial"`
	Model         string `json:"model"`
	Manufacturer  string `json:"manufacturer"`
	Initialized   bool   `json:"initialized"`
	LoginRequired bool   `json:"loginRequired"`
	UserPINLocked bool   `json:"userPinLocked,omitempty"`
}

// ListTokens lists the tokens present in the module's slots.
func ListTokens(modulePath string) ([]TokenInfo, error) {
	if modulePath == "" {
		modulePath = DefaultModulePath()
	}
	path, err := Config{ModulePath: modulePath}.modulePath()
	if err != nil {
		return nil, err
	}
	p := pkcs11.New(path)
	if p == nil {
		return nil, fmt.Errorf("hsm: cannot load PKCS#11 module %q: not a PKCS#11 library", path)
	}
	initErr := p.Initialize()
	alreadyInit := errors.Is(initErr, pkcs11.Error(pkcs11.CKR_CRYPTOKI_ALREADY_INITIALIZED))
	if initErr != nil && !alreadyInit {
		p.Destroy()
		return nil, fmt.Errorf("hsm: initialising PKCS#11 module %q%s: %w", path, moduleHint(path), initErr)
	}
	if !alreadyInit {
		// Only finalise what this call initialised: another user in this
		// process (a crypto11 context) would lose its sessions.
		defer func() { _ = p.Finalize(); p.Destroy() }()
	}
	slots, err := p.GetSlotList(true)
	if err != nil {
		return nil, fmt.Errorf("hsm: listing slots of %q: %w", path, explain(err))
	}
	var out []TokenInfo
	for _, slot := range slots {
		ti, err := p.GetTokenInfo(slot)
		if err != nil {
			return nil, fmt.Errorf("hsm: reading token in slot %d: %w", slot, explain(err))
		}
		out = append(out, TokenInfo{
			Label:         strings.TrimRight(ti.Label, " \x00"),
			Serial:        strings.TrimRight(ti.SerialNumber, " \x00"),
			Model:         strings.TrimRight(ti.Model, " \x00"),
			Manufacturer:  strings.TrimRight(ti.ManufacturerID, " \x00"),
			Initialized:   ti.Flags&pkcs11.CKF_TOKEN_INITIALIZED != 0,
			LoginRequired: ti.Flags&pkcs11.CKF_LOGIN_REQUIRED != 0,
			UserPINLocked: ti.Flags&pkcs11.CKF_USER_PIN_LOCKED != 0,
		})
	}
	return out, nil
}

// moduleHint says where to look when a module fails to initialise: for
// SoftHSM that is nearly always its configuration file.
func moduleHint(path string) string {
	if !strings.Contains(path, "softhsm") {
		return ""
	}
	conf := os.Getenv("SOFTHSM2_CONF")
	if conf == "" {
		conf = "/etc/softhsm/softhsm2.conf"
	}
	return fmt.Sprintf(" (SoftHSM: check the configuration file %q and that its directories.tokendir exists)", conf)
}
