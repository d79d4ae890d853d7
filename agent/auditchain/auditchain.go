// Package auditchain makes the agent's audit trail tamper-evident and
// checks it. Each record carries, in its prev field, the SHA-256 of the
// line before it (across rotated files and restarts), so that deleting,
// inserting, editing or reordering a line breaks the chain at the next
// one; and a checkpoint record now and then carries a signature, made with
// a key in the HSM, over the hash of the last line written and its seq,
// so that the chain up to there cannot be rewritten whole without the key.
package auditchain

import (
	"bufio"
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/rsa"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strconv"
	"time"
)

// CheckpointMsg is the msg of a checkpoint record.
const CheckpointMsg = "audit checkpoint"

// LineHash is the hash a record's successor carries in prev: of its line
// as written, newline included.
func LineHash(line []byte) string {
	h := sha256.Sum256(line)
	return hex.EncodeToString(h[:])
}

// CheckpointDigest is what a checkpoint signs (with SHA-256 as the
// signature's hash): the hash of the last line written and that record's seq.
func CheckpointDigest(head string, seq uint64) []byte {
	h := sha256.Sum256([]byte("hsmagent audit checkpoint\x00" + head + "\x00" + strconv.FormatUint(seq, 10)))
	return h[:]
}

// record is what Verify reads of a line.
type record struct {
	Time      time.Time `json:"time"`
	Msg       string    `json:"msg"`
	Seq       *uint64   `json:"seq"`
	Prev      *string   `json:"prev"`
	CoversSeq uint64    `json:"covers_seq"`
	Covers    string    `json:"covers"`
	Sig       string    `json:"sig"`
}

// Report is what Verify found.
type Report struct {
	Files, Records int
	Checkpoints    int // verified
	// Uncovered counts the records after the last verified checkpoint: a
	// truncation among them would not show.
	Uncovered int
	// Starts counts the records that begin a chain (prev empty: an agent
	// that started on an empty file), the first one included.
	Starts int
	// MidChain: the first record's prev names a line not in the files (an
	// older file is missing).
	MidChain bool
}

// Break is where the trail stops being what the agent wrote.
type Break struct {
	File string
	Line int    // in File, from 1
	Seq  uint64 // of the record, 0 if it has none
	Why  string
}

func (b *Break) Error() string {
	seq := ""
	if b.Seq > 0 {
		seq = fmt.Sprintf(" (seq %d)", b.Seq)
	}
	return fmt.Sprintf("%s line %d%s: %s", b.File, b.Line, seq, b.Why)
}

// Verify reads files, in the order they were written (the oldest rotated
// file first), and checks the chain and every checkpoint with pub. A
// broken trail is a *Break; other errors are reading errors.
func Verify(files []string, pub crypto.PublicKey) (Report, error) {
	v := &verifier{pub: pub, seen: map[string]line{}, covered: -1}
	for _, name := range files {
		f, err := os.Open(name)
		if err != nil {
			return v.r, err
		}
		err = v.file(name, f)
		f.Close()
		if err != nil {
			return v.r, err
		}
		v.r.Files++
	}
	v.r.Uncovered = v.r.Records - 1 - v.covered
	return v.r, nil
}

type line struct {
	index int
	seq   uint64
}

type verifier struct {
	pub     crypto.PublicKey
	r       Report
	last    string          // hash of the previous line
	lastAt  time.Time       // its time
	seen    map[string]line // line hash -> where
	covered int             // index of the last record a checkpoint covers
}

func (v *verifier) file(name string, rd io.Reader) error {
	br := bufio.NewReaderSize(rd, 64<<10)
	for n := 1; ; n++ {
		text, err := br.ReadBytes('\n')
		if err == io.EOF && len(text) == 0 {
			return nil
		}
		if err != nil && err != io.EOF {
			return err
		}
		if !bytes.HasSuffix(text, []byte("\n")) {
			return &Break{name, n, 0, "the last line is cut short (the file was truncated, or a write was torn)"}
		}
		if err := v.line(name, n, text); err != nil {
			return err
		}
	}
}

func (v *verifier) line(name string, n int, text []byte) error {
	var rec record
	if err := json.Unmarshal(text, &rec); err != nil {
		return &Break{name, n, 0, "not a JSON record: edited, or not an audit file"}
	}
	seq := uint64(0)
	if rec.Seq != nil {
		seq = *rec.Seq
	}
	fail := func(format string, a ...any) error { return &Break{name, n, seq, fmt.Sprintf(format, a...)} }
	first := v.r.Records == 0
	switch {
	case rec.Prev == nil:
		return fail("the record has no prev field: written by an agent without a chained audit file, or edited")
	case *rec.Prev == "" && n != 1:
		return fail("its prev is empty in the middle of a file: edited")
	case *rec.Prev == "" && rec.Time.Before(v.lastAt):
		return fail("a chain starts here with a record older than the one before it: give the files oldest first")
	case *rec.Prev == "":
		v.r.Starts++ // an agent started on an empty file
	case first:
		v.r.MidChain = true
	case *rec.Prev != v.last:
		return fail("its prev is not the hash of the line before it: that line was edited, or records were deleted, inserted or moved between them")
	}
	h := LineHash(text)
	v.seen[h] = line{index: v.r.Records, seq: seq}
	v.last, v.lastAt = h, rec.Time
	v.r.Records++
	if rec.Msg != CheckpointMsg {
		return nil
	}
	at, ok := v.seen[rec.Covers]
	switch {
	case !ok:
		return fail("the checkpoint covers a record that is not in these files (give every file, oldest first)")
	case at.seq != rec.CoversSeq:
		return fail("the checkpoint covers seq %d, but the record it names has seq %d", rec.CoversSeq, at.seq)
	}
	sig, err := base64.StdEncoding.DecodeString(rec.Sig)
	if err != nil || !verifySig(v.pub, CheckpointDigest(rec.Covers, rec.CoversSeq), sig) {
		return fail("the checkpoint's signature does not verify with the key given: forged, edited, or another key")
	}
	v.r.Checkpoints++
	v.covered = max(v.covered, at.index)
	return nil
}

func verifySig(pub crypto.PublicKey, digest, sig []byte) bool {
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		return ecdsa.VerifyASN1(k, digest, sig)
	case *rsa.PublicKey:
		return rsa.VerifyPKCS1v15(k, crypto.SHA256, digest, sig) == nil
	}
	return false
}
