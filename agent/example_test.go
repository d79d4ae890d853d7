package agent_test

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net/http"
	"time"

	"github.com/hsmagent/hsmagent/agent"
)

// An mTLS HTTP client whose key stays in the HSM: the agent signs the
// handshake, and the certificate follows rotation without a restart.
func Example_mTLSClient() {
	env := newExampleEnv() // an agent with key "d1-ppr-mtls", and a test CA
	defer env.close()
	serverURL := env.serve(&tls.Config{
		Certificates: []tls.Certificate{env.issue(nil, "api.example")},
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ClientCAs:    env.roots,
	}, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "hello %s", r.TLS.PeerCertificates[0].Subject.CommonName)
	}))

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	client, err := agent.Dial(ctx, env.socket)
	if err != nil {
		fmt.Println(err)
		return
	}
	defer client.Close()

	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{
		RootCAs:              env.roots,
		MinVersion:           tls.VersionTLS12,
		GetClientCertificate: client.GetClientCertificate("d1-ppr-mtls"),
	}}}
	resp, err := hc.Get(serverURL)
	if err != nil {
		fmt.Println(err)
		return
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	fmt.Println(resp.Status, string(body))
	// Output: 200 OK hello TLSMA-ECDSA/EXAMPLE001/PPR
}

// An HTTPS server that asks its clients for certificates and whose own key
// stays in the HSM.
func Example_mTLSServer() {
	env := newExampleEnv()
	defer env.close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	client, err := agent.Dial(ctx, env.socket)
	if err != nil {
		fmt.Println(err)
		return
	}
	defer client.Close()

	serverURL := env.serve(&tls.Config{
		GetCertificate: client.GetCertificate("d1-ppr-mtls"),
		ClientAuth:     tls.RequireAndVerifyClientCert,
		ClientCAs:      env.roots,
		MinVersion:     tls.VersionTLS12,
	}, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "welcome %s", r.TLS.PeerCertificates[0].Subject.CommonName)
	}))

	// The peer, with a software key, checks the server's chain.
	peer := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{
		RootCAs:      env.roots,
		Certificates: []tls.Certificate{env.issue(nil, "d1-client")},
	}}}
	resp, err := peer.Get(serverURL)
	if err != nil {
		fmt.Println(err)
		return
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	fmt.Println(resp.Status, string(body), "served by", resp.TLS.PeerCertificates[0].Subject.CommonName)
	// Output: 200 OK welcome d1-client served by TLSMA-ECDSA/EXAMPLE001/PPR
}
