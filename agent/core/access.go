package core

import (
	"errors"
	"fmt"
	"os"
	"os/user"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"unicode/utf8"
)

// Rule allows users and groups (names or numeric ids) to use the keys whose
// labels match one of Keys. A key is an exact label or a pattern:
//
//   - "*" as the whole pattern matches every key but a rotation's pending
//     successors and retired keys ("L/successor", "L/retired-<time>", see
//     package rotation), which only a pattern naming them matches;
//   - elsewhere, * matches any run of characters except "/", and ? one
//     character except "/": "d1-ppr-*" matches "d1-ppr-mtls" but not "d1-ppr-a/b";
//   - ** matches any run of characters, "/" included: "d1/**" matches
//     "d1/ppr/mtls" (but not "d1"), "a**b" matches "ab" and "a/x/b";
//   - [abc], [a-z] and [^a-z] match one character in (or not in) the class,
//     never "/";
//   - \ makes the next character literal: "\*" matches only "*".
//
// Groups match the caller's primary gid and the supplementary groups its
// process holds, as the kernel reports them when it connects (see Peer); a
// user listed in the user database as a group member without holding the
// group is not a member.
type Rule struct {
	Keys   []string `yaml:"keys"`
	Users  []string `yaml:"users"`
	Groups []string `yaml:"groups"`
}

// Policy decides which peer may use which key. The agent's own user and root
// may use every key: they can read the PIN and the agent's memory anyway.
// Everyone else needs a rule; without rules, nobody else is allowed.
type Policy struct {
	ownUID int
	rules  []resolvedRule
	admin  resolvedRule // who may call the Admin operations besides root (admin.go)
}

type resolvedRule struct {
	keys   []keyPattern
	uids   []int
	gids   []int
	source Rule
}

// sameAs reports whether q decides as p does: the same rules, resolved to
// the same ids. (A reload re-reads the rules whether they changed or not.)
func (p *Policy) sameAs(q *Policy) bool {
	if p == q {
		return true
	}
	if p == nil || q == nil || p.ownUID != q.ownUID || len(p.rules) != len(q.rules) {
		return false
	}
	for i := range p.rules {
		a, b := p.rules[i], q.rules[i]
		if !reflect.DeepEqual(a.source, b.source) || !slices.Equal(a.uids, b.uids) || !slices.Equal(a.gids, b.gids) {
			return false
		}
	}
	return true
}

// RuleError is NewPolicy's refusal of one rule; Index counts from 0, so a
// configuration can point at the rule's own line.
type RuleError struct {
	Index int
	Err   error
}

func (e *RuleError) Error() string {
	msg := e.Err.Error()
	if !strings.HasPrefix(msg, ":") {
		msg = " " + msg
	}
	return fmt.Sprintf("agent: access rule %d%s", e.Index+1, msg)
}

func (e *RuleError) Unwrap() error { return e.Err }

// NewPolicy resolves user and group names now, so that a rule naming a user
// or group the host does not know is refused at start-up instead of silently
// matching nobody.
func NewPolicy(rules []Rule) (*Policy, error) {
	p := &Policy{ownUID: os.Getuid()}
	for i, r := range rules {
		if len(r.Keys) == 0 {
			return nil, &RuleError{Index: i, Err: errors.New(`names no keys (use ["*"] for all)`)}
		}
		if len(r.Users) == 0 && len(r.Groups) == 0 {
			return nil, &RuleError{Index: i, Err: fmt.Errorf("for %q names no users or groups", r.Keys)}
		}
		rr := resolvedRule{source: r}
		for _, k := range r.Keys {
			kp, err := compileKeyPattern(k)
			if err != nil {
				return nil, &RuleError{Index: i, Err: fmt.Errorf(": bad key pattern %q: %w", k, err)}
			}
			rr.keys = append(rr.keys, kp)
		}
		var err error
		if rr.uids, rr.gids, err = resolveIDs(r.Users, r.Groups); err != nil {
			return nil, &RuleError{Index: i, Err: err}
		}
		p.rules = append(p.rules, rr)
	}
	return p, nil
}

// resolveIDs resolves users and groups (names or numeric ids) to ids.
func resolveIDs(users, groups []string) (uids, gids []int, err error) {
	for _, u := range users {
		id, err := lookupID(u, func(s string) (string, error) {
			usr, err := user.Lookup(s)
			if err != nil {
				return "", err
			}
			return usr.Uid, nil
		})
		if err != nil {
			return nil, nil, fmt.Errorf(": unknown user %q%s", u, lookupCause(err))
		}
		uids = append(uids, id)
	}
	for _, g := range groups {
		id, err := lookupID(g, func(s string) (string, error) {
			grp, err := user.LookupGroup(s)
			if err != nil {
				return "", err
			}
			return grp.Gid, nil
		})
		if err != nil {
			return nil, nil, fmt.Errorf(": unknown group %q%s", g, lookupCause(err))
		}
		gids = append(gids, id)
	}
	return uids, gids, nil
}

// lookupCause explains a failed lookup unless the error only repeats "unknown".
func lookupCause(err error) string {
	var uu user.UnknownUserError
	var ug user.UnknownGroupError
	if errors.As(err, &uu) || errors.As(err, &ug) {
		return " on this host"
	}
	return ": " + err.Error()
}

func lookupID(s string, byName func(string) (string, error)) (int, error) {
	if n, err := strconv.Atoi(s); err == nil {
		if n < 0 {
			return 0, fmt.Errorf("negative id")
		}
		return n, nil
	}
	id, err := byName(s)
	if err != nil {
		return 0, err
	}
	return strconv.Atoi(id)
}

