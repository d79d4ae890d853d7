package core

import (
	"context"
	"errors"
	"fmt"
	"strconv"
)

// Code is the status code of an answer, numbered as gRPC numbers its codes:
// the framed signing connection carries the same numbers, and the gRPC
// adapter converts with codes.Code(c). The core names only those it gives.
type Code uint32

const (
	CodeOK                 Code = 0
	CodeCanceled           Code = 1
	CodeUnknown            Code = 2
	CodeInvalidArgument    Code = 3
	CodeDeadlineExceeded   Code = 4
	CodeNotFound           Code = 5
	CodeAlreadyExists      Code = 6
	CodePermissionDenied   Code = 7
	CodeResourceExhausted  Code = 8
	CodeFailedPrecondition Code = 9
	CodeAborted            Code = 10
	CodeInternal           Code = 13
	CodeUnavailable        Code = 14
	CodeUnauthenticated    Code = 16
)

var codeNames = map[Code]string{
	CodeOK: "OK", CodeCanceled: "Canceled", CodeUnknown: "Unknown", CodeInvalidArgument: "InvalidArgument",
	CodeDeadlineExceeded: "DeadlineExceeded", CodeNotFound: "NotFound", CodeAlreadyExists: "AlreadyExists", CodePermissionDenied: "PermissionDenied",
	CodeResourceExhausted: "ResourceExhausted", CodeFailedPrecondition: "FailedPrecondition", CodeAborted: "Aborted",
	CodeInternal: "Internal", CodeUnavailable: "Unavailable", CodeUnauthenticated: "Unauthenticated",
	11: "OutOfRange", 12: "Unimplemented", 15: "DataLoss",
}

// String is the code's name, as gRPC spells it (and the audit records it).
func (c Code) String() string {
	if n, ok := codeNames[c]; ok {
		return n
	}
	return "Code(" + strconv.FormatUint(uint64(c), 10) + ")"
}

// Error is an answer the core decided, with the code the caller gets. Its
// message is the caller's; RequestID, when set, names the audit record,
// and transports carry it in a field of its own, never in the message.
type Error struct {
	Code      Code
	Msg       string
	RequestID string
}

func (e *Error) Error() string { return e.Msg }

// Errorf is an *Error with a formatted message.
func Errorf(c Code, format string, a ...any) *Error {
	return &Error{Code: c, Msg: fmt.Sprintf(format, a...)}
}

// CodeOf is the code of err as the core answers it: an *Error's own,
// CodeCanceled or CodeDeadlineExceeded for a context's end, CodeUnknown otherwise.
func CodeOf(err error) Code {
	var e *Error
	switch {
	case err == nil:
		return CodeOK
	case errors.As(err, &e):
		return e.Code
	case errors.Is(err, context.Canceled):
		return CodeCanceled
	case errors.Is(err, context.DeadlineExceeded):
		return CodeDeadlineExceeded
	}
	return CodeUnknown
}

// MalformedError is what a transport's Recv returns for input it could
// not decode: the core audits it once, answers what came before, and ends
// the stream with Code.
type MalformedError struct {
	Code Code
	Err  error
}

func (e *MalformedError) Error() string { return e.Err.Error() }
func (e *MalformedError) Unwrap() error { return e.Err }

// RequestIDOf is the request id err carries, if it is an *Error with one.
func RequestIDOf(err error) string {
	var e *Error
	if errors.As(err, &e) {
		return e.RequestID
	}
	return ""
}
