package softhsmtest

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestInsecurePINFile: the binary refuses a PIN file open to group or others
// with one line that says how to fix it, and reads it with a warning when the
// operator overrides the check by flag or environment.
func TestInsecurePINFile(t *testing.T) {
	fx := New(t)
	loose := filepath.Join(t.TempDir(), "loose.pin")
	if err := os.WriteFile(loose, []byte(fx.PIN+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(loose, 0o644); err != nil {
		t.Fatal(err)
	}
	uri := "pkcs11:token=" + fx.Label + "?pin-source=file:" + loose
	list := []string{"keys", "list", "--token", fx.Label}
	tests := []struct {
		name    string
		env     []string
		args    []string
		code    int
		stderr  []string // each must appear
		warning bool     // a "warning: " line about the file
	}{
		{name: "refused", args: append(list, "--pin-file", loose), code: 1,
			stderr: []string{"hsmagent: hsm: PIN file", loose, "mode 0644", "chmod 600 " + loose}},
		{name: "refused from the URI", args: []string{"keys", "list", "--uri", uri}, code: 1,
			stderr: []string{"mode 0644", "chmod 600 " + loose}},
		{name: "flag", args: append(list, "--pin-file", loose, "--allow-insecure-pin-file"), warning: true},
		{name: "environment", env: []string{"HSMAGENT_ALLOW_INSECURE_PIN_FILE=true"}, args: append(list, "--pin-file", loose), warning: true},
		{name: "flag with the URI", args: []string{"keys", "list", "--uri", uri, "--allow-insecure-pin-file"}, warning: true},
		{name: "flag with a safe file", args: append(list, "--pin-file", fx.PINFile, "--allow-insecure-pin-file")},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := fx.hsmagentEnv(t, tt.env, tt.args...)
			if r.code != tt.code {
				t.Fatalf("exit %d, want %d; stderr: %s", r.code, tt.code, r.stderr)
			}
			lines := strings.Split(strings.TrimRight(r.stderr, "\n"), "\n")
			if tt.code != 0 && len(lines) != 1 {
				t.Errorf("want one line on stderr, got:\n%s", r.stderr)
			}
			for _, want := range tt.stderr {
				if !strings.Contains(r.stderr, want) {
					t.Errorf("stderr %q lacks %q", r.stderr, want)
				}
			}
			warned := strings.Contains(r.stderr, "warning: ") && strings.Contains(r.stderr, loose) && strings.Contains(r.stderr, "chmod 600")
			if warned != tt.warning {
				t.Errorf("warning shown: %t, want %t; stderr: %s", warned, tt.warning, r.stderr)
			}
		})
	}
}
