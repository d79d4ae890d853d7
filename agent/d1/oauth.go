package d1

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/cryptosigner"
	"github.com/go-jose/go-jose/v4/jwt"
	"golang.org/x/oauth2"
)

// JWTBearerGrant is the grant type of RFC 7523 that D1's token endpoint takes.
const JWTBearerGrant = "urn:ietf:params:oauth:grant-type:jwt-bearer"

// MaxAssertionLifetime is the longest exp - now D1 accepts (D1-C8).
const MaxAssertionLifetime = 15 * time.Minute

// JWTBearer signs OAuth assertions with an HSM key and trades them for
// access tokens at D1's token endpoint (D1-C8).
type JWTBearer struct {
	// Signer is an ECDSA P-256 key (ES256 is the only algorithm D1 takes),
	// usually agent.Client.Signer(ctx, label).
	Signer crypto.Signer
	// KeyID is the "kid" header: the key registered with D1.
	KeyID string
	// IssuerID is the "sub" claim, and "iss" unless Issuer is set.
	IssuerID string
	// Issuer overrides "iss" (the aggregatorId in an aggregator model).
	Issuer string
	// Audience is the optional "aud" claim.
	Audience string
	// TokenURL is D1's token endpoint, <base>/authz/v1/oauth2/token.
	TokenURL string
	// HTTPClient makes the token request: the mTLS client of NewHTTPClient.
	HTTPClient *http.Client
	// Lifetime of an assertion; 0 means 5 minutes, at most 15.
	Lifetime time.Duration
	// Now is the clock; nil means time.Now.
	Now func() time.Time
	// Observe, when set, is told of every token fetch: the new token's
	// expiry, or the error (for metrics; it must not block).
	Observe func(expiry time.Time, err error)
}

func (j *JWTBearer) now() time.Time {
	if j.Now != nil {
		return j.Now()
	}
	return time.Now()
}

// BearerFieldError is a JWTBearer field that cannot make an assertion D1
// accepts. It is found before anything is signed or sent, so it is the
// caller's configuration, not D1 or the network.
type BearerFieldError struct {
	Field string // the JWTBearer field: Signer, KeyID, IssuerID, TokenURL or Lifetime
	Err   error
}

func (e *BearerFieldError) Error() string { return e.Err.Error() }
func (e *BearerFieldError) Unwrap() error { return e.Err }

func (j *JWTBearer) check() error {
	if err := j.checkFields(); err != nil {
		return err
	}
	if err := CheckIssuerID(j.IssuerID); err != nil {
		return &BearerFieldError{"IssuerID", err}
	}
	return nil
}

func (j *JWTBearer) checkFields() *BearerFieldError {
	if j.Signer == nil {
		return &BearerFieldError{"Signer", errors.New("d1: no JWT signing key")}
	}
	pub, ok := j.Signer.Public().(*ecdsa.PublicKey)
	switch {
	case !ok || pub.Curve != elliptic.P256():
		return &BearerFieldError{"Signer", fmt.Errorf("d1: the JWT key is %T, D1 takes ES256 only: use an ecdsa-p256 key", j.Signer.Public())}
	case j.KeyID == "":
		return &BearerFieldError{"KeyID", errors.New("d1: the JWT needs a kid: the key id registered with D1")}
	case j.TokenURL == "":
		return &BearerFieldError{"TokenURL", errors.New("d1: no token endpoint URL")}
	case j.Lifetime > MaxAssertionLifetime:
		return &BearerFieldError{"Lifetime", fmt.Errorf("d1: assertion lifetime %v is over D1's maximum of 15 minutes", j.Lifetime)}
	}
	if _, err := url.ParseRequestURI(j.TokenURL); err != nil {
		return &BearerFieldError{"TokenURL", fmt.Errorf("d1: token endpoint %q: %w", j.TokenURL, err)}
	}
	return nil
}

// Assertion returns a fresh signed JWT: header alg ES256 and kid; claims iss,
// sub, aud (if set), iat, exp and a random jti.
func (j *JWTBearer) Assertion() (string, error) {
	if err := j.check(); err != nil {
		return "", err
	}
	lifetime := j.Lifetime
	if lifetime == 0 {
		lifetime = 5 * time.Minute
	}
	iss := j.Issuer
	if iss == "" {
		iss = j.IssuerID
	}
	now := j.now()
	jti, err := NewJWTID()
	if err != nil {
		return "", err
	}
	claims := jwt.Claims{
		Issuer:   iss,
		Subject:  j.IssuerID,
		IssuedAt: jwt.NewNumericDate(now),
		Expiry:   jwt.NewNumericDate(now.Add(lifetime)),
		ID:       jti,
	}
	if j.Audience != "" {
		claims.Audience = jwt.Audience{j.Audience}
	}
	return SignJWT(j.Signer, j.KeyID, claims)
}

