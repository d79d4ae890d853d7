package hsm

import (
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"

	"github.com/ThalesGroup/crypto11"
	"github.com/miekg/pkcs11"
)

// Token is an open, logged-in PKCS#11 token. It is safe for concurrent use.
//
// When an operation fails because the session or login was lost (the HSM was
// restarted, another process logged out, the device was pulled), Token reopens
// the module, logs in again and retries the operation once.
type Token struct {
	cfg        Config
	modulePath string

	mu         sync.RWMutex // held for reading by every operation, for writing by reopen
	ctx        *crypto11.Context
	generation uint64 // incremented by every reopen; keys cached under an older one are looked up again
	closed     bool
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
	t := &Token{cfg: cfg, modulePath: path}
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
	ctx, err := crypto11.Configure(&crypto11.Config{
		Path:        t.modulePath,
		TokenLabel:  t.cfg.TokenLabel,
		TokenSerial: t.cfg.TokenSerial,
		Pin:         pin,
		MaxSessions: t.cfg.MaxSessions,
	})
	if err == nil {
		return ctx, nil
	}
	return nil, t.configureError(err)
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
		if info.Label == t.cfg.TokenLabel || (t.cfg.TokenSerial != "" && info.Serial == t.cfg.TokenSerial) {
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
	if t.ctx == nil {
		return nil
	}
	return t.ctx.Close()
}

// errUnavailable stands for a context that could not be reopened: the next
// operation tries again.
var errUnavailable = errors.New("hsm: the token could not be reopened after a lost session")

// do runs op with the current context. If op fails because the session was
// lost, the token is reopened and op runs once more.
func (t *Token) do(op func(ctx *crypto11.Context, generation uint64) error) error {
	for attempt := 0; ; attempt++ {
		t.mu.RLock()
		if t.closed {
			t.mu.RUnlock()
			return errors.New("hsm: token is closed")
		}
		ctx, gen := t.ctx, t.generation
		err := errUnavailable
		if ctx != nil {
			err = op(ctx, gen)
		}
		t.mu.RUnlock()
		if err == nil || attempt > 0 || (ctx != nil && !isSessionLost(err)) {
			return err
		}
		if rerr := t.reopen(gen); rerr != nil {
			return fmt.Errorf("%w; reopening the token failed: %w", explain(err), rerr)
		}
	}
}

// reopen replaces the context unless another caller already did since generation seen.
func (t *Token) reopen(seen uint64) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return errors.New("hsm: token is closed")
	}
	if t.generation != seen {
		return nil
	}
	t.generation++
	// Closing the last context finalises the module, which drops every session
	// the library still believes in; the new context starts from scratch.
	if t.ctx != nil {
		_ = t.ctx.Close()
	}
	ctx, err := t.configure()
	t.ctx = ctx // nil on failure: the next operation tries again
	return err
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
