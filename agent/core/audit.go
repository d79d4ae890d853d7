package core

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/hsmagent/hsmagent/agent/auditchain"
)

// auditLog numbers the audit records: each record written gets the next
// seq, so that a missing or repeated record shows as a gap or a repeat. The
// number is taken and the record written under one lock, so records reach
// the sink in seq order. Records the sink would drop (below its level) take
// no number: seq has no gaps among the records written. Refusals left out by
// the rationing take no number either; the "refusals suppressed" records
// count them.
//
// The trail fails closed: when a record cannot be written (a full disk, a
// read-only remount), the decision it records is not carried out: the
// caller gets Unavailable instead of its signature, and until a probe
// record written every a.every goes through, requests are refused
// before the HSM is asked. A failed record gives its seq back, so the file
// shows no gap for what was refused. With failOpen the agent signs on
// without records and the numbers skipped show as gaps.
type auditLog struct {
	h        slog.Handler
	log      *slog.Logger // operational log: one line per outage
	failOpen bool
	onChange func(writable bool) // health and metrics
	stop     chan struct{}       // closed by Shutdown: ends the probe
	every    time.Duration       // how often a failed trail is tried again

	down    atomic.Bool
	refused atomic.Int64 // decisions refused or unrecorded during this outage

	mu    sync.Mutex
	seq   uint64
	chain Chain // nil: records are not chained
}

// Chain is an audit sink that knows the hash of the last line it wrote
// (an AuditFile): each record then carries it as prev.
type Chain interface {
	LastLineHash() string
}

// head is the seq and line hash of the last record written.
func (a *auditLog) head() (uint64, string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.seq, a.chain.LastLineHash()
}

// errAuditDown is what write returns while the trail cannot be written.
var errAuditDown = errors.New("agent: the audit trail cannot be written")

func newAuditLog(l, log *slog.Logger, failOpen bool, probeEvery time.Duration, onChange func(bool)) *auditLog {
	return &auditLog{h: l.Handler(), log: log, failOpen: failOpen, onChange: onChange, stop: make(chan struct{}), every: probeEvery}
}

// refusing reports whether decisions are refused now for want of a trail.
func (a *auditLog) refusing() bool { return !a.failOpen && a.down.Load() }

// refuse counts a decision refused for want of a record.
func (a *auditLog) refuse() error {
	a.refused.Add(1)
	return errAuditDown
}

// write writes one record with attrs, then seq. It returns errAuditDown if
// the record was not written and the decision it records must not stand.
func (a *auditLog) write(ctx context.Context, level slog.Level, msg string, attrs ...slog.Attr) error {
	if !a.h.Enabled(ctx, level) {
		return nil
	}
	if a.refusing() {
		return a.refuse()
	}
	r := slog.NewRecord(time.Now(), level, msg, 0)
	r.AddAttrs(attrs...)
	if t := transportOf(ctx); t != "" {
		r.AddAttrs(slog.String("transport", t))
	}
	// Fail-open signs on: the number of a lost record stays used, a gap.
	err := a.numbered(ctx, r, !a.failOpen)
	if err == nil {
		return nil
	}
	a.refused.Add(1)
	a.failed(err)
	if a.failOpen {
		return nil
	}
	return errAuditDown
}

// numbered gives r the next seq and writes it; a record that fails gives
// its number back when giveBack is set.
func (a *auditLog) numbered(ctx context.Context, r slog.Record, giveBack bool) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.seq++
	r.AddAttrs(slog.Uint64("seq", a.seq))
	if a.chain != nil {
		r.AddAttrs(slog.String("prev", a.chain.LastLineHash()))
	}
	err := a.h.Handle(ctx, r)
	if err != nil && giveBack {
		a.seq--
	}
	return err
}

