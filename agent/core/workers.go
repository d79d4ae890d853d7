package core

import (
	"sync/atomic"
	"time"
)

// workers runs functions in goroutines that outlive one call. A goroutine
// started per signature grows its stack on the HSM path (crypto11, cgo,
// ASN.1) every time; a worker keeps the stack it has grown. Workers beyond
// maxIdle leave when their call returns, the others after workerIdle
// without one.
type workers struct {
	tasks   chan func()
	maxIdle int32
	idle    atomic.Int32
	alive   atomic.Int32 // workers, busy or idle
}

// workerIdle is how long a worker waits for another call before leaving.
const workerIdle = 10 * time.Second

func newWorkers(maxIdle int) *workers {
	return &workers{tasks: make(chan func()), maxIdle: int32(maxIdle)}
}

// run calls f in an idle worker, or in a new one if none is idle.
func (w *workers) run(f func()) {
	select {
	case w.tasks <- f:
	default:
		w.alive.Add(1)
		go w.work(f)
	}
}

func (w *workers) work(f func()) {
	defer w.alive.Add(-1)
	timer := time.NewTimer(workerIdle)
	defer timer.Stop()
	for {
		f()
		if w.idle.Add(1) > w.maxIdle {
			w.idle.Add(-1)
			return
		}
		timer.Reset(workerIdle)
		select {
		case f = <-w.tasks:
			w.idle.Add(-1)
		case <-timer.C:
			w.idle.Add(-1)
			return
		}
	}
}
