package softhsmtest

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hsmagent/hsmagent/agent"
	"github.com/hsmagent/hsmagent/agent/agentpb"
	"github.com/hsmagent/hsmagent/agent/rotation"
	"github.com/hsmagent/hsmagent/hsm"
)

// The rotation's end-to-end tests: a real agent process (HSM worker on) on a
// SoftHSM token, the CLI run as root with no PIN, the Go client's mTLS
// handshakes judged by openssl s_server -Verify 1.

const rotLabel = "d1-ppr-mtls"

// rotationWorld is an agent serving rotLabel with a certificate from the
// test CA "thales" and its intermediate, a Go client of the agent, and
// openssl s_server demanding a client certificate from thales.
type rotationWorld struct {
	a       *adminAgent
	ctx     context.Context
	client  *agent.Client
	thales  *CA
	public  *CA // issues openssl s_server's certificate
	addr    string
	first   *x509.Certificate // rotLabel's certificate before the rotation
	oldPub  crypto.PublicKey
	oldFP   string
	files   string // a directory every user may read, for the inputs
	chainPE string // thales' intermediate, PEM
}

var d1CSRFlags = []string{"--profile", "d1", "--issuer-id", "ABCDEFGHIJ", "--env", "PPR",
	"--country", "FR", "--state", "Ile-de-France", "--locality", "Paris", "--org", "Example Bank", "--org-unit", "Card Issuing"}

func newRotationWorld(t *testing.T, serveFlags ...string) *rotationWorld {
	t.Helper()
	a := startAdminAgent(t, serveFlags...)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	// The inputs of commands run as another user: t.TempDir's parent is
	// private to this user.
	files, err := os.MkdirTemp("", "hsmagent-rotation-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(files) })
	if err := os.Chmod(files, 0o755); err != nil {
		t.Fatal(err)
	}
	w := &rotationWorld{a: a, ctx: ctx, thales: NewCAWithIntermediate(t, "Test Thales"), public: NewCAWithIntermediate(t, "Test Public"), files: files}
	w.chainPE = writePEM(t, filepath.Join(files, "chain.pem"), w.thales.Intermediate)

	if r := a.run(t, "keys", "generate", "--label", rotLabel, "--type", "ecdsa-p256"); r.code != 0 {
		t.Fatalf("keys generate: exit %d\n%s", r.code, r.stderr)
	}
	csrPath := filepath.Join(a.dir, "first.csr")
	if r := a.run(t, append(append([]string{"csr", "--key", rotLabel}, d1CSRFlags...), "--out", csrPath)...); r.code != 0 {
		t.Fatalf("csr: exit %d\n%s", r.code, r.stderr)
	}
	w.first = w.thales.SignCSR(t, readCSR(t, csrPath))
	first := writePEM(t, filepath.Join(files, "first.crt"), w.first)
	if r := a.run(t, "cert", "import", "--key", rotLabel, "--cert", first, "--chain", w.chainPE); r.code != 0 {
		t.Fatalf("cert import: exit %d\n%s", r.code, r.stderr)
	}
	w.oldPub = w.first.PublicKey
	w.oldFP = fingerprint(t, w.oldPub)
	w.client = w.dial(t)
	return w
}

func (w *rotationWorld) dial(t *testing.T) *agent.Client {
	t.Helper()
	client, err := agent.Dial(w.ctx, w.a.d.socket)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { client.Close() })
	return client
}

// startPeer starts openssl s_server -Verify 1, trusting thales' root only.
func (w *rotationWorld) startPeer(t *testing.T) {
	t.Helper()
	srvCert, srvKey := serverFiles(t, w.a.dir, w.public)
	roots := writePEM(t, filepath.Join(w.a.dir, "thales-root.pem"), w.thales.Cert)
	inter := writePEM(t, filepath.Join(w.a.dir, "public-intermediate.pem"), w.public.Intermediate)
	w.addr = freeAddr(t)
	openssl := exec.Command("openssl", "s_server", "-quiet", "-accept", w.addr, "-cert", srvCert, "-cert_chain", inter, "-key", srvKey,
		"-CAfile", roots, "-Verify", "1", "-verify_return_error", "-www")
	if err := openssl.Start(); err != nil {
		t.Fatalf("openssl s_server: %v", err)
	}
	t.Cleanup(func() { openssl.Process.Kill(); openssl.Wait() })
	waitListening(t, w.addr)
}

