package d1

import (
	"context"
	"crypto"
	"crypto/rsa"
	"errors"
	"io/fs"
	"math/big"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

// rsa4096 is the public half of an RSA 4096 key: a D1 type, without the
// seconds that generating one takes.
var rsa4096 = &rsa.PublicKey{N: new(big.Int).Lsh(big.NewInt(1), 4095), E: 65537}

func TestPlanKeys(t *testing.T) {
	tests := []struct {
		name     string
		settings map[Env]*Settings
		labels   []string
		want     map[Env][]string // mTLS labels per environment
		bare     []Env            // environments named by labels only
	}{
		{"labels only", nil, []string{"d1-ppr-mtls", "d1-prd-mtls", "web"},
			map[Env][]string{PreProd: {"d1-ppr-mtls"}, Production: {"d1-prd-mtls"}}, []Env{PreProd, Production}},
		{"configured key wins over labels", map[Env]*Settings{PreProd: {Key: "client"}}, []string{"d1-ppr-mtls", "client"},
			map[Env][]string{PreProd: {"client"}}, nil},
		{"other roles by label", nil, []string{"d1-prd-jwt", "d1-prd-server", "PRD_oauth", "d1-prd-mtls"},
			map[Env][]string{Production: {"d1-prd-mtls"}}, []Env{Production}},
		{"a server key names its environment without a client key", nil, []string{"d1-prd-server"},
			map[Env][]string{Production: nil}, []Env{Production}},
		{"other roles by settings, in any environment", map[Env]*Settings{PreProd: {JWT: JWTSettings{Key: "d1-prd-signer"}}}, []string{"d1-prd-signer"},
			map[Env][]string{PreProd: nil, Production: nil}, []Env{Production}},
		{"empty section", map[Env]*Settings{Production: nil}, nil, map[Env][]string{Production: nil}, []Env{Production}},
		{"ambiguous label", nil, []string{"ppr-prd"}, map[Env][]string{}, nil},
		// A rotation's keys are checked by the served check, not as the environment's keys.
		{"a pending successor and a retired key", nil, []string{"d1-ppr-mtls", "d1-ppr-mtls/successor", "d1-ppr-mtls/retired-20261203T170000Z"},
			map[Env][]string{PreProd: {"d1-ppr-mtls"}}, []Env{PreProd}},
		{"a rotation's keys alone name no environment", nil, []string{"d1-prd-mtls/successor"}, map[Env][]string{}, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			plans := PlanKeys(tt.settings, tt.labels)
			if len(plans) != len(tt.want) {
				t.Fatalf("environments %v, want %v", plans, tt.want)
			}
			for env, want := range tt.want {
				p := plans[env]
				if p == nil || !slices.Equal(p.MTLS, want) || (p.Settings == nil) != slices.Contains(tt.bare, env) {
					t.Errorf("%s: %+v, want mTLS %v", env, p, want)
				}
			}
		})
	}
}

// TestCheckCN covers D1-C4 (the CN names type, issuer and environment) and
// D1-G2 (never the other environment's certificate).
func TestCheckCN(t *testing.T) {
	ec := newP256(t).Public()
	tests := []struct {
		name, cn string
		pub      crypto.PublicKey
		issuerID string
		want     Status
		message  string
	}{
		{"default pattern", "TLSMA-ECDSA/ABCDEFGHIJ/PPR", ec, "ABCDEFGHIJ", Pass, `"TLSMA-ECDSA/ABCDEFGHIJ/PPR": ECDSA, PPR`},
		{"RSA", "TLSMA-RSA/ABCDEFGHIJ/PPR", rsa4096, "", Pass, "RSA, PPR"},
		{"D1-G2 other environment", "TLSMA-ECDSA/ABCDEFGHIJ/PRD", ec, "", Fail, "is a PRD certificate on the PPR key"},
		{"no environment", "client.example", ec, "", Warn, "names no environment"},
		{"both environments", "PPR/PRD", ec, "", Warn, "names no environment"},
		{"type differs", "TLSMA-RSA/ABCDEFGHIJ/PPR", ec, "", Warn, "names key type RSA but the key is ECDSA"},
		{"other issuer id", "TLSMA-ECDSA/OTHER/PPR", ec, "ABCDEFGHIJ", Warn, `does not hold the issuer id "ABCDEFGHIJ"`},
		{"another pattern", "issuer/ABCDEFGHIJ/PPR", ec, "ABCDEFGHIJ", Pass, "ECDSA, PPR"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := checkCN(PreProd, "d1-ppr-mtls", tt.cn, tt.pub, tt.issuerID)
			if f.Check != CNCheck || f.Env != PreProd || f.Status != tt.want || !strings.Contains(f.Message, tt.message) || (f.Fix == "") != (tt.want == Pass) {
				t.Errorf("%+v, want %s with %q", f, tt.want, tt.message)
			}
		})
	}
}

