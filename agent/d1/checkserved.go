package d1

import (
	"bytes"
	"crypto"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/hsmagent/hsmagent/agent/rotation"
)

// ServedCheck compares, key by key, what the token holds with what the
// running agent offers: the agent reads the token only at start and on
// reload, so a change made beside it is not served until then.
const ServedCheck Check = "served"

// ServedKey is a key as the running agent offers it.
type ServedKey struct {
	Label  string
	ID     []byte
	Public crypto.PublicKey
	Chain  []*x509.Certificate // leaf first; empty without a certificate
}

// Difference names one way in which what the agent serves under a label
// differs from what the token holds. The names are stable: doctor's JSON
// lists them.
type Difference string

// The differences CheckServed reports.
const (
	NotServed          Difference = "not-served"   // on the token; the agent does not offer it
	NotOnToken         Difference = "not-on-token" // offered by the agent; the token no longer holds it
	PublicKeyDiffers   Difference = "public-key"   // another key pair under the same label
	IDDiffers          Difference = "id"           // another CKA_ID
	CertificateDiffers Difference = "certificate"  // another leaf, or a leaf on one side only
	ChainDiffers       Difference = "chain"        // the same leaf with other chain certificates
)

// ServedView is what CheckServed compares.
type ServedView struct {
	Token  []Key
	Served []ServedKey
	// EveryKey says the agent shows this caller every key it serves (root
	// and the agent's own user): otherwise a key its access rules withhold
	// reads as not served, so that difference is only a warning.
	EveryKey bool
	// Skip are labels the agent never offers, such as its audit signing key.
	Skip []string
}

// fixReload is what makes the agent serve what the token holds now.
const fixReload = "reload the agent so that it reads the token again: systemctl reload hsmagent (or kill -HUP the agent's pid)"

// CheckServed compares each key's public key, CKA_ID, certificate and chain
// on the token with what the agent serves: one failure per differing key,
// naming every difference, or one pass for all.
func CheckServed(v ServedView) []Finding {
	token := map[string]*Key{}
	served := map[string]*ServedKey{}
	var labels []string
	for i, k := range v.Token {
		if k.Label == "" || slices.Contains(v.Skip, k.Label) {
			continue // unlabelled objects are never served
		}
		token[k.Label] = &v.Token[i]
		labels = append(labels, k.Label)
	}
	for i, k := range v.Served {
		served[k.Label] = &v.Served[i]
		if token[k.Label] == nil {
			labels = append(labels, k.Label)
		}
	}
	slices.Sort(labels)
	labels = slices.Compact(labels)
	var out, infos []Finding
	for _, label := range labels {
		if base, kind := rotation.Parse(label); kind != rotation.Current {
			// A rotation's other keys are served to no client: said, never a difference.
			infos = append(infos, rotationInfo(label, base, kind, token[label]))
			continue
		}
		if f, ok := compareKey(label, token[label], served[label], v.EveryKey); ok {
			out = append(out, f)
		}
	}
	if len(out) == 0 {
		out = append(out, passed(ServedCheck, "", "the agent serves the token's %d key(s) as stored: public key, id, certificate and chain", len(served)-len(infos)))
	}
	return append(out, infos...)
}

// rotationInfo is the passing line that names a pending successor or a
// retired key (t is nil when only the agent lists it).
func rotationInfo(label, base string, kind rotation.Kind, t *Key) Finding {
	f := Finding{Check: ServedCheck, Key: label, Status: Pass}
	if kind == rotation.Successor {
		state := "no certificate yet: next, 'hsmagent csr --key " + base + " --successor'"
		if t != nil && len(t.Chain) > 0 {
			state = "certified"
		}
		f.Message = fmt.Sprintf("key %q has a pending successor %q (%s), which no client signs with until 'hsmagent cert import --key %s --successor' promotes it", base, label, state, base)
		return f
	}
	f.Message = fmt.Sprintf("key %q is a retired key of %q, which no client signs with; delete it once no one needs it: hsmagent keys delete --label %s --yes", label, base, label)
	return f
}

