package softhsmtest

import (
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"errors"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hsmagent/hsmagent/hsm"
	"github.com/miekg/pkcs11"
)

// doctorLine is one line of doctor's JSON checklist.
type doctorLine struct {
	Check       string   `json:"check"`
	Status      string   `json:"status"`
	Detail      string   `json:"detail"`
	Fix         string   `json:"fix"`
	Key         string   `json:"key"`
	Differences []string `json:"differences"`
}

// doctor runs 'hsmagent doctor --json' against the token and the agent on
// socket, and returns its exit status and lines.
func (t *Token) doctor(tb testing.TB, socket string) (int, []doctorLine) {
	tb.Helper()
	r := t.hsmagent(tb, t.args([]string{"doctor"}, "--socket", socket, "--json", "--timeout", "5s")...)
	var lines []doctorLine
	if err := json.Unmarshal([]byte(r.stdout), &lines); err != nil {
		tb.Fatalf("doctor printed no JSON (exit %d): %v\n%s\n%s", r.code, err, r.stdout, r.stderr)
	}
	return r.code, lines
}

// served is doctor's served lines: key label -> differences ("" -> the one
// pass line when all agree).
func served(lines []doctorLine) map[string][]string {
	out := map[string][]string{}
	for _, l := range lines {
		if l.Check == "served" {
			out[l.Key] = l.Differences
		}
	}
	return out
}

// TestDoctorComparesServed starts a real agent process on a SoftHSM token,
// changes the token beside it as another process would (a key added,
// deleted or replaced, a certificate renewed, a chain changed, a CKA_ID
// rewritten) and checks that doctor fails naming the key and each
// difference, with the reload as fix; after SIGHUP the agent serves what the
// token holds and doctor passes.
func TestDoctorComparesServed(t *testing.T) {
	tests := []struct {
		name   string
		change func(t *testing.T, fx *Token, tok *hsm.Token, w *servedWorld)
		want   map[string][]string // key -> differences; nil: all agree
	}{
		{name: "agree", change: func(*testing.T, *Token, *hsm.Token, *servedWorld) {}},
		{name: "key missing from the agent", change: func(t *testing.T, _ *Token, tok *hsm.Token, _ *servedWorld) {
			if _, err := tok.GenerateKey("late", hsm.ECDSAP256, nil); err != nil {
				t.Fatal(err)
			}
		}, want: map[string][]string{"late": {"not-served"}}},
		{name: "key the token lacks", change: func(t *testing.T, _ *Token, tok *hsm.Token, _ *servedWorld) {
			if err := tok.DeleteKey("api"); err != nil {
				t.Fatal(err)
			}
		}, want: map[string][]string{"api": {"not-on-token"}}},
		{name: "certificate renewed", change: func(t *testing.T, _ *Token, tok *hsm.Token, w *servedWorld) {
			renewed := w.ca.Leaf(t, pkix.Name{CommonName: "web renewed"}, w.web.Public, time.Now().Add(-time.Hour), time.Now().Add(60*24*time.Hour))
			if err := tok.ImportChain("web", append([]*x509.Certificate{renewed}, w.ca.Chain()...)); err != nil {
				t.Fatal(err)
			}
		}, want: map[string][]string{"web": {"certificate"}}},
		{name: "chain changed", change: func(t *testing.T, _ *Token, tok *hsm.Token, w *servedWorld) {
			if err := tok.ImportChain("web", w.webChain[:1]); err != nil {
				t.Fatal(err)
			}
		}, want: map[string][]string{"web": {"chain"}}},
		{name: "id changed", change: func(t *testing.T, fx *Token, _ *hsm.Token, _ *servedWorld) {
			rawSetID(t, fx, "api", []byte{0xca, 0xfe})
		}, want: map[string][]string{"api": {"id"}}},
		{name: "key replaced", change: func(t *testing.T, _ *Token, tok *hsm.Token, w *servedWorld) {
			if err := tok.DeleteKey("api"); err != nil {
				t.Fatal(err)
			}
			if _, err := tok.GenerateKey("api", hsm.ECDSAP256, w.api.ID); err != nil {
				t.Fatal(err)
			}
		}, want: map[string][]string{"api": {"public-key", "certificate"}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			fx := New(t)
			w := newServedWorld(t, fx)
			d := fx.startDaemon(t)
			tok := fx.Open(t)
			tt.change(t, fx, tok, w)
			tok.Close()

			code, lines := fx.doctor(t, d.socket)
			got := served(lines)
			if tt.want == nil {
				if code != 0 || !allServed(lines) {
					t.Errorf("exit %d, served lines %v; want one pass line\n%+v", code, got, lines)
				}
			} else {
				if code != 1 || len(got) != len(tt.want) {
					t.Errorf("exit %d, served lines %v; want exit 1 and %v\n%+v", code, got, tt.want, lines)
				}
				for key, diffs := range tt.want {
					if !slices.Equal(got[key], diffs) {
						t.Errorf("key %q: differences %v, want %v", key, got[key], diffs)
					}
				}
				for _, l := range lines {
					if l.Check == "served" && (l.Status != "fail" || !strings.Contains(l.Detail, `"`+l.Key+`"`) || !strings.Contains(l.Fix, "systemctl reload hsmagent")) {
						t.Errorf("served line %+v: want a failure naming the key, with the reload as fix", l)
					}
				}
			}
			if t.Failed() {
				return
			}
			// The fix works: after a reload the agent serves the token as it is.
			d.signal(t, syscall.SIGHUP)
			d.waitFor(t, "msg=reloaded")
			code, lines = fx.doctor(t, d.socket)
			if code != 0 || !allServed(lines) {
				t.Errorf("after SIGHUP: exit %d, served lines %v\n%+v", code, served(lines), lines)
			}
		})
	}
}

