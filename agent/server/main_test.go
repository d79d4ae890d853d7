package server_test

import (
	"bufio"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/hsmagent/hsmagent/agent/agentpb"
	"github.com/hsmagent/hsmagent/agent/internal/wire"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
)

// helperEnv makes the test binary act as a bare client (see signHelper), so
// that tests can run it as another user or with other groups under setpriv.
const helperEnv = "HSMAGENT_SERVER_TEST_HELPER"

func TestMain(m *testing.M) {
	switch os.Getenv(helperEnv) {
	case "sign":
		os.Exit(signHelper(os.Getenv("HSMAGENT_TEST_SOCKET"), os.Getenv("HSMAGENT_TEST_KEY"), false))
	case "streams":
		os.Exit(streamsHelper(os.Getenv("HSMAGENT_TEST_SOCKET"), 24))
	case "sign-message":
		os.Exit(signHelper(os.Getenv("HSMAGENT_TEST_SOCKET"), os.Getenv("HSMAGENT_TEST_KEY"), true))
	case "stream-mix":
		os.Exit(streamMixHelper(os.Getenv("HSMAGENT_TEST_SOCKET"), os.Getenv("HSMAGENT_TEST_PLAN")))
	case "sign-many":
		n, _ := strconv.Atoi(os.Getenv("HSMAGENT_TEST_N"))
		os.Exit(signManyHelper(os.Getenv("HSMAGENT_TEST_SOCKET"), os.Getenv("HSMAGENT_TEST_KEY"), n))
	case "watches":
		n, _ := strconv.Atoi(os.Getenv("HSMAGENT_TEST_N"))
		os.Exit(watchesHelper(os.Getenv("HSMAGENT_TEST_SOCKET"), n))
	case "list-revision":
		os.Exit(listRevisionHelper(os.Getenv("HSMAGENT_TEST_SOCKET")))
	case "dial-rate":
		n, _ := strconv.Atoi(os.Getenv("HSMAGENT_TEST_N"))
		os.Exit(dialRateHelper(os.Getenv("HSMAGENT_TEST_SOCKET"), n))
	case "hold":
		n, _ := strconv.Atoi(os.Getenv("HSMAGENT_TEST_CONNS"))
		os.Exit(holdHelper(os.Getenv("HSMAGENT_TEST_SOCKET"), n))
	}
	os.Exit(m.Run())
}

