package rawsock_test

import (
	"bytes"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/hsmagent/hsmagent/internal/rawsock"
)

// pair is a connected pair of Unix stream sockets from the net package.
func pair(t *testing.T) (*net.UnixConn, *net.UnixConn) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "s")
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	c, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	s, err := l.AcceptUnix()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(); s.Close() })
	return c, s
}

func TestReadWaitsAndSeesTheEnd(t *testing.T) {
	a, b := pair(t)
	r, err := rawsock.New(b)
	if err != nil {
		t.Fatal(err)
	}
	got := make(chan string, 1)
	go func() {
		buf := make([]byte, 64)
		n, err := r.Stream().Read(buf)
		if err != nil {
			t.Error(err)
		}
		got <- string(buf[:n])
	}()
	select {
	case s := <-got:
		t.Fatalf("read %q with nothing sent", s)
	case <-time.After(50 * time.Millisecond):
	}
	a.Write([]byte("hello"))
	if s := <-got; s != "hello" {
		t.Fatalf("read %q, want hello", s)
	}
	a.Close()
	if _, err := r.Stream().Read(make([]byte, 8)); err != io.EOF {
		t.Fatalf("read after the peer closed: %v, want io.EOF", err)
	}
}

func TestReadHonoursTheDeadline(t *testing.T) {
	_, b := pair(t)
	r, _ := rawsock.New(b)
	b.SetReadDeadline(time.Now().Add(20 * time.Millisecond))
	if _, err := r.Read(make([]byte, 8)); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("read past the deadline: %v, want os.ErrDeadlineExceeded", err)
	}
}

func TestReadOfAClosedConn(t *testing.T) {
	_, b := pair(t)
	r, _ := rawsock.New(b)
	b.Close()
	if _, err := r.Read(make([]byte, 8)); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("read of a closed conn: %v, want net.ErrClosed", err)
	}
}

// A socket the peer does not read fills: TryWrite then writes part or
// nothing and returns at once, and Write waits until the peer reads, then
// writes all of it.
func TestWritesOfAFullSocket(t *testing.T) {
	a, b := pair(t)
	w, _ := rawsock.New(b)
	chunk := bytes.Repeat([]byte{1}, 64<<10)
	total := 0
	for {
		n, err := w.TryWrite(chunk)
		if err != nil {
			t.Fatal(err)
		}
		total += n
		if n < len(chunk) {
			break
		}
		if total > 64<<20 {
			t.Fatal("the socket never filled")
		}
	}
	if n, err := w.TryWrite([]byte("x")); n != 0 || err != nil {
		t.Fatalf("TryWrite of a full socket: %d, %v; want 0, nil", n, err)
	}
	wrote := make(chan int, 1)
	go func() {
		n, err := w.Write(chunk)
		if err != nil {
			t.Error(err)
		}
		wrote <- n
	}()
	select {
	case <-wrote:
		t.Fatal("Write of a full socket returned before the peer read")
	case <-time.After(50 * time.Millisecond):
	}
	want := total + len(chunk)
	got, err := io.ReadFull(a, make([]byte, want))
	if err != nil || got != want {
		t.Fatalf("peer read %d of %d: %v", got, want, err)
	}
	if n := <-wrote; n != len(chunk) {
		t.Fatalf("Write wrote %d of %d", n, len(chunk))
	}
}

func TestWriteHonoursTheDeadline(t *testing.T) {
	_, b := pair(t)
	w, _ := rawsock.New(b)
	b.SetWriteDeadline(time.Now().Add(50 * time.Millisecond))
	chunk := bytes.Repeat([]byte{1}, 64<<10)
	for i := 0; ; i++ {
		if _, err := w.Write(chunk); err != nil {
			if !errors.Is(err, os.ErrDeadlineExceeded) {
				t.Fatalf("write past the deadline: %v, want os.ErrDeadlineExceeded", err)
			}
			return
		}
		if i > 1000 {
			t.Fatal("the socket never filled")
		}
	}
}
