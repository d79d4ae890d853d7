package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"strings"
	"time"

	"github.com/hsmagent/hsmagent/agent"
	"github.com/hsmagent/hsmagent/agent/d1"
	"github.com/hsmagent/hsmagent/agent/proxy"
	"github.com/urfave/cli/v2"
)

// Commands that use the agent: none of them opens the HSM or knows the PIN.

func d1ClientFlags() []cli.Flag {
	return []cli.Flag{
		configFlag,
		socketFlag,
		&cli.StringFlag{Name: "key", Usage: "`LABEL` of the D1 mTLS client key in the agent"},
		&cli.StringFlag{Name: "env", Usage: "D1 environment `ENV`: PPR or PRD (default: from the certificate's CN)"},
		&cli.StringFlag{Name: "server-ca", Usage: "PEM `FILE` trusted for D1's server instead of the embedded Amazon roots"},
		&cli.DurationFlag{Name: "max-conn-age", Usage: "retire connections to D1 after `DURATION` so DNS changes apply", Value: d1.DefaultMaxConnAge},
	}
}

func jwtFlags() []cli.Flag {
	return []cli.Flag{
		&cli.StringFlag{Name: "jwt-key", Usage: "`LABEL` of the ES256 key that signs OAuth assertions"},
		&cli.StringFlag{Name: "kid", Usage: "key `ID` registered with D1 (JWT header kid)"},
		&cli.StringFlag{Name: "issuer-id", Usage: "issuer `ID` (JWT sub, and iss unless --jwt-issuer)"},
		&cli.StringFlag{Name: "jwt-issuer", Usage: "JWT iss `ID` when it differs from the issuer id (aggregator model)"},
		&cli.StringFlag{Name: "token-url", Usage: "D1 token endpoint `URL`, <base>/authz/v1/oauth2/token"},
		&cli.StringFlag{Name: "aud", Usage: "JWT aud `AUDIENCE` (optional)"},
	}
}

// dialAgent connects to the agent: at once or not at all when the socket is
// missing, refuses this user or has no agent behind it (agent.Dial), unless
// the command has --wait-for-agent.
func dialAgent(c *cli.Context) (*agent.Client, error) {
	wait := c.Duration("wait-for-agent") // 0 for commands without the flag
	ctx, cancel := context.WithTimeout(c.Context, wait+10*time.Second)
	defer cancel()
	socket, err := agentSocket(c)
	if err != nil {
		return nil, err
	}
	return agent.Dial(ctx, socket, agent.WithWaitForAgent(wait))
}

// packagedSocket is where the package's agent listens (packaging/systemd).
const packagedSocket = "/run/hsmagent/agent.sock"

// agentSocket is the socket a command talks to: --socket, $HSMAGENT_SOCKET
// or the config's socket, else the package's when it exists.
func agentSocket(c *cli.Context) (string, error) {
	if s := c.String("socket"); s != "" {
		return s, nil
	}
	// A socket the caller may not reach (its directory is the agent's
	// group's) is still the one: dialling it explains the permission.
	if _, err := os.Stat(packagedSocket); !errors.Is(err, fs.ErrNotExist) {
		return packagedSocket, nil
	}
	return "", usagef("no agent socket: pass --socket PATH, set %s or put socket: in the config (none at %s)", agent.SocketEnv, packagedSocket)
}

// d1HTTPClient builds the inbound mTLS client from the flags.
func d1HTTPClient(c *cli.Context, client *agent.Client) (*http.Client, d1.Env, error) {
	label := c.String("key")
	if label == "" {
		return nil, "", usagef("missing --key LABEL (the D1 mTLS client key)")
	}
	cert, err := client.TLSCertificate(c.Context, label)
	if err != nil {
		return nil, "", err
	}
	env, err := d1.InferEnv(c.String("env"), cert.Leaf.Subject.CommonName, label)
	if err != nil {
		return nil, "", usageError{err}
	}
	opts := d1.ClientOptions{Env: env, GetClientCertificate: client.GetClientCertificate(label), MaxConnAge: c.Duration("max-conn-age")}
	if f := c.String("server-ca"); f != "" {
		if opts.ServerRoots, err = d1.LoadCertPool(f); err != nil {
			return nil, "", err
		}
	}
	hc, err := d1.NewHTTPClient(opts)
	return hc, env, err
}

