package proxy

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"strings"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
	"github.com/hsmagent/hsmagent/agent/d1"
)

// TokenPath is where D1 asks the issuer for an access token (D1-S6).
const TokenPath = "/authz/d1/v1/oauth2/token"

// tokenIssuer is the "iss" of the access tokens the server proxy issues.
const tokenIssuer = "hsmagent-proxy"

// OAuth protects the server proxy's routes for D1-S6: D1 trades HTTP Basic
// client credentials for a short-lived JWT access token at TokenPath, signed
// by a key in the agent, and sends it as Bearer on every other call.
type OAuth struct {
	ClientID string
	Secret   []byte
	// Signer signs the access tokens (ES256 with a P-256 key, RS256 with RSA).
	Signer crypto.Signer
	KeyID  string
	// TTL of the access tokens; 0 means 15 minutes.
	TTL time.Duration
	Log *slog.Logger
	// Now is the clock; nil means time.Now.
	Now func() time.Time
}

func (o *OAuth) now() time.Time {
	if o.Now != nil {
		return o.Now()
	}
	return time.Now()
}

func (o *OAuth) ttl() time.Duration {
	if o.TTL > 0 {
		return o.TTL
	}
	return 15 * time.Minute
}

func (o *OAuth) alg() jose.SignatureAlgorithm {
	if _, ok := o.Signer.Public().(*ecdsa.PublicKey); ok {
		return jose.ES256
	}
	return jose.RS256
}

// Check validates the configuration.
func (o *OAuth) Check() error {
	switch {
	case o.ClientID == "" || strings.Contains(o.ClientID, ":"):
		return errors.New("proxy: OAuth client id is empty or holds ':'")
	case len(o.Secret) < 16:
		return errors.New("proxy: OAuth client secret is shorter than 16 bytes")
	case o.Signer == nil:
		return errors.New("proxy: no OAuth token signing key")
	}
	return nil
}

// Wrap serves TokenPath itself and lets through to next only requests with
// a valid Bearer token, whose Authorization header it removes.
func (o *OAuth) Wrap(next http.Handler) http.Handler { return o.wrap(next, nil) }

// wrap is Wrap telling obs (if not nil) of each token request's outcome.
func (o *OAuth) wrap(next http.Handler, obs Observer) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == TokenPath {
			result := o.token(w, r)
			if obs != nil {
				obs.TokenIssued(result)
			}
			return
		}
		if err := o.verify(r.Header.Get("Authorization")); err != nil {
			w.Header().Set("WWW-Authenticate", `Bearer error="invalid_token"`)
			oauthError(w, http.StatusUnauthorized, "invalid_token", err.Error())
			return
		}
		r.Header.Del("Authorization")
		next.ServeHTTP(w, r)
	})
}

func oauthError(w http.ResponseWriter, status int, code, desc string) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(map[string]string{"error": code, "error_description": desc})
}

// token answers a token request and returns "ok" or the OAuth error code sent.
func (o *OAuth) token(w http.ResponseWriter, r *http.Request) string {
	if r.Method != http.MethodPost {
		oauthError(w, http.StatusMethodNotAllowed, "invalid_request", "use POST")
		return "invalid_request"
	}
	id, secret, ok := r.BasicAuth()
	idOK := subtle.ConstantTimeCompare([]byte(id), []byte(o.ClientID)) == 1
	secretOK := subtle.ConstantTimeCompare([]byte(secret), o.Secret) == 1
	if !ok || !idOK || !secretOK {
		w.Header().Set("WWW-Authenticate", `Basic realm="hsmagent"`)
		oauthError(w, http.StatusUnauthorized, "invalid_client", "client authentication failed")
		return "invalid_client"
	}
	if err := r.ParseForm(); err != nil || r.PostForm.Get("grant_type") != "client_credentials" {
		oauthError(w, http.StatusBadRequest, "unsupported_grant_type", "grant_type must be client_credentials")
		return "unsupported_grant_type"
	}
	now := o.now()
	jti, err := d1.NewJWTID()
	if err != nil {
		o.Log.Error("issuing an access token failed", "err", err)
		oauthError(w, http.StatusInternalServerError, "server_error", "could not make a token id")
		return "server_error"
	}
	claims := jwt.Claims{Issuer: tokenIssuer, Subject: o.ClientID, IssuedAt: jwt.NewNumericDate(now),
		NotBefore: jwt.NewNumericDate(now), Expiry: jwt.NewNumericDate(now.Add(o.ttl())), ID: jti}
	tok, err := d1.SignJWT(o.Signer, o.KeyID, claims)
	if err != nil {
		o.Log.Error("issuing an access token failed", "err", err)
		oauthError(w, http.StatusInternalServerError, "server_error", "could not sign the token")
		return "server_error"
	}
	o.Log.Info("access token issued", "client_id", o.ClientID, "expires", claims.Expiry.Time().UTC().Format(time.RFC3339))
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	json.NewEncoder(w).Encode(map[string]any{"access_token": tok, "token_type": "Bearer", "expires_in": int(o.ttl().Seconds())})
	return "ok"
}

func (o *OAuth) verify(header string) error {
	raw, ok := strings.CutPrefix(header, "Bearer ")
	if !ok || raw == "" {
		return errors.New("a Bearer token is required")
	}
	tok, err := jwt.ParseSigned(raw, []jose.SignatureAlgorithm{o.alg()})
	if err != nil {
		return errors.New("malformed token")
	}
	var c jwt.Claims
	if err := tok.Claims(o.Signer.Public(), &c); err != nil {
		return errors.New("bad token signature")
	}
	if err := c.ValidateWithLeeway(jwt.Expected{Issuer: tokenIssuer, Subject: o.ClientID, Time: o.now()}, 5*time.Second); err != nil {
		return fmt.Errorf("token not valid: %v", err)
	}
	return nil
}
