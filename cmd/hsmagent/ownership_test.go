package main

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"testing"
)

// TestSoftHSMTokenDir reads directories.tokendir as SoftHSM does: from
// SOFTHSM2_CONF, comments skipped, the last setting winning.
func TestSoftHSMTokenDir(t *testing.T) {
	tests := []struct {
		name, conf, want string
		wantErr          bool
	}{
		{"plain", "directories.tokendir = /var/lib/softhsm/tokens/\nobjectstore.backend = file\n", "/var/lib/softhsm/tokens/", false},
		{"comment skipped", "# directories.tokendir = /old\ndirectories.tokendir=/new\n", "/new", false},
		{"indented", "  directories.tokendir =  /t  \n", "/t", false},
		{"no tokendir", "log.level = ERROR\n", "", true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "softhsm2.conf")
			if err := os.WriteFile(path, []byte(tt.conf), 0o600); err != nil {
				t.Fatal(err)
			}
			t.Setenv("SOFTHSM2_CONF", path)
			dir, conf, err := softhsmTokenDir()
			if dir != tt.want || conf != path || (err != nil) != tt.wantErr {
				t.Errorf("got %q, %q, %v; want %q", dir, conf, err, tt.want)
			}
		})
	}
	t.Setenv("SOFTHSM2_CONF", filepath.Join(t.TempDir(), "missing.conf"))
	if _, _, err := softhsmTokenDir(); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("missing config: %v, want not exist", err)
	}
}

// TestOwnershipOtherModules: only SoftHSM's objects are files of the
// calling user; another module gets no ownership line and no repair.
func TestOwnershipOtherModules(t *testing.T) {
	for module, want := range map[string]bool{
		"/usr/lib/softhsm/libsofthsm2.so":                  true,
		"/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so": true,
		"/opt/vendor/lib/libvendorpkcs11.so":               false,
		"/usr/lib/x86_64-linux-gnu/opensc-pkcs11.so":       false,
	} {
		if got := isSoftHSM(module); got != want {
			t.Errorf("isSoftHSM(%q) = %v", module, got)
		}
		if !want && checkTokenOwnership(module) != nil {
			t.Errorf("%q: an ownership line for a module that is not SoftHSM", module)
		}
	}
}
