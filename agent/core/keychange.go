package core

import (
	"errors"
	"fmt"
	"sync"
	"time"
)

// keyChangeReloadInterval spaces the reloads that key changes trigger, so
// that a store which keeps reporting a change cannot make every request reload.
const keyChangeReloadInterval = time.Second

// isKeyChanged reports whether a signer's error says its key was replaced
// (the KeyChangedError contract in keystore.go).
func isKeyChanged(err error) bool {
	var kc KeyChangedError
	return errors.As(err, &kc) && kc.KeyChanged()
}

// keyChanges coalesces the reloads that replaced keys trigger: one runs at a
// time, and the requests that find a change while it runs ask for one more.
type keyChanges struct {
	mu      sync.Mutex
	logged  map[string]bool // label and old public key: one log line per replaced key
	running bool
	again   bool
	last    time.Time // start of the last reload
}

// keyChanged handles a signer's KeyChanged error for the key in entry e: it
// logs the change once, starts a reload that picks up the new public key (and
// tells WatchKeys clients), and returns the caller's refusal.
//
// The code is FailedPrecondition, not Unavailable: retrying the same call is
// wrong until the caller has fetched the new public key (ListKeys, WatchKeys),
// since the next signature will be made with the new key.
func (c *Core) keyChanged(label string, e *entry, err error) *gateError {
	k := &c.keyChanges
	id := label + "\x00" + string(e.proto.PublicKey)
	k.mu.Lock()
	first := !k.logged[id]
	if first {
		if k.logged == nil {
			k.logged = make(map[string]bool)
		}
		k.logged[id] = true
	}
	start := !k.running
	if start {
		k.running = true
	} else {
		k.again = true
	}
	k.mu.Unlock()
	if first {
		c.log.Warn("a key was replaced in the key store: refusing to sign with it and reloading the keys", "key", label, "err", err)
	}
	if start {
		go c.reloadAfterKeyChange()
	}
	return &gateError{KeyChanged, fmt.Sprintf(
		"agent: key %q was replaced in the key store since the agent loaded it; the agent is reloading its keys: fetch the public key again (ListKeys or WatchKeys) before signing", label)}
}

func (c *Core) reloadAfterKeyChange() {
	k := &c.keyChanges
	for {
		k.mu.Lock()
		wait := time.Until(k.last.Add(keyChangeReloadInterval))
		k.mu.Unlock()
		if wait > 0 {
			time.Sleep(wait)
		}
		if c.isStopping() {
			k.mu.Lock()
			k.running, k.again = false, false
			k.mu.Unlock()
			return
		}
		k.mu.Lock()
		k.last, k.again = time.Now(), false
		k.mu.Unlock()
		before := c.Revision()
		if err := c.Reload(nil); err != nil {
			c.log.Error("reloading the keys after a key change failed; the previous keys stay", "err", err)
		} else {
			c.log.Info("keys reloaded after a key change", "revision", c.Revision(), "previous_revision", before)
		}
		k.mu.Lock()
		if !k.again {
			k.running = false
			k.mu.Unlock()
			return
		}
		k.mu.Unlock()
	}
}
