package main

import (
	"cmp"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"syscall"
	"time"

	"github.com/hsmagent/hsmagent/agent"
	"github.com/hsmagent/hsmagent/hsm"
	"github.com/urfave/cli/v2"
)

// The lifecycle commands (keys generate and delete, cert import, csr) go
// through the running agent, which alone opens the token and knows the PIN,
// and open the token themselves only with --direct or when no agent runs.
// A change made directly is served by the agent only after a reload, and
// objects written by another user than the agent's may be invisible to it.

// adminFlags are the lifecycle commands' flags beside the token's.
func adminFlags() []cli.Flag {
	return []cli.Flag{
		configFlag,
		socketFlag,
		&cli.BoolFlag{Name: "direct", Usage: "open the token directly with the PIN, even when an agent answers on the socket"},
	}
}

// adminTimeout bounds an Admin call: an RSA 4096 key takes seconds to make.
const adminTimeout = 3 * time.Minute

// lifecycleAgent is the agent to send the command to, or nil to open the
// token directly: with --direct, or when no agent listens on the socket
// status would use. It says on stderr which. An agent that listens but
// cannot be reached (permission denied) is an error, never a reason to
// go around it.
func lifecycleAgent(c *cli.Context) (*agent.Client, string, error) {
	if _, err := commandConfig(c); err != nil {
		return nil, "", err
	}
	if c.Bool("direct") {
		infof(c, "directly on the token (--direct)")
		return nil, "", nil
	}
	socket := c.String("socket")
	if socket == "" {
		if _, err := os.Stat(packagedSocket); errors.Is(err, fs.ErrNotExist) {
			infof(c, "directly on the token (no agent socket: none at %s, and no --socket)", packagedSocket)
			return nil, "", nil
		}
		socket = packagedSocket
	}
	if !listening(socket) {
		infof(c, "directly on the token (no agent answers at %s)", socket)
		return nil, "", nil
	}
	ctx, cancel := context.WithTimeout(c.Context, 5*time.Second)
	defer cancel()
	client, err := agent.Dial(ctx, socket)
	if err != nil {
		return nil, "", fmt.Errorf("%w (or give --direct to open the token yourself, with its PIN)", err)
	}
	// A command aimed at another token than the agent's opens that one:
	// the agent cannot change it, and must not change its own instead.
	if want, named := selectedToken(c); named {
		served, err := client.AdminToken(ctx)
		if err != nil {
			client.Close()
			return nil, "", agentFailure(err)
		}
		if want != served {
			client.Close()
			infof(c, "directly on the token (the agent at %s serves token %q, not the one selected)", socket, served)
			return nil, "", nil
		}
	}
	infof(c, "through the agent at %s", socket)
	return client, socket, nil
}

// selectedToken is the label of the token the flags, environment, URI or
// config name, and whether they name one at all (a serial alone names one
// whose label is unknown here).
func selectedToken(c *cli.Context) (label string, named bool) {
	label, serial := c.String("token"), c.String("token-serial")
	if s := c.String("uri"); s != "" {
		if u, err := hsm.ParseURI(s); err == nil {
			label, serial = cmp.Or(label, u.Config.TokenLabel), cmp.Or(serial, u.Config.TokenSerial)
		}
	}
	return label, label != "" || serial != ""
}

// listening reports whether something may answer on the socket: anything
// but no socket at all or a refused connection.
func listening(path string) bool {
	conn, err := net.DialTimeout("unix", path, time.Second)
	if err == nil {
		conn.Close()
		return true
	}
	return !errors.Is(err, syscall.ENOENT) && !errors.Is(err, syscall.ENOTDIR) && !errors.Is(err, syscall.ECONNREFUSED)
}

// agentFailure is an Admin call's error as one line: the agent's own
// message, which names the fix, with the request id of its audit record.
func agentFailure(err error) error {
	var ce *agent.CallError
	if !errors.As(err, &ce) {
		return err
	}
	msg := ce.Msg
	if ce.RequestID != "" {
		msg += " (request " + ce.RequestID + ")"
	}
	return errors.New(msg)
}

// adminLabel is the key label of a command that may not open the token:
// from its flag, or the object of its URI.
func adminLabel(c *cli.Context, flag string) (string, error) {
	if c.String(flag) == "" && c.String("uri") != "" {
		u, err := hsm.ParseURI(c.String("uri"))
		if err != nil {
			return "", usageError{err}
		}
		return keyLabel(c, flag, tokenSelection{object: u.Object})
	}
	return keyLabel(c, flag, tokenSelection{})
}

func adminContext(c *cli.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(c.Context, adminTimeout)
}

// agentKey finds label among every key of the agent's token.
func agentKey(c *cli.Context, client *agent.Client, label string) (agent.Key, error) {
	ctx, cancel := adminContext(c)
	defer cancel()
	keys, err := client.AdminKeys(ctx)
	if err != nil {
		return agent.Key{}, agentFailure(err)
	}
	var labels []string
	for _, k := range keys {
		if k.Label == label {
			return k, nil
		}
		labels = append(labels, k.Label)
	}
	return agent.Key{}, fmt.Errorf("key %q not found in the agent's token; keys present: %q", label, labels)
}

// agentCSR has the agent sign req for the key labelled label: the
// request is built here as a template signed by a throwaway key, and the
// agent signs the same subject and names for its own key. The answer is
// checked: the key's public key, the template's subject, a signature
// that verifies.
func agentCSR(c *cli.Context, client *agent.Client, label string, pub crypto.PublicKey, req hsm.CSRRequest) ([]byte, error) {
	throwaway, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	template, err := hsm.CreateCSR(throwaway, req)
	if err != nil {
		return nil, err
	}
	ctx, cancel := adminContext(c)
	defer cancel()
	der, err := client.CreateCSR(ctx, label, template)
	if err != nil {
		return nil, agentFailure(err)
	}
	csr, err := x509.ParseCertificateRequest(der)
	if err == nil {
		err = csr.CheckSignature()
	}
	if err != nil {
		return nil, fmt.Errorf("the agent's CSR for key %q does not verify: %w", label, err)
	}
	tmpl, _ := x509.ParseCertificateRequest(template)
	if eq, ok := pub.(interface{ Equal(crypto.PublicKey) bool }); !ok || !eq.Equal(csr.PublicKey) || string(csr.RawSubject) != string(tmpl.RawSubject) {
		return nil, fmt.Errorf("the agent's CSR for key %q is not for that key or subject", label)
	}
	return der, nil
}
