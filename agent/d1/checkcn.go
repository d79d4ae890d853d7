package d1

import (
	"crypto"
	"fmt"
	"slices"
	"strings"
)

// checkCN reads a client certificate's CN as D1 names them (D1-C4, by
// default TLSMA-{keyType}/{issuerId}/{env}): it must name the environment of
// the key it is stored with (D1-G2), and should name the key's type and the
// configured issuer id. Only the environment is a failure: the pattern is
// confirmed per issuer with Thales, so the rest only warns.
func checkCN(env Env, label, cn string, pub crypto.PublicKey, issuerID string) Finding {
	const confirm = "confirm the CN pattern with the Thales Delivery Team; the default is " + DefaultCNTemplate
	certEnv, ok := EnvOfCN(cn)
	switch {
	case !ok:
		return warned(CNCheck, env, fmt.Sprintf("CN %q names no environment (PPR or PRD)", cn), confirm)
	case certEnv != env:
		return failed(CNCheck, env, fmt.Sprintf("CN %q is a %s certificate on the %s key %q; PPR and PRD credentials must never be mixed (D1-G2)", cn, certEnv, env, label),
			fmt.Sprintf("import the %s certificate on %q, and the %s one on a %s key", env, label, certEnv, certEnv))
	}
	keyType, _ := CNKeyType(pub)
	if named, ok := cnKeyType(cn); ok && named != keyType {
		return warned(CNCheck, env, fmt.Sprintf("CN %q names key type %s but the key is %s", cn, named, keyType), confirm)
	}
	if issuerID != "" && !slices.Contains(strings.Split(cn, "/"), issuerID) {
		return warned(CNCheck, env, fmt.Sprintf("CN %q does not hold the issuer id %q of d1.%s.jwt.issuer_id", cn, issuerID, env), confirm)
	}
	return passed(CNCheck, env, "%q: %s, %s", cn, keyType, env)
}

// cnKeyType is the key type a CN of the default pattern names: ECDSA in
// "TLSMA-ECDSA/ABCDEFGHIJ/PPR". A CN of another pattern names none.
func cnKeyType(cn string) (string, bool) {
	rest, ok := strings.CutPrefix(cn, "TLSMA-")
	if !ok {
		return "", false
	}
	named, _, _ := strings.Cut(rest, "/")
	return named, true
}
