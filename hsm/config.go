package hsm

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	pkcs11uri "github.com/stefanberger/go-pkcs11uri"
)

// Config selects a PKCS#11 module, a token on it and the way to obtain its PIN.
type Config struct {
	// ModulePath is the PKCS#11 library. Empty means SoftHSM where it is installed.
	ModulePath string
	// TokenLabel or TokenSerial selects the token; slot numbers are not offered
	// because some modules (SoftHSM among them) renumber slots.
	TokenLabel  string
	TokenSerial string
	// PIN returns the user PIN when the token is opened (and again after a lost
	// session). It is never stored in Config itself.
	PIN PINSource
	// MaxSessions caps the PKCS#11 sessions kept open; 0 means crypto11's default.
	MaxSessions int
	// Logger receives one line when the token becomes unavailable and one
	// when it is back; nil logs nothing.
	Logger *slog.Logger
	// OnReopen, if set, is called after every attempt to reopen the token
	// (after a lost session, and during an outage), with whether it worked:
	// what a session-reopen metric counts. It must not block.
	OnReopen func(ok bool)
	// ReopenMin and ReopenMax bound the delay between reopen attempts while
	// the token is unavailable (doubling from min to max, with jitter);
	// zero means DefaultReopenMin and DefaultReopenMax.
	ReopenMin, ReopenMax time.Duration
}

// Defaults for Config.ReopenMin and ReopenMax: quick to notice a token that
// is back, and at most one attempt every ten seconds during a long outage.
const (
	DefaultReopenMin = 100 * time.Millisecond
	DefaultReopenMax = 10 * time.Second
)

func (c Config) reopenMin() time.Duration {
	if c.ReopenMin > 0 {
		return c.ReopenMin
	}
	return DefaultReopenMin
}

func (c Config) reopenMax() time.Duration {
	if c.ReopenMax > 0 {
		return max(c.ReopenMax, c.reopenMin())
	}
	return max(DefaultReopenMax, c.reopenMin())
}

// softHSMPaths are where Debian, Ubuntu, Fedora, Alpine and Homebrew install SoftHSM.
var softHSMPaths = []string{
	"/usr/lib/softhsm/libsofthsm2.so",
	"/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
	"/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
	"/usr/lib64/pkcs11/libsofthsm2.so",
	"/usr/lib/pkcs11/libsofthsm2.so",
	"/usr/local/lib/softhsm/libsofthsm2.so",
	"/opt/homebrew/lib/softhsm/libsofthsm2.so",
}

// DefaultModulePath returns the first SoftHSM library found on this host, or "".
func DefaultModulePath() string {
	for _, p := range softHSMPaths {
		if _, err := os.Stat(p); err == nil {
			return p
		}
	}
	return ""
}

func (c Config) modulePath() (string, error) {
	path := c.ModulePath
	if path == "" {
		path = DefaultModulePath()
		if path == "" {
			return "", errors.New("hsm: no PKCS#11 module given and SoftHSM is not installed; pass --module PATH")
		}
	}
	if _, err := os.Stat(path); err != nil {
		return "", fmt.Errorf("hsm: PKCS#11 module %q not found: %w", path, errors.Unwrap(err))
	}
	return path, nil
}

func (c Config) tokenName() string {
	if c.TokenLabel != "" {
		return fmt.Sprintf("token %q", c.TokenLabel)
	}
	return fmt.Sprintf("token with serial %q", c.TokenSerial)
}

// A PINSource yields the user PIN. Sources read the PIN when called, so a PIN
// file rotated on disk is picked up at the next login.
type PINSource func() (string, error)

// PINFromFile reads the PIN from the first line of a file. A file that group
// or others may read or write is refused with an *InsecurePINFileError, as
// ssh refuses such a private key file: anyone who can read it can log in to
// the token, and anyone who can write it can lock the PIN with wrong tries.
func PINFromFile(path string) PINSource {
	return func() (string, error) { return readPINFile(path, true) }
}

// PINFromFileInsecure reads the PIN like PINFromFile but accepts any file
// mode. It is for an operator who has been told, and overrides the check.
func PINFromFileInsecure(path string) PINSource {
	return func() (string, error) { return readPINFile(path, false) }
}

// InsecurePINFileError is returned for a PIN file open to group or others.
type InsecurePINFileError struct {
	Path string
	Mode fs.FileMode // permission bits
}

func (e *InsecurePINFileError) Error() string {
	return fmt.Sprintf("hsm: PIN file %q has mode %04o, open to group or others; run chmod 600 %s", e.Path, uint32(e.Mode), e.Path)
}

