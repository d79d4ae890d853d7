//go:build !unix

package agent

import "fmt"

func describe(path string) string { return fmt.Sprintf("%q", path) }

func callerFacts() string { return "" }
