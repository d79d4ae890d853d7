// Package worker contains the vendor's PKCS#11 module: the agent's HSM
// calls run in a worker process (the same binary, started by serve), so
// that a module that crashes takes down only the worker, and a call that
// never returns only holds the worker's thread. The agent supervises it:
// a worker that dies is replaced and logged in again, with backoff; one
// whose calls stay stuck past a bound is killed and replaced.
//
// Agent and worker speak a small framed protocol over a socketpair: a
// 4-byte length, then a message. The agent's side (Start, Store) needs no
// cgo; the worker's (Serve) is handed a KeyStore opened on the token.
package worker

import (
	"crypto"
	"crypto/rsa"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// Message types, the first byte of each message.
const (
	msgInit byte = iota + 1 // agent to worker: config and PIN (JSON); answered once
	msgKeys                 // the keys with their chains (JSON answer)
	msgSign                 // one signature
	// The Admin operations, JSON both ways (admin.go).
	msgGenerate // a key pair generated; answered with its PKIX public key
	msgDelete   // a key pair destroyed with its chain
	msgSetChain // a certificate chain stored with a key
	msgPromote  // a key's successor promoted; answered with the retired label
	msgEnd      // one past the last type: a new type goes before it
)

// Statuses of an answer.
const (
	statusOK          byte = iota
	statusUnavailable      // the token is down: the key store's Unavailable()
	statusKeyChanged       // the label names another key now: KeyChanged()
	statusNotFound         // no key has the label
	statusFailed           // any other error
)

// maxMessage bounds a message: a key list with its chains is the largest.
const maxMessage = 4 << 20

// maxPacket bounds a message on the signatures socket, either way: a
// request's label and digest, or a signature or an error's text.
const maxPacket = 4 << 10

// header is a message's type and id; answers carry their request's id.
const header = 1 + 8

// signRequest is one signature asked of the worker. Fingerprint is the
// SHA-256 of the public key the agent advertises for Label: a worker
// whose key under Label differs answers statusKeyChanged, never signs
// with a key the agent did not offer.
type signRequest struct {
	Label       string
	Fingerprint [32]byte
	Hash        crypto.Hash
	PSS         bool
	SaltLength  int // of PSS: rsa.PSSSaltLengthAuto, EqualsHash or a length
	Digest      []byte
}

// opts is the request's crypto.SignerOpts.
func (r *signRequest) opts() crypto.SignerOpts {
	if r.PSS {
		return &rsa.PSSOptions{Hash: r.Hash, SaltLength: r.SaltLength}
	}
	return r.Hash
}

func appendSign(b []byte, id uint64, r *signRequest) []byte {
	b = appendHeader(b, msgSign, id)
	b = append(b, byte(len(r.Label)))
	b = append(b, r.Label...)
	b = append(b, r.Fingerprint[:]...)
	pss := byte(0)
	if r.PSS {
		pss = 1
	}
	b = append(b, byte(r.Hash), pss)
	b = binary.BigEndian.AppendUint32(b, uint32(int32(r.SaltLength)))
	b = append(b, byte(len(r.Digest)))
	return append(b, r.Digest...)
}

var errMalformed = errors.New("worker: malformed message")

// parseSign decodes a sign request's body (after the header).
func parseSign(b []byte) (*signRequest, error) {
	var r signRequest
	n, b, ok := take(b, 1)
	if !ok {
		return nil, errMalformed
	}
	label, b, ok := take(b, int(n[0]))
	if !ok {
		return nil, errMalformed
	}
	r.Label = string(label)
	fp, b, ok := take(b, 32)
	if !ok {
		return nil, errMalformed
	}
	copy(r.Fingerprint[:], fp)
	f, b, ok := take(b, 1+1+4+1)
	if !ok {
		return nil, errMalformed
	}
	r.Hash, r.PSS = crypto.Hash(f[0]), f[1] == 1
	r.SaltLength = int(int32(binary.BigEndian.Uint32(f[2:6])))
	if f[1] > 1 || !r.Hash.Available() || (r.Hash != crypto.SHA256 && r.Hash != crypto.SHA384 && r.Hash != crypto.SHA512) {
		return nil, errMalformed
	}
	digest, b, ok := take(b, int(f[6]))
	if !ok || len(b) != 0 || len(digest) != r.Hash.Size() {
		return nil, errMalformed
	}
	r.Digest = digest
	return &r, nil
}

func take(b []byte, n int) (head, rest []byte, ok bool) {
	if n < 0 || len(b) < n {
		return nil, nil, false
	}
	return b[:n], b[n:], true
}

func appendHeader(b []byte, typ byte, id uint64) []byte {
	b = append(b, typ)
	return binary.BigEndian.AppendUint64(b, id)
}

// appendAnswer is the answer to request id: a status, then the signature,
// the JSON of a listing, or an error's message.
func appendAnswer(b []byte, typ byte, id uint64, status byte, body []byte) []byte {
	b = appendHeader(b, typ, id)
	b = append(b, status)
	return append(b, body...)
}

// appendFramed appends appendAnswer's message with its length.
func appendFramed(b []byte, typ byte, id uint64, status byte, body []byte) []byte {
	b = binary.BigEndian.AppendUint32(b, uint32(header+1+len(body)))
	return appendAnswer(b, typ, id, status, body)
}

// writeFrame writes one message with its length.
func writeFrame(w io.Writer, msg []byte) error {
	var n [4]byte
	binary.BigEndian.PutUint32(n[:], uint32(len(msg)))
	_, err := w.Write(append(n[:], msg...))
	return err
}

// readFrame reads one message into buf (grown as needed).
func readFrame(r io.Reader, buf []byte) ([]byte, error) {
	var n [4]byte
	if _, err := io.ReadFull(r, n[:]); err != nil {
		return nil, err
	}
	size := binary.BigEndian.Uint32(n[:])
	if size < header || size > maxMessage {
		return nil, fmt.Errorf("%w: %d bytes", errMalformed, size)
	}
	if cap(buf) < int(size) {
		buf = make([]byte, size)
	}
	buf = buf[:size]
	if _, err := io.ReadFull(r, buf); err != nil {
		return nil, err
	}
	return buf, nil
}

func parseHeader(b []byte) (typ byte, id uint64, body []byte) {
	return b[0], binary.BigEndian.Uint64(b[1:header]), b[header:]
}
