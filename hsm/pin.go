package hsm

import (
	"errors"
	"os"
)

// Where hsmagent looks for the PIN by default.
const (
	PINEnv        = "HSMAGENT_PIN" // environment variable holding the PIN
	PINCredential = "hsmagent-pin" // systemd credential (LoadCredential=hsmagent-pin:...)
)

// PINChoice is what an operator configured for the PIN. Source picks one
// in a fixed order, so every command and the agent agree: the PIN file, the
// PINEnv variable, the URI's pin-source, the systemd credential PINCredential,
// and last a prompt on the terminal.
type PINChoice struct {
	File              string    // --pin-file
	AllowInsecureFile bool      // read File even when group or others may read it
	FromURI           PINSource // the URI's pin-source, or nil
	Prompt            PINSource // asks on a terminal; nil when there is none
}

// ErrNoPIN is returned (wrapped) by the source Source gives when nothing was configured.
var ErrNoPIN = errors.New("hsm: no PIN: pass --pin-file FILE, set HSMAGENT_PIN, add pin-source to the URI, pass the systemd credential hsmagent-pin (LoadCredential=), or run on a terminal to be prompted")

// Source returns the first configured PIN source.
func (p PINChoice) Source() PINSource {
	switch {
	case p.File != "" && p.AllowInsecureFile:
		return PINFromFileInsecure(p.File)
	case p.File != "":
		return PINFromFile(p.File)
	case envSet(PINEnv):
		return PINFromEnv(PINEnv)
	case p.FromURI != nil:
		return p.FromURI
	}
	if src, ok := SystemdCredential(PINCredential); ok {
		return src
	}
	if p.Prompt != nil {
		return p.Prompt
	}
	return func() (string, error) { return "", ErrNoPIN }
}

func envSet(name string) bool { return os.Getenv(name) != "" }