// handshake makes one mTLS connection of client to openssl s_server and
// returns the leaf the client sent and the one openssl says it verified.
func (w *rotationWorld) handshake(t *testing.T, client *agent.Client) (sent, seen *x509.Certificate) {
	t.Helper()
	get := client.GetClientCertificate(rotLabel)
	conf := &tls.Config{RootCAs: w.public.Pool(), ServerName: "localhost", MinVersion: tls.VersionTLS13,
		GetClientCertificate: func(cri *tls.CertificateRequestInfo) (*tls.Certificate, error) {
			c, err := get(cri)
			if err == nil {
				sent = c.Leaf
			}
			return c, err
		}}
	conn, err := tls.Dial("tcp", w.addr, conf)
	if err != nil {
		t.Fatalf("mTLS to openssl s_server: %v", err)
	}
	defer conn.Close()
	fmt.Fprint(conn, "GET / HTTP/1.0\r\n\r\n")
	page, _ := io.ReadAll(conn)
	// -www prints the client certificate it verified, as PEM.
	i := bytes.Index(page, []byte("-----BEGIN CERTIFICATE-----"))
	if !bytes.Contains(page, []byte("TLSv1.3")) || i < 0 {
		t.Fatalf("openssl s_server's page has no verified client certificate:\n%.800s", page)
	}
	b, _ := pem.Decode(page[i:])
	if b == nil {
		t.Fatalf("openssl s_server's page: no PEM certificate:\n%.800s", page)
	}
	seen, err = x509.ParseCertificate(b.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	if sent == nil {
		t.Fatal("the client sent no certificate")
	}
	return sent, seen
}

// waitHandshake repeats handshakes until openssl sees serial, which the
// client follows by WatchKeys, and fails after 10 s.
func (w *rotationWorld) waitHandshake(t *testing.T, client *agent.Client, want *x509.Certificate) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		sent, seen := w.handshake(t, client)
		if seen.Equal(want) && sent.Equal(want) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("openssl s_server sees serial %s (client sent %s), want %s", seen.SerialNumber.Text(16), sent.SerialNumber.Text(16), want.SerialNumber.Text(16))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// signsWith signs through the agent under rotLabel and says whether pub
// verifies the signature.
func (w *rotationWorld) signsWith(t *testing.T, client *agent.Client, pub crypto.PublicKey) bool {
	t.Helper()
	signer, err := client.Signer(w.ctx, rotLabel)
	if err != nil {
		t.Fatalf("signer of %s: %v", rotLabel, err)
	}
	digest := sha256.Sum256([]byte(t.Name()))
	sig, err := signer.Sign(nil, digest[:], crypto.SHA256)
	if err != nil {
		t.Fatalf("signing with %s: %v", rotLabel, err)
	}
	return ecdsa.VerifyASN1(pub.(*ecdsa.PublicKey), digest[:], sig)
}

// adminKey is the key labelled label as the agent lists it to root, nil
// when it lists none.
func (w *rotationWorld) adminKey(t *testing.T, label string) *agent.Key {
	t.Helper()
	keys, err := w.client.AdminKeys(w.ctx)
	if err != nil {
		t.Fatalf("AdminKeys: %v", err)
	}
	for _, k := range keys {
		if k.Label == label {
			return &k
		}
	}
	return nil
}

// tokenKeys is 'keys list --json' on the token itself (with the PIN
// file), beside the agent: label -> public key SHA-256.
func (w *rotationWorld) tokenKeys(t *testing.T) map[string]string {
	t.Helper()
	fx := w.a.fx
	r := fx.ok(t, fx.args([]string{"keys", "list"}, "--json")...)
	var views []struct {
		Label     string `json:"label"`
		PublicKey string `json:"publicKeySha256"`
	}
	if err := json.Unmarshal([]byte(r.stdout), &views); err != nil {
		t.Fatalf("keys list --json: %v\n%s", err, r.stdout)
	}
	out := map[string]string{}
	for _, v := range views {
		out[v.Label] = v.PublicKey
	}
	return out
}

// rotate runs keys rotate as root and returns the successor's fingerprint.
func (w *rotationWorld) rotate(t *testing.T) string {
	t.Helper()
	r := w.a.run(t, "keys", "rotate", "--label", rotLabel)
	if r.code != 0 || !strings.Contains(r.stderr, "through the agent at "+w.a.d.socket) {
		t.Fatalf("keys rotate: exit %d\n%s", r.code, r.stderr)
	}
	return printedFingerprint(t, r.stderr)
}

// successorCSR runs csr --successor as root and returns the request.
func (w *rotationWorld) successorCSR(t *testing.T) *x509.CertificateRequest {
	t.Helper()
	path := filepath.Join(w.a.dir, "successor.csr")
	r := w.a.run(t, "csr", "--key", rotLabel, "--successor", "--out", path)
	if r.code != 0 || !strings.Contains(r.stderr, "through the agent at ") {
		t.Fatalf("csr --successor: exit %d\n%s", r.code, r.stderr)
	}
	if out, err := exec.Command("openssl", "req", "-in", path, "-noout", "-verify").CombinedOutput(); err != nil || !strings.Contains(string(out), "verify OK") {
		t.Fatalf("openssl req -verify of the successor's CSR: %v\n%s", err, out)
	}
	csr, err := x509.ParseCertificateRequest(readCSR(t, path))
	if err != nil {
		t.Fatal(err)
	}
	return csr
}

// promote runs cert import --successor as root and returns the retired label.
func (w *rotationWorld) promote(t *testing.T, args ...string) string {
	t.Helper()
	r := w.a.run(t, append([]string{"cert", "import", "--key", rotLabel, "--successor"}, args...)...)
	if r.code != 0 || !strings.Contains(r.stderr, "through the agent at ") || !strings.Contains(r.stderr, "promoted the successor of key") {
		t.Fatalf("cert import --successor: exit %d\n%s", r.code, r.stderr)
	}
	m := regexp.MustCompile(`the key before is "([^"]+)"`).FindStringSubmatch(r.stderr)
	if m == nil {
		t.Fatalf("cert import --successor names no retired label:\n%s", r.stderr)
	}
	return m[1]
}

func printedFingerprint(t *testing.T, stderr string) string {
	t.Helper()
	m := regexp.MustCompile(`public key SHA-256: (\S+)`).FindStringSubmatch(stderr)
	if m == nil {
		t.Fatalf("no public key fingerprint printed:\n%s", stderr)
	}
	return m[1]
}

func fingerprint(t *testing.T, pub crypto.PublicKey) string {
	t.Helper()
	fp, err := hsm.PublicKeyFingerprint(pub)
	if err != nil {
		t.Fatal(err)
	}
	return fp
}

func samePublic(a, b crypto.PublicKey) bool {
	e, ok := a.(interface{ Equal(crypto.PublicKey) bool })
	return ok && b != nil && e.Equal(b)
}

// records counts the admin records of op for key with result.
func (w *rotationWorld) records(t *testing.T, op, key, result string) int {
	t.Helper()
	n := 0
	for _, r := range w.a.auditRecords(t) {
		if r["op"] == op && r["key"] == key && r["result"] == result {
			n++
		}
	}
	return n
}

// statusSuccessor is the successor 'status --json' shows beside rotLabel.
func (w *rotationWorld) statusSuccessor(t *testing.T) (successor map[string]any, retired []any, text string) {
	t.Helper()
	r := w.a.run(t, "status", "--socket", w.a.d.socket, "--json")
	var v struct {
		Keys []map[string]any `json:"keys"`
	}
	if err := json.Unmarshal([]byte(r.stdout), &v); err != nil {
		t.Fatalf("status --json: exit %d: %v\n%s\n%s", r.code, err, r.stdout, r.stderr)
	}
	found := false
	for _, k := range v.Keys {
		if k["label"] == rotLabel {
			found = true
			successor, _ = k["successor"].(map[string]any)
			retired, _ = k["retired"].([]any)
		}
		if k["label"] != rotLabel && strings.HasPrefix(k["label"].(string), rotLabel) {
			t.Errorf("status lists %q as a key of its own:\n%s", k["label"], r.stdout)
		}
	}
	if !found {
		t.Fatalf("status does not list %s:\n%s", rotLabel, r.stdout)
	}
	return successor, retired, w.a.run(t, "status", "--socket", w.a.d.socket).stdout
}

// doctorSuccessor is doctor's line about rotLabel's successor, nil if none.
func (w *rotationWorld) doctorSuccessor(t *testing.T) *doctorLine {
	t.Helper()
	_, lines := w.a.fx.doctor(t, w.a.d.socket)
	for _, l := range lines {
		if l.Key == rotation.SuccessorLabel(rotLabel) {
			return &l
		}
	}
	return nil
}

// TestRotationThroughAgent runs a rotation as root with no PIN against a
// running agent: keys rotate, csr --successor, the CA signs, cert import
// --successor. The same Go client, accepted by openssl s_server -Verify 1
// before, presents the new certificate after with no restart and signs with
// the new key; the old key stays on the token under its retired label;
// each step is audited; status and doctor show the successor while pending.
// It runs with the agent's HSM worker (the default) and with the module in
// the agent's own process.
func TestRotationThroughAgent(t *testing.T) {
	for _, mode := range []struct {
		name   string
		flags  []string
		worker bool
	}{{"hsm worker", nil, true}, {"in process", []string{"--hsm-in-process"}, false}} {
		t.Run(mode.name, func(t *testing.T) {
			w := newRotationWorld(t, mode.flags...)
			if want := fmt.Sprintf(`"hsm_worker":%v`, mode.worker); !strings.Contains(w.a.d.logText(), want) {
				t.Fatalf("the agent's log lacks %s:\n%s", want, w.a.d.logText())
			}
			rotationThroughAgent(t, w)
		})
	}
}

func rotationThroughAgent(t *testing.T, w *rotationWorld) {
	w.startPeer(t)
	watch := watchKeys(t, w.a.d.socket)

	w.waitHandshake(t, w.client, w.first)
	if !w.signsWith(t, w.client, w.oldPub) {
		t.Fatal("before the rotation, the agent's signature does not verify with the current key")
	}
	if s, _, _ := w.statusSuccessor(t); s != nil {
		t.Fatalf("status shows a successor before any rotation: %v", s)
	}

	// 1. keys rotate.
	succFP := w.rotate(t)
	if succFP == w.oldFP {
		t.Fatal("the successor has the current key's public key")
	}
	succ := rotation.SuccessorLabel(rotLabel)
	watch.waitFor(t, "the successor", listed(succ))
	sk := w.adminKey(t, succ)
	if sk == nil || fingerprint(t, sk.Public) != succFP || len(sk.Chain) != 0 {
		t.Fatalf("the agent lists the successor as %+v, want public key %s and no certificate", sk, succFP)
	}
	rec := w.a.lastRecord(t, "rotate-key")
	if rec["result"] != "ok" || rec["uid"] != float64(0) || rec["key"] != rotLabel || rec["key_type"] != "ecdsa-p256" || rec["public_key_sha256"] != succFP {
		t.Errorf("rotate record %v (successor %s)", rec, succFP)
	}
	// The successor is not used before it is promoted.
	w.waitHandshake(t, w.client, w.first)
	if !w.signsWith(t, w.client, w.oldPub) {
		t.Error("after keys rotate, the agent signs under the label with another key than the current one")
	}
	s, _, text := w.statusSuccessor(t)
	if s == nil || s["label"] != succ || s["type"] != "ecdsa-p256" || s["hasCertificate"] != false {
		t.Errorf("status --json shows successor %v, want %s without certificate", s, succ)
	}
	if want := fmt.Sprintf("%s: pending successor %s (ecdsa-p256), not used until promoted; next: hsmagent csr --key %s --successor", rotLabel, succ, rotLabel); !strings.Contains(text, want) {
		t.Errorf("status lacks %q:\n%s", want, text)
	}
	if l := w.doctorSuccessor(t); l == nil || l.Status != "pass" || !strings.Contains(l.Detail, "pending successor") || !strings.Contains(l.Detail, "no certificate yet") {
		t.Errorf("doctor's successor line: %+v", l)
	}

	// 2. csr --successor: the current certificate's subject, the successor's key.
	csr := w.successorCSR(t)
	if !bytes.Equal(csr.RawSubject, w.first.RawSubject) || csr.Subject.String() != w.first.Subject.String() {
		t.Errorf("the successor's CSR has subject %q, the current certificate %q", csr.Subject, w.first.Subject)
	}
	if !strings.HasSuffix(csr.Subject.CommonName, "/PPR") || !strings.HasPrefix(csr.Subject.CommonName, "TLSMA-ECDSA/") {
		t.Errorf("the successor's CSR has CN %q, want the D1 CN of the same environment", csr.Subject.CommonName)
	}
	if !samePublic(csr.PublicKey, sk.Public) || samePublic(csr.PublicKey, w.oldPub) {
		t.Errorf("the successor's CSR holds public key %s, want the successor's %s (the current key is %s)", fingerprint(t, csr.PublicKey), succFP, w.oldFP)
	}
	if rec := w.a.lastRecord(t, "create-csr"); rec["result"] != "ok" || rec["key"] != succ || rec["public_key_sha256"] != succFP {
		t.Errorf("CSR record %v", rec)
	}

	// 3. The CA signs; 4. cert import --successor, a leaf alone: the
	// current key's chain, which links, is kept.
	next := w.thales.SignCSR(t, csr.Raw)
	nextPath := writePEM(t, filepath.Join(w.files, "next.crt"), next)
	retired := w.promote(t, "--cert", nextPath)
	if base, kind := rotation.Parse(retired); base != rotLabel || kind != rotation.Retired {
		t.Fatalf("retired label %q is not a retired label of %s", retired, rotLabel)
	}
	serial := next.SerialNumber.Text(16)
	watch.waitFor(t, "the promoted certificate", servedLeaf(rotLabel, serial))
	watch.waitFor(t, "the list without the successor", func(l *agentpb.ListKeysResponse) bool { return servedLeaf(rotLabel, serial)(l) && !listed(succ)(l) })

	// The same client, no restart: openssl verifies the new leaf, and the
	// handshake's CertificateVerify is the new key's.
	w.waitHandshake(t, w.client, next)
	if !w.signsWith(t, w.client, sk.Public) || w.signsWith(t, w.client, w.oldPub) {
		t.Error("after the promotion, the agent does not sign under the label with the successor's key")
	}
	served := w.adminKey(t, rotLabel)
	if served == nil || !samePublic(served.Public, sk.Public) || len(served.Chain) != 2 || !served.Chain[0].Equal(next) || !served.Chain[1].Equal(w.thales.Intermediate) {
		t.Errorf("the agent serves %s as %+v; want the successor's key, its leaf and the kept intermediate", rotLabel, served)
	}
	if w.adminKey(t, succ) != nil {
		t.Errorf("the agent still lists %s", succ)
	}
	if old := w.adminKey(t, retired); old == nil || !samePublic(old.Public, w.oldPub) {
		t.Errorf("the agent lists the retired key %s as %+v, want the key before", retired, old)
	}
	// The token itself, read beside the agent.
	tok := w.tokenKeys(t)
	if tok[rotLabel] != succFP || tok[retired] != w.oldFP {
		t.Errorf("the token holds %v; want %s -> %s and %s -> %s", tok, rotLabel, succFP, retired, w.oldFP)
	}
	if _, ok := tok[succ]; ok {
		t.Errorf("the token still holds %s", succ)
	}
	// And as an outside tool reads it: each object of the key before moved
	// to the retired label, the successor's to the label, none left behind.
	want := map[string][]string{
		"Private Key": {rotLabel, retired},
		"Public Key":  {rotLabel, retired},
		"Certificate": {rotLabel, rotLabel + "/chain/1", retired, retired + "/chain/1"},
	}
	if got := w.p11Objects(t); !reflect.DeepEqual(got, want) {
		t.Errorf("pkcs11-tool --list-objects finds %v, want %v", got, want)
	}
	rec = w.a.lastRecord(t, "promote-key")
	if rec["result"] != "ok" || rec["uid"] != float64(0) || rec["key"] != rotLabel || rec["public_key_sha256"] != succFP ||
		rec["serial"] != serial || rec["chain"] != float64(1) || rec["retired"] != retired {
		t.Errorf("promote record %v (successor %s, serial %s, retired %s)", rec, succFP, serial, retired)
	}
	// One record per step.
	for _, step := range []struct{ op, key string }{{"rotate-key", rotLabel}, {"create-csr", succ}, {"promote-key", rotLabel}} {
		if n := w.records(t, step.op, step.key, "ok"); n != 1 {
			t.Errorf("%d %s records of %s, want 1", n, step.op, step.key)
		}
	}
	s, ret, text := w.statusSuccessor(t)
	if s != nil || len(ret) != 1 || ret[0] != retired {
		t.Errorf("status after the promotion: successor %v, retired %v; want none and [%s]", s, ret, retired)
	}
	if strings.Contains(text, "pending successor") || !strings.Contains(text, "retired key "+retired+" kept") {
		t.Errorf("status after the promotion:\n%s", text)
	}
	if l := w.doctorSuccessor(t); l != nil {
		t.Errorf("doctor still shows a successor: %+v", l)
	}
	if strings.Contains(w.a.d.logText(), `"msg":"reloaded"`) {
		t.Error("the agent was reloaded by SIGHUP; a rotation should need none")
	}
}

// TestRotationRefusedForNonAdmin: keys rotate and cert import --successor
// as a user the admin rule does not name are refused in one line, audited
// with the user's uid, and change nothing.
func TestRotationRefusedForNonAdmin(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("needs root to run the command as another user")
	}
	w := newRotationWorld(t)
	succ := rotation.SuccessorLabel(rotLabel)
	refused := func(t *testing.T, op string, r result) {
		t.Helper()
		lines := errorLines(r.stderr)
		if r.code != 1 || len(lines) != 1 || !strings.HasPrefix(lines[0], "hsmagent: ") ||
			!strings.Contains(lines[0], fmt.Sprintf("uid %d may not change the agent's keys", otherUID)) {
			t.Fatalf("%s as uid %d: exit %d\n%s", op, otherUID, r.code, r.stderr)
		}
		rec := w.a.lastRecord(t, op)
		if rec["uid"] != float64(otherUID) || rec["result"] != "not-admin" || rec["code"] != "PermissionDenied" || rec["key"] != rotLabel ||
			!strings.Contains(lines[0], rec["request_id"].(string)) {
			t.Errorf("%s refusal record %v", op, rec)
		}
	}

	refused(t, "rotate-key", w.a.runAs(t, nil, "keys", "rotate", "--label", rotLabel))
	if k := w.adminKey(t, succ); k != nil {
		t.Fatalf("the refused rotation made %s", succ)
	}

	succFP := w.rotate(t) // as root
	next := w.thales.SignCSR(t, w.successorCSR(t).Raw)
	nextPath := writePEM(t, filepath.Join(w.files, "next.crt"), next)
	refused(t, "promote-key", w.a.runAs(t, nil, "cert", "import", "--key", rotLabel, "--successor", "--cert", nextPath))
	if k := w.adminKey(t, succ); k == nil || fingerprint(t, k.Public) != succFP || len(k.Chain) != 0 {
		t.Errorf("after the refused import the successor is %+v, want %s pending without certificate", k, succFP)
	}
	if k := w.adminKey(t, rotLabel); k == nil || !samePublic(k.Public, w.oldPub) || !k.Chain[0].Equal(w.first) {
		t.Errorf("after the refused import the agent serves %+v, want the key before", k)
	}
	if !w.signsWith(t, w.client, w.oldPub) {
		t.Error("after the refused import the agent does not sign with the key before")
	}
	if n := w.records(t, "promote-key", rotLabel, "ok"); n != 0 {
		t.Errorf("%d promote records with result ok", n)
	}
	// A member of the admin group may.
	r := w.a.runAs(t, []uint32{adminGID}, "cert", "import", "--key", rotLabel, "--successor", "--cert", nextPath)
	if r.code != 0 || !strings.Contains(r.stderr, "promoted the successor") {
		t.Fatalf("cert import --successor as a member of the admin group: exit %d\n%s", r.code, r.stderr)
	}
	if rec := w.a.lastRecord(t, "promote-key"); rec["uid"] != float64(otherUID) || rec["result"] != "ok" || rec["serial"] != next.SerialNumber.Text(16) {
		t.Errorf("promote record %v", rec)
	}
	if k := w.adminKey(t, rotLabel); k == nil || fingerprint(t, k.Public) != succFP || !k.Chain[0].Equal(next) {
		t.Errorf("after the admin member's import the agent serves %+v, want the successor with its certificate", k)
	}
	if !w.signsWith(t, w.client, next.PublicKey) {
		t.Error("after the admin member's import the agent does not sign with the successor's key")
	}
}

