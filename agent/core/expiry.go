package core

import (
	"fmt"
	"log/slog"
	"sync"
	"time"
)

// expiryThresholds are the days before a certificate's not-after at which
// the log warns, most distant first.
var expiryThresholds = []int{30, 14, 7, 1}

// expiryBand says how close a certificate with left to live is to expiry:
// -1 not within the first threshold, i for expiryThresholds[i], and
// len(expiryThresholds) once expired. Higher is more urgent.
func expiryBand(left time.Duration) int {
	if left <= 0 {
		return len(expiryThresholds)
	}
	band := -1
	for i, d := range expiryThresholds {
		if left <= time.Duration(d)*24*time.Hour {
			band = i
		}
	}
	return band
}

// expiryWatch logs each stored certificate once per band it enters, so a
// certificate is announced at 30, 14, 7 and 1 days and on expiry, not every
// day; a start or reload announces every certificate in a band again.
type expiryWatch struct {
	mu     sync.Mutex
	now    func() time.Time
	log    *slog.Logger
	warned map[string]expiryMark // key label -> what was last announced
}

type expiryMark struct {
	notAfter int64
	band     int
}

func newExpiryWatch(now func() time.Time, log *slog.Logger) *expiryWatch {
	if now == nil {
		now = time.Now
	}
	return &expiryWatch{now: now, log: log, warned: map[string]expiryMark{}}
}

// check looks at st's certificates; all (at start and reload) announces
// every certificate in a band, not only those that entered a new one.
func (w *expiryWatch) check(st *state, all bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	now := w.now()
	if all {
		w.warned = map[string]expiryMark{}
	}
	for _, label := range st.labels {
		na := st.keys[label].proto.NotAfterUnix
		if na == 0 {
			delete(w.warned, label) // no certificate: nothing to expire
			continue
		}
		notAfter := time.Unix(na, 0).UTC()
		left := notAfter.Sub(now)
		band := expiryBand(left)
		prev, seen := w.warned[label]
		if band < 0 {
			delete(w.warned, label)
			continue
		}
		if seen && prev.notAfter == na && prev.band >= band {
			continue
		}
		w.warned[label] = expiryMark{na, band}
		days := int(left / (24 * time.Hour))
		if band == len(expiryThresholds) {
			w.log.Error(fmt.Sprintf("the certificate of key %q has expired; import a renewed one with 'hsmagent cert import' and reload the agent", label),
				"key", label, "not_after", notAfter, "days_left", days)
			continue
		}
		w.log.Warn(fmt.Sprintf("the certificate of key %q expires within %d days; import a renewed one with 'hsmagent cert import' and reload the agent", label, expiryThresholds[band]),
			"key", label, "not_after", notAfter, "days_left", days, "threshold_days", expiryThresholds[band])
	}
}

// keysLoaded is called with each state New and Reload install.
func (c *Core) keysLoaded(st *state) {
	c.expiry.check(st, true)
}

// watchExpiry checks the certificates every interval until Shutdown.
func (c *Core) watchExpiry(every time.Duration) {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-t.C:
			c.expiry.check(c.state.Load(), false)
		case <-c.stopping:
			return
		}
	}
}
