// Package rotation names the labels of a key rotation, shared by the agent,
// the token and the commands: a key labelled L gets its successor under
// "L/successor" and, once the successor is promoted to L, the key before
// keeps living under "L/retired-<UTC time>" until deleted. Both contain a
// '/', which an access rule's '*' never matches, so no caller signs with a
// successor or a retired key unless a rule names it outright.
package rotation

import (
	"fmt"
	"strings"
	"time"
)

const (
	successorSuffix = "/successor"
	retiredInfix    = "/retired-"
	// TimeFormat is the retired label's UTC time: sortable, no ':' or space.
	TimeFormat = "20060102T150405Z"
	// MaxLabel is the longest label the token takes (package hsm's rule).
	MaxLabel = 128
)

// Kind is what a label is in a rotation.
type Kind int

const (
	Current   Kind = iota // any label that is neither of the others
	Successor             // "L/successor"
	Retired               // "L/retired-<time>"
)

func (k Kind) String() string {
	switch k {
	case Successor:
		return "successor"
	case Retired:
		return "retired"
	}
	return "current"
}

// SuccessorLabel is the pending successor's label of the key labelled label.
func SuccessorLabel(label string) string { return label + successorSuffix }

// RetiredLabel is the label the key labelled label gets when retired at at.
func RetiredLabel(label string, at time.Time) string {
	return label + retiredInfix + at.UTC().Format(TimeFormat)
}

// Parse says what label is and the label of the key it belongs to (label
// itself for a current key). A retired label's time must parse: any other
// text after "/retired-" is a label like any other.
func Parse(label string) (base string, kind Kind) {
	if b, ok := strings.CutSuffix(label, successorSuffix); ok && b != "" {
		return b, Successor
	}
	if i := strings.LastIndex(label, retiredInfix); i > 0 {
		if _, err := time.Parse(TimeFormat, label[i+len(retiredInfix):]); err == nil {
			return label[:i], Retired
		}
	}
	return label, Current
}

// RetiredAt is when the key of a retired label was retired.
func RetiredAt(label string) (time.Time, error) {
	i := strings.LastIndex(label, retiredInfix)
	if i <= 0 {
		return time.Time{}, fmt.Errorf("key %q is not a retired key", label)
	}
	return time.Parse(TimeFormat, label[i+len(retiredInfix):])
}

// CheckNew refuses a new key under a rotation's label: a successor is made
// by 'keys rotate', a retired key by the promotion, never by hand (a key
// generated under one would sign under the label it names).
func CheckNew(label string) error {
	if base, kind := Parse(label); kind != Current {
		return fmt.Errorf("%q is the label of a %s key of %q, which only a rotation makes; to rotate the key: hsmagent keys rotate --label %s", label, kind, base, base)
	}
	return nil
}

// CheckRotatable refuses a label that cannot be rotated: a successor or a
// retired key, or one too long for its retired label to fit the token.
func CheckRotatable(label string) error {
	switch base, kind := Parse(label); {
	case kind != Current:
		return fmt.Errorf("key %q is a %s key of %q; the rotation's commands take the key being rotated: give %q", label, kind, base, base)
	case len(RetiredLabel(label, time.Time{})) > MaxLabel:
		return fmt.Errorf("key label %q is too long to rotate: its retired label would be longer than %d bytes", label, MaxLabel)
	}
	return nil
}
