package d1

import (
	"context"
	"fmt"
	"net"
	"net/url"
	"strings"
	"time"
)

// Resolver looks up host names: net.DefaultResolver, or a stand-in in tests.
type Resolver interface {
	LookupHost(ctx context.Context, host string) ([]string, error)
}

// CheckDNS resolves the D1 host names of the settings, as every new
// connection to D1 does (D1-C7), giving each lookup timeout. These are only
// warnings: the host's resolver may differ from the one that will be used.
func CheckDNS(ctx context.Context, settings map[Env]*Settings, r Resolver, timeout time.Duration) []Finding {
	var out []Finding
	for _, env := range Envs {
		s := settings[env]
		if s == nil {
			continue
		}
		seen := map[string]bool{}
		for _, setting := range []struct{ name, value string }{{"target", s.Target}, {"jwt.token_url", s.JWT.TokenURL}} {
			u, err := url.Parse(setting.value)
			if setting.value == "" || err != nil || u.Hostname() == "" || seen[u.Hostname()] {
				continue
			}
			seen[u.Hostname()] = true
			out = append(out, checkHost(ctx, env, "d1."+string(env)+"."+setting.name, u.Hostname(), r, timeout))
		}
	}
	return out
}

// checkHost resolves the host name that setting gives.
func checkHost(ctx context.Context, env Env, setting, host string, r Resolver, timeout time.Duration) Finding {
	if net.ParseIP(host) != nil {
		return warned(DNSCheck, env, fmt.Sprintf("%s is the IP address %s", setting, host),
			"configure D1's host name: D1 has no static IP addresses (D1-C7)")
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	addrs, err := r.LookupHost(ctx, host)
	if err != nil {
		return warned(DNSCheck, env, fmt.Sprintf("%s (%s) does not resolve: %v", host, setting, err),
			"check /etc/resolv.conf and the host name; D1 host names are given at onboarding")
	}
	return passed(DNSCheck, env, "%s resolves to %s", host, strings.Join(addrs, ", "))
}
