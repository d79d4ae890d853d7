package softhsmtest

import (
	"bufio"
	"context"
	"crypto"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hsmagent/hsmagent/agent"
	"github.com/hsmagent/hsmagent/agent/agentpb"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

// errorLines are the lines of stderr but the one that says where a
// lifecycle command went (through the agent, or directly on the token).
func errorLines(stderr string) []string {
	var out []string
	for _, l := range strings.Split(strings.TrimRight(stderr, "\n"), "\n") {
		if !strings.HasPrefix(l, "through the agent at ") && !strings.HasPrefix(l, "directly on the token (") {
			out = append(out, l)
		}
	}
	return out
}

// adminAgent is "hsmagent serve" (HSM worker on, the default) with an
// audit file and an admin rule naming group adminGID, reachable by uid
// otherUID, whom the tests run commands as.
type adminAgent struct {
	fx    *Token
	d     *daemon
	audit string
	dir   string
}

const (
	otherUID = 65534 // nobody: no admin by default
	adminGID = 4242  // the admin rule's group, given to nobody by setgroups
)

func startAdminAgent(t *testing.T, extra ...string) *adminAgent {
	t.Helper()
	fx := New(t)
	dir := t.TempDir()
	os.Chmod(dir, 0o755)
	a := &adminAgent{fx: fx, dir: dir, audit: filepath.Join(dir, "audit.log")}
	config := filepath.Join(dir, "agent.yaml")
	// The socket's group is nobody's, so that the other user reaches the
	// agent: the admin rule, not the socket, decides.
	cfg := fmt.Sprintf("log_format: json\naudit_log: %q\nsocket_group: \"%d\"\nadmin:\n  groups: [\"%d\"]\n", a.audit, otherUID, adminGID)
	if err := os.WriteFile(config, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	a.d = fx.startDaemon(t, append([]string{"--config", config}, extra...)...)
	// The socket's directory: traversable by the socket's group.
	run := filepath.Dir(a.d.socket)
	for _, p := range []string{run, filepath.Dir(run)} {
		if err := os.Chmod(p, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	return a
}

// run runs the binary as this test's user with no token flags and no PIN:
// the agent is reached by its socket.
func (a *adminAgent) run(t *testing.T, args ...string) result {
	t.Helper()
	return a.fx.hsmagentEnv(t, []string{"HSMAGENT_SOCKET=" + a.d.socket}, args...)
}

// runAs runs the binary as uid otherUID with the given groups.
func (a *adminAgent) runAs(t *testing.T, groups []uint32, args ...string) result {
	t.Helper()
	cmd := exec.Command(binary, append(args, "--socket", a.d.socket)...)
	cmd.Env = []string{"PATH=/usr/bin:/bin", "HOME=/"}
	cmd.Dir = "/"
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: otherUID, Gid: otherUID, Groups: groups}}
	var stdout, stderr strings.Builder
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	r := result{stdout: stdout.String(), stderr: stderr.String()}
	if ee, ok := err.(*exec.ExitError); ok {
		r.code = ee.ExitCode()
	} else if err != nil {
		t.Fatalf("running hsmagent %v as uid %d: %v", args, otherUID, err)
	}
	return r
}

// dial connects a Go client to the agent as this test's user, both ended
// with the test; ctx bounds the test's calls to a minute.
func (a *adminAgent) dial(t *testing.T) (context.Context, *agent.Client) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	t.Cleanup(cancel)
	client, err := agent.Dial(ctx, a.d.socket)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { client.Close() })
	return ctx, client
}

// auditRecords are the admin records of the audit file.
func (a *adminAgent) auditRecords(t *testing.T) []map[string]any {
	t.Helper()
	f, err := os.Open(a.audit)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var out []map[string]any
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		var m map[string]any
		if json.Unmarshal(sc.Bytes(), &m) == nil && m["msg"] == "admin" {
			out = append(out, m)
		}
	}
	return out
}

// lastRecord is the last admin record of op.
func (a *adminAgent) lastRecord(t *testing.T, op string) map[string]any {
	t.Helper()
	recs := a.auditRecords(t)
	for i := len(recs) - 1; i >= 0; i-- {
		if recs[i]["op"] == op {
			return recs[i]
		}
	}
	t.Fatalf("no admin record of %s in %s", op, a.audit)
	return nil
}

