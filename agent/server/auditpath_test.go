package server_test

import (
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hsmagent/hsmagent/agent/server"
)

// TestAuditFilePathTrusted: the audit file is opened as the socket is made:
// a symbolic link, a FIFO, a file another user owns or may write, and a
// directory others may write are refused with what to do, without
// following, blocking or touching the target; Reopen (SIGHUP) refuses the
// same and keeps the current file (issue 18, item 6).
func TestAuditFilePathTrusted(t *testing.T) {
	for _, tc := range []struct {
		name  string
		plant func(t *testing.T, dir, path string)
		want  string
	}{
		{"a symbolic link", func(t *testing.T, dir, path string) {
			if err := os.Symlink(filepath.Join(dir, "elsewhere"), path); err != nil {
				t.Fatal(err)
			}
		}, "is a symbolic link"},
		{"a FIFO", func(t *testing.T, dir, path string) {
			if err := syscall.Mkfifo(path, 0o600); err != nil {
				t.Fatal(err)
			}
		}, "is a FIFO"},
		{"a file others may write", func(t *testing.T, dir, path string) {
			if err := os.WriteFile(path, nil, 0o600); err != nil {
				t.Fatal(err)
			}
			os.Chmod(path, 0o666)
		}, "writable by others"},
		{"a directory others may write", func(t *testing.T, dir, path string) {
			os.Chmod(dir, 0o777)
		}, "writable by others"},
		{"a file another user owns", func(t *testing.T, dir, path string) {
			if os.Geteuid() != 0 {
				t.Skip("needs root to chown")
			}
			if err := os.WriteFile(path, nil, 0o600); err != nil {
				t.Fatal(err)
			}
			if err := os.Chown(path, 65534, 65534); err != nil {
				t.Fatal(err)
			}
		}, "owned by uid 65534"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			path := filepath.Join(dir, "audit.jsonl")
			tc.plant(t, dir, path)
			done := make(chan error, 1)
			go func() {
				f, err := server.OpenAuditFile(path)
				if err == nil {
					f.Close()
				}
				done <- err
			}()
			select {
			case err := <-done:
				if err == nil || !strings.Contains(err.Error(), tc.want) {
					t.Errorf("OpenAuditFile: %v; want an error saying %q", err, tc.want)
				}
			case <-time.After(5 * time.Second):
				t.Fatal("OpenAuditFile blocked")
			}
			if _, err := os.Lstat(filepath.Join(dir, "elsewhere")); err == nil {
				t.Error("a file was made at the link's target")
			}
		})
	}

	t.Run("reopen after a link was planted", func(t *testing.T) {
		dir := t.TempDir()
		path := filepath.Join(dir, "audit.jsonl")
		f, err := server.OpenAuditFile(path)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		os.Rename(path, path+".1")
		if err := os.Symlink(filepath.Join(dir, "elsewhere"), path); err != nil {
			t.Fatal(err)
		}
		if err := f.Reopen(); err == nil || !strings.Contains(err.Error(), "symbolic link") {
			t.Errorf("Reopen onto a link: %v; want refused", err)
		}
		if _, err := f.Write([]byte("still written\n")); err != nil {
			t.Fatal(err)
		}
		if b, _ := os.ReadFile(path + ".1"); string(b) != "still written\n" {
			t.Errorf("the current file got %q; want the record", b)
		}
	})
}
