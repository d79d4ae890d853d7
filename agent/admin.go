package agent

import (
	"context"
	"crypto/x509"
	"fmt"

	"github.com/hsmagent/hsmagent/agent/agentpb"
	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
)

// The Admin calls change the agent's token: its operator's lifecycle
// commands use them so that only the agent opens the token and knows the
// PIN. The agent allows them to the callers its admin rule names (root by
// default); others get a *CallError with StatusCode PermissionDenied whose
// message names the rule. Each change is served at once, without a reload.

func (c *Client) admin() agentpb.AdminClient { return agentpb.NewAdminClient(c.conn) }

// adminError is a failed Admin call's error, with its request id.
func adminError(what string, err error, trailer metadata.MD) error {
	return callError(what, withRequestID(err, trailerRequestID(trailer)))
}

// AdminToken returns the label of the token the agent serves ("" for a
// key store that is no PKCS #11 token).
func (c *Client) AdminToken(ctx context.Context) (string, error) {
	var trailer metadata.MD
	resp, err := c.admin().Token(ctx, &agentpb.AdminTokenRequest{}, grpc.Trailer(&trailer))
	if err != nil {
		return "", adminError("asking for the agent's token", err, trailer)
	}
	return resp.Label, nil
}

// AdminKeys lists every key of the agent's token, whatever the access rules.
func (c *Client) AdminKeys(ctx context.Context) ([]Key, error) {
	var trailer metadata.MD
	resp, err := c.admin().Keys(ctx, &agentpb.AdminKeysRequest{}, grpc.Trailer(&trailer))
	if err != nil {
		return nil, adminError("listing the token's keys", err, trailer)
	}
	keys := make([]Key, 0, len(resp.Keys))
	for _, pk := range resp.Keys {
		k, err := keyFromProto(pk)
		if err != nil {
			return nil, err
		}
		keys = append(keys, k)
	}
	return keys, nil
}

// GenerateKey has the agent generate a key of keyType (ecdsa-p256,
// ecdsa-p384, rsa-2048, rsa-3072, rsa-4096) under label in its token.
func (c *Client) GenerateKey(ctx context.Context, label, keyType string) (Key, error) {
	var trailer metadata.MD
	resp, err := c.admin().GenerateKey(ctx, &agentpb.GenerateKeyRequest{Label: label, KeyType: keyType}, grpc.Trailer(&trailer))
	if err != nil {
		return Key{}, adminError(fmt.Sprintf("generating key %q", label), err, trailer)
	}
	return keyFromProto(resp.Key)
}

// DeleteKey has the agent destroy the key labelled label and its chain.
func (c *Client) DeleteKey(ctx context.Context, label string) error {
	var trailer metadata.MD
	if _, err := c.admin().DeleteKey(ctx, &agentpb.DeleteKeyRequest{Label: label}, grpc.Trailer(&trailer)); err != nil {
		return adminError(fmt.Sprintf("deleting key %q", label), err, trailer)
	}
	return nil
}

// Imported is the outcome of ImportCertificate.
type Imported struct {
	// Key is the key as the agent serves it now, with its new chain.
	Key Key
	// Previous is the chain stored before, leaf first; empty if none.
	Previous []*x509.Certificate
	// KeptChain counts the chain certificates kept from Previous, for a
	// leaf imported alone whose stored chain still links to it.
	KeptChain int
}

// ImportCertificate has the agent store certs (a leaf and its chain, in
// any order) with the key labelled label. A leaf alone keeps the stored
// chain when it still links to it, unless replaceChain is set.
func (c *Client) ImportCertificate(ctx context.Context, label string, certs []*x509.Certificate, replaceChain bool) (*Imported, error) {
	req := &agentpb.ImportCertificateRequest{Label: label, ReplaceChain: replaceChain}
	for _, cert := range certs {
		req.Certificates = append(req.Certificates, cert.Raw)
	}
	var trailer metadata.MD
	resp, err := c.admin().ImportCertificate(ctx, req, grpc.Trailer(&trailer))
	if err != nil {
		return nil, adminError(fmt.Sprintf("importing the certificate of key %q", label), err, trailer)
	}
	out := &Imported{KeptChain: int(resp.KeptChain)}
	if out.Key, err = keyFromProto(resp.Key); err != nil {
		return nil, err
	}
	for i, der := range resp.PreviousChain {
		cert, err := x509.ParseCertificate(der)
		if err != nil {
			return nil, fmt.Errorf("agent: key %q: bad previous certificate %d from agent: %w", label, i, err)
		}
		out.Previous = append(out.Previous, cert)
	}
	return out, nil
}

// CreateCSR has the agent sign, with the key labelled label, a PKCS #10
// request for that key carrying the subject and alternative names of
// template (a DER request signed by any key, such as a throwaway one).
// It returns the DER request.
func (c *Client) CreateCSR(ctx context.Context, label string, template []byte) ([]byte, error) {
	var trailer metadata.MD
	resp, err := c.admin().CreateCSR(ctx, &agentpb.CreateCSRRequest{Label: label, Template: template}, grpc.Trailer(&trailer))
	if err != nil {
		return nil, adminError(fmt.Sprintf("making the CSR of key %q", label), err, trailer)
	}
	return resp.Csr, nil
}

// RotateKey has the agent generate the successor of the key labelled
// label, of keyType ("" for the current key's type), under
// rotation.SuccessorLabel(label). A pending successor is an error unless
// replace is set, which destroys it first.
func (c *Client) RotateKey(ctx context.Context, label, keyType string, replace bool) (Key, error) {
	var trailer metadata.MD
	resp, err := c.admin().RotateKey(ctx, &agentpb.RotateKeyRequest{Label: label, KeyType: keyType, Replace: replace}, grpc.Trailer(&trailer))
	if err != nil {
		return Key{}, adminError(fmt.Sprintf("rotating key %q", label), err, trailer)
	}
	return keyFromProto(resp.Successor)
}

// PromoteKey has the agent store certs (the successor's leaf and chain, in
// any order) with the successor of the key labelled label and make the
// successor that key. It returns the key as now served and the label the
// key before has.
func (c *Client) PromoteKey(ctx context.Context, label string, certs []*x509.Certificate, replaceChain bool) (Key, string, error) {
	req := &agentpb.PromoteKeyRequest{Label: label, ReplaceChain: replaceChain}
	for _, cert := range certs {
		req.Certificates = append(req.Certificates, cert.Raw)
	}
	var trailer metadata.MD
	resp, err := c.admin().PromoteKey(ctx, req, grpc.Trailer(&trailer))
	if err != nil {
		return Key{}, "", adminError(fmt.Sprintf("promoting the successor of key %q", label), err, trailer)
	}
	k, err := keyFromProto(resp.Key)
	return k, resp.RetiredLabel, err
}
