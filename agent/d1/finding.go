package d1

import "fmt"

// Status is the outcome of one check.
type Status int

const (
	// Pass: the check found what D1 needs.
	Pass Status = iota + 1
	// Warn: worth reading, but D1 traffic still works.
	Warn
	// Fail: D1 traffic from this host fails, or must not be sent, until fixed.
	Fail
)

// String is the word doctor prints: "pass", "warn" or "fail".
func (s Status) String() string {
	switch s {
	case Pass:
		return "pass"
	case Warn:
		return "warn"
	case Fail:
		return "fail"
	}
	return fmt.Sprintf("Status(%d)", int(s))
}

// Check names a check. The names are stable: scripts read them in doctor's JSON.
type Check string

// The checks of this package.
const (
	KeyCheck         Check = "key"         // an mTLS client key: present, of a D1 type, sign-only (D1-C2, D1-K1)
	CertificateCheck Check = "certificate" // the key has its own certificate
	ChainCheck       Check = "chain"       // the stored chain links, in order
	CNCheck          Check = "cn"          // the CN names the key's environment and type (D1-C4, D1-G2)
	ExpiryCheck      Check = "expiry"      // the chain is valid now and for 30 days more
	JWTKeyCheck      Check = "jwt-key"     // the OAuth assertion key makes ES256 (D1-C8)
	KeysCheck        Check = "keys"        // the token names some D1 environment
	SocketCheck      Check = "socket"      // the agent's socket exists and is not open to all
	AgentCheck       Check = "agent"       // the agent answers and is SERVING
	DNSCheck         Check = "dns"         // D1's host names resolve (D1-C7)
	MTLSCheck        Check = "mtls"        // a handshake with D1 through the agent (D1-G1, D1-C6)
	OAuthCheck       Check = "oauth"       // an access token from D1 (D1-C8)
)

// Finding is one line of a host's checklist: what a check found and, unless
// it passed, what to do about it.
type Finding struct {
	Check   Check
	Env     Env // "" for the host's own checks
	Status  Status
	Message string
	Fix     string // "" when the check passed
	// Key is the label of the key a finding is about, "" when it is about
	// none in particular (only the served check sets it).
	Key string
	// Differences are what the served check found to differ for Key.
	Differences []Difference
}

func passed(check Check, env Env, format string, args ...any) Finding {
	return Finding{Check: check, Env: env, Status: Pass, Message: fmt.Sprintf(format, args...)}
}

func warned(check Check, env Env, message, fix string) Finding {
	return Finding{Check: check, Env: env, Status: Warn, Message: message, Fix: fix}
}

func failed(check Check, env Env, message, fix string) Finding {
	return Finding{Check: check, Env: env, Status: Fail, Message: message, Fix: fix}
}

// Envs are the D1 environments in the order checks report them.
var Envs = []Env{PreProd, Production}
