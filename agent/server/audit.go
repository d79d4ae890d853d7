package server

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
)

// auditLog numbers the audit records: each record written gets the next
// seq, so that a missing or repeated record shows as a gap or a repeat. The
// number is taken and the record written under one lock, so records reach
// the sink in seq order. Records the sink would drop (below its level) take
// no number: seq has no gaps among the records written. Refusals left out by
// the rationing take no number either; the "refusals suppressed" records
// count them.
type auditLog struct {
	h   slog.Handler
	mu  sync.Mutex
	seq uint64
}

func newAuditLog(l *slog.Logger) *auditLog { return &auditLog{h: l.Handler()} }

// write writes one record with attrs, then seq.
func (a *auditLog) write(ctx context.Context, level slog.Level, msg string, attrs ...slog.Attr) {
	if !a.h.Enabled(ctx, level) {
		return
	}
	r := slog.NewRecord(time.Now(), level, msg, 0)
	r.AddAttrs(attrs...)
	a.mu.Lock()
	defer a.mu.Unlock()
	a.seq++
	r.AddAttrs(slog.Uint64("seq", a.seq))
	_ = a.h.Handle(ctx, r) // nowhere better to report it: the sink is the log
}

// newRequestID returns 16 hex characters, random, so that ids are unique
// across restarts and say nothing about the agent's load.
func newRequestID() string {
	var b [8]byte
	rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// withRequestID appends the request id to a message a client sees, in the
// form the Go client (agent.CallError) takes apart again.
func withRequestID(msg, id string) string {
	return msg + " (request " + id + ")"
}

// RequestIDTrailer is the gRPC trailer of Sign and ListKeys that carries
// the call's request id, as written in its audit record.
const RequestIDTrailer = "hsmagent-request-id"

func sendRequestID(ctx context.Context, id string) {
	// An error means the stream is gone: nobody is left to read it.
	_ = grpc.SetTrailer(ctx, metadata.Pairs(RequestIDTrailer, id))
}

// AuditFile is an append-only audit file that can be reopened at the same
// path, for logrotate: after the rename, Reopen starts the new file and
// closes the old one. Writes are never lost between the two.
type AuditFile struct {
	path string
	mu   sync.Mutex
	f    *os.File
}

// OpenAuditFile opens path for appending, creating it 0600.
func OpenAuditFile(path string) (*AuditFile, error) {
	f, err := openAppend(path)
	if err != nil {
		return nil, err
	}
	return &AuditFile{path: path, f: f}, nil
}

func openAppend(path string) (*os.File, error) {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("server: opening audit log %q: %w", path, err)
	}
	return f, nil
}

// Write implements io.Writer; one call is one record.
func (a *AuditFile) Write(p []byte) (int, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.f.Write(p)
}

// Reopen opens the path again and switches to it. On error the current file
// stays in use.
func (a *AuditFile) Reopen() error {
	f, err := openAppend(a.path)
	if err != nil {
		return err
	}
	a.mu.Lock()
	old := a.f
	a.f = f
	a.mu.Unlock()
	return old.Close()
}

// Close closes the file.
func (a *AuditFile) Close() error {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.f.Close()
}
