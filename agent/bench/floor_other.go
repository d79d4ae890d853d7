//go:build !linux

package bench

import (
	"context"
	"errors"
	"os"
	"time"
)

var errNoFloor = errors.New("bench: the machine's floor is measured on Linux only")

// Floor is measured on Linux only.
func Floor(context.Context, time.Duration, time.Duration, Spawn) (FloorResult, error) {
	return FloorResult{}, errNoFloor
}

// ServePeer is a process of the floor's chain, on Linux only.
func ServePeer(string, time.Duration, *os.File, *os.File) error { return errNoFloor }