func TestSettingsProblems(t *testing.T) {
	ca := filepath.Join(t.TempDir(), "ca.pem")
	if err := os.WriteFile(ca, []byte("not PEM"), 0o644); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name     string
		settings Settings
		want     []string // settings with a problem
	}{
		{"good", Settings{Target: "https://d1.example", JWT: JWTSettings{TokenURL: "https://d1.example/authz/v1/oauth2/token"}}, nil},
		{"empty", Settings{}, nil},
		{"http target", Settings{Target: "http://d1.example"}, []string{"target"}},
		{"no host", Settings{Target: "https://"}, []string{"target"}},
		{"token URL not a URL", Settings{JWT: JWTSettings{TokenURL: "d1.example/token"}}, []string{"jwt.token_url"}},
		{"server CA missing and not PEM", Settings{ServerCA: ca}, []string{"server_ca"}},
		{"all", Settings{Target: "ftp://x", ServerCA: "/nonexistent", JWT: JWTSettings{TokenURL: "x"}}, []string{"target", "jwt.token_url", "server_ca"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var got []string
			for _, p := range tt.settings.Problems() {
				got = append(got, p.Setting)
				if p.Message == "" {
					t.Errorf("%s: no message", p.Setting)
				}
			}
			if !slices.Equal(got, tt.want) {
				t.Errorf("problems with %v, want %v", got, tt.want)
			}
		})
	}
}

func TestCheckSocket(t *testing.T) {
	tests := []struct {
		name string
		s    SocketFile
		want Status
		fix  string
	}{
		{"private", SocketFile{Path: "/run/a.sock", Found: true, Mode: fs.ModeSocket | 0o660, Owner: "hsmagent", Group: "d1"}, Pass, ""},
		{"open to all", SocketFile{Path: "/run/a.sock", Found: true, Mode: fs.ModeSocket | 0o666}, Warn, "socket_mode"},
		{"missing", SocketFile{Path: "/run/a.sock"}, Fail, "start the agent"},
		{"a plain file", SocketFile{Path: "/run/a.sock", Found: true, Mode: 0o600}, Fail, "correct the socket path"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := CheckSocket(tt.s)
			if f.Check != SocketCheck || f.Status != tt.want || !strings.Contains(f.Fix, tt.fix) || (f.Fix == "") != (tt.fix == "") {
				t.Errorf("%+v, want %s, fix %q", f, tt.want, tt.fix)
			}
		})
	}
	if f := CheckSocket(SocketFile{Path: "/run/a.sock", Found: true, Mode: fs.ModeSocket | 0o660, Owner: "hsmagent", Group: "d1"}); f.Message != "/run/a.sock: owner hsmagent, group d1, mode 0660" {
		t.Errorf("message %q", f.Message)
	}
}

func TestCheckAgent(t *testing.T) {
	tests := []struct {
		name    string
		a       AgentAnswer
		want    Status
		message string
	}{
		{"serving", AgentAnswer{Health: "SERVING", Version: "1.2", Keys: 3}, Pass, "version 1.2, SERVING, 3 key(s) offered to this user"},
		{"no version", AgentAnswer{Health: "SERVING"}, Pass, "version unknown"},
		{"not serving", AgentAnswer{Health: "NOT_SERVING"}, Fail, "agent health is NOT_SERVING"},
		{"dial failed", AgentAnswer{DialErr: errors.New("agent: connection refused")}, Fail, "connection refused"},
		{"call failed", AgentAnswer{Err: errors.New("permission denied"), Health: "SERVING"}, Fail, "permission denied"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := CheckAgent(tt.a)
			if f.Check != AgentCheck || f.Status != tt.want || !strings.Contains(f.Message, tt.message) || (f.Fix == "") != (tt.want == Pass) {
				t.Errorf("%+v, want %s with %q", f, tt.want, tt.message)
			}
		})
	}
}

// fakeResolver answers from a table; a missing name does not resolve.
type fakeResolver map[string][]string

func (r fakeResolver) LookupHost(ctx context.Context, host string) ([]string, error) {
	if addrs, ok := r[host]; ok {
		return addrs, nil
	}
	return nil, errors.New("no such host")
}

// TestCheckDNS covers D1-C7: D1 has host names, not static addresses.
func TestCheckDNS(t *testing.T) {
	r := fakeResolver{"d1.example": {"192.0.2.7", "192.0.2.8"}}
	tests := []struct {
		name     string
		settings map[Env]*Settings
		want     []string // "env status message-part"
	}{
		{"resolves", map[Env]*Settings{PreProd: {Target: "https://d1.example"}}, []string{"PPR pass d1.example resolves to 192.0.2.7, 192.0.2.8"}},
		{"one line per host", map[Env]*Settings{PreProd: {Target: "https://d1.example", JWT: JWTSettings{TokenURL: "https://d1.example:8443/token"}}},
			[]string{"PPR pass d1.example resolves"}},
		{"does not resolve", map[Env]*Settings{Production: {JWT: JWTSettings{TokenURL: "https://auth.invalid/token"}}},
			[]string{"PRD warn auth.invalid (d1.PRD.jwt.token_url) does not resolve"}},
		{"an IP address", map[Env]*Settings{PreProd: {Target: "https://192.0.2.1"}}, []string{"PPR warn d1.PPR.target is the IP address 192.0.2.1"}},
		{"environments in order", map[Env]*Settings{Production: {Target: "https://d1.example"}, PreProd: {Target: "https://d1.example"}},
			[]string{"PPR pass", "PRD pass"}},
		{"nothing to resolve", map[Env]*Settings{PreProd: nil, Production: {Key: "k"}}, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := CheckDNS(context.Background(), tt.settings, r, time.Second)
			if len(got) != len(tt.want) {
				t.Fatalf("%+v, want %v", got, tt.want)
			}
			for i, f := range got {
				if line := string(f.Env) + " " + f.Status.String() + " " + f.Message; f.Check != DNSCheck || !strings.HasPrefix(line, tt.want[i]) {
					t.Errorf("%q, want %q", line, tt.want[i])
				}
			}
		})
	}
}
