package server

import "time"

// SetExpiryCheckEvery shortens the daily certificate check for a test.
func SetExpiryCheckEvery(d time.Duration) (restore func()) {
	old := expiryCheckEvery
	expiryCheckEvery = d
	return func() { expiryCheckEvery = old }
}

// ExpiryBand exposes expiryBand to the tests.
var ExpiryBand = expiryBand
