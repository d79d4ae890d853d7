package d1

import (
	"crypto"
	"crypto/rsa"
	"crypto/x509"
	"errors"
	"maps"
	"math/big"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/hsmagent/hsmagent/agent/keytype"
)

// stubChains stands in for package hsm's chain rules.
type stubChains struct {
	sortErr  error
	reversed bool // the stored chain is out of order
	warnings []string
	dateErr  error
}

func (s stubChains) Sort(_ crypto.PublicKey, certs []*x509.Certificate) ([]*x509.Certificate, error) {
	if s.sortErr != nil {
		return nil, s.sortErr
	}
	sorted := slices.Clone(certs)
	if s.reversed {
		slices.Reverse(sorted)
	}
	return sorted, nil
}

func (s stubChains) Warnings([]*x509.Certificate, time.Time) ([]string, error) {
	return s.warnings, s.dateErr
}

// TestCheckKeys runs the key checks on keys made in memory. Each case lists
// the lines it expects, check/env -> status; no other line may appear.
func TestCheckKeys(t *testing.T) {
	thales := newTestCA(t, "Test Thales CA")
	const cnPPR = "TLSMA-ECDSA/ABCDEFGHIJ/PPR"
	// client is a sign-only P-256 key with a Thales certificate whose CN is cn.
	client := func(label, cn string) Key {
		pub := newP256(t).Public()
		k := Key{Label: label, Type: keytype.ECDSAP256, Public: pub, CanSign: true}
		if cn != "" {
			k.Chain = []*x509.Certificate{thales.issue(t, cn, pub, 90*24*time.Hour), thales.cert}
		}
		return k
	}
	jwt := Key{Label: "d1-ppr-jwt", Type: keytype.ECDSAP256, Public: newP256(t).Public(), CanSign: true}
	rsa2048 := &rsa.PublicKey{N: new(big.Int).Lsh(big.NewInt(1), 2047), E: 65537}
	ppr := map[Env]*Settings{PreProd: {Key: "d1-ppr-mtls", JWT: JWTSettings{Key: "d1-ppr-jwt", IssuerID: "ABCDEFGHIJ"}}}
	full := map[string]Status{"key/PPR": Pass, "certificate/PPR": Pass, "chain/PPR": Pass, "cn/PPR": Pass, "expiry/PPR": Pass, "jwt-key/PPR": Pass}
	with := func(changes map[string]Status) map[string]Status {
		m := maps.Clone(full)
		for k, s := range changes {
			if s == 0 {
				delete(m, k)
			} else {
				m[k] = s
			}
		}
		return m
	}
	noCert := map[string]Status{"certificate/PPR": 0, "chain/PPR": 0, "cn/PPR": 0, "expiry/PPR": 0} // lines a key that fails earlier does not get
	tests := []struct {
		name     string
		keys     []Key
		settings map[Env]*Settings
		chains   stubChains
		want     map[string]Status
		message  string // in the first line that did not pass
	}{
		{name: "good", keys: []Key{client("d1-ppr-mtls", cnPPR), jwt}, settings: ppr, want: full},
		{name: "labels only", keys: []Key{client("d1-ppr-mtls", cnPPR)},
			want: with(map[string]Status{"jwt-key/PPR": 0})},
		{name: "no D1 environment", keys: []Key{client("web", "api.example")},
			want: map[string]Status{"keys": Warn}, message: "no D1 environment"},
		{name: "configured key missing", keys: []Key{jwt}, settings: ppr,
			want: map[string]Status{"key/PPR": Fail, "jwt-key/PPR": Pass}, message: `no key "d1-ppr-mtls" on the token`},
		{name: "no client key with settings", keys: []Key{jwt}, settings: map[Env]*Settings{PreProd: {JWT: JWTSettings{Key: "d1-ppr-jwt"}}},
			want: map[string]Status{"key/PPR": Fail, "jwt-key/PPR": Pass}, message: "no mTLS client key for PPR"},
		{name: "server key only", keys: []Key{{Label: "d1-prd-server", Type: keytype.ECDSAP256, Public: newP256(t).Public(), CanSign: true}},
			want: map[string]Status{"key/PRD": Warn}, message: "no mTLS client key for PRD"},
		// D1-G2: the PRD key configured for PPR fails there and is checked in PRD.
		{name: "key of the other environment", keys: []Key{client("d1-prd-mtls", "TLSMA-ECDSA/ABCDEFGHIJ/PRD")}, settings: map[Env]*Settings{PreProd: {Key: "d1-prd-mtls"}},
			want: map[string]Status{"key/PPR": Fail, "key/PRD": Pass, "certificate/PRD": Pass, "chain/PRD": Pass, "cn/PRD": Pass, "expiry/PRD": Pass}, message: "is named for PRD but configured for PPR"},
		// D1-C2
		{name: "RSA 2048", keys: []Key{{Label: "d1-ppr-mtls", Type: keytype.RSA2048, Public: rsa2048, CanSign: true}, jwt}, settings: ppr,
			want: with(merge(noCert, map[string]Status{"key/PPR": Fail})), message: "RSA 2048-bit keys are not accepted"},
		// D1-K1
		{name: "extractable", keys: []Key{func() Key { k := client("d1-ppr-mtls", cnPPR); k.PolicyProblems = []string{"extractable"}; return k }(), jwt}, settings: ppr,
			want: with(merge(noCert, map[string]Status{"key/PPR": Fail})), message: "departs from the D1 key policy: extractable"},
		{name: "cannot sign", keys: []Key{client("d1-ppr-mtls", cnPPR), func() Key { k := jwt; k.CanSign = false; return k }()}, settings: ppr,
			want: with(map[string]Status{"jwt-key/PPR": Fail}), message: "departs from the D1 key policy: cannot sign"},
		{name: "no certificate", keys: []Key{client("d1-ppr-mtls", ""), jwt}, settings: ppr,
			want: with(merge(noCert, map[string]Status{"certificate/PPR": Fail})), message: `key "d1-ppr-mtls" has no certificate`},
		{name: "certificate of another key", keys: []Key{func() Key { k := client("d1-ppr-mtls", cnPPR); k.Public = newP256(t).Public(); return k }(), jwt}, settings: ppr,
			want: with(merge(noCert, map[string]Status{"certificate/PPR": Fail})), message: "is for another key"},
		{name: "chain does not link", keys: []Key{client("d1-ppr-mtls", cnPPR), jwt}, settings: ppr, chains: stubChains{sortErr: errors.New("hsm: the chain does not link")},
			want: with(map[string]Status{"chain/PPR": Fail}), message: "does not link"},
		{name: "chain out of order", keys: []Key{client("d1-ppr-mtls", cnPPR), jwt}, settings: ppr, chains: stubChains{reversed: true},
			want: with(map[string]Status{"chain/PPR": Warn}), message: "out of order"},
		{name: "expires soon", keys: []Key{client("d1-ppr-mtls", cnPPR), jwt}, settings: ppr, chains: stubChains{warnings: []string{"expires in 3 days", "chain certificate expires in 9 days"}},
			want: with(map[string]Status{"expiry/PPR": Warn}), message: "expires in 3 days; chain certificate expires in 9 days"},
		{name: "expired", keys: []Key{client("d1-ppr-mtls", cnPPR), jwt}, settings: ppr, chains: stubChains{dateErr: errors.New("certificate expired")},
			want: with(map[string]Status{"expiry/PPR": Fail}), message: "certificate expired"},
		{name: "CN of the other environment", keys: []Key{client("d1-ppr-mtls", "TLSMA-ECDSA/ABCDEFGHIJ/PRD"), jwt}, settings: ppr,
			want: with(map[string]Status{"cn/PPR": Fail}), message: "PPR and PRD credentials must never be mixed"},
		// D1-C8
		{name: "RSA JWT key", keys: []Key{client("d1-ppr-mtls", cnPPR), {Label: "d1-ppr-jwt", Type: keytype.RSA4096, Public: rsa4096, CanSign: true}}, settings: ppr,
			want: with(map[string]Status{"jwt-key/PPR": Fail}), message: "D1 takes ES256 assertions only"},
		{name: "JWT key missing", keys: []Key{client("d1-ppr-mtls", cnPPR)}, settings: ppr,
			want: with(map[string]Status{"jwt-key/PPR": Fail}), message: `no key "d1-ppr-jwt" on the token`},
		{name: "both environments", keys: []Key{client("d1-prd-mtls", "TLSMA-ECDSA/ABCDEFGHIJ/PRD"), client("d1-ppr-mtls", "")},
			want: map[string]Status{"key/PPR": Pass, "certificate/PPR": Fail, "key/PRD": Pass, "certificate/PRD": Pass, "chain/PRD": Pass, "cn/PRD": Pass, "expiry/PRD": Pass}, message: "has no certificate"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			found := CheckKeys(tt.keys, tt.settings, tt.chains, time.Now())
			got := lines(t, found)
			if !maps.Equal(got, tt.want) {
				t.Errorf("lines %v\nwant  %v", got, tt.want)
			}
			if i := slices.IndexFunc(found, func(f Finding) bool { return f.Status != Pass }); i >= 0 && !strings.Contains(found[i].Message, tt.message) {
				t.Errorf("first problem %q, want %q", found[i].Message, tt.message)
			}
			for _, f := range found {
				if (f.Status == Pass) != (f.Fix == "") {
					t.Errorf("%s/%s: %s with fix %q", f.Check, f.Env, f.Status, f.Fix)
				}
			}
			if t.Failed() {
				for _, f := range found {
					t.Logf("%+v", f)
				}
			}
		})
	}
}