// jwtBearer builds the OAuth token source from the flags, or nil without --jwt-key.
func jwtBearer(c *cli.Context, client *agent.Client, hc *http.Client) (*d1.JWTBearer, error) {
	if c.String("jwt-key") == "" {
		for _, f := range []string{"kid", "issuer-id", "token-url", "aud", "jwt-issuer"} {
			if c.IsSet(f) {
				return nil, usagef("--%s needs --jwt-key", f)
			}
		}
		return nil, nil
	}
	for _, f := range []string{"kid", "issuer-id", "token-url"} {
		if c.String(f) == "" {
			return nil, usagef("--jwt-key needs --%s", f)
		}
	}
	signer, err := client.Signer(c.Context, c.String("jwt-key"))
	if err != nil {
		return nil, err
	}
	j := &d1.JWTBearer{Signer: signer, KeyID: c.String("kid"), IssuerID: c.String("issuer-id"), Issuer: c.String("jwt-issuer"),
		Audience: c.String("aud"), TokenURL: c.String("token-url"), HTTPClient: hc}
	if _, err := j.Assertion(); err != nil { // validate now, not at the first request
		return nil, usageError{err}
	}
	return j, nil
}

func d1Command() *cli.Command {
	return &cli.Command{
		Name:  "d1",
		Usage: "Thales D1 helpers that use the agent",
		Subcommands: []*cli.Command{{
			Name:   "token",
			Usage:  "print a fresh D1 access token (OAuth JWT bearer over mTLS), for debugging with curl",
			Flags:  append(d1ClientFlags(), jwtFlags()...),
			Action: d1TokenAction,
		}},
	}
}

func d1TokenAction(c *cli.Context) error {
	if _, err := commandConfig(c, d1Client); err != nil {
		return err
	}
	if c.String("jwt-key") == "" {
		return usagef("missing --jwt-key LABEL (with --kid, --issuer-id and --token-url)")
	}
	client, err := dialAgent(c)
	if err != nil {
		return err
	}
	defer client.Close()
	hc, env, err := d1HTTPClient(c, client)
	if err != nil {
		return err
	}
	j, err := jwtBearer(c, client, hc)
	if err != nil {
		return err
	}
	tok, err := j.Token()
	if err != nil {
		return err
	}
	infof(c, "D1 %s access token, valid until %s", env, tok.Expiry.UTC().Format(time.RFC3339))
	fmt.Fprintln(c.App.Writer, tok.AccessToken)
	return nil
}

func jwtCommand() *cli.Command {
	return &cli.Command{
		Name:  "jwt",
		Usage: "JSON Web Tokens signed by a key in the agent",
		Subcommands: []*cli.Command{{
			Name:  "sign",
			Usage: "sign the given claims (a JSON object) as a compact JWS: ES256 for P-256 keys, RS256 for RSA",
			Flags: []cli.Flag{
				configFlag,
				socketFlag,
				&cli.StringFlag{Name: "key", Usage: "signing key `LABEL` (required)"},
				&cli.StringFlag{Name: "kid", Usage: "header kid `ID` (required)"},
				&cli.StringFlag{Name: "claims", Usage: "`FILE` with the claims as JSON, or - for stdin (required)"},
			},
			Action: jwtSignAction,
		}},
	}
}

func jwtSignAction(c *cli.Context) error {
	if _, err := commandConfig(c); err != nil {
		return err
	}
	if c.String("key") == "" || c.String("kid") == "" || c.String("claims") == "" {
		return usagef("jwt sign needs --key LABEL, --kid ID and --claims FILE|-")
	}
	var data []byte
	var err error
	if f := c.String("claims"); f == "-" {
		data, err = io.ReadAll(io.LimitReader(os.Stdin, 1<<20))
	} else {
		data, err = os.ReadFile(f)
	}
	if err != nil {
		return usagef("--claims: %v", err)
	}
	var claims map[string]any
	if err := json.Unmarshal(data, &claims); err != nil {
		return usagef("--claims: not a JSON object: %v", err)
	}
	client, err := dialAgent(c)
	if err != nil {
		return err
	}
	defer client.Close()
	signer, err := client.Signer(c.Context, c.String("key"))
	if err != nil {
		return err
	}
	token, err := d1.SignJWT(signer, c.String("kid"), claims)
	if err != nil {
		return err
	}
	fmt.Fprintln(c.App.Writer, token)
	return nil
}

