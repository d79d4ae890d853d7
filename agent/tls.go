package agent

import (
	"bytes"
	"context"
	"crypto/tls"
	"time"

	"github.com/hsmagent/hsmagent/agent/agentpb"
)

// certCache is the latest key list from the watch stream, as tls.Certificates.
type certCache struct {
	revision uint64
	byLabel  map[string]*tls.Certificate
}

// GetClientCertificate returns a tls.Config.GetClientCertificate callback that
// presents the chain of the key labelled label, following rotation.
func (c *Client) GetClientCertificate(label string) func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
	c.startWatch()
	return func(info *tls.CertificateRequestInfo) (*tls.Certificate, error) {
		return c.currentCertificate(info.Context(), label)
	}
}

// GetCertificate returns a tls.Config.GetCertificate callback that serves the
// chain of the key labelled label, following rotation.
func (c *Client) GetCertificate(label string) func(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	c.startWatch()
	return func(hello *tls.ClientHelloInfo) (*tls.Certificate, error) {
		return c.currentCertificate(hello.Context(), label)
	}
}

func (c *Client) currentCertificate(ctx context.Context, label string) (*tls.Certificate, error) {
	if cache := c.certs.Load(); cache != nil {
		if cert := cache.byLabel[label]; cert != nil {
			return cert, nil
		}
	}
	// Not in the watched list (yet, or the watch is reconnecting): ask directly.
	if ctx == nil {
		ctx = context.Background()
	}
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, c.signTimeout)
		defer cancel()
	}
	return c.TLSCertificate(ctx, label)
}

// startWatch follows the agent's key list in the background until Close.
func (c *Client) startWatch() {
	c.watchOnce.Do(func() { go c.watch() })
}

func (c *Client) watch() {
	delay := 50 * time.Millisecond
	for c.watchCtx.Err() == nil {
		if c.watchOnceStream() {
			delay = 50 * time.Millisecond
		}
		// The stream broke: forget what it said, so callbacks ask the agent
		// directly until the watch is back.
		c.certs.Store(nil)
		select {
		case <-c.watchCtx.Done():
			return
		case <-time.After(delay):
		}
		delay = min(delay*2, 2*time.Second)
	}
}

// watchOnceStream reads one WatchKeys stream; it reports whether any message came.
func (c *Client) watchOnceStream() bool {
	stream, err := c.api.WatchKeys(c.watchCtx, &agentpb.WatchKeysRequest{})
	if err != nil {
		return false
	}
	received := false
	for {
		resp, err := stream.Recv()
		if err != nil {
			return received
		}
		received = true
		c.certs.Store(c.buildCache(resp))
	}
}

func (c *Client) buildCache(resp *agentpb.ListKeysResponse) *certCache {
	prev := c.certs.Load()
	next := &certCache{revision: resp.Revision, byLabel: make(map[string]*tls.Certificate, len(resp.Keys))}
	for _, pk := range resp.Keys {
		if len(pk.CertificateChain) == 0 {
			continue
		}
		// Keep the same *tls.Certificate when nothing changed.
		if prev != nil {
			if old := prev.byLabel[pk.Label]; old != nil && sameChain(old.Certificate, pk.CertificateChain) {
				next.byLabel[pk.Label] = old
				continue
			}
		}
		k, err := keyFromProto(pk)
		if err != nil {
			continue
		}
		cert, err := c.tlsCertificate(k)
		if err == nil {
			next.byLabel[pk.Label] = cert
		}
	}
	return next
}

func sameChain(a, b [][]byte) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if !bytes.Equal(a[i], b[i]) {
			return false
		}
	}
	return true
}
