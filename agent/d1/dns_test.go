package d1_test

import (
	"context"
	"crypto/tls"
	"io"
	"log"
	"net"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hsmagent/hsmagent/agent/d1"
	"github.com/miekg/dns"
)

var quietLog = log.New(io.Discard, "", 0)

// testDNS answers A queries for d1.test. with an address that the test can
// change, under a one-second TTL.
type testDNS struct {
	addr    string
	answer  atomic.Value // net.IP
	queries atomic.Int64
}

func startDNS(t *testing.T, first net.IP) *testDNS {
	t.Helper()
	d := &testDNS{}
	d.answer.Store(first)
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	d.addr = pc.LocalAddr().String()
	srv := &dns.Server{PacketConn: pc, Handler: dns.HandlerFunc(func(w dns.ResponseWriter, req *dns.Msg) {
		m := new(dns.Msg)
		m.SetReply(req)
		for _, q := range req.Question {
			if q.Name == "d1.test." && q.Qtype == dns.TypeA {
				d.queries.Add(1)
				m.Answer = append(m.Answer, &dns.A{
					Hdr: dns.RR_Header{Name: q.Name, Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: 1},
					A:   d.answer.Load().(net.IP),
				})
			}
		}
		w.WriteMsg(m)
	})}
	go srv.ActivateAndServe()
	t.Cleanup(func() { srv.Shutdown() })
	return d
}

// resolver sends every lookup to the test DNS server.
func (d *testDNS) resolver() *net.Resolver {
	return &net.Resolver{PreferGo: true, Dial: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var dialer net.Dialer
		return dialer.DialContext(ctx, "udp", d.addr)
	}}
}

// TestDNSChangeReachesNewAddress (D1-C7): D1's host name is resolved for new
// connections, and connections are retired after MaxConnAge, so once the DNS
// answer changes, later requests reach the new address.
func TestDNSChangeReachesNewAddress(t *testing.T) {
	w := newWorld(t)
	first := w.d1Server(t, "127.0.0.1:0", tls.VersionTLS13, "first")
	port := first[strings.LastIndex(first, ":")+1:]
	w.d1Server(t, "127.0.0.2:"+port, tls.VersionTLS13, "second")
	dnsSrv := startDNS(t, net.ParseIP("127.0.0.1"))

	opts := w.options(d1.PreProd, "d1-ppr-mtls")
	opts.Resolver = dnsSrv.resolver()
	opts.MaxConnAge = 500 * time.Millisecond
	c, err := d1.NewHTTPClient(opts)
	if err != nil {
		t.Fatal(err)
	}
	url := "https://d1.test:" + port + "/"
	if body, err := get(t, c, url); err != nil || !strings.HasPrefix(body, "first") {
		t.Fatalf("first request: %q %v", body, err)
	}
	dnsSrv.answer.Store(net.ParseIP("127.0.0.2"))
	// Within MaxConnAge the kept-alive connection is reused: still the first address.
	if body, err := get(t, c, url); err != nil || !strings.HasPrefix(body, "first") {
		t.Fatalf("request on the kept-alive connection: %q %v", body, err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		time.Sleep(100 * time.Millisecond)
		body, err := get(t, c, url)
		if err != nil {
			t.Fatal(err)
		}
		if strings.HasPrefix(body, "second") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("requests never moved to the new address (DNS queries: %d)", dnsSrv.queries.Load())
		}
	}
	if n := dnsSrv.queries.Load(); n < 2 {
		t.Errorf("%d DNS queries; each new connection should resolve again", n)
	}
}
