package core

import "time"

// Observer is told what the agent does, for metrics (package agent/metrics
// has the Prometheus one). Its methods are called on the request path and
// must not block.
type Observer interface {
	// Signed is called once per sign request with its outcome; key is the
	// label when the agent has such a key (and did not deny it) and ""
	// otherwise, so that a caller's made-up labels never reach a metric.
	Signed(key string, o Outcome, d time.Duration)
	// KeysLoaded is called with the keys served, at start and after every reload.
	KeysLoaded(keys []Key)
	// HSMServing is called when the HSM stops answering and when it is back.
	HSMServing(serving bool)
	// AuditWritable is called when the audit trail stops taking records
	// and when it takes them again.
	AuditWritable(writable bool)
}

type nopObserver struct{}

func (nopObserver) Signed(string, Outcome, time.Duration) {}
func (nopObserver) KeysLoaded([]Key)                      {}
func (nopObserver) HSMServing(bool)                       {}
func (nopObserver) AuditWritable(bool)                    {}