// servedWorld is the token's starting state: "web" with a certificate from
// an intermediate and that chain, "api" with a certificate of its own.
type servedWorld struct {
	ca       *CA
	web, api *hsm.Key
	webChain []*x509.Certificate
}

func newServedWorld(t *testing.T, fx *Token) *servedWorld {
	t.Helper()
	tok := fx.Open(t)
	defer tok.Close()
	w := &servedWorld{ca: NewCAWithIntermediate(t, "Served Test")}
	var err error
	if w.web, err = tok.GenerateKey("web", hsm.ECDSAP256, nil); err != nil {
		t.Fatal(err)
	}
	if w.api, err = tok.GenerateKey("api", hsm.ECDSAP256, nil); err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	w.webChain = append([]*x509.Certificate{w.ca.Leaf(t, pkix.Name{CommonName: "web"}, w.web.Public, now.Add(-time.Hour), now.Add(30*24*time.Hour))}, w.ca.Chain()...)
	if err := tok.ImportChain("web", w.webChain); err != nil {
		t.Fatal(err)
	}
	api := w.ca.Leaf(t, pkix.Name{CommonName: "api"}, w.api.Public, now.Add(-time.Hour), now.Add(30*24*time.Hour))
	if err := tok.ImportChain("api", []*x509.Certificate{api}); err != nil {
		t.Fatal(err)
	}
	return w
}

// rawSetID rewrites the CKA_ID of both halves of the key pair labelled
// label, as a vendor tool could: the agent keeps serving the old id.
func rawSetID(t *testing.T, fx *Token, label string, id []byte) {
	t.Helper()
	p, slot := fx.Raw(t)
	session, err := p.OpenSession(slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
	if err != nil {
		t.Fatal(err)
	}
	defer p.CloseSession(session)
	if err := p.Login(session, pkcs11.CKU_USER, fx.PIN); err != nil && !errors.Is(err, pkcs11.Error(pkcs11.CKR_USER_ALREADY_LOGGED_IN)) {
		t.Fatal(err)
	}
	for _, class := range []uint{pkcs11.CKO_PRIVATE_KEY, pkcs11.CKO_PUBLIC_KEY} {
		if err := p.FindObjectsInit(session, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_CLASS, class), pkcs11.NewAttribute(pkcs11.CKA_LABEL, label)}); err != nil {
			t.Fatal(err)
		}
		objs, _, err := p.FindObjects(session, 4)
		p.FindObjectsFinal(session)
		if err != nil || len(objs) != 1 {
			t.Fatalf("key %q, class %d: %d objects, %v", label, class, len(objs), err)
		}
		if err := p.SetAttributeValue(session, objs[0], []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_ID, id)}); err != nil {
			t.Fatal(err)
		}
	}
}

