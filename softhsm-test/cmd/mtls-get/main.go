// Command mtls-get makes one HTTPS request with a client certificate whose
// key is held by the hsmagent agent, and prints what was negotiated. The demo
// uses it against openssl s_server; it is also a short example of the agent
// client library.
//
//	mtls-get --socket /run/hsmagent/agent.sock --key d1-ppr-mtls --ca ca.pem https://localhost:8443/
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"time"

	"github.com/hsmagent/hsmagent/agent"
)

func main() {
	socket := flag.String("socket", os.Getenv(agent.SocketEnv), "agent socket")
	key := flag.String("key", "", "key label")
	caFile := flag.String("ca", "", "PEM file of the CA that signed the server's certificate")
	flag.Parse()
	if err := run(*socket, *key, *caFile, flag.Arg(0)); err != nil {
		fmt.Fprintln(os.Stderr, "mtls-get:", err)
		os.Exit(1)
	}
}

func run(socket, key, caFile, url string) error {
	if key == "" || caFile == "" || url == "" {
		return fmt.Errorf("usage: mtls-get --socket PATH --key LABEL --ca FILE URL")
	}
	pem, err := os.ReadFile(caFile)
	if err != nil {
		return err
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(pem) {
		return fmt.Errorf("%s holds no PEM certificate", caFile)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	client, err := agent.Dial(ctx, socket)
	if err != nil {
		return err
	}
	defer client.Close()

	hc := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{
		RootCAs:              roots,
		MinVersion:           tls.VersionTLS12,
		GetClientCertificate: client.GetClientCertificate(key),
	}}}
	resp, err := hc.Get(url)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	io.Copy(io.Discard, io.LimitReader(resp.Body, 1<<16))
	st := resp.TLS
	fmt.Printf("HTTP %s from %s\n", resp.Status, url)
	fmt.Printf("TLS version:   %s\n", tls.VersionName(st.Version))
	fmt.Printf("cipher suite:  %s\n", tls.CipherSuiteName(st.CipherSuite))
	fmt.Printf("server:        %s (issuer %s)\n", st.PeerCertificates[0].Subject, st.PeerCertificates[0].Issuer)
	fmt.Printf("client key:    %q, held by the agent at %s\n", key, socket)
	leaf, _ := client.GetClientCertificate(key)(&tls.CertificateRequestInfo{})
	if leaf != nil && leaf.Leaf != nil {
		fmt.Printf("client cert:   %s\n", leaf.Leaf.Subject)
	}
	return nil
}