// watcher follows WatchKeys on its own connection and keeps every list.
type watcher struct {
	mu    sync.Mutex
	lists []*agentpb.ListKeysResponse
	ch    chan struct{}
}

func watchKeys(t *testing.T, socket string) *watcher {
	t.Helper()
	conn, err := grpc.NewClient("unix://"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(func() { cancel(); conn.Close() })
	stream, err := agentpb.NewAgentClient(conn).WatchKeys(ctx, &agentpb.WatchKeysRequest{})
	if err != nil {
		t.Fatal(err)
	}
	w := &watcher{ch: make(chan struct{}, 100)}
	go func() {
		for {
			resp, err := stream.Recv()
			if err != nil {
				return
			}
			w.mu.Lock()
			w.lists = append(w.lists, resp)
			w.mu.Unlock()
			w.ch <- struct{}{}
		}
	}()
	w.waitFor(t, "the first list", func(*agentpb.ListKeysResponse) bool { return true })
	return w
}

// waitFor waits until a list sent satisfies ok.
func (w *watcher) waitFor(t *testing.T, what string, ok func(*agentpb.ListKeysResponse) bool) {
	t.Helper()
	deadline := time.After(10 * time.Second)
	for {
		w.mu.Lock()
		for _, l := range w.lists {
			if ok(l) {
				w.mu.Unlock()
				return
			}
		}
		w.mu.Unlock()
		select {
		case <-w.ch:
		case <-deadline:
			t.Fatalf("WatchKeys never sent %s", what)
		}
	}
}

func listed(label string) func(*agentpb.ListKeysResponse) bool {
	return func(l *agentpb.ListKeysResponse) bool {
		for _, k := range l.Keys {
			if k.Label == label {
				return true
			}
		}
		return false
	}
}

func servedLeaf(label string, serial string) func(*agentpb.ListKeysResponse) bool {
	return func(l *agentpb.ListKeysResponse) bool {
		for _, k := range l.Keys {
			if k.Label == label && len(k.CertificateChain) > 0 {
				c, err := x509.ParseCertificate(k.CertificateChain[0])
				return err == nil && c.SerialNumber.Text(16) == serial
			}
		}
		return false
	}
}

func readCSR(t *testing.T, path string) []byte {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := pem.Decode(data)
	if b == nil || b.Type != "CERTIFICATE REQUEST" {
		t.Fatalf("%s holds no CSR:\n%s", path, data)
	}
	return b.Bytes
}

// mtlsThroughOpenSSL makes one mTLS connection from the Go client, with the
// key's certificate as the agent serves it now, to openssl s_server, which
// demands a client certificate from ca; it returns the serial presented.
func mtlsThroughOpenSSL(t *testing.T, client *agent.Client, label, addr string, serverRoots *x509.CertPool) string {
	t.Helper()
	get := client.GetClientCertificate(label)
	var sent string
	conf := &tls.Config{RootCAs: serverRoots, ServerName: "localhost",
		GetClientCertificate: func(cri *tls.CertificateRequestInfo) (*tls.Certificate, error) {
			c, err := get(cri)
			if err == nil && c.Leaf != nil {
				sent = c.Leaf.SerialNumber.Text(16)
			}
			return c, err
		}}
	conn, err := tls.Dial("tcp", addr, conf)
	if err != nil {
		t.Fatalf("mTLS to openssl s_server: %v", err)
	}
	defer conn.Close()
	fmt.Fprint(conn, "GET / HTTP/1.0\r\n\r\n")
	page, _ := io.ReadAll(conn)
	if !strings.Contains(string(page), "TLSv1.3") {
		t.Fatalf("openssl s_server's page:\n%.600s", page)
	}
	return sent
}

// TestAdminLifecycleThroughAgent runs the renewal runbook against a real
// agent with its HSM worker, as root with no PIN: generate, CSR, import,
// an mTLS peer (openssl s_server -Verify) accepting the Go client, a
// renewal it accepts too, and delete; the agent's list and a WatchKeys
// watcher follow each change without SIGHUP, and each is audited.
func TestAdminLifecycleThroughAgent(t *testing.T) {
	a := startAdminAgent(t)
	if !strings.Contains(a.d.logText(), `"hsm_worker":true`) {
		t.Fatalf("the agent runs no HSM worker:\n%s", a.d.logText())
	}
	w := watchKeys(t, a.d.socket)
	ctx, client := a.dial(t)
	const label = "d1-ppr-mtls"

	r := a.run(t, "keys", "generate", "--label", label, "--type", "ecdsa-p256")
	if r.code != 0 || !strings.Contains(r.stderr, "through the agent at "+a.d.socket) || !strings.Contains(r.stderr, "public key SHA-256: ") {
		t.Fatalf("keys generate: exit %d\n%s", r.code, r.stderr)
	}
	w.waitFor(t, "the generated key", listed(label))
	rec := a.lastRecord(t, "generate-key")
	fp := strings.TrimSpace(r.stderr[strings.Index(r.stderr, "public key SHA-256: ")+len("public key SHA-256: "):])
	if rec["result"] != "ok" || rec["uid"] != float64(0) || rec["key"] != label || rec["key_type"] != "ecdsa-p256" || rec["public_key_sha256"] != fp {
		t.Errorf("generate record %v (printed fingerprint %s)", rec, fp)
	}

	// CSR and import, as the renewal runbook does them, twice: the first
	// certificate, then a renewal from the same CA that keeps the chain.
	thales := NewCAWithIntermediate(t, "Test Thales")
	public := NewCAWithIntermediate(t, "Test Public")
	srvCert, srvKey := serverFiles(t, a.dir, public)
	roots := filepath.Join(a.dir, "thales-root.pem")
	writePEM(t, roots, thales.Cert)
	addr := freeAddr(t)
	// OpenSSL sends only the first certificate of -cert; the intermediate goes in -cert_chain.
	inter := writePEM(t, filepath.Join(a.dir, "public-intermediate.pem"), public.Intermediate)
	openssl := exec.Command("openssl", "s_server", "-quiet", "-accept", addr, "-cert", srvCert, "-cert_chain", inter, "-key", srvKey,
		"-CAfile", roots, "-Verify", "1", "-verify_return_error", "-www")
	if err := openssl.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { openssl.Process.Kill(); openssl.Wait() }()
	waitListening(t, addr)

	d1CSR := []string{"csr", "--key", label, "--profile", "d1", "--issuer-id", "ABCDEFGHIJ", "--env", "PPR",
		"--country", "FR", "--state", "Ile-de-France", "--locality", "Paris", "--org", "Example Bank", "--org-unit", "Card Issuing"}
	var serials []string
	for i, step := range []string{"first certificate", "renewal"} {
		csrPath := filepath.Join(a.dir, fmt.Sprintf("%d.csr", i))
		r := a.run(t, append(d1CSR, "--out", csrPath)...)
		if r.code != 0 || !strings.Contains(r.stderr, "through the agent at ") ||
			!strings.Contains(r.stderr, "subject: /C=FR/ST=Ile-de-France/L=Paris/O=Example Bank/OU=Card Issuing/CN=TLSMA-ECDSA/ABCDEFGHIJ/PPR") {
			t.Fatalf("%s: csr: exit %d\n%s", step, r.code, r.stderr)
		}
		// OpenSSL as the outside judge of the agent's CSR.
		if out, err := exec.Command("openssl", "req", "-in", csrPath, "-noout", "-verify").CombinedOutput(); err != nil || !strings.Contains(string(out), "verify OK") {
			t.Fatalf("%s: openssl req -verify: %v\n%s", step, err, out)
		}
		leaf := thales.SignCSR(t, readCSR(t, csrPath))
		certPath := writePEM(t, filepath.Join(a.dir, fmt.Sprintf("%d.crt", i)), leaf)
		args := []string{"cert", "import", "--key", label, "--cert", certPath}
		if i == 0 {
			args = append(args, "--chain", writePEM(t, filepath.Join(a.dir, "chain.pem"), thales.Intermediate))
		}
		r = a.run(t, args...)
		if r.code != 0 || !strings.Contains(r.stderr, "through the agent at ") || !strings.Contains(r.stderr, "and 1 chain certificate(s)") {
			t.Fatalf("%s: cert import: exit %d\n%s", step, r.code, r.stderr)
		}
		if i == 1 && !strings.Contains(r.stderr, "kept the 1 chain certificate(s)") {
			t.Errorf("renewal without --chain did not say it kept the chain:\n%s", r.stderr)
		}
		serial := leaf.SerialNumber.Text(16)
		w.waitFor(t, "the "+step, servedLeaf(label, serial))
		if rec := a.lastRecord(t, "import-certificate"); rec["serial"] != serial || rec["chain"] != float64(1) || rec["result"] != "ok" || rec["public_key_sha256"] != fp {
			t.Errorf("%s: import record %v", step, rec)
		}
		if rec := a.lastRecord(t, "create-csr"); rec["result"] != "ok" || rec["key"] != label {
			t.Errorf("%s: CSR record %v", step, rec)
		}
		// The Go client follows without restart; OpenSSL accepts it.
		deadline := time.Now().Add(10 * time.Second)
		for {
			got := mtlsThroughOpenSSL(t, client, label, addr, public.Pool())
			if got == serial {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: the client presents serial %s, not %s", step, got, serial)
			}
			time.Sleep(50 * time.Millisecond)
		}
		serials = append(serials, serial)
	}
	if serials[0] == serials[1] {
		t.Fatal("the renewal did not change the certificate")
	}

	r = a.run(t, "keys", "delete", "--label", label, "--yes")
	if r.code != 0 || !strings.Contains(r.stderr, "through the agent at ") {
		t.Fatalf("keys delete: exit %d\n%s", r.code, r.stderr)
	}
	w.waitFor(t, "the list without the deleted key", func(l *agentpb.ListKeysResponse) bool { return !listed(label)(l) && l.Revision > 0 })
	if keys, err := client.Keys(ctx); err != nil || len(keys) != 0 {
		t.Errorf("after delete the agent offers %v (%v)", keys, err)
	}
	if rec := a.lastRecord(t, "delete-key"); rec["result"] != "ok" || rec["public_key_sha256"] != fp {
		t.Errorf("delete record %v", rec)
	}
	if strings.Contains(a.d.logText(), `"msg":"reloaded"`) {
		t.Error("the agent was reloaded by SIGHUP; the changes should need none")
	}
}

// serverFiles issues openssl s_server's certificate for localhost.
func serverFiles(t *testing.T, dir string, ca *CA) (certFile, keyFile string) {
	t.Helper()
	w := &d1World{dir: dir}
	return w.peerFiles(t, ca, "localhost", time.Now().Add(24*time.Hour), "localhost")
}

// TestAdminRefusedForNonAdmin: an operation as a user the admin rule does
// not name is refused in one line that names the rule and the fix, audited
// with the caller's uid, and changes nothing; the same user in the admin
// group may.
func TestAdminRefusedForNonAdmin(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("needs root to run the command as another user")
	}
	a := startAdminAgent(t)
	if r := a.run(t, "keys", "generate", "--label", "web"); r.code != 0 {
		t.Fatalf("keys generate: %s", r.stderr)
	}

	r := a.runAs(t, nil, "keys", "delete", "--label", "web", "--yes")
	lines := errorLines(r.stderr)
	if r.code != 1 || len(lines) != 1 || !strings.HasPrefix(lines[0], "hsmagent: ") ||
		!strings.Contains(lines[0], fmt.Sprintf("uid %d may not change the agent's keys: its admin rule allows root, groups %d", otherUID, adminGID)) ||
		!strings.Contains(lines[0], "under admin: (users:, groups:) in the agent's config") || !strings.Contains(lines[0], "(request ") {
		t.Fatalf("refusal: exit %d\n%s", r.code, r.stderr)
	}
	rec := a.lastRecord(t, "delete-key")
	if rec["uid"] != float64(otherUID) || rec["result"] != "not-admin" || rec["code"] != "PermissionDenied" || rec["key"] != "web" ||
		!strings.Contains(lines[0], rec["request_id"].(string)) {
		t.Errorf("refusal record %v", rec)
	}
	if r := a.run(t, "status", "--socket", a.d.socket); !strings.Contains(r.stdout, "web") {
		t.Errorf("the refused delete deleted:\n%s", r.stdout)
	}

	r = a.runAs(t, []uint32{adminGID}, "keys", "generate", "--label", "ops-key")
	if r.code != 0 || !strings.Contains(r.stderr, "through the agent at ") {
		t.Fatalf("keys generate as a member of the admin group: exit %d\n%s", r.code, r.stderr)
	}
	if rec := a.lastRecord(t, "generate-key"); rec["uid"] != float64(otherUID) || rec["result"] != "ok" || rec["key"] != "ops-key" {
		t.Errorf("generate record %v", rec)
	}
}

