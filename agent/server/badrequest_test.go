package server_test

import (
	"context"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/hsmagent/hsmagent/agent/agenttest"
	"github.com/hsmagent/hsmagent/agent/server"
	"google.golang.org/grpc"
)

// TestMalformedRequestsAudited: requests gRPC refuses before a handler sees
// them (bytes that are not the message, a message over the size cap, a bad
// message inside a SignStream) each leave an audit record and count in the
// metrics, like every other decision.
func TestMalformedRequestsAudited(t *testing.T) {
	audit := &auditBuffer{}
	seen := &recordingObserver{}
	a := agenttest.Start(t, newMemStore(t), server.Options{Audit: slog.New(slog.NewTextHandler(audit, nil)), Observer: seen})
	api, conn := rawClient(t, a.Socket)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var reply []byte
	for _, data := range [][]byte{
		{0xff, 0xff, 0xff, 0xff},            // not protobuf
		{0x0a, 0x02, 0xff, 0xfe},            // a key that is not UTF-8
		[]byte(strings.Repeat("k", 20<<10)), // over the 16 KiB cap
	} {
		if err := conn.Invoke(ctx, "/hsmagent.v1.Agent/Sign", &data, &reply, grpc.ForceCodec(rawCodec{})); err == nil {
			t.Fatalf("%x...: accepted", data[:4])
		}
	}
	desc := &grpc.StreamDesc{StreamName: "SignStream", ServerStreams: true, ClientStreams: true}
	stream, err := conn.NewStream(ctx, desc, "/hsmagent.v1.Agent/SignStream", grpc.ForceCodec(rawCodec{}))
	if err != nil {
		t.Fatal(err)
	}
	bad := []byte{0xff, 0xff}
	stream.SendMsg(&bad)
	stream.CloseSend()
	stream.RecvMsg(&reply)
	waitFor(t, func() bool { return audit.count("result=malformed") >= 4 })
	if n := audit.count("result=malformed"); n != 4 {
		t.Errorf("%d malformed requests audited, want 4:\n%s", n, audit.buf.String())
	}
	if got := seen.String(); strings.Count(got, "/malformed") != 3 {
		t.Errorf("metrics saw %q; want 3 malformed signs", got)
	}
	if _, err := api.Sign(ctx, goodEC); err != nil {
		t.Errorf("a good request after the malformed ones: %v", err)
	}
}