func proxyCommand() *cli.Command {
	common := []cli.Flag{
		&cli.Int64Flag{Name: "max-body", Usage: "largest request body in `BYTES`", Value: proxy.DefaultMaxBody},
		&cli.StringFlag{Name: "log-format", Usage: "`FORMAT`: text or json", Value: "text"},
		&cli.DurationFlag{Name: "wait-for-agent", Usage: "at start, wait up to `DURATION` for the agent's socket to accept, for a proxy started before the agent (default: fail at once)", EnvVars: []string{"HSMAGENT_WAIT_FOR_AGENT"}},
	}
	return &cli.Command{
		Name:  "proxy",
		Usage: "sidecar proxies for D1 mTLS with keys in the agent, for backends in any language",
		Subcommands: []*cli.Command{
			{
				Name:  "client",
				Usage: "plain HTTP on loopback in, mTLS (and OAuth Bearer) to D1 out",
				Flags: append(append(append([]cli.Flag{
					&cli.StringFlag{Name: "listen", Usage: "loopback `ADDR` to listen on, e.g. 127.0.0.1:8080 (required, here or in the config)"},
					&cli.StringFlag{Name: "target", Usage: "D1 base `URL`, e.g. https://api.d1-stg.thalescloud.io (required, here or in the config)"},
					proxyMetricsFlag(),
				}, d1ClientFlags()...), jwtFlags()...), common...),
				Action: proxyClientAction,
			},
			{
				Name:  "server",
				Usage: "mTLS from D1 in (Thales client CA only), plain HTTP to the backend out",
				Flags: append([]cli.Flag{
					configFlag,
					socketFlag,
					&cli.StringFlag{Name: "env", Usage: "`ENV` whose config section to use: PPR or PRD"},
					&cli.StringFlag{Name: "listen", Usage: "`ADDR` to listen on (443 preferred by D1, 8443 supported)", Value: ":443"},
					&cli.StringFlag{Name: "backend", Usage: "backend `URL`, e.g. http://127.0.0.1:9000 (required, here or in the config)"},
					&cli.StringFlag{Name: "key", Usage: "`LABEL` of the server key in the agent (its stored chain is served; required, here or in the config)"},
					&cli.StringFlag{Name: "client-ca", Usage: "Thales client CA PEM `FILE`, the only CA trusted for D1's client certificates (required, here or in the config)"},
					&cli.DurationFlag{Name: "ca-reload-interval", Usage: "check the client CA file for changes every `DURATION`", Value: 30 * time.Second},
					&cli.StringFlag{Name: "oauth-client-id", Usage: "enable OAuth for D1's calls (D1-S6): the client `ID` D1 authenticates with"},
					&cli.StringFlag{Name: "oauth-secret-file", Usage: "`FILE` holding D1's OAuth client secret"},
					&cli.StringFlag{Name: "oauth-key", Usage: "`LABEL` of the key in the agent that signs the access tokens"},
					&cli.DurationFlag{Name: "oauth-ttl", Usage: "access token lifetime", Value: 15 * time.Minute},
					proxyMetricsFlag(),
				}, common...),
				Action: proxyServerAction,
			},
		},
	}
}

func proxyClientAction(c *cli.Context) error {
	cfg, err := commandConfig(c, d1Client)
	if err != nil {
		return err
	}
	listen, target := c.String("listen"), c.String("target")
	if listen == "" || target == "" {
		return usagef("proxy client needs --listen 127.0.0.1:PORT and --target https://D1-HOST%s", cfg.d1Hint())
	}
	if err := proxy.CheckLoopback(listen); err != nil {
		return usageError{err}
	}
	u, err := url.Parse(target)
	if err != nil || u.Scheme != "https" || u.Host == "" {
		return usagef("--target %q is not an https:// URL", target)
	}
	log, err := newLogger(c.App.ErrWriter, c.String("log-format"), "info")
	if err != nil {
		return err
	}
	pm, err := startProxyMetrics(c.String("metrics-listen"), "client", log)
	if err != nil {
		return err
	}
	defer pm.stop()
	client, err := dialAgent(c)
	if err != nil {
		return err
	}
	defer client.Close()
	hc, env, err := d1HTTPClient(c, client)
	if err != nil {
		return err
	}
	rt := hc.Transport
	j, err := jwtBearer(c, client, hc)
	if err != nil {
		return err
	}
	pm.observeTokens(j)
	if j != nil {
		ts, err := j.TokenSource()
		if err != nil {
			return err
		}
		rt = d1.BearerTransport(rt, ts)
	}
	srv := proxy.NewHTTPServer(proxy.NewClient(u, rt, log, c.Int64("max-body"), pm.options()...), log)
	srv.Addr = listen
	return runHTTP(srv, log, false, nil, "proxy client serving",
		"listen", listen, "target", target, "env", string(env), "key", c.String("key"), "oauth", j != nil)
}

