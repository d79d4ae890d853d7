package d1

import (
	"strings"

	"github.com/hsmagent/hsmagent/agent/rotation"
)

// KeyPlan is what one environment should have on the token.
type KeyPlan struct {
	Settings *Settings // nil when only key labels name the environment
	MTLS     []string  // labels of the mTLS client keys to check
}

// PlanKeys finds the environments a host works in, from its settings and
// the labels of the keys on its token, and the mTLS client keys of each:
// the configured key, else every key whose label names the environment,
// except keys the settings or the label give another role (JWT, OAuth,
// server). A nil Settings names its environment without configuring it.
func PlanKeys(settings map[Env]*Settings, labels []string) map[Env]*KeyPlan {
	plans := map[Env]*KeyPlan{}
	otherRole := map[string]bool{} // labels configured for another role, in any environment
	for env, s := range settings {
		p := &KeyPlan{Settings: s}
		if s != nil {
			if s.Key != "" {
				p.MTLS = []string{s.Key}
			}
			for _, l := range []string{s.JWT.Key, s.ServerKey, s.OAuthKey} {
				if l != "" {
					otherRole[l] = true
				}
			}
		}
		plans[env] = p
	}
	for _, label := range labels {
		if _, kind := rotation.Parse(label); kind != rotation.Current {
			continue // a successor or retired key: not the label's key (CheckServed reports it)
		}
		env, ok := EnvOfLabel(label)
		if !ok {
			continue
		}
		p := plans[env]
		if p == nil {
			p = &KeyPlan{}
			plans[env] = p
		}
		if (p.Settings != nil && p.Settings.Key != "") || otherRole[label] || otherRoleLabel(label) {
			continue
		}
		p.MTLS = append(p.MTLS, label)
	}
	return plans
}

// otherRoleLabel says whether a label names a JWT, OAuth or server key,
// which are not mTLS client keys and carry no D1 client certificate.
func otherRoleLabel(label string) bool {
	for _, w := range labelWords(label) {
		if w == "jwt" || w == "oauth" || w == "server" {
			return true
		}
	}
	return false
}

// labelWords splits a key label into its lower-case words: "d1-PPR_mtls"
// is d1, ppr, mtls.
func labelWords(label string) []string {
	return strings.FieldsFunc(strings.ToLower(label), func(r rune) bool {
		return !(r >= 'a' && r <= 'z' || r >= '0' && r <= '9')
	})
}