// SignJWT signs claims (any JSON-encodable value) as a compact JWS with
// ES256 for an ECDSA P-256 signer, RS256 for an RSA one.
func SignJWT(signer crypto.Signer, kid string, claims any) (string, error) {
	alg := jose.ES256
	switch k := signer.Public().(type) {
	case *ecdsa.PublicKey:
		if k.Curve != elliptic.P256() {
			return "", errors.New("d1: JWT keys on ECDSA must be P-256 (ES256)")
		}
	default:
		alg = jose.RS256
	}
	js, err := jose.NewSigner(jose.SigningKey{Algorithm: alg, Key: cryptosigner.Opaque(signer)},
		(&jose.SignerOptions{}).WithType("JWT").WithHeader("kid", kid))
	if err != nil {
		return "", fmt.Errorf("d1: JWT signer: %w", err)
	}
	token, err := jwt.Signed(js).Claims(claims).Serialize()
	if err != nil {
		return "", fmt.Errorf("d1: signing JWT: %w", err)
	}
	return token, nil
}

// Token implements oauth2.TokenSource: a new assertion traded for a new
// access token. Wrap it with TokenSource to reuse tokens until they expire.
func (j *JWTBearer) Token() (*oauth2.Token, error) {
	tok, err := j.exchange(context.Background())
	if j.Observe != nil {
		var expiry time.Time
		if err == nil {
			expiry = tok.Expiry
		}
		j.Observe(expiry, err)
	}
	return tok, err
}

// TokenSource caches the access token and fetches a new one a minute before
// it expires; concurrent callers share one refresh.
func (j *JWTBearer) TokenSource() (oauth2.TokenSource, error) {
	if err := j.check(); err != nil {
		return nil, err
	}
	return oauth2.ReuseTokenSourceWithExpiry(nil, j, time.Minute), nil
}

// TokenError is the token endpoint's refusal, with its status and body.
type TokenError struct {
	URL    string
	Status int
	Body   string
}

func (e *TokenError) Error() string {
	return fmt.Sprintf("d1: token endpoint %q answered %d %s: %s", e.URL, e.Status, http.StatusText(e.Status), e.Body)
}

func (j *JWTBearer) exchange(ctx context.Context) (*oauth2.Token, error) {
	assertion, err := j.Assertion()
	if err != nil {
		return nil, err
	}
	form := url.Values{"grant_type": {JWTBearerGrant}, "assertion": {assertion}}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, j.TokenURL, strings.NewReader(form.Encode()))
	if err != nil {
		return nil, fmt.Errorf("d1: token request: %w", err)
	}
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	req.Header.Set("Accept", "application/json")
	hc := j.HTTPClient
	if hc == nil {
		return nil, errors.New("d1: no HTTP client for the token endpoint: use the mTLS client of NewHTTPClient")
	}
	resp, err := hc.Do(req)
	if err != nil {
		return nil, fmt.Errorf("d1: token request to %q: %w", j.TokenURL, err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<16))
	if resp.StatusCode != http.StatusOK {
		return nil, &TokenError{URL: j.TokenURL, Status: resp.StatusCode, Body: truncate(string(body), 512)}
	}
	var tr struct {
		AccessToken string          `json:"access_token"`
		TokenType   string          `json:"token_type"`
		ExpiresIn   json.RawMessage `json:"expires_in"`
	}
	if err := json.Unmarshal(body, &tr); err != nil || tr.AccessToken == "" {
		return nil, fmt.Errorf("d1: token endpoint %q answered 200 without an access_token: %s", j.TokenURL, truncate(string(body), 512))
	}
	tok := &oauth2.Token{AccessToken: tr.AccessToken, TokenType: "Bearer"}
	// D1 tokens live 15 minutes; trust expires_in when given (number or string).
	lifetime := 15 * time.Minute
	if s := strings.Trim(string(tr.ExpiresIn), `"`); s != "" {
		if n, err := strconv.Atoi(s); err == nil && n > 0 {
			lifetime = time.Duration(n) * time.Second
		}
	}
	tok.Expiry = j.now().Add(lifetime)
	return tok, nil
}

func truncate(s string, n int) string {
	s = strings.TrimSpace(s)
	if len(s) > n {
		return s[:n] + "..."
	}
	return s
}

// BearerTransport adds "Authorization: Bearer <token>" from ts to every request.
func BearerTransport(base http.RoundTripper, ts oauth2.TokenSource) http.RoundTripper {
	return &oauth2.Transport{Source: ts, Base: base}
}