// TestAdminBadInputKeepsServing: what an operator gets wrong through the
// agent gets one line, and the agent signs on.
func TestAdminBadInputKeepsServing(t *testing.T) {
	a := startAdminAgent(t)
	if r := a.run(t, "keys", "generate", "--label", "web"); r.code != 0 {
		t.Fatalf("keys generate: %s", r.stderr)
	}
	if r := a.run(t, "keys", "generate", "--label", "other"); r.code != 0 {
		t.Fatalf("keys generate: %s", r.stderr)
	}
	ctx, client := a.dial(t)
	keys, err := client.Keys(ctx)
	if err != nil || len(keys) != 2 {
		t.Fatalf("keys %v %v", keys, err)
	}
	pub := map[string]crypto.PublicKey{}
	for _, k := range keys {
		pub[k.Label] = k.Public
	}
	ca := NewCA(t, "Bad Input CA")
	now := time.Now()
	foreign := writePEM(t, filepath.Join(a.dir, "foreign.pem"), ca.Leaf(t, pkix.Name{CommonName: "x"}, pub["other"], now.Add(-time.Hour), now.Add(time.Hour)))
	expired := writePEM(t, filepath.Join(a.dir, "expired.pem"), ca.Leaf(t, pkix.Name{CommonName: "old"}, pub["web"], now.Add(-48*time.Hour), now.Add(-24*time.Hour)))
	corrupt := filepath.Join(a.dir, "corrupt.pem")
	os.WriteFile(corrupt, []byte("-----BEGIN CERTIFICATE-----\nnot base64 at all!\n-----END CERTIFICATE-----\n"), 0o644)

	tests := []struct {
		name string
		args []string
		code int
		want string
	}{
		{"label in use", []string{"keys", "generate", "--label", "web"}, 1, `a key labelled "web" exists already`},
		{"label the token reserves", []string{"keys", "generate", "--label", "a/chain/1"}, 1, `may not contain "/chain/"`},
		{"control character in label", []string{"keys", "generate", "--label", "a\tb"}, 2, "control or non-printable"},
		{"unknown key type", []string{"keys", "generate", "--label", "x", "--type", "ed25519"}, 2, `unsupported key type "ed25519"`},
		{"--id through the agent", []string{"keys", "generate", "--label", "x", "--id", "0102"}, 2, "--id is for --direct only"},
		{"delete unknown key", []string{"keys", "delete", "--label", "nope", "--yes"}, 1, `"nope"`},
		{"certificate of another key", []string{"cert", "import", "--key", "web", "--cert", foreign}, 1, `does not belong to key "web": its public key differs`},
		{"expired certificate", []string{"cert", "import", "--key", "web", "--cert", expired}, 1, "expired on"},
		{"corrupt PEM", []string{"cert", "import", "--key", "web", "--cert", corrupt}, 1, "corrupt.pem"},
		{"import for an unknown key", []string{"cert", "import", "--key", "nope", "--cert", expired}, 1, `no key labelled "nope"`},
		{"CSR of an unknown key", []string{"csr", "--key", "nope", "--subject", "CN=x"}, 1, `key "nope" not found in the agent's token`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := a.run(t, tt.args...)
			lines := errorLines(r.stderr)
			if r.code != tt.code || len(lines) != 1 || !strings.HasPrefix(lines[0], "hsmagent: ") || !strings.Contains(lines[0], tt.want) {
				t.Errorf("exit %d (want %d), want one line with %q:\n%s", r.code, tt.code, tt.want, r.stderr)
			}
			signer, err := client.Signer(ctx, "web")
			if err != nil {
				t.Fatal(err)
			}
			digest := sha256.Sum256([]byte(tt.name))
			if _, err := signer.Sign(nil, digest[:], crypto.SHA256); err != nil {
				t.Errorf("the agent stopped signing: %v", err)
			}
		})
	}
}