// failed starts an outage, once: a log line, health, and the probe.
func (a *auditLog) failed(err error) {
	if !a.down.CompareAndSwap(false, true) {
		return
	}
	if a.failOpen {
		a.log.Error("the audit trail cannot be written; SIGNING CONTINUES WITHOUT AUDIT RECORDS (audit_fail_open)", "err", err)
	} else {
		a.log.Error("the audit trail cannot be written; refusing every request until it can", "err", err)
	}
	a.onChange(false)
	go a.probe()
}

// probe writes an "audit resumed" record every a.every until one
// goes through, which ends the outage.
func (a *auditLog) probe() {
	t := time.NewTicker(a.every)
	defer t.Stop()
	for {
		select {
		case <-a.stop:
			return
		case <-t.C:
		}
		r := slog.NewRecord(time.Now(), slog.LevelWarn, "audit resumed", 0)
		r.AddAttrs(slog.Int64("refused", a.refused.Load()), slog.Bool("fail_open", a.failOpen))
		if a.numbered(context.Background(), r, true) != nil {
			continue
		}
		n := a.refused.Swap(0)
		a.down.Store(false)
		a.log.Info("the audit trail is written again; serving", "refused_meanwhile", n)
		a.onChange(true)
		return
	}
}

func (a *auditLog) close() {
	select {
	case <-a.stop:
	default:
		close(a.stop)
	}
}

// auditUnavailable is the refusal of a request whose record cannot be written.
func auditUnavailable() *gateError {
	return &gateError{AuditDown,
		"agent: the audit trail cannot be written, so nothing is signed; see the agent's log"}
}

// auditLabel is a caller's label as its record keeps it: cut at MaxLabel
// bytes on a character boundary (a cut character would make the line
// invalid UTF-8), with characters that are not printable, line and
// paragraph separators among them, written as \uXXXX so that no viewer
// breaks the record's line on them.
func auditLabel(label string) string {
	if len(label) > MaxLabel {
		cut := MaxLabel
		for cut > 0 && !utf8.RuneStart(label[cut]) {
			cut--
		}
		label = label[:cut]
	}
	if strings.IndexFunc(label, func(r rune) bool { return !unicode.IsPrint(r) }) < 0 {
		return label
	}
	var b strings.Builder
	for _, r := range label {
		if unicode.IsPrint(r) {
			b.WriteRune(r)
		} else {
			fmt.Fprintf(&b, "\\u%04x", r)
		}
	}
	return b.String()
}

// newRequestID returns 16 hex characters, random, so that ids are unique
// across restarts and say nothing about the agent's load.
func newRequestID() string {
	var b [8]byte
	rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// AuditFile is an append-only audit file that can be reopened at the same
// path, for logrotate: after the rename, Reopen starts the new file and
// closes the old one. Writes are never lost between the two.
type AuditFile struct {
	path string
	mu   sync.Mutex
	f    *os.File
	last string // hash of the last line in the file (auditchain.LineHash), "" if none
}

// OpenAuditFile opens path for appending, creating it 0600. The chain goes
// on from the file's last line: a restart does not break it.
func OpenAuditFile(path string) (*AuditFile, error) {
	f, err := openAppend(path)
	if err != nil {
		return nil, err
	}
	last, err := lastLineHash(path)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("server: audit log %q: reading its last line: %w", path, err)
	}
	return &AuditFile{path: path, f: f, last: last}, nil
}

// LastLineHash is the hash of the last record written, which the next
// record carries in its prev field.
func (a *AuditFile) LastLineHash() string {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.last
}

// lastLineHash reads the hash of the last complete line of path.
func lastLineHash(path string) (string, error) {
	if path == os.DevNull {
		return "", nil
	}
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil || fi.Size() == 0 {
		return "", err
	}
	// A record is a few hundred bytes; 64 KiB holds the last one whole.
	off := max(fi.Size()-64<<10, 0)
	buf := make([]byte, fi.Size()-off)
	if _, err := f.ReadAt(buf, off); err != nil {
		return "", err
	}
	end := bytes.LastIndexByte(buf, '\n')
	if end < 0 {
		return "", nil
	}
	start := bytes.LastIndexByte(buf[:end], '\n') + 1
	return auditchain.LineHash(buf[start : end+1]), nil
}