// CheckPINFile returns an *InsecurePINFileError when group or others may
// read or write the file at path, nil when only its owner may.
func CheckPINFile(path string) error {
	fi, err := os.Stat(path)
	if err != nil {
		return fmt.Errorf("hsm: PIN file %q: %w", path, errors.Unwrap(err))
	}
	return checkPINFileMode(path, fi)
}

func checkPINFileMode(path string, fi fs.FileInfo) error {
	if fi.Mode().Perm()&0o077 != 0 {
		return &InsecurePINFileError{Path: path, Mode: fi.Mode().Perm()}
	}
	return nil
}

func readPINFile(path string, checkMode bool) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", fmt.Errorf("hsm: reading PIN file %q: %w", path, errors.Unwrap(err))
	}
	defer f.Close()
	if checkMode {
		// Stat the open file, not the path, so the file checked is the file read.
		fi, err := f.Stat()
		if err != nil {
			return "", fmt.Errorf("hsm: reading PIN file %q: %w", path, errors.Unwrap(err))
		}
		if err := checkPINFileMode(path, fi); err != nil {
			return "", err
		}
	}
	b, err := io.ReadAll(f)
	if err != nil {
		return "", fmt.Errorf("hsm: reading PIN file %q: %w", path, errors.Unwrap(err))
	}
	pin, _, _ := strings.Cut(string(b), "\n")
	pin = strings.TrimRight(pin, "\r")
	if pin == "" {
		return "", fmt.Errorf("hsm: PIN file %q is empty", path)
	}
	return pin, nil
}

// PINFromEnv reads the PIN from an environment variable.
func PINFromEnv(name string) PINSource {
	return func() (string, error) {
		pin := os.Getenv(name)
		if pin == "" {
			return "", fmt.Errorf("hsm: environment variable %q is empty", name)
		}
		return pin, nil
	}
}

// SystemdCredential returns a source for the credential named name passed by
// systemd (LoadCredential=name:...), and false when systemd passed none.
func SystemdCredential(name string) (PINSource, bool) {
	dir := os.Getenv("CREDENTIALS_DIRECTORY")
	if dir == "" {
		return nil, false
	}
	path := filepath.Join(dir, name)
	if _, err := os.Stat(path); err != nil {
		return nil, false
	}
	// No mode check: systemd keeps credentials in a per-unit directory only
	// the unit's user can enter, and grants that user read access with an
	// ACL when it can, which shows in the mode as group bits (0440).
	return PINFromFileInsecure(path), true
}

// URI is what an RFC 7512 PKCS#11 URI selects.
type URI struct {
	Config
	// Object is the key label named by the URI's "object" attribute, if any.
	Object string
	// PINFile is the path of the URI's "pin-source" attribute, if any; Config.PIN reads it.
	PINFile string
}

// ParseURI reads an RFC 7512 PKCS#11 URI such as
//
//	pkcs11:token=issuer;object=d1-ppr-mtls?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/etc/hsmagent/pin
//
// A pin-value attribute is refused: a PIN inside a URI ends up in shell
// history and process listings.
func ParseURI(s string) (URI, error) {
	u := pkcs11uri.New()
	if err := u.Parse(s); err != nil {
		return URI{}, fmt.Errorf("hsm: bad PKCS#11 URI: %w", err)
	}
	if _, ok := u.GetQueryAttribute("pin-value", false); ok {
		return URI{}, errors.New("hsm: PKCS#11 URI carries pin-value; put the PIN in a file and use pin-source=file:PATH instead")
	}
	var out URI
	out.TokenLabel, _ = u.GetPathAttribute("token", false)
	out.TokenSerial, _ = u.GetPathAttribute("serial", false)
	out.Object, _ = u.GetPathAttribute("object", false)
	out.ModulePath, _ = u.GetQueryAttribute("module-path", false)
	if src, ok := u.GetQueryAttribute("pin-source", false); ok {
		path := strings.TrimPrefix(src, "file:")
		if strings.Contains(path, ":") && !strings.HasPrefix(path, "/") {
			return URI{}, fmt.Errorf("hsm: PKCS#11 URI pin-source %q: only file: sources are supported", src)
		}
		out.PINFile, out.PIN = path, PINFromFile(path)
	}
	return out, nil
}

func (c Config) reopened(ok bool) {
	if c.OnReopen != nil {
		c.OnReopen(ok)
	}
}
