package server_test

import (
	"context"
	"crypto/sha256"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"testing"
	"time"

	"github.com/hsmagent/hsmagent/agent/agentpb"
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