// openAppend opens the audit file as the socket is made: in a directory no
// one else can write (or a sticky one), never through a symbolic link,
// never blocking (a FIFO planted at the path is refused, not waited on),
// and only a regular file that no one else can write.
func openAppend(path string) (*os.File, error) {
	fail := func(format string, a ...any) error {
		return fmt.Errorf("server: audit log %q: %s", path, fmt.Sprintf(format, a...))
	}
	if path == os.DevNull { // records thrown away on purpose (hsmagent bench)
		return os.OpenFile(path, os.O_WRONLY, 0)
	}
	if err := checkAuditDir(filepath.Dir(path)); err != nil {
		return nil, fail("%v", err)
	}
	fd, err := syscall.Open(path, syscall.O_WRONLY|syscall.O_APPEND|syscall.O_CREAT|syscall.O_NOFOLLOW|syscall.O_NONBLOCK|syscall.O_CLOEXEC, 0o600)
	switch {
	case errors.Is(err, syscall.ELOOP):
		return nil, fail("is a symbolic link; give the path of a regular file")
	case errors.Is(err, syscall.ENXIO):
		return nil, fail("is a FIFO or socket, not a regular file")
	case err != nil:
		return nil, fail("opening: %v", err)
	}
	f := os.NewFile(uintptr(fd), path)
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, fail("%v", err)
	}
	st, _ := fi.Sys().(*syscall.Stat_t)
	switch euid := os.Geteuid(); {
	case !fi.Mode().IsRegular():
		err = fail("is not a regular file (%v)", fi.Mode().Type())
	case st != nil && int(st.Uid) != euid && st.Uid != 0:
		err = fail("is owned by uid %d, not the agent's uid %d or root; chown it or remove it", st.Uid, euid)
	case fi.Mode().Perm()&0o022 != 0:
		err = fail("is writable by others (mode %04o); chmod go-w %q", fi.Mode().Perm(), path)
	}
	if err == nil {
		err = syscall.SetNonblock(fd, false)
	}
	if err != nil {
		f.Close()
		return nil, err
	}
	return f, nil
}

// checkAuditDir refuses a directory that another user could use to put a
// link or a FIFO at the audit file's path.
func checkAuditDir(dir string) error {
	fi, err := os.Stat(dir)
	if err != nil {
		return fmt.Errorf("its directory: %w", err)
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok || !fi.IsDir() {
		return fmt.Errorf("%q is not a directory", dir)
	}
	euid := os.Geteuid()
	if owner := int(st.Uid); owner != 0 && owner != euid {
		return fmt.Errorf("its directory %q is owned by uid %d, not the agent's uid %d or root: its owner could replace the file; use a directory such as /var/log/hsmagent", dir, owner, euid)
	}
	if fi.Mode()&os.ModeSticky == 0 && fi.Mode().Perm()&0o022 != 0 {
		return fmt.Errorf("its directory %q is writable by others (mode %04o): they could replace the file; chmod go-w %q", dir, fi.Mode().Perm(), dir)
	}
	return nil
}

// Write implements io.Writer; one call is one record. A record cut short
// (the disk filled in the middle of it) is cut off again, so that the next
// record does not land on the end of a broken line.
func (a *AuditFile) Write(p []byte) (int, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	n, err := a.f.Write(p)
	if err == nil {
		a.last = auditchain.LineHash(p)
	}
	if err != nil && n > 0 {
		if st, serr := a.f.Stat(); serr == nil && st.Size() >= int64(n) {
			a.f.Truncate(st.Size() - int64(n))
		}
	}
	return n, err
}

// Reopen opens the path again and switches to it; the chain goes on from
// the last line of the file before. On error the current file stays in use.
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
