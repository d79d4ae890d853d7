package d1

import (
	"fmt"
	"net/url"
)

// Settings are what a host configures for one D1 environment. Findings name
// them as hsmagent's config file does: d1.PPR.target, d1.PPR.jwt.kid.
type Settings struct {
	Target   string // D1's base URL
	Key      string // label of the mTLS client key
	ServerCA string // PEM file trusted for D1's server instead of the embedded roots
	JWT      JWTSettings
	// ServerKey and OAuthKey are keys of the inbound side (D1 calling the
	// issuer): they carry no D1 client certificate.
	ServerKey, OAuthKey string
}

// JWTSettings configure the OAuth token fetch (D1-C8).
type JWTSettings struct {
	Key      string // label of the ES256 assertion key
	Kid      string
	IssuerID string
	Issuer   string
	TokenURL string
	Audience string
}

// SettingProblem is a setting that cannot work, found without the network.
type SettingProblem struct {
	Setting string // under the environment's section: "target", "jwt.token_url", "server_ca"
	Message string
}

// Problems lists the settings of s that cannot work: URLs that are not
// https:// and a server CA file that does not load.
func (s *Settings) Problems() []SettingProblem {
	var out []SettingProblem
	for _, u := range []struct{ setting, value string }{{"target", s.Target}, {"jwt.token_url", s.JWT.TokenURL}} {
		if u.value != "" && !isHTTPSURL(u.value) {
			out = append(out, SettingProblem{u.setting, fmt.Sprintf("%q is not an https:// URL", u.value)})
		}
	}
	if s.ServerCA != "" {
		if _, err := LoadCertPool(s.ServerCA); err != nil {
			out = append(out, SettingProblem{"server_ca", err.Error()})
		}
	}
	return out
}

func isHTTPSURL(s string) bool {
	u, err := url.Parse(s)
	return err == nil && u.Scheme == "https" && u.Host != ""
}
