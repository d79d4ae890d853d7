package core

import "log/slog"

// AdminOutcome is what became of one Admin operation (a key generated,
// deleted, certified, rotated or promoted, a CSR signed). Its audit result
// and log level are derived from it here, once; the caller's code comes
// with the error, which says what to do.
type AdminOutcome uint8

const (
	AdminDone        AdminOutcome = iota // the change was made
	AdminNotAdmin                        // the caller is not named by the admin rule
	AdminUnsupported                     // the agent's key store cannot make this change
	AdminInvalid                         // the request is wrong: label, type, certificate, CSR template
	AdminAuditKey                        // the label is the agent's audit signing key
	AdminNotFound                        // no key (or no pending successor) has the label
	AdminExists                          // the label is taken
	AdminFailed                          // the token refused or lost the change
)

var adminResults = [...]string{
	AdminDone:        "ok",
	AdminNotAdmin:    "not-admin",
	AdminUnsupported: "unsupported",
	AdminInvalid:     "invalid",
	AdminAuditKey:    "audit-key",
	AdminNotFound:    "not-found",
	AdminExists:      "exists",
	AdminFailed:      "failed",
}

// String is the outcome's audit result.
func (o AdminOutcome) String() string { return adminResults[o] }

// Level is the log level of the outcome's audit record.
func (o AdminOutcome) Level() slog.Level {
	if o == AdminDone {
		return slog.LevelInfo
	}
	return slog.LevelWarn
}
