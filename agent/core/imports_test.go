package core

import (
	"go/build"
	"strings"
	"testing"
)

// TestNoTransport keeps the core free of transports: no gRPC and no
// network package, so that its tests run without sockets and a new
// transport is an adapter, not a change here.
func TestNoTransport(t *testing.T) {
	pkg, err := build.ImportDir(".", 0)
	if err != nil {
		t.Fatal(err)
	}
	for _, imp := range pkg.Imports {
		if imp == "net" || strings.HasPrefix(imp, "net/") || strings.HasPrefix(imp, "google.golang.org/grpc") {
			t.Errorf("package core imports %s", imp)
		}
	}
}
