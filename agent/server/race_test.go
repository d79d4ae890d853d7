//go:build race

package server_test

// raceEnabled: memory and time figures mean little under the race detector.
const raceEnabled = true