// Allowed reports whether peer may use the key labelled label.
func (p *Policy) Allowed(peer Peer, label string) bool {
	if peer.UID == 0 || peer.UID == p.ownUID {
		return true
	}
	for _, r := range p.rules {
		if !r.matchesKey(label) {
			continue
		}
		if slices.Contains(r.uids, peer.UID) || slices.Contains(r.gids, peer.GID) {
			return true
		}
		for _, g := range peer.Groups {
			if slices.Contains(r.gids, g) {
				return true
			}
		}
	}
	return false
}

func (r resolvedRule) matchesKey(label string) bool {
	for _, k := range r.keys {
		if k.match(label) {
			return true
		}
	}
	return false
}

// keyPattern is a compiled key pattern (syntax in Rule). path.Match is not
// used: its * stops at "/", so "*" would not mean "every key", and it has no
// form that crosses "/".
type keyPattern struct {
	every bool // the pattern is "*": all keys, whatever they contain, but a rotation's others
	parts []patternPart
}

type partKind uint8

const (
	partRune  partKind = iota // one given character
	partOne                   // ?: any one character but "/"
	partClass                 // [...]: one character of a class, never "/"
	partStar                  // *: any run without "/"
	partAny                   // **: any run
)

type patternPart struct {
	kind   partKind
	r      rune
	ranges [][2]rune // partClass: inclusive ranges
	negate bool      // partClass: [^...]
}

func compileKeyPattern(s string) (keyPattern, error) {
	if s == "" {
		return keyPattern{}, errors.New("empty pattern")
	}
	if s == "*" {
		return keyPattern{every: true}, nil
	}
	var kp keyPattern
	for i := 0; i < len(s); {
		part, n, err := nextPart(s[i:])
		if err != nil {
			return keyPattern{}, err
		}
		kp.parts = append(kp.parts, part)
		i += n
	}
	return kp, nil
}

// nextPart parses the part at the start of s and returns it with its length in bytes.
func nextPart(s string) (patternPart, int, error) {
	r, n := utf8.DecodeRuneInString(s)
	switch r {
	case '*':
		stars := len(s) - len(strings.TrimLeft(s, "*"))
		if stars > 1 {
			return patternPart{kind: partAny}, stars, nil
		}
		return patternPart{kind: partStar}, 1, nil
	case '?':
		return patternPart{kind: partOne}, 1, nil
	case '[':
		part, m, err := parseClass(s[1:])
		return part, 1 + m, err
	case '\\':
		if len(s) == 1 {
			return patternPart{}, 0, errors.New(`ends with a lone \`)
		}
		lit, m := utf8.DecodeRuneInString(s[1:])
		return patternPart{kind: partRune, r: lit}, 1 + m, nil
	}
	return patternPart{kind: partRune, r: r}, n, nil
}

// parseClass parses what follows "[" up to and including the closing "]".
func parseClass(s string) (patternPart, int, error) {
	part := patternPart{kind: partClass}
	i := 0
	if strings.HasPrefix(s, "^") {
		part.negate = true
		i++
	}
	for {
		if i < len(s) && s[i] == ']' && len(part.ranges) > 0 {
			return part, i + 1, nil
		}
		lo, n, err := classRune(s[i:])
		if err != nil {
			return patternPart{}, 0, err
		}
		i += n
		hi := lo
		if i < len(s) && s[i] == '-' {
			if hi, n, err = classRune(s[i+1:]); err != nil {
				return patternPart{}, 0, err
			}
			i += 1 + n
			if hi < lo {
				return patternPart{}, 0, fmt.Errorf("range %c-%c is backwards", lo, hi)
			}
		}
		part.ranges = append(part.ranges, [2]rune{lo, hi})
	}
}

// classRune reads one character of a class; "-" and "]" must be quoted with \.
func classRune(s string) (rune, int, error) {
	switch {
	case s == "" || s == "\\":
		return 0, 0, errors.New("[ without a closing ]")
	case s[0] == ']' || s[0] == '-':
		return 0, 0, fmt.Errorf(`%q inside [...] must be written \%c`, s[0], s[0])
	case s[0] == '\\':
		r, n := utf8.DecodeRuneInString(s[1:])
		return r, 1 + n, nil
	}
	r, n := utf8.DecodeRuneInString(s)
	return r, n, nil
}

// match runs the pattern as a small automaton over the label's characters:
// at[i] says that parts[:i] can match what has been read so far. It costs
// len(label)*len(parts) steps at most, with no backtracking.
func (kp keyPattern) match(label string) bool {
	if kp.every {
		return !rotationOther(label)
	}
	at := make([]bool, len(kp.parts)+1)
	at[0] = true
	kp.skipEmptyRuns(at)
	for _, r := range label {
		next := make([]bool, len(at))
		for i, part := range kp.parts {
			if !at[i] {
				continue
			}
			switch {
			case part.kind == partAny, part.kind == partStar && r != '/':
				next[i] = true // the run goes on
			case part.matchesOne(r):
				next[i+1] = true
			}
		}
		kp.skipEmptyRuns(next)
		at = next
	}
	return at[len(kp.parts)]
}

// skipEmptyRuns lets * and ** match nothing.
func (kp keyPattern) skipEmptyRuns(at []bool) {
	for i, part := range kp.parts {
		if at[i] && (part.kind == partStar || part.kind == partAny) {
			at[i+1] = true
		}
	}
}

func (p patternPart) matchesOne(r rune) bool {
	switch p.kind {
	case partRune:
		return r == p.r
	case partOne:
		return r != '/'
	case partClass:
		if r == '/' {
			return false
		}
		in := false
		for _, rg := range p.ranges {
			in = in || (rg[0] <= r && r <= rg[1])
		}
		return in != p.negate
	}
	return false
}
