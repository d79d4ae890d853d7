package hsm

import (
	"errors"
	"fmt"
	"time"

	"github.com/miekg/pkcs11"
)

// ErrKeyNotFound is matched (errors.Is) by the error for a label no key has.
var ErrKeyNotFound = errors.New("hsm: key not found")

// KeyNotFoundError names the missing label and the labels that do exist.
type KeyNotFoundError struct {
	Label, Token string
	Present      []string
}

func (e *KeyNotFoundError) Error() string {
	if len(e.Present) == 0 {
		return fmt.Sprintf("hsm: key %q not found on token %q (the token holds no keys)", e.Label, e.Token)
	}
	return fmt.Sprintf("hsm: key %q not found on token %q; keys present: %q", e.Label, e.Token, e.Present)
}

func (e *KeyNotFoundError) Is(target error) bool { return target == ErrKeyNotFound }

// ErrKeyChanged is matched (errors.Is) by the error of a signer whose label
// now names another key pair than the one it was made for.
var ErrKeyChanged = errors.New("hsm: key changed")

// KeyChangedError refuses a signature because the key under the signer's
// label was replaced (deleted and generated again) on the token: signing with
// the new key would not match the public key the signer advertises.
type KeyChangedError struct {
	Label, Token string
	What         string // "public key differs" or "CKA_ID differs"
}

func (e *KeyChangedError) Error() string {
	return fmt.Sprintf("hsm: the key labelled %q was replaced on token %q (%s); reload the agent (SIGHUP) to serve the new key", e.Label, e.Token, e.What)
}

func (e *KeyChangedError) Is(target error) bool { return target == ErrKeyChanged }

// KeyChanged marks the error for the agent (server.KeyStore's contract),
// which does not import this package.
func (e *KeyChangedError) KeyChanged() bool { return true }

// ErrCertificateNotFound is returned (wrapped) when a key has no certificate stored.
var ErrCertificateNotFound = errors.New("no certificate stored")

// ErrUnavailable is matched (errors.Is) by the *UnavailableError of an
// operation refused while the token cannot be reopened.
var ErrUnavailable = errors.New("hsm: token unavailable")

// UnavailableError is returned at once, without calling the module, while
// the token is unavailable: an operation found its session lost and the
// token could not be opened again. A goroutine keeps reopening it.
type UnavailableError struct {
	Token   string        // as in messages: `token "X"` or `token with serial "N"`
	Cause   error         // the error that started the outage
	Since   time.Time     // when the outage started
	RetryIn time.Duration // until the next reopen attempt; <= 0 while one runs
}

func (e *UnavailableError) Error() string {
	retry := "retrying now"
	if e.RetryIn > 0 {
		retry = "retrying in " + e.RetryIn.Round(10*time.Millisecond).String()
	}
	return fmt.Sprintf("hsm: %s is unavailable (%s); %s", e.Token, causeWords(e.Cause), retry)
}

func (e *UnavailableError) Unwrap() error        { return e.Cause }
func (e *UnavailableError) Is(target error) bool { return target == ErrUnavailable }

// Unavailable reports true: the contract of agent/server's KeyStore for an
// error that means the backend is down, not that this request was bad.
func (e *UnavailableError) Unavailable() bool { return true }

// causeWords is the operator's words for a cause: the explanation of its PKCS#11
// code when it has one, its text otherwise.
func causeWords(err error) string {
	var ex *explained
	if errors.As(err, &ex) {
		return ex.hint
	}
	if err == nil {
		return "unknown cause"
	}
	return err.Error()
}

// explained is a PKCS#11 error with the words explain found for it.
type explained struct {
	hint string
	err  error
}

func (e *explained) Error() string { return e.hint + ": " + e.err.Error() }
func (e *explained) Unwrap() error { return e.err }

// explain turns a PKCS#11 return code into words an operator can act on.
// The original error stays wrapped so callers can still test for the code.
// An error explained already is returned as it is, so that layers which
// each explain do not repeat the words.
func explain(err error) error {
	var ex *explained
	if errors.As(err, &ex) {
		return err
	}
	var rv pkcs11.Error
	if !errors.As(err, &rv) {
		return err
	}
	var hint string
	switch rv {
	case pkcs11.CKR_PIN_INCORRECT:
		hint = "wrong PIN"
	case pkcs11.CKR_PIN_LOCKED:
		hint = "the user PIN is locked after too many wrong tries; the security officer must reset it"
	case pkcs11.CKR_PIN_EXPIRED:
		hint = "the user PIN has expired; set a new one with the token's tools"
	case pkcs11.CKR_PIN_LEN_RANGE:
		hint = "the PIN has a length the token does not accept"
	case pkcs11.CKR_USER_PIN_NOT_INITIALIZED:
		hint = "the token has no user PIN yet; initialise it first"
	case pkcs11.CKR_TOKEN_NOT_PRESENT, pkcs11.CKR_DEVICE_REMOVED:
		hint = "the token is not present"
	case pkcs11.CKR_TOKEN_NOT_RECOGNIZED:
		hint = "the module does not recognise the token"
	case pkcs11.CKR_DEVICE_ERROR, pkcs11.CKR_GENERAL_ERROR:
		hint = "the HSM reported a device error"
	case pkcs11.CKR_DEVICE_MEMORY:
		hint = "the token is out of memory"
	case pkcs11.CKR_SESSION_HANDLE_INVALID, pkcs11.CKR_SESSION_CLOSED:
		hint = "the HSM session was lost"
	case pkcs11.CKR_USER_NOT_LOGGED_IN:
		hint = "the HSM session is no longer logged in"
	case pkcs11.CKR_OBJECT_HANDLE_INVALID, pkcs11.CKR_KEY_HANDLE_INVALID:
		hint = "the key handle is no longer valid"
	case pkcs11.CKR_MECHANISM_INVALID:
		hint = "the token does not support this algorithm"
	case pkcs11.CKR_TEMPLATE_INCONSISTENT, pkcs11.CKR_ATTRIBUTE_VALUE_INVALID:
		hint = "the token refused the key attributes"
	case pkcs11.CKR_DATA_LEN_RANGE:
		hint = "the data to sign has a length the key does not accept"
	case pkcs11.CKR_KEY_FUNCTION_NOT_PERMITTED, pkcs11.CKR_KEY_TYPE_INCONSISTENT:
		hint = "the key may not be used this way"
	case pkcs11.CKR_TOKEN_WRITE_PROTECTED:
		hint = "the token is write-protected"
	case pkcs11.CKR_CRYPTOKI_NOT_INITIALIZED:
		hint = "the PKCS#11 module is not initialised"
	default:
		return err
	}
	return &explained{hint: hint, err: err}
}

// isSessionLost reports whether err means the token must be reopened and logged in
// again: crypto11 returns such sessions to its pool and never logs in again itself.
func isSessionLost(err error) bool {
	var rv pkcs11.Error
	if !errors.As(err, &rv) {
		return false
	}
	switch rv {
	case pkcs11.CKR_SESSION_HANDLE_INVALID, pkcs11.CKR_SESSION_CLOSED,
		pkcs11.CKR_USER_NOT_LOGGED_IN, pkcs11.CKR_DEVICE_REMOVED,
		pkcs11.CKR_DEVICE_ERROR, pkcs11.CKR_TOKEN_NOT_PRESENT,
		pkcs11.CKR_OBJECT_HANDLE_INVALID, pkcs11.CKR_KEY_HANDLE_INVALID,
		pkcs11.CKR_CRYPTOKI_NOT_INITIALIZED:
		return true
	}
	return false
}
