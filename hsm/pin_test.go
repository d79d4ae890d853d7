package hsm

import (
	"errors"
	"os"
	"path/filepath"
	"testing"
)

// TestPINChoiceOrder: the PIN file wins over the environment, which wins
// over the URI, the systemd credential and the prompt, in that order.
func TestPINChoiceOrder(t *testing.T) {
	dir := t.TempDir()
	write := func(name, pin string, mode os.FileMode) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(pin+"\n"), mode); err != nil {
			t.Fatal(err)
		}
		return p
	}
	file := write("pin", "from-file", 0o600)
	loose := write("loose", "from-loose-file", 0o644)
	credDir := filepath.Join(dir, "creds")
	os.Mkdir(credDir, 0o700)
	write("creds/"+PINCredential, "from-credential", 0o400)
	fixed := func(s string) PINSource { return func() (string, error) { return s, nil } }

	tests := []struct {
		name       string
		choice     PINChoice
		env, creds string
		want       string
		wantErr    error
	}{
		{"file first", PINChoice{File: file, FromURI: fixed("uri"), Prompt: fixed("prompt")}, "from-env", credDir, "from-file", nil},
		{"environment next", PINChoice{FromURI: fixed("uri"), Prompt: fixed("prompt")}, "from-env", credDir, "from-env", nil},
		{"then the URI", PINChoice{FromURI: fixed("uri"), Prompt: fixed("prompt")}, "", credDir, "uri", nil},
		{"then the credential", PINChoice{Prompt: fixed("prompt")}, "", credDir, "from-credential", nil},
		{"then the prompt", PINChoice{Prompt: fixed("prompt")}, "", "", "prompt", nil},
		{"nothing", PINChoice{}, "", "", "", ErrNoPIN},
		{"loose file refused", PINChoice{File: loose}, "", "", "", nil},
		{"loose file allowed", PINChoice{File: loose, AllowInsecureFile: true}, "", "", "from-loose-file", nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Setenv(PINEnv, tt.env)
			t.Setenv("CREDENTIALS_DIRECTORY", tt.creds)
			got, err := tt.choice.Source()()
			if tt.name == "loose file refused" {
				var insecure *InsecurePINFileError
				if !errors.As(err, &insecure) {
					t.Fatalf("a 0644 PIN file was read: %q, %v", got, err)
				}
				return
			}
			if got != tt.want || !errors.Is(err, tt.wantErr) {
				t.Errorf("got %q, %v; want %q, %v", got, err, tt.want, tt.wantErr)
			}
		})
	}
}