// signHelper asks the agent on socket for one signature with key and prints
// the status code: OK, PermissionDenied, ... (and the message, if asked).
func signHelper(socket, key string, withMessage bool) int {
	conn, err := grpc.NewClient("unix://"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		fmt.Println(err)
		return 1
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	digest := sha256.Sum256([]byte("x"))
	_, err = agentpb.NewAgentClient(conn).Sign(ctx, &agentpb.SignRequest{Key: key, Digest: digest[:], Hash: agentpb.Hash_HASH_SHA256})
	if withMessage {
		fmt.Println(status.Code(err), status.Convert(err).Message())
		return 0
	}
	fmt.Println(status.Code(err))
	return 0
}

// signManyHelper asks for n signatures at once on one connection and
// prints how many succeeded: "ok=N".
func signManyHelper(socket, key string, n int) int {
	conn, err := grpc.NewClient("unix://"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		fmt.Println(err)
		return 1
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	digest := sha256.Sum256([]byte("x"))
	api := agentpb.NewAgentClient(conn)
	done := make(chan error, n)
	for range n {
		go func() {
			_, err := api.Sign(ctx, &agentpb.SignRequest{Key: key, Digest: digest[:], Hash: agentpb.Hash_HASH_SHA256})
			done <- err
		}()
	}
	ok := 0
	for range n {
		if <-done == nil {
			ok++
		}
	}
	fmt.Printf("ok=%d\n", ok)
	return 0
}

// watchesHelper opens n WatchKeys streams at once (on connections of 8
// streams each) and prints how many got their first list and how many were
// refused: "admitted=32 refused=8".
func watchesHelper(socket string, n int) int {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	results := make(chan codes.Code, n)
	var api agentpb.AgentClient
	for i := range n {
		if i%8 == 0 {
			conn, err := grpc.NewClient("unix://"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
			if err != nil {
				fmt.Println(err)
				return 1
			}
			defer conn.Close()
			api = agentpb.NewAgentClient(conn)
		}
		go func(api agentpb.AgentClient) {
			stream, err := api.WatchKeys(ctx, &agentpb.WatchKeysRequest{})
			if err == nil {
				_, err = stream.Recv()
			}
			results <- status.Code(err)
		}(api)
	}
	admitted, refused := 0, 0
	for range n {
		switch <-results {
		case codes.OK:
			admitted++
		case codes.ResourceExhausted:
			refused++
		}
	}
	fmt.Printf("admitted=%d refused=%d\n", admitted, refused)
	return 0
}

// listRevisionHelper prints the revision and labels ListKeys gives it.
func listRevisionHelper(socket string) int {
	conn, err := grpc.NewClient("unix://"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		fmt.Println(err)
		return 1
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	resp, err := agentpb.NewAgentClient(conn).ListKeys(ctx, &agentpb.ListKeysRequest{})
	if err != nil {
		fmt.Println(status.Code(err))
		return 0
	}
	var labels []string
	for _, k := range resp.Keys {
		labels = append(labels, k.Label)
	}
	fmt.Printf("revision=%d keys=%s\n", resp.Revision, strings.Join(labels, ","))
	return 0
}

// dialRateHelper opens n connections as fast as it can, sending nothing,
// and prints how many the agent kept (no end within 300 ms) and how many it
// closed at once: "accepted=44 refused=156".
func dialRateHelper(socket string, n int) int {
	start := time.Now()
	var conns []net.Conn
	for range n {
		if c, err := net.Dial("unix", socket); err == nil {
			conns = append(conns, c)
		}
	}
	dialled := time.Since(start)
	results := make(chan bool, len(conns))
	for _, c := range conns {
		go func() {
			c.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
			_, err := c.Read(make([]byte, 1))
			var ne net.Error
			results <- errors.As(err, &ne) && ne.Timeout()
			c.Close()
		}()
	}
	accepted := 0
	for range conns {
		if <-results {
			accepted++
		}
	}
	fmt.Printf("accepted=%d refused=%d ms=%d\n", accepted, n-accepted, dialled.Milliseconds())
	return 0
}

// holdHelper opens n connections to the agent and holds them, without a
// byte sent, until its standard input closes or 20 seconds have passed. It
// prints "dialled N" once it has tried them all.
func holdHelper(socket string, n int) int {
	var conns []net.Conn
	for range n {
		c, err := net.Dial("unix", socket)
		if err != nil {
			continue // refused or the accept queue is full: a flood's lot
		}
		conns = append(conns, c)
	}
	fmt.Println("dialled", len(conns))
	done := make(chan struct{})
	go func() { io.Copy(io.Discard, os.Stdin); close(done) }()
	select {
	case <-done:
	case <-time.After(20 * time.Second):
	}
	for _, c := range conns {
		c.Close()
	}
	return 0
}

// streamsHelper opens n SignStreams at once (over two connections, under the
// streams-per-connection limit) and prints how many the agent admitted
// (still open after a second) and refused: "admitted=16 refused=8".
func streamsHelper(socket string, n int) int {
	var conns []*grpc.ClientConn
	for range 2 {
		conn, err := grpc.NewClient("unix://"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			fmt.Println(err)
			return 1
		}
		defer conn.Close()
		conns = append(conns, conn)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	codesSeen := make(chan codes.Code, n)
	for i := range n {
		go func() {
			stream, err := agentpb.NewAgentClient(conns[i%2]).SignStream(ctx)
			if err == nil {
				_, err = stream.Recv()
			}
			codesSeen <- status.Code(err)
		}()
	}
	admitted, refused := 0, 0
	for range n {
		switch <-codesSeen {
		case codes.DeadlineExceeded:
			admitted++
		case codes.ResourceExhausted:
			refused++
		}
	}
	fmt.Printf("admitted=%d refused=%d\n", admitted, refused)
	return 0
}

// streamMixHelper opens, in the order of plan, gRPC SignStreams (g) and
// signing connections (s), each with one request, and holds them all open
// until it has printed, for each, "ok" if its request was answered (the
// agent admitted the stream) or the code of the status that refused it:
// "g:ok s:ok s:ResourceExhausted".
func streamMixHelper(socket, plan string) int {
	conn, err := grpc.NewClient("unix://"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		fmt.Println(err)
		return 1
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	req := &agentpb.SignStreamRequest{Items: []*agentpb.SignStreamItem{{Id: 1, Request: goodEC}}}
	var held []net.Conn // open until the end
	defer func() {
		for _, c := range held {
			c.Close()
		}
	}()
	var out []string
	for _, kind := range plan {
		var answer string
		switch kind {
		case 'g':
			stream, err := agentpb.NewAgentClient(conn).SignStream(ctx)
			if err == nil {
				err = stream.Send(req)
			}
			// A stream the agent refused at once ends the Send with io.EOF:
			// its status comes with Recv.
			if err == nil || errors.Is(err, io.EOF) {
				_, err = stream.Recv()
			}
			answer = "ok"
			if err != nil {
				answer = status.Code(err).String()
			}
		case 's':
			c, err := net.Dial("unix", socket)
			if err != nil {
				fmt.Println(err)
				return 1
			}
			held = append(held, c)
			c.SetDeadline(time.Now().Add(10 * time.Second))
			b, _ := wire.AppendFrame([]byte(wire.Preface), req)
			r := bufio.NewReader(c)
			head := make([]byte, len(wire.Preface))
			resp := &agentpb.SignStreamResponse{}
			if _, err = c.Write(b); err == nil {
				_, err = io.ReadFull(r, head)
			}
			if err == nil {
				_, err = wire.ReadFrame(r, wire.MaxMessageSize, nil, resp)
			}
			switch {
			case err != nil || string(head) != wire.Preface || len(resp.Results) != 1:
				fmt.Printf("signing connection: %q %v %v\n", head, resp, err)
				return 1
			case resp.Results[0].Id == wire.StatusID:
				answer = codes.Code(resp.Results[0].Code).String()
			default:
				answer = "ok"
			}
		}
		out = append(out, fmt.Sprintf("%c:%s", kind, answer))
	}
	fmt.Println(strings.Join(out, " "))
	return 0
}
