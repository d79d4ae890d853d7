package d1

import (
	"context"
	"crypto"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/http"
	"time"
)

// Credentials are the issuer's keys as the agent offers them: an
// *agent.Client.
type Credentials interface {
	GetClientCertificate(label string) func(*tls.CertificateRequestInfo) (*tls.Certificate, error)
	Signer(ctx context.Context, label string) (crypto.Signer, error)
}

// CheckOnline makes a real mTLS handshake with each configured D1 target,
// presenting the client key through creds, then fetches an access token with
// the JWT key (D1-G1, D1-C6, D1-C8). Any HTTP answer after the handshake
// passes. A nil creds means the agent did not answer: nothing is tried.
// Each request gives up after timeout.
func CheckOnline(ctx context.Context, settings map[Env]*Settings, creds Credentials, timeout time.Duration) []Finding {
	var out []Finding
	for _, env := range Envs {
		s := settings[env]
		if s == nil || s.Target == "" {
			continue
		}
		out = append(out, checkEnvOnline(ctx, env, s, creds, timeout)...)
	}
	return out
}

func checkEnvOnline(ctx context.Context, env Env, s *Settings, creds Credentials, timeout time.Duration) []Finding {
	if creds == nil {
		return []Finding{failed(MTLSCheck, env, "not tried: the agent did not answer", "fix the agent check first")}
	}
	if s.Key == "" {
		return []Finding{failed(MTLSCheck, env, fmt.Sprintf("no d1.%s.key: which key to present is not configured", env), fmt.Sprintf("set d1.%s.key to the mTLS client key's label", env))}
	}
	hc, err := onlineClient(env, s, creds, timeout)
	if err != nil {
		return []Finding{failed(MTLSCheck, env, err.Error(), fmt.Sprintf("fix the key and certificate checks of %s; the agent must offer %q to this user", env, s.Key))}
	}
	hs := handshake(ctx, env, s.Target, hc)
	if hs.Status != Pass {
		return []Finding{hs}
	}
	return []Finding{hs, fetchToken(ctx, env, s.JWT, creds, hc, timeout)}
}

// onlineClient is the mTLS client D1's users get from NewHTTPClient.
func onlineClient(env Env, s *Settings, creds Credentials, timeout time.Duration) (*http.Client, error) {
	opts := ClientOptions{Env: env, GetClientCertificate: creds.GetClientCertificate(s.Key)}
	if s.ServerCA != "" {
		pool, err := LoadCertPool(s.ServerCA)
		if err != nil {
			return nil, err
		}
		opts.ServerRoots = pool
	}
	hc, err := NewHTTPClient(opts)
	if err != nil {
		return nil, err
	}
	hc.Timeout = timeout
	return hc, nil
}

func handshake(ctx context.Context, env Env, target string, hc *http.Client) Finding {
	req, err := http.NewRequestWithContext(ctx, http.MethodHead, target, nil)
	if err != nil {
		return failed(MTLSCheck, env, err.Error(), fmt.Sprintf("correct d1.%s.target", env))
	}
	resp, err := hc.Do(req)
	if err != nil {
		return failed(MTLSCheck, env, err.Error(), handshakeFix(err, env))
	}
	resp.Body.Close()
	return passed(MTLSCheck, env, "handshake with %s completed (%s), HTTP %d", req.URL.Host, tls.VersionName(resp.TLS.Version), resp.StatusCode)
}

// handshakeFix tells what to look at from how the handshake failed.
func handshakeFix(err error, env Env) string {
	var unknown x509.UnknownAuthorityError
	var hostname x509.HostnameError
	var invalid x509.CertificateInvalidError
	switch {
	case errors.As(err, &unknown):
		return fmt.Sprintf("D1's server certificate does not chain to the trusted roots (D1-C6): check d1.%s.server_ca (without it the embedded Amazon roots are used) and that the target is D1", env)
	case errors.As(err, &hostname), errors.As(err, &invalid):
		return fmt.Sprintf("D1's server certificate is not valid for d1.%s.target: check the host name and the clock", env)
	case isAlertFromPeer(err): // before net.Error: an alert arrives as a *net.OpError
		return "D1 refused the client certificate: it must be the one Thales signed for this environment, valid today"
	case isNetworkError(err):
		return fmt.Sprintf("check d1.%s.target, DNS and the firewall or proxy towards D1", env)
	}
	return fmt.Sprintf("check d1.%s.target and the network towards D1", env)
}

// isAlertFromPeer says whether err is a TLS alert the server sent. Over TCP
// crypto/tls reports one as a *net.OpError with Op "remote error" around an
// unexported alert type; tls.AlertError is what it wraps over QUIC.
func isAlertFromPeer(err error) bool {
	var alert tls.AlertError
	var op *net.OpError
	return errors.As(err, &alert) || errors.As(err, &op) && op.Op == "remote error"
}

// isNetworkError says whether err is the network's: a failed dial or
// lookup, or a timeout (http.Client's own, or its context's). Not any net.Error: every error of http.Client.Do is
// a *url.Error, which is one.
func isNetworkError(err error) bool {
	var op *net.OpError
	var dns *net.DNSError
	var netErr net.Error
	return errors.As(err, &op) || errors.As(err, &dns) || errors.As(err, &netErr) && netErr.Timeout() ||
		errors.Is(err, context.DeadlineExceeded)
}

func fetchToken(ctx context.Context, env Env, j JWTSettings, creds Credentials, hc *http.Client, timeout time.Duration) Finding {
	if j.Key == "" {
		return warned(OAuthCheck, env, fmt.Sprintf("no d1.%s.jwt section: the OAuth token fetch (D1-C8) is not checked", env),
			fmt.Sprintf("set d1.%s.jwt: key, kid, issuer_id and token_url", env))
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	signer, err := creds.Signer(ctx, j.Key)
	if err != nil {
		return failed(OAuthCheck, env, err.Error(), fmt.Sprintf("the agent must offer %q to this user", j.Key))
	}
	bearer := &JWTBearer{Signer: signer, KeyID: j.Kid, IssuerID: j.IssuerID, Issuer: j.Issuer, Audience: j.Audience, TokenURL: j.TokenURL, HTTPClient: hc}
	tok, err := bearer.Token()
	if err != nil {
		return failed(OAuthCheck, env, err.Error(), tokenFix(err, env))
	}
	return passed(OAuthCheck, env, "access token from %s, valid until %s", j.TokenURL, tok.Expiry.UTC().Format(time.RFC3339))
}

// tokenFix tells what to look at from how the token fetch failed.
func tokenFix(err error, env Env) string {
	var refused *TokenError
	var field *BearerFieldError
	switch {
	case errors.As(err, &refused):
		return "D1 refused the assertion: check kid and issuer_id, and that the JWT key's public key is registered with D1 under that kid"
	case errors.As(err, &field):
		return fmt.Sprintf("complete d1.%s.jwt: key, kid, issuer_id, token_url", env)
	}
	return fmt.Sprintf("check d1.%s.jwt.token_url and the network towards D1", env)
}
