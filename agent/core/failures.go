package core

import (
	"errors"
	"sync"
	"time"
)

// backendDown reports whether a signer's error says the key store's backend
// is down (see KeyStore): the agent answers Unavailable, not Internal.
func backendDown(err error) bool {
	var u interface{ Unavailable() bool }
	return errors.As(err, &u) && u.Unavailable()
}

// sampler lets one log line through per interval and counts the others, so
// that an HSM failing every request does not fill the log.
type sampler struct {
	interval time.Duration

	mu      sync.Mutex
	last    time.Time
	dropped int
}

// allow reports whether a line may be logged now, and how many were held
// back since the last one.
func (s *sampler) allow() (dropped int, ok bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	now := time.Now()
	if !s.last.IsZero() && now.Sub(s.last) < s.interval {
		s.dropped++
		return 0, false
	}
	dropped, s.last, s.dropped = s.dropped, now, 0
	return dropped, true
}