func proxyServerAction(c *cli.Context) error {
	cfg, err := commandConfig(c, d1Server)
	if err != nil {
		return err
	}
	backend, label, caFile := c.String("backend"), c.String("key"), c.String("client-ca")
	if backend == "" || label == "" || caFile == "" {
		return usagef("proxy server needs --backend http://127.0.0.1:PORT, --key LABEL and --client-ca FILE%s", cfg.d1Hint())
	}
	u, err := url.Parse(backend)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return usagef("--backend %q is not an http:// URL", backend)
	}
	log, err := newLogger(c.App.ErrWriter, c.String("log-format"), "info")
	if err != nil {
		return err
	}
	pm, err := startProxyMetrics(c.String("metrics-listen"), "server", log)
	if err != nil {
		return err
	}
	defer pm.stop()
	client, err := dialAgent(c)
	if err != nil {
		return err
	}
	defer client.Close()
	// Fail at start-up, not at the first handshake, if the key has no chain.
	if _, err := client.TLSCertificate(c.Context, label); err != nil {
		return err
	}
	st, err := d1.NewServerTLS(d1.ServerOptions{GetCertificate: client.GetCertificate(label), ClientCAFile: caFile})
	if err != nil {
		return err
	}
	oauth, err := serverOAuth(c, client, log)
	if err != nil {
		return err
	}
	srv := proxy.NewHTTPServer(proxy.NewServer(u, log, c.Int64("max-body"), oauth, pm.options()...), log)
	srv.Addr = c.String("listen")
	srv.TLSConfig = st.TLSConfig()
	// Offer HTTP/2 as well; the per-handshake configs are clones of this one.
	srv.TLSConfig.NextProtos = []string{"h2", "http/1.1"}
	ctx, cancel := context.WithCancel(c.Context)
	defer cancel()
	reload := watchClientCA(ctx, st, caFile, c.Duration("ca-reload-interval"), log)
	return runHTTP(srv, log, true, reload, "proxy server serving",
		"listen", srv.Addr, "backend", backend, "key", label, "client_ca", caFile)
}

// watchClientCA reloads the Thales client CA file every interval until ctx
// is done, and returns the reload for SIGHUP. A file that does not load
// leaves the previous CA in force, so a bad edit does not stop D1's calls.
func watchClientCA(ctx context.Context, st *d1.ServerTLS, caFile string, interval time.Duration, log *slog.Logger) (reload func()) {
	go st.WatchCAFile(ctx, interval, func(changed bool, err error) {
		if err != nil {
			log.Error("client CA reload failed, keeping the previous one", "file", caFile, "err", err)
		} else {
			log.Info("client CA reloaded", "file", caFile)
		}
	})
	return func() {
		if _, err := st.Reload(); err != nil {
			log.Error("client CA reload failed, keeping the previous one", "file", caFile, "err", err)
			return
		}
		log.Info("reloaded", "file", caFile)
	}
}

// serverOAuth builds the D1-S6 token issuer from the flags, or nil without them.
func serverOAuth(c *cli.Context, client *agent.Client, log *slog.Logger) (*proxy.OAuth, error) {
	id, secretFile, key := c.String("oauth-client-id"), c.String("oauth-secret-file"), c.String("oauth-key")
	if id == "" && secretFile == "" && key == "" {
		return nil, nil
	}
	if id == "" || secretFile == "" || key == "" {
		return nil, usagef("OAuth needs --oauth-client-id, --oauth-secret-file and --oauth-key together")
	}
	secret, err := os.ReadFile(secretFile)
	if err != nil {
		return nil, usagef("--oauth-secret-file: %v", err)
	}
	signer, err := client.Signer(c.Context, key)
	if err != nil {
		return nil, err
	}
	o := &proxy.OAuth{ClientID: id, Secret: []byte(strings.TrimRight(string(secret), "\r\n")), Signer: signer, KeyID: key,
		TTL: c.Duration("oauth-ttl"), Log: log}
	if err := o.Check(); err != nil {
		return nil, usageError{err}
	}
	return o, nil
}

// runHTTP serves srv on its address as a daemon: SIGHUP calls reload,
// SIGTERM/SIGINT drain for up to 10 seconds.
func runHTTP(srv *http.Server, log *slog.Logger, useTLS bool, reload func(), ready string, attrs ...any) error {
	ln, err := net.Listen("tcp", srv.Addr)
	if err != nil {
		return fmt.Errorf("proxy: %w", err)
	}
	d := daemon{
		name: "proxy",
		log:  log,
		serve: func() error {
			var err error
			if useTLS {
				err = srv.ServeTLS(ln, "", "")
			} else {
				err = srv.Serve(ln)
			}
			if errors.Is(err, http.ErrServerClosed) {
				return nil
			}
			return err
		},
		shutdown: srv.Shutdown,
		reload:   reload,
	}
	return d.run(ready, attrs...)
}