// TestRotationBadInput: each mistake gets one line, and nothing is lost:
// the current key still serves with its certificate, and a pending
// successor stays pending.
func TestRotationBadInput(t *testing.T) {
	w := newRotationWorld(t)
	a := w.a
	succ := rotation.SuccessorLabel(rotLabel)
	// A second key, certified, with no rotation under way.
	if r := a.run(t, "keys", "generate", "--label", "other", "--type", "ecdsa-p256"); r.code != 0 {
		t.Fatalf("keys generate: %s", r.stderr)
	}
	other := w.adminKey(t, "other")
	otherCert := writePEM(t, filepath.Join(w.files, "other.crt"),
		w.thales.Leaf(t, w.first.Subject, other.Public, time.Now().Add(-time.Hour), time.Now().Add(24*time.Hour)))
	if r := a.run(t, "cert", "import", "--key", "other", "--cert", otherCert, "--chain", w.chainPE); r.code != 0 {
		t.Fatalf("cert import: %s", r.stderr)
	}
	succFP := w.rotate(t)
	current := writePEM(t, filepath.Join(w.files, "current.crt"), w.first)
	corrupt := filepath.Join(w.files, "corrupt.pem")
	if err := os.WriteFile(corrupt, []byte("-----BEGIN CERTIFICATE-----\nnot base64 at all!\n-----END CERTIFICATE-----\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	retiredLabel := rotation.RetiredLabel(rotLabel, time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC))

	tests := []struct {
		name string
		args []string
		code int
		want string
	}{
		{"rotate without --label", []string{"keys", "rotate"}, 2, "--label"},
		{"rotate twice without --replace", []string{"keys", "rotate", "--label", rotLabel}, 1, `key "` + rotLabel + `" has a pending successor already`},
		{"rotate an unknown key", []string{"keys", "rotate", "--label", "nope"}, 1, `no key labelled "nope" to rotate`},
		{"rotate a successor", []string{"keys", "rotate", "--label", succ}, 2, `key "` + succ + `" is a successor key of "` + rotLabel + `"; the rotation's commands take the key being rotated: give "` + rotLabel + `"`},
		{"rotate a retired key", []string{"keys", "rotate", "--label", retiredLabel}, 2, `key "` + retiredLabel + `" is a retired key of "` + rotLabel + `"; the rotation's commands take the key being rotated: give "` + rotLabel + `"`},
		{"import with no successor pending", []string{"cert", "import", "--key", "other", "--successor", "--cert", otherCert}, 1, `key "other" has no pending successor`},
		{"import the current key's certificate as the successor's", []string{"cert", "import", "--key", rotLabel, "--successor", "--cert", current}, 1, "does not belong to"},
		{"import a corrupt PEM", []string{"cert", "import", "--key", rotLabel, "--successor", "--cert", corrupt}, 1, "corrupt.pem"},
		{"import for a successor label", []string{"cert", "import", "--key", succ, "--successor", "--cert", current}, 2, "is a successor key"},
		{"import for a retired label", []string{"cert", "import", "--key", retiredLabel, "--successor", "--cert", current}, 2, "is a retired key"},
		{"csr --successor for a successor label", []string{"csr", "--key", succ, "--successor"}, 2, `key "` + succ + `" is a successor key`},
		{"csr --successor for a retired label", []string{"csr", "--key", retiredLabel, "--successor"}, 2, `key "` + retiredLabel + `" is a retired key`},
		{"csr --successor with no successor pending", []string{"csr", "--key", "other", "--successor"}, 1, `key "other" has no pending successor`},
		{"generate under a successor's label", []string{"keys", "generate", "--label", rotation.SuccessorLabel("other")}, 2, `only a rotation makes; to rotate the key: hsmagent keys rotate --label other`},
		{"generate under a retired label", []string{"keys", "generate", "--label", rotation.RetiredLabel(rotLabel, time.Now().Add(time.Hour))}, 2, `is the label of a retired key of "` + rotLabel + `"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before := len(a.auditRecords(t))
			r := a.run(t, tt.args...)
			lines := errorLines(r.stderr)
			if r.code != tt.code || len(lines) != 1 || !strings.HasPrefix(lines[0], "hsmagent: ") || !strings.Contains(lines[0], tt.want) {
				t.Errorf("exit %d (want %d), want one line with %q:\n%s", r.code, tt.code, tt.want, r.stderr)
			}
			// Nothing lost: the key before serves, the successor is pending.
			if k := w.adminKey(t, rotLabel); k == nil || !samePublic(k.Public, w.oldPub) || len(k.Chain) != 2 || !k.Chain[0].Equal(w.first) {
				t.Errorf("the agent serves %s as %+v, want the key before with its chain", rotLabel, k)
			}
			if !w.signsWith(t, w.client, w.oldPub) {
				t.Error("the agent does not sign with the key before")
			}
			if k := w.adminKey(t, succ); k == nil || fingerprint(t, k.Public) != succFP || len(k.Chain) != 0 {
				t.Errorf("the successor is %+v, want %s pending without certificate", k, succFP)
			}
			// A call the agent refused is audited; one refused by the CLI
			// before reaching the agent (code 2) writes nothing.
			recs := a.auditRecords(t)
			for _, rec := range recs[before:] {
				if rec["result"] == "ok" && rec["op"] != "keys" && rec["op"] != "token" {
					t.Errorf("a bad input made a change: %v", rec)
				}
			}
		})
	}
	tok := w.tokenKeys(t)
	if len(tok) != 3 || tok[rotLabel] != w.oldFP || tok[succ] != succFP || tok["other"] != fingerprint(t, other.Public) {
		t.Errorf("the token holds %v after the bad inputs, want %s, %s and other as before", tok, rotLabel, succ)
	}

	// --replace makes a new successor; the current key still serves.
	r := a.run(t, "keys", "rotate", "--label", rotLabel, "--replace")
	if r.code != 0 {
		t.Fatalf("keys rotate --replace: exit %d\n%s", r.code, r.stderr)
	}
	if fp := printedFingerprint(t, r.stderr); fp == succFP || fp == w.oldFP {
		t.Errorf("--replace made successor %s (before %s, current %s)", fp, succFP, w.oldFP)
	}
	if !w.signsWith(t, w.client, w.oldPub) {
		t.Error("after --replace the agent does not sign with the key before")
	}
}

// TestRotationAgentRestarted stops the agent between csr --successor and
// cert import --successor and starts it again on the same token and
// socket: the key before serves, the successor is still pending, and the
// import then promotes it; the Go client follows through both.
func TestRotationAgentRestarted(t *testing.T) {
	w := newRotationWorld(t)
	w.startPeer(t)
	succ := rotation.SuccessorLabel(rotLabel)
	w.waitHandshake(t, w.client, w.first)
	succFP := w.rotate(t)
	next := w.thales.SignCSR(t, w.successorCSR(t).Raw)

	w.a.d.signal(t, syscall.SIGTERM)
	w.a.d.cmd.Wait()
	d := &daemon{socket: w.a.d.socket}
	cmd := exec.Command(binary, append(append([]string{"serve", "--socket", d.socket}, w.a.fx.tokenArgs()...), "--config", filepath.Join(w.a.dir, "agent.yaml"))...)
	cmd.Env = w.a.fx.Env()
	w.a.d = w.a.fx.runDaemon(t, d, cmd)

	// The client of the agent before reconnects by itself; calls made
	// before it has may fail, as while the agent was down.
	serving := time.Now()
	deadline := serving.Add(10 * time.Second)
	for _, err := w.client.Keys(w.ctx); err != nil; _, err = w.client.Keys(w.ctx) {
		if time.Now().After(deadline) {
			t.Fatalf("the client did not reconnect to the restarted agent: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Logf("the client answered %v after the restarted agent served", time.Since(serving).Round(time.Millisecond))
	w.waitHandshake(t, w.client, w.first)
	if !w.signsWith(t, w.client, w.oldPub) {
		t.Error("after the restart the agent does not sign with the key before")
	}
	if k := w.adminKey(t, succ); k == nil || fingerprint(t, k.Public) != succFP {
		t.Fatalf("after the restart the successor is %+v, want %s pending", k, succFP)
	}
	if s, _, _ := w.statusSuccessor(t); s == nil || s["label"] != succ {
		t.Errorf("after the restart status shows successor %v", s)
	}

	watch := watchKeys(t, w.a.d.socket)
	nextPath := writePEM(t, filepath.Join(w.files, "next.crt"), next)
	retired := w.promote(t, "--cert", nextPath, "--chain", w.chainPE)
	watch.waitFor(t, "the promoted certificate", servedLeaf(rotLabel, next.SerialNumber.Text(16)))
	w.waitHandshake(t, w.client, next)
	if !w.signsWith(t, w.client, next.PublicKey) {
		t.Error("after the promotion the agent does not sign with the successor's key")
	}
	tok := w.tokenKeys(t)
	if tok[rotLabel] != succFP || tok[retired] != w.oldFP || len(tok) != 2 {
		t.Errorf("the token holds %v; want %s -> %s and %s -> %s", tok, rotLabel, succFP, retired, w.oldFP)
	}
}

// TestRotationSignaturesAcrossPromotion signs under the label without a
// pause from several goroutines while the successor is promoted: no
// signature fails, each verifies with the key before or the successor,
// and every one begun after cert import --successor returned is the
// successor's. It runs with the HSM worker and with the module in process.
func TestRotationSignaturesAcrossPromotion(t *testing.T) {
	for _, mode := range []struct {
		name  string
		flags []string
	}{{"hsm worker", nil}, {"in process", []string{"--hsm-in-process"}}} {
		t.Run(mode.name, func(t *testing.T) { signaturesAcrossPromotion(t, newRotationWorld(t, mode.flags...)) })
	}
}

func signaturesAcrossPromotion(t *testing.T, w *rotationWorld) {
	succFP := w.rotate(t)
	next := w.thales.SignCSR(t, w.successorCSR(t).Raw)
	nextPath := writePEM(t, filepath.Join(w.files, "next.crt"), next)
	signer, err := w.client.Signer(w.ctx, rotLabel) // by label: it follows the promotion
	if err != nil {
		t.Fatal(err)
	}
	type signed struct {
		begun   time.Time
		old, nu bool
		err     error
	}
	stop := make(chan struct{})
	results := make(chan []signed, 4)
	for g := 0; g < 4; g++ {
		go func(g int) {
			var out []signed
			for i := 0; ; i++ {
				select {
				case <-stop:
					results <- out
					return
				default:
				}
				digest := sha256.Sum256([]byte(fmt.Sprintf("%d-%d", g, i)))
				s := signed{begun: time.Now()}
				var sig []byte
				if sig, s.err = signer.Sign(nil, digest[:], crypto.SHA256); s.err == nil {
					s.old = ecdsa.VerifyASN1(w.oldPub.(*ecdsa.PublicKey), digest[:], sig)
					s.nu = ecdsa.VerifyASN1(next.PublicKey.(*ecdsa.PublicKey), digest[:], sig)
				}
				out = append(out, s)
			}
		}(g)
	}
	time.Sleep(200 * time.Millisecond)
	w.promote(t, "--cert", nextPath)
	done := time.Now()
	time.Sleep(200 * time.Millisecond)
	close(stop)
	var all []signed
	for g := 0; g < 4; g++ {
		all = append(all, <-results...)
	}
	var olds, news, after int
	for _, s := range all {
		switch {
		case s.err != nil:
			t.Errorf("a signature across the promotion failed: %v", s.err)
		case s.old == s.nu:
			t.Errorf("a signature verifies with neither key (or both: %v)", s.old)
		case s.old && s.begun.After(done):
			t.Errorf("a signature begun %v after the promotion returned is the key before's", s.begun.Sub(done))
		case s.old:
			olds++
		default:
			news++
			if s.begun.After(done) {
				after++
			}
		}
	}
	t.Logf("%d signatures: %d with the key before, %d with the successor (%d begun after the promotion returned)", len(all), olds, news, after)
	if olds == 0 || after == 0 {
		t.Errorf("%d signatures with the key before, %d with the successor after the promotion: the test saw no cut-over", olds, after)
	}
	if tok := w.tokenKeys(t); tok[rotLabel] != succFP {
		t.Errorf("the token holds %v, want %s -> %s", tok, rotLabel, succFP)
	}
}

// p11Objects is what pkcs11-tool --list-objects, an outside reader, finds
// on the token: object class ("Private Key", "Public Key", "Certificate")
// -> labels.
func (w *rotationWorld) p11Objects(t *testing.T) map[string][]string {
	t.Helper()
	fx := w.a.fx
	tool, err := exec.LookPath("pkcs11-tool")
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal("pkcs11-tool is missing: run 'make deps' or apt-get install opensc")
		}
		t.Skip("pkcs11-tool is missing (apt-get install opensc)")
	}
	// The PIN on pkcs11-tool's command line is acceptable for a throwaway test token only.
	cmd := exec.Command(tool, "--module", fx.ModulePath, "--token-label", fx.Label, "--login", "--pin", fx.PIN, "--list-objects")
	cmd.Env = fx.Env()
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("pkcs11-tool --list-objects: %v\n%s", err, out)
	}
	objs := map[string][]string{}
	class := ""
	for _, l := range strings.Split(string(out), "\n") {
		if c, _, ok := strings.Cut(l, " Object;"); ok && !strings.HasPrefix(l, " ") {
			class = c
			continue
		}
		if v, ok := strings.CutPrefix(strings.TrimSpace(l), "label:"); ok && class != "" {
			objs[class] = append(objs[class], strings.TrimSpace(v))
		}
	}
	for c := range objs {
		slices.Sort(objs[c])
	}
	return objs
}
