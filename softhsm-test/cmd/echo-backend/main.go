// Command echo-backend is the plain-HTTP backend of the demo: it answers each
// request with what the server proxy told it about the D1 caller.
//
//	echo-backend 127.0.0.1:9000
package main

import (
	"fmt"
	"net/http"
	"os"
	"time"
)

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: echo-backend ADDR")
		os.Exit(2)
	}
	srv := &http.Server{Addr: os.Args[1], ReadHeaderTimeout: 5 * time.Second, Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "backend: %s %s\n", r.Method, r.URL.Path)
		for _, h := range []string{"X-D1-Client-Subject", "X-D1-Client-Serial", "X-D1-Client-Fingerprint", "X-Forwarded-For"} {
			fmt.Fprintf(w, "backend: %s: %s\n", h, r.Header.Get(h))
		}
	})}
	if err := srv.ListenAndServe(); err != nil {
		fmt.Fprintln(os.Stderr, "echo-backend:", err)
		os.Exit(1)
	}
}
