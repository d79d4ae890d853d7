package hsm_test

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/hsmagent/hsmagent/hsm"
)

// TestPINFileMode: a PIN file that group or others may read or write is
// refused, as ssh refuses such a private key file, unless the caller opts out.
func TestPINFileMode(t *testing.T) {
	dir := t.TempDir()
	tests := []struct {
		mode fs.FileMode
		ok   bool
	}{
		{0o600, true},
		{0o400, true},
		{0o700, true},
		{0o640, false},
		{0o644, false},
		{0o660, false},
		{0o620, false}, // group may rewrite the PIN: a wrong one locks the token
		{0o604, false},
		{0o602, false},
		{0o666, false},
	}
	for _, tt := range tests {
		t.Run(tt.mode.String(), func(t *testing.T) {
			path := filepath.Join(dir, "pin-"+tt.mode.String())
			if err := os.WriteFile(path, []byte("1234\n"), 0o600); err != nil {
				t.Fatal(err)
			}
			if err := os.Chmod(path, tt.mode); err != nil { // WriteFile's mode is filtered by the umask
				t.Fatal(err)
			}
			pin, err := hsm.PINFromFile(path)()
			if tt.ok {
				if err != nil || pin != "1234" {
					t.Fatalf("PIN %q, %v", pin, err)
				}
				if err := hsm.CheckPINFile(path); err != nil {
					t.Errorf("CheckPINFile: %v", err)
				}
				return
			}
			if err == nil {
				t.Fatalf("mode %04o accepted", tt.mode)
			}
			msg := err.Error()
			for _, want := range []string{"hsm: ", `"` + path + `"`, fmt.Sprintf("mode %04o", uint32(tt.mode)), "chmod 600 " + path} {
				if !strings.Contains(msg, want) {
					t.Errorf("error %q lacks %q", msg, want)
				}
			}
			if strings.Contains(msg, "\n") || strings.Contains(msg, "1234") {
				t.Errorf("error is not one line without the PIN: %q", msg)
			}
			var ie *hsm.InsecurePINFileError
			if !errors.As(err, &ie) || ie.Path != path || ie.Mode != tt.mode {
				t.Errorf("error %T %+v, want *hsm.InsecurePINFileError for %s %04o", err, ie, path, tt.mode)
			}
			if err := hsm.CheckPINFile(path); !errors.As(err, &ie) {
				t.Errorf("CheckPINFile: %v", err)
			}
			// The override reads it anyway.
			if pin, err := hsm.PINFromFileInsecure(path)(); err != nil || pin != "1234" {
				t.Errorf("PINFromFileInsecure: %q, %v", pin, err)
			}
		})
	}
}

// TestPINFileFromURIAndSystemd: the URI's pin-source is checked like
// --pin-file; a systemd credential is not, because systemd grants the
// service's user access with an ACL, which shows as group bits in the mode.
func TestPINFileFromURIAndSystemd(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "pin")
	os.WriteFile(path, []byte("1234\n"), 0o600)
	os.Chmod(path, 0o644)

	u, err := hsm.ParseURI("pkcs11:token=t?pin-source=file:" + path)
	if err != nil {
		t.Fatal(err)
	}
	if u.PINFile != path {
		t.Errorf("URI PIN file %q, want %q", u.PINFile, path)
	}
	if _, err := u.PIN(); err == nil || !strings.Contains(err.Error(), "chmod 600") {
		t.Errorf("URI pin-source with mode 0644: %v", err)
	}

	cred := filepath.Join(dir, "hsmagent-pin")
	os.WriteFile(cred, []byte("5678\n"), 0o600)
	os.Chmod(cred, 0o440)
	t.Setenv("CREDENTIALS_DIRECTORY", dir)
	src, ok := hsm.SystemdCredential("hsmagent-pin")
	if !ok {
		t.Fatal("systemd credential not found")
	}
	if pin, err := src(); err != nil || pin != "5678" {
		t.Errorf("systemd credential: %q, %v", pin, err)
	}
}