func merge(a, b map[string]Status) map[string]Status {
	m := maps.Clone(a)
	maps.Copy(m, b)
	return m
}

// lines maps each finding's check/env to its status; a line twice is an error.
func lines(t *testing.T, found []Finding) map[string]Status {
	t.Helper()
	got := map[string]Status{}
	for _, f := range found {
		key := strings.TrimSuffix(string(f.Check)+"/"+string(f.Env), "/")
		if _, dup := got[key]; dup {
			t.Errorf("line %s twice", key)
		}
		got[key] = f.Status
	}
	return got
}

// TestCheckKeysOrder: environments come in a fixed order, PPR first, and the
// checks of a key in the order an operator fixes them.
func TestCheckKeysOrder(t *testing.T) {
	thales := newTestCA(t, "Test Thales CA")
	var keys []Key
	for _, env := range []string{"prd", "ppr"} {
		pub := newP256(t).Public()
		cn := "TLSMA-ECDSA/ABCDEFGHIJ/" + strings.ToUpper(env)
		keys = append(keys, Key{Label: "d1-" + env + "-mtls", Type: keytype.ECDSAP256, Public: pub, CanSign: true,
			Chain: []*x509.Certificate{thales.issue(t, cn, pub, 90*24*time.Hour)}})
	}
	var got []string
	for _, f := range CheckKeys(keys, nil, stubChains{}, time.Now()) {
		got = append(got, string(f.Check)+"/"+string(f.Env))
	}
	want := []string{"key/PPR", "certificate/PPR", "chain/PPR", "cn/PPR", "expiry/PPR", "key/PRD", "certificate/PRD", "chain/PRD", "cn/PRD", "expiry/PRD"}
	if !slices.Equal(got, want) {
		t.Errorf("order %v, want %v", got, want)
	}
}