// compareKey is the finding for one label, false when both sides agree.
func compareKey(label string, t *Key, s *ServedKey, everyKey bool) (Finding, bool) {
	f := Finding{Check: ServedCheck, Key: label, Status: Fail, Fix: fixReload}
	switch {
	case s == nil && !everyKey:
		f.Status, f.Differences = Warn, []Difference{NotServed}
		f.Message = fmt.Sprintf("key %q is on the token but the agent does not offer it to this user", label)
		f.Fix = "run doctor as root to compare every key (the agent offers this user only the keys its access rules allow)"
		return f, true
	case s == nil:
		f.Differences = []Difference{NotServed}
		f.Message = fmt.Sprintf("key %q is on the token but the agent does not serve it", label)
		f.Fix = fixReload + "; if it still does not, the agent's user cannot read the key's objects (see the ownership line)"
		return f, true
	case t == nil:
		f.Differences = []Difference{NotOnToken}
		f.Message = fmt.Sprintf("the agent serves key %q, which the token does not hold", label)
		f.Fix = fixReload + "; or, if the agent uses another token than this doctor run, select the agent's (token: in the config)"
		return f, true
	}
	var what []string
	if !samePublicKey(t.Public, s.Public) {
		f.Differences = append(f.Differences, PublicKeyDiffers)
		what = append(what, fmt.Sprintf("the token holds another key pair under this label (public key %s, served %s)", fingerprint(t.Public), fingerprint(s.Public)))
	}
	if !bytes.Equal(t.ID, s.ID) {
		f.Differences = append(f.Differences, IDDiffers)
		what = append(what, fmt.Sprintf("CKA_ID %s on the token, %s served", hexOrNone(t.ID), hexOrNone(s.ID)))
	}
	if d := compareLeaf(t.Chain, s.Chain); d != "" {
		f.Differences = append(f.Differences, CertificateDiffers)
		what = append(what, d)
	} else if d := compareChain(t.Chain, s.Chain); d != "" {
		f.Differences = append(f.Differences, ChainDiffers)
		what = append(what, d)
	}
	if len(what) == 0 {
		return Finding{}, false
	}
	f.Message = fmt.Sprintf("key %q: %s", label, strings.Join(what, "; "))
	return f, true
}

// compareLeaf describes how the token's leaf differs from the served one, "" when it does not.
func compareLeaf(token, served []*x509.Certificate) string {
	switch {
	case len(token) == 0 && len(served) == 0:
		return ""
	case len(served) == 0:
		return fmt.Sprintf("the token holds a certificate (%s) that the agent does not serve", certName(token[0]))
	case len(token) == 0:
		return fmt.Sprintf("the agent serves a certificate (%s) that the token no longer holds", certName(served[0]))
	case token[0].Equal(served[0]):
		return ""
	}
	age := "another"
	switch {
	case token[0].NotAfter.After(served[0].NotAfter):
		age = "a newer"
	case token[0].NotAfter.Before(served[0].NotAfter):
		age = "an older"
	}
	return fmt.Sprintf("the token holds %s certificate (%s) than the agent serves (%s)", age, certName(token[0]), certName(served[0]))
}

// compareChain describes how the chain certificates above the same leaf differ, "" when they do not.
func compareChain(token, served []*x509.Certificate) string {
	if slices.EqualFunc(token, served, (*x509.Certificate).Equal) {
		return ""
	}
	return fmt.Sprintf("the token stores %d chain certificate(s) above the leaf (%s), the agent serves %d (%s)",
		max(len(token)-1, 0), chainNames(token), max(len(served)-1, 0), chainNames(served))
}

func certName(c *x509.Certificate) string {
	return fmt.Sprintf("%q, serial %s, expires %s", c.Subject.CommonName, c.SerialNumber.Text(16), c.NotAfter.UTC().Format(time.DateOnly))
}

func chainNames(chain []*x509.Certificate) string {
	if len(chain) < 2 {
		return "none"
	}
	names := make([]string, 0, len(chain)-1)
	for _, c := range chain[1:] {
		names = append(names, fmt.Sprintf("%q", c.Subject.CommonName))
	}
	return strings.Join(names, ", ")
}

func hexOrNone(b []byte) string {
	if len(b) == 0 {
		return "none"
	}
	return hex.EncodeToString(b)
}

// fingerprint is a short SHA-256 of the SPKI, enough to tell two keys apart in a message.
func fingerprint(pub crypto.PublicKey) string {
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return fmt.Sprintf("of type %T", pub)
	}
	sum := sha256.Sum256(der)
	return "SHA-256 " + hex.EncodeToString(sum[:6])
}
