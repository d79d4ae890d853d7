package server

import (
	"errors"
	"fmt"
	"os"
	"os/user"
	"path"
	"slices"
	"strconv"
)

// Rule allows users and groups (names or numeric ids) to use the keys whose
// labels match one of Keys (exact labels or path.Match patterns such as "d1-ppr-*").
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
}

type resolvedRule struct {
	keys   []string
	uids   []int
	gids   []int
	source Rule
}

// NewPolicy resolves user and group names now, so that a rule naming a user
// or group the host does not know is refused at start-up instead of silently
// matching nobody.
func NewPolicy(rules []Rule) (*Policy, error) {
	p := &Policy{ownUID: os.Getuid()}
	for i, r := range rules {
		if len(r.Keys) == 0 {
			return nil, fmt.Errorf("agent: access rule %d names no keys (use [\"*\"] for all)", i+1)
		}
		if len(r.Users) == 0 && len(r.Groups) == 0 {
			return nil, fmt.Errorf("agent: access rule %d for %q names no users or groups", i+1, r.Keys)
		}
		rr := resolvedRule{keys: r.Keys, source: r}
		for _, k := range r.Keys {
			if _, err := path.Match(k, ""); err != nil {
				return nil, fmt.Errorf("agent: access rule %d: bad key pattern %q", i+1, k)
			}
		}
		for _, u := range r.Users {
			id, err := lookupID(u, func(s string) (string, error) {
				usr, err := user.Lookup(s)
				if err != nil {
					return "", err
				}
				return usr.Uid, nil
			})
			if err != nil {
				return nil, fmt.Errorf("agent: access rule %d: unknown user %q%s", i+1, u, lookupCause(err))
			}
			rr.uids = append(rr.uids, id)
		}
		for _, g := range r.Groups {
			id, err := lookupID(g, func(s string) (string, error) {
				grp, err := user.LookupGroup(s)
				if err != nil {
					return "", err
				}
				return grp.Gid, nil
			})
			if err != nil {
				return nil, fmt.Errorf("agent: access rule %d: unknown group %q%s", i+1, g, lookupCause(err))
			}
			rr.gids = append(rr.gids, id)
		}
		p.rules = append(p.rules, rr)
	}
	return p, nil
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
		if ok, _ := path.Match(k, label); ok {
			return true
		}
	}
	return false
}