// TestAdminDirectAndNoAgent: --direct opens the token with the PIN beside
// the agent, and with no agent the commands do so by themselves; each says so.
func TestAdminDirectAndNoAgent(t *testing.T) {
	a := startAdminAgent(t)
	fx := a.fx
	r := fx.ok(t, fx.args([]string{"keys", "generate"}, "--label", "direct", "--socket", a.d.socket, "--direct")...)
	if !strings.Contains(r.stderr, "directly on the token (--direct)") || !strings.Contains(r.stderr, `on token "`+fx.Label+`"`) {
		t.Errorf("--direct:\n%s", r.stderr)
	}
	// Without the token flags, through the agent, the same command needs no PIN.
	if r := a.run(t, "keys", "generate", "--label", "through"); r.code != 0 || !strings.Contains(r.stderr, "through the agent at ") {
		t.Fatalf("through the agent: %s", r.stderr)
	}
	// Naming the agent's own token goes through the agent too; naming
	// another opens that one, never the agent's instead.
	if r := a.run(t, fx.args([]string{"keys", "generate"}, "--label", "named")...); r.code != 0 || !strings.Contains(r.stderr, "through the agent at ") {
		t.Errorf("the agent's token named: exit %d\n%s", r.code, r.stderr)
	}
	r = a.run(t, "keys", "generate", "--label", "elsewhere", "--token", "another-token", "--pin-file", fx.PINFile)
	if r.code != 1 || !strings.Contains(r.stderr, fmt.Sprintf("directly on the token (the agent at %s serves token %q, not the one selected)", a.d.socket, fx.Label)) ||
		!strings.Contains(r.stderr, `token "another-token" not found`) {
		t.Errorf("another token named: exit %d\n%s", r.code, r.stderr)
	}
	a.d.signal(t, syscall.SIGTERM)
	a.d.cmd.Wait()
	r = fx.ok(t, fx.args([]string{"keys", "delete"}, "--label", "through", "--yes", "--socket", a.d.socket)...)
	if !strings.Contains(r.stderr, "directly on the token (no agent answers at "+a.d.socket+")") {
		t.Errorf("no agent:\n%s", r.stderr)
	}
	r = fx.ok(t, fx.args([]string{"keys", "list"}, "--json")...)
	if !strings.Contains(r.stdout, `"direct"`) || !strings.Contains(r.stdout, `"named"`) || strings.Contains(r.stdout, `"through"`) || strings.Contains(r.stdout, `"elsewhere"`) {
		t.Errorf("keys list:\n%s", r.stdout)
	}
}

// TestAdminInProcessStore: with the module in the agent's own process
// (hsm_in_process) the Admin calls change the token as well.
func TestAdminInProcessStore(t *testing.T) {
	a := startAdminAgent(t, "--hsm-in-process")
	if !strings.Contains(a.d.logText(), `"hsm_worker":false`) {
		t.Fatalf("the agent runs a worker:\n%s", a.d.logText())
	}
	w := watchKeys(t, a.d.socket)
	if r := a.run(t, "keys", "generate", "--label", "inproc", "--type", "rsa-2048"); r.code != 0 || !strings.Contains(r.stderr, "through the agent at ") {
		t.Fatalf("keys generate: exit %d\n%s", r.code, r.stderr)
	}
	w.waitFor(t, "the generated key", listed("inproc"))
	if r := a.run(t, "keys", "delete", "--label", "inproc", "--yes"); r.code != 0 {
		t.Fatalf("keys delete: exit %d\n%s", r.code, r.stderr)
	}
	w.waitFor(t, "the list without it", func(l *agentpb.ListKeysResponse) bool { return len(l.Keys) == 0 && l.Revision >= 2 })
}
