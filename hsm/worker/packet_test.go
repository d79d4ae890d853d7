package worker

import (
	"bytes"
	"errors"
	"syscall"
	"testing"
	"time"
)

// The raw calls on the signatures socket wait in the netpoller when the
// socket is full or empty, keep packets whole, and see the other end close.
func TestPacketsWaitAndEnd(t *testing.T) {
	ours, theirs, err := socketPair(syscall.SOCK_SEQPACKET, "test")
	if err != nil {
		t.Fatal(err)
	}
	defer theirs.Close()
	s, err := newPackets(ours)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	theirFd := int(theirs.Fd())

	// A read with nothing to read waits for the packet.
	got := make(chan []byte, 1)
	go func() {
		b := make([]byte, maxPacket)
		n, err := s.read(b)
		if err != nil {
			t.Error(err)
		}
		got <- b[:n]
	}()
	select {
	case b := <-got:
		t.Fatalf("read returned %q with nothing sent", b)
	case <-time.After(50 * time.Millisecond):
	}
	if _, err := syscall.Write(theirFd, []byte("one packet")); err != nil {
		t.Fatal(err)
	}
	if b := <-got; string(b) != "one packet" {
		t.Fatalf("read %q, want %q", b, "one packet")
	}

	// Writes fill the socket, then one waits until the other end reads.
	pkt := bytes.Repeat([]byte{7}, 1000)
	sent := 0
	wrote := make(chan error, 1)
	for {
		go func() { wrote <- s.write(pkt) }()
		select {
		case err := <-wrote:
			if err != nil {
				t.Fatal(err)
			}
			sent++
			if sent > 100000 {
				t.Fatal("the socket never filled")
			}
			continue
		case <-time.After(50 * time.Millisecond):
		}
		break
	}
	// The writer is woken once the socket has room again: after the
	// other end has read a good part of what waits.
	buf := make([]byte, maxPacket)
	readOne := func(i int) {
		n, err := syscall.Read(theirFd, buf)
		if err != nil || n != len(pkt) {
			t.Fatalf("packet %d: %d bytes, %v; want %d", i, n, err, len(pkt))
		}
	}
	for i := range sent {
		readOne(i)
	}
	select {
	case err := <-wrote:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("a write waiting on a full socket did not go out once it had room")
	}
	readOne(sent)

	// The other end closed: a read sees 0 bytes, a write fails.
	theirs.Close()
	if n, err := s.read(buf); n != 0 || err != nil {
		t.Fatalf("read after the other end closed: %d, %v; want 0, nil", n, err)
	}
	if err := s.write(pkt); !errors.Is(err, syscall.EPIPE) && !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("write after the other end closed: %v; want EPIPE", err)
	}
}
