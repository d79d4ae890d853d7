package core

import "log/slog"

// Outcome is what became of one sign request. Its audit result, metric
// label, log level, whether its record is rationed and the code the caller
// gets are all derived from it here, once.
type Outcome uint8

const (
	Signed         Outcome = iota // a signature
	Invalid                       // the request is wrong: label, hash, digest, padding, salt
	Denied                        // the rules do not let the caller use the key (which exists)
	DeniedNotFound                // the caller may not use the label, and no key has it: answered as Denied
	NotFound                      // no key has the label (the caller may use it)
	Busy                          // too many signatures wait for the HSM
	CallerBusy                    // the caller's uid has its share waiting or in the HSM
	Cancelled                     // the caller left before the HSM signed
	Expired                       // the caller's deadline passed before the HSM signed
	Timeout                       // the HSM did not answer within the HSM timeout
	HSMDown                       // refused at once: the HSM is stuck or down
	HSMError                      // the HSM answered with an error
	KeyChanged                    // the key object was replaced in the token
	AuditDown                     // refused: the audit trail cannot be written
	Malformed                     // the message did not decode, or was over the size cap
	NoRequest                     // the call's request never came
)

var outcomes = [...]struct {
	result string // audit result
	metric string // metric label: one for both denials, so metrics are no oracle
	code   Code
	// rationed: refusals cost the caller nothing, so their records are
	// rationed per uid; signatures and HSM failures are bounded by the HSM.
	rationed bool
}{
	Signed:         {"ok", "ok", CodeOK, false},
	Invalid:        {"InvalidArgument", "InvalidArgument", CodeInvalidArgument, true},
	Denied:         {"PermissionDenied", "denied", CodePermissionDenied, true},
	DeniedNotFound: {"NotFound", "denied", CodePermissionDenied, true},
	NotFound:       {"NotFound", "NotFound", CodeNotFound, true},
	Busy:           {"busy", "busy", CodeResourceExhausted, true},
	CallerBusy:     {"caller-busy", "caller-busy", CodeResourceExhausted, true},
	Cancelled:      {"abandoned", "abandoned", CodeCanceled, true},
	Expired:        {"abandoned", "abandoned", CodeDeadlineExceeded, true},
	Timeout:        {"timeout", "timeout", CodeUnavailable, false},
	HSMDown:        {"hsm-down", "hsm-down", CodeUnavailable, true},
	HSMError:       {"hsm-error", "hsm-error", CodeInternal, false},
	KeyChanged:     {"key-changed", "key-changed", CodeFailedPrecondition, true},
	AuditDown:      {"audit-down", "audit-down", CodeUnavailable, true},
	Malformed:      {"malformed", "malformed", CodeInvalidArgument, true},
	NoRequest:      {"no-request", "no-request", CodeDeadlineExceeded, true},
}

// String is the outcome's audit result.
func (o Outcome) String() string { return outcomes[o].result }

// Metric is the outcome's label in the signature metrics: both kinds of
// denial are "denied", so that metrics tell no caller which keys exist.
func (o Outcome) Metric() string { return outcomes[o].metric }

// Code is the status code the caller gets.
func (o Outcome) Code() Code { return outcomes[o].code }

// Level is the log level of the outcome's audit record.
func (o Outcome) Level() slog.Level {
	if o == Signed {
		return slog.LevelInfo
	}
	return slog.LevelWarn
}

// rationed reports whether the outcome's records are rationed per uid.
func (o Outcome) rationed() bool { return outcomes[o].rationed }