// TestDirectAsRootKeepsTokenFiles is the SoftHSM ownership trap: the agent
// runs as nobody on a token nobody owns, and root writes to the token
// directly. A direct hsmagent command as root gives the files SoftHSM wrote
// back to nobody and says so, and the agent serves the new key after
// SIGHUP; files root writes with another tool are what doctor reports
// (ownership and served both fail), and the next direct command as root
// repairs them.
func TestDirectAsRootKeepsTokenFiles(t *testing.T) {
	const nobody = 65534
	if os.Getuid() != 0 {
		t.Skip("needs root: the trap is root writing to another user's token (CI runs as root)")
	}
	module := ModulePath(t)
	dir := SocketDir(t)
	fx, err := Create(filepath.Join(dir, "hsm"), module, "owned")
	if err != nil {
		t.Fatal(err)
	}
	t.Setenv("SOFTHSM2_CONF", fx.ConfPath)
	for _, p := range []string{dir, filepath.Join(dir, "hsm")} {
		if err := os.Chmod(p, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Mkdir(filepath.Join(dir, "out"), 0o755); err != nil {
		t.Fatal(err)
	}
	fx.ok(t, fx.args([]string{"keys", "generate"}, "--label", "first")...)
	chownR(t, filepath.Join(dir, "hsm"), nobody)
	chownR(t, filepath.Join(dir, "out"), nobody)
	socket := filepath.Join(dir, "out", "run", "agent.sock")
	args := append([]string{"--reuid=65534", "--regid=65534", "--clear-groups", binary, "serve", "--socket", socket}, fx.tokenArgs()...)
	cmd := exec.Command("setpriv", args...)
	cmd.Env = fx.Env()
	d := fx.runDaemon(t, &daemon{socket: socket}, cmd)

	// A direct command as root: the files are nobody's again, and it says so.
	r := fx.ok(t, fx.args([]string{"keys", "generate"}, "--label", "second")...)
	if !strings.Contains(r.stderr, "gave them to nobody:") {
		t.Errorf("keys generate as root did not say it gave the token's files back:\n%s", r.stderr)
	}
	if foreign := filesNotOwnedBy(t, filepath.Join(dir, "hsm", "tokens"), nobody); len(foreign) > 0 {
		t.Fatalf("root's files left in the token: %v", foreign)
	}
	d.signal(t, syscall.SIGHUP)
	d.waitFor(t, "msg=reloaded")
	code, lines := fx.doctor(t, socket)
	if code != 0 || !allServed(lines) || status(lines, "ownership") != "pass" {
		t.Errorf("after a direct generate as root: exit %d, served %v\n%+v", code, served(lines), lines)
	}

	// Root writes with something else than hsmagent: SoftHSM leaves root's
	// files, the agent cannot read them, and doctor says so.
	tok := fx.Open(t)
	if _, err := tok.GenerateKey("third", hsm.ECDSAP256, nil); err != nil {
		t.Fatal(err)
	}
	tok.Close()
	if len(filesNotOwnedBy(t, filepath.Join(dir, "hsm", "tokens"), nobody)) == 0 {
		t.Fatal("control: root's PKCS#11 calls left no root-owned file, so the test proves nothing")
	}
	d.signal(t, syscall.SIGHUP)
	d.waitFor(t, "msg=reloaded")
	if line := d.waitFor(t, "the agent cannot read them"); !strings.Contains(line, "owner=root") || !strings.Contains(line, "chown nobody:") {
		t.Errorf("the agent's warning does not name the owner and the fix: %s", line)
	}
	code, lines = fx.doctor(t, socket)
	if got := served(lines); code != 1 || !slices.Equal(got["third"], []string{"not-served"}) || status(lines, "ownership") != "fail" {
		t.Errorf("root-owned files: exit %d, served %v, ownership %q\n%+v", code, got, status(lines, "ownership"), lines)
	}
	for _, l := range lines {
		if l.Check == "ownership" && !strings.Contains(l.Fix, "chown nobody:") {
			t.Errorf("ownership fix %q does not give the chown", l.Fix)
		}
	}
	// Any direct command as root repairs them; the reload serves the key.
	r = fx.ok(t, fx.args([]string{"keys", "list"})...)
	if !strings.Contains(r.stderr, "gave them to nobody:") {
		t.Errorf("keys list as root did not repair:\n%s", r.stderr)
	}
	d.signal(t, syscall.SIGHUP)
	d.waitFor(t, "msg=reloaded")
	if code, lines := fx.doctor(t, socket); code != 0 || status(lines, "ownership") != "pass" {
		t.Errorf("after the repair: exit %d\n%+v", code, lines)
	}
}

// allServed: doctor's one served line is the pass that says the agent serves the token as stored.
func allServed(lines []doctorLine) bool {
	got := served(lines)
	_, pass := got[""]
	return len(got) == 1 && pass && status(lines, "served") == "pass"
}

func status(lines []doctorLine, check string) string {
	for _, l := range lines {
		if l.Check == check {
			return l.Status
		}
	}
	return ""
}

func filesNotOwnedBy(t *testing.T, root string, uid int) []string {
	t.Helper()
	var out []string
	err := filepath.WalkDir(root, func(p string, e fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		fi, err := e.Info()
		if err != nil {
			return err
		}
		if int(fi.Sys().(*syscall.Stat_t).Uid) != uid {
			out = append(out, p)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}
