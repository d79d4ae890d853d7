package softhsmtest

import (
	"bufio"
	"bytes"
	"context"
	"crypto"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hsmagent/hsmagent/agent"
	"github.com/hsmagent/hsmagent/agent/rotation"
)

// The README's "D1 onboarding runbook", run as it is written.
//
// The test reads the ```sh blocks of that section from README.md when it
// runs, so a runbook that drifts from what the commands do fails here. The
// blocks run in order in one bash, as root, with `set -e`, each with stdin
// from /dev/null and its stdout and stderr kept for the assertions. What
// the runbook takes from the host is arranged around it, never by editing
// a block:
//
//   - The paths. The blocks name /etc/hsmagent/pin, /etc/hsmagent/agent.yaml,
//     /run/hsmagent/agent.sock and /var/log/hsmagent. The bash runs in a
//     mount namespace of its own: /etc is an overlay whose upper directory
//     is the test's (it holds hsmagent/pin and hsmagent/agent.yaml), and
//     /run/hsmagent and /var/log/hsmagent are the test's directories bound
//     in place, so the test sees the agent's socket and audit file while
//     the host's /etc, /run and /var/log stay untouched.
//   - The token. SOFTHSM2_CONF points at a fresh SoftHSM token labelled
//     "issuer" (the runbook's HSMAGENT_TOKEN) with the PIN of /etc/hsmagent/pin;
//     PATH starts with the hsmagent built for the tests. No HSMAGENT_*
//     setting comes from the test: the runbook exports its own.
//   - systemd. A line marked "# systemd" (starting the agent) runs a stand-in,
//     as packaging/first-run-test.sh does: the packaged unit's ExecStart=
//     with the PIN as its credential (CREDENTIALS_DIRECTORY), in the
//     background. It runs as root, who owns this token; the unit's user,
//     groups and sandbox are first-run-test.sh's business.
//   - Thales. Where the runbook sends a CSR away (a block writes one with
//     --out and the next block imports a certificate), the test checks the
//     CSR and issues its certificate from an in-memory test CA with an
//     intermediate (ca.go), written under the names the importing block
//     gives with --cert (and --chain: the intermediate). The CA's root is
//     what an openssl s_server demands client certificates from.
//
// Before the agent starts, every lifecycle command must say it went
// directly to the token; after, through the agent. After the renewal and
// after the rotation, the same agent process (never restarted, never sent
// SIGHUP, its HSM worker never replaced) must serve the new chain, then the
// new key under the same label, to ListKeys, to a WatchKeys watcher and to
// an mTLS handshake of the Go client with openssl s_server -Verify 1.
func TestRunbook(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("the runbook runs as root, in a mount namespace of its own")
	}
	blocks := markdownShBlocks(t, "../README.md", "## D1 onboarding runbook")
	rb := newRunbook(t)
	rb.start(t)
	for i, b := range blocks {
		rb.run(t, i, b)
	}
	rb.finish(t)
}

// markdownShBlocks returns the ```sh blocks of the section under heading,
// up to the next level-2 heading, each with its list indentation removed.
func markdownShBlocks(t *testing.T, path, heading string) []string {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var blocks []string
	var cur []string
	in, inBlock, found := false, false, false
	indent := ""
	for _, line := range strings.Split(string(data), "\n") {
		trimmed := strings.TrimLeft(line, " ")
		switch {
		case line == heading:
			in, found = true, true
		case !in:
		case !inBlock && strings.HasPrefix(line, "## "):
			in = false
		case !inBlock && trimmed == "```sh":
			inBlock, indent, cur = true, line[:len(line)-len(trimmed)], nil
		case inBlock && trimmed == "```":
			inBlock = false
			blocks = append(blocks, strings.Join(cur, "\n"))
		case inBlock:
			cur = append(cur, strings.TrimPrefix(line, indent))
		}
	}
	if !found {
		t.Fatalf("%s has no heading %q", path, heading)
	}
	if len(blocks) == 0 {
		t.Fatalf("no ```sh blocks under %q in %s", heading, path)
	}
	return blocks
}

// runbook is the runbook's shell, its host and the test's stand-ins.
type runbook struct {
	dir    string // etc/ (the overlay's upper directory), run/, log/, work/, out/
	fx     *Token
	thales *CA
	stdin  io.WriteCloser
	marks  chan string // the shell's stdout: one line per finished block
	exited chan error

	pendingCSR string // written by the last block, to be signed before an import

	// Once the agent runs:
	agentPID int
	socket   string // the agent's socket as the test sees it
	client   *agent.Client
	watch    *watcher
	sslAddr  string
	sslRoots *x509.CertPool   // the roots that verify openssl s_server
	firstPub crypto.PublicKey // the key pair the label had when the agent started
	subject  string           // the first certificate's subject, for the later CSRs

	// What the runbook did, checked at the end.
	generated, started, renewed, rotated, promoted bool
}

const runbookLabel = "d1-ppr-mtls"

func newRunbook(t *testing.T) *runbook {
	t.Helper()
	module := ModulePath(t)
	dir := t.TempDir()
	for _, d := range []string{"etc/hsmagent", "etc-work", "run", "log", "work", "out", "creds", "softhsm"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o750); err != nil {
			t.Fatal(err)
		}
	}
	fx, err := Create(filepath.Join(dir, "softhsm"), module, "issuer")
	if err != nil {
		t.Fatal(err)
	}
	rb := &runbook{dir: dir, fx: fx, thales: NewCAWithIntermediate(t, "Test Thales D1"),
		marks: make(chan string, 100), exited: make(chan error, 1), socket: filepath.Join(dir, "run", "agent.sock")}
	// /etc/hsmagent as the package and the first-run guide leave it: the
	// PIN root's alone, and a config for this token.
	pin := fx.PIN + "\n"
	rb.write(t, "etc/hsmagent/pin", pin, 0o600)
	rb.write(t, "creds/hsmagent-pin", pin, 0o400)
	rb.write(t, "etc/hsmagent/agent.yaml", fmt.Sprintf(`socket: /run/hsmagent/agent.sock
module: %s
token: issuer
log_format: json
audit_log: /var/log/hsmagent/audit.jsonl
`, module), 0o640)
	return rb
}

func (rb *runbook) path(rel string) string { return filepath.Join(rb.dir, rel) }

func (rb *runbook) write(t *testing.T, rel, data string, mode os.FileMode) {
	t.Helper()
	if err := os.WriteFile(rb.path(rel), []byte(data), mode); err != nil {
		t.Fatal(err)
	}
}

// unitExecStart is the packaged unit's ExecStart=, with the binary on PATH.
func unitExecStart(t *testing.T) string {
	t.Helper()
	data, err := os.ReadFile("../packaging/systemd/hsmagent.service")
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^ExecStart=(\S+)(.*)$`).FindStringSubmatch(string(data))
	if m == nil {
		t.Fatal("packaging/systemd/hsmagent.service has no ExecStart=")
	}
	return filepath.Base(m[1]) + m[2]
}

// start runs bash in its own mount namespace and sets up the host there.
func (rb *runbook) start(t *testing.T) {
	t.Helper()
	sh := exec.Command("bash", "--noprofile", "--norc", "-s")
	sh.Dir = rb.path("work")
	sh.Env = []string{
		"PATH=" + filepath.Dir(binary) + ":/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
		"HOME=/root", "LANG=C.UTF-8", "SOFTHSM2_CONF=" + rb.fx.ConfPath,
	}
	// Its own mount namespace (Go makes / private in it), and its own
	// process group, which holds the agent it starts, ended as one.
	sh.SysProcAttr = &syscall.SysProcAttr{Unshareflags: syscall.CLONE_NEWNS, Setpgid: true}
	var stderr bytes.Buffer
	sh.Stderr = &stderr
	stdout, err := sh.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if rb.stdin, err = sh.StdinPipe(); err != nil {
		t.Fatal(err)
	}
	if err := sh.Start(); err != nil {
		// Root in a container without CAP_SYS_ADMIN has no mount namespace.
		if errors.Is(err, syscall.EPERM) && os.Getenv("CI") == "" {
			t.Skipf("no mount namespace for the runbook: %v", err)
		}
		t.Fatalf("bash in a mount namespace of its own: %v", err)
	}
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			rb.marks <- sc.Text()
		}
	}()
	go func() {
		err := sh.Wait()
		if err == nil {
			err = fmt.Errorf("bash exited 0; stderr:\n%s", stderr.String())
		} else {
			err = fmt.Errorf("bash: %v; stderr:\n%s", err, stderr.String())
		}
		rb.exited <- err
	}()
	t.Cleanup(func() {
		rb.stdin.Close()
		syscall.Kill(-sh.Process.Pid, syscall.SIGKILL)
		if rb.client != nil {
			rb.client.Close()
		}
	})
	d := rb.dir
	prelude := fmt.Sprintf(`set -e
mount -t overlay overlay -o lowerdir=/etc,upperdir=%[1]s/etc,workdir=%[1]s/etc-work /etc
mount -t tmpfs -o mode=0755 tmpfs /run
mkdir /run/hsmagent && mount --bind %[1]s/run /run/hsmagent
mount -t tmpfs -o mode=0755 tmpfs /var/log
mkdir /var/log/hsmagent && mount --bind %[1]s/log /var/log/hsmagent
systemd_stand_in() {
	case "$*" in
	"systemctl enable --now hsmagent")
		CREDENTIALS_DIRECTORY=%[1]s/creds %[2]s </dev/null >>%[1]s/agent.log 2>&1 &
		echo $! >%[1]s/agent.pid
		for _ in $(seq 200); do
			grep -q '"msg":"agent serving"' %[1]s/agent.log && return 0
			kill -0 $! 2>/dev/null || break
			sleep 0.1
		done
		echo "runbook test: the agent did not start:" >&2; cat %[1]s/agent.log >&2; return 1
		;;
	*) echo "runbook test: no stand-in for '$*'" >&2; return 1 ;;
	esac
}
echo prelude-done
`, d, unitExecStart(t))
	rb.send(t, prelude)
	rb.waitMark(t, "prelude-done", "the test's prelude (mounts)")
}

func (rb *runbook) send(t *testing.T, text string) {
	t.Helper()
	if _, err := io.WriteString(rb.stdin, text); err != nil {
		t.Fatalf("writing to bash: %v", err)
	}
}

func (rb *runbook) waitMark(t *testing.T, mark, what string) {
	t.Helper()
	timeout := time.After(3 * time.Minute)
	for {
		select {
		case m := <-rb.marks:
			if m == mark {
				return
			}
			t.Logf("bash: %s", m)
		case err := <-rb.exited:
			t.Fatalf("%s failed: %v", what, err)
		case <-timeout:
			t.Fatalf("%s did not finish in 3 minutes", what)
		}
	}
}

var (
	systemdLine = regexp.MustCompile(`(?m)^(.*?)[ \t]*# systemd$`)
	outFlag     = regexp.MustCompile(`--out (\S+)`)
	certFlag    = regexp.MustCompile(`--cert (\S+)`)
	chainFlag   = regexp.MustCompile(`--chain (\S+)`)
	d1PPRCN     = regexp.MustCompile(`^TLSMA-ECDSA/[^/]+/PPR$`)
	lifecycle   = regexp.MustCompile(`(?m)^hsmagent (keys (generate|rotate|delete)|csr|cert import) `)
)

// run runs block i of the runbook, with the test's stand-ins before and
// its checks after.
func (rb *runbook) run(t *testing.T, i int, block string) {
	t.Helper()
	script := systemdLine.ReplaceAllString(block, "systemd_stand_in $1")
	t.Logf("runbook block %d:\n%s", i+1, script)
	if strings.Contains(block, "hsmagent cert import") {
		rb.thalesSigns(t, block)
	}
	out, errf := rb.path(fmt.Sprintf("out/%d.out", i)), rb.path(fmt.Sprintf("out/%d.err", i))
	mark := fmt.Sprintf("runbook-block-%d-done", i)
	rb.send(t, fmt.Sprintf("{\n%s\n} </dev/null >%s 2>%s\necho %s\n", script, out, errf, mark))
	what := fmt.Sprintf("runbook block %d", i+1)
	func() {
		defer func() {
			if t.Failed() {
				rb.logOutput(t, out, errf)
			}
		}()
		rb.waitMark(t, mark, what)
	}()
	rb.check(t, i, block, rb.logOutput(t, out, errf))
}

// logOutput logs a block's stdout and stderr and returns its stderr.
func (rb *runbook) logOutput(t *testing.T, out, errf string) string {
	t.Helper()
	o, _ := os.ReadFile(out)
	e, _ := os.ReadFile(errf)
	t.Logf("stdout:\n%s\nstderr:\n%s", o, e)
	return string(e)
}

// thalesSigns stands in for Thales before a block that imports a
// certificate: the CSR the runbook wrote last is checked and signed.
func (rb *runbook) thalesSigns(t *testing.T, block string) {
	t.Helper()
	cert := certFlag.FindStringSubmatch(block)
	if cert == nil {
		t.Fatalf("a cert import without --cert:\n%s", block)
	}
	if rb.pendingCSR == "" {
		t.Fatalf("the runbook imports %s, but no block before wrote a CSR (csr --out) to send to Thales", cert[1])
	}
	csr, err := x509.ParseCertificateRequest(readCSR(t, rb.path("work/"+rb.pendingCSR)))
	if err != nil {
		t.Fatal(err)
	}
	if err := csr.CheckSignature(); err != nil {
		t.Fatalf("the CSR %s: %v", rb.pendingCSR, err)
	}
	// A D1 CN, and a successor's CSR with the current certificate's subject.
	if !d1PPRCN.MatchString(csr.Subject.CommonName) {
		t.Errorf("the CSR %s has CN %q, not a D1 PPR one", rb.pendingCSR, csr.Subject.CommonName)
	}
	if rb.subject != "" && csr.Subject.String() != rb.subject {
		t.Errorf("the CSR %s has subject %q, the certificate %q", rb.pendingCSR, csr.Subject, rb.subject)
	}
	leaf := rb.thales.Leaf(t, csr.Subject, csr.PublicKey, time.Now().Add(-time.Minute), time.Now().Add(90*24*time.Hour))
	writePEM(t, rb.path("work/"+cert[1]), leaf)
	if chain := chainFlag.FindStringSubmatch(block); chain != nil {
		writePEM(t, rb.path("work/"+chain[1]), rb.thales.Chain()...)
	}
	t.Logf("Thales (the test CA) signed %s: %s, serial %s", rb.pendingCSR, cert[1], leaf.SerialNumber.Text(16))
	rb.pendingCSR = ""
}

// check runs after block i: where its commands went, and what the agent
// serves after an agent start, a renewal and a rotation.
func (rb *runbook) check(t *testing.T, i int, block, stderr string) {
	t.Helper()
	if m := outFlag.FindStringSubmatch(block); m != nil && strings.Contains(block, "hsmagent csr ") {
		rb.pendingCSR = m[1]
	}
	if n := len(lifecycle.FindAllString(block, -1)); n > 0 {
		want := "directly on the token ("
		if rb.started {
			want = "through the agent at /run/hsmagent/agent.sock"
		}
		got := 0
		for _, l := range strings.Split(stderr, "\n") {
			if strings.HasPrefix(l, want) {
				got++
			}
		}
		if got != n {
			t.Errorf("block %d: %d lifecycle command(s), %d said %q:\n%s", i+1, n, got, want, stderr)
		}
	}
	if strings.Contains(block, "hsmagent keys generate --label "+runbookLabel) {
		rb.generated = true
	}
	successor := strings.Contains(block, "--successor")
	switch {
	case strings.Contains(block, "systemctl enable --now hsmagent"):
		rb.agentStarted(t)
	case !rb.started:
	case strings.Contains(block, "hsmagent keys rotate --label "+runbookLabel):
		rb.rotated = true
		rb.checkPending(t)
	case strings.Contains(block, "hsmagent cert import") && successor:
		rb.promoted = true
		rb.checkServes(t, block, "rotation", true)
	case strings.Contains(block, "hsmagent cert import"):
		rb.renewed = true
		rb.checkServes(t, block, "renewal", false)
	}
}

// agentStarted connects the test's clients to the agent the runbook
// started and checks that an outside TLS peer accepts the first certificate.
func (rb *runbook) agentStarted(t *testing.T) {
	t.Helper()
	rb.started = true
	data, err := os.ReadFile(rb.path("agent.pid"))
	if err != nil {
		t.Fatal(err)
	}
	if rb.agentPID, err = strconv.Atoi(strings.TrimSpace(string(data))); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if rb.client, err = agent.Dial(ctx, rb.socket); err != nil {
		t.Fatal(err)
	}
	rb.watch = watchKeys(t, rb.socket)
	k := rb.served(t, runbookLabel, false)
	if len(k.Chain) != 2 {
		t.Fatalf("the agent serves %d certificate(s) with %q, want the leaf and Thales's intermediate", len(k.Chain), runbookLabel)
	}
	rb.firstPub, rb.subject = k.Public, k.Chain[0].Subject.String()

	// openssl s_server stands in for D1: it demands a client certificate
	// from the test Thales CA.
	public := NewCAWithIntermediate(t, "Test Public")
	srvCert, srvKey := serverFiles(t, rb.path("work"), public)
	roots := writePEM(t, rb.path("thales-root.pem"), rb.thales.Cert)
	inter := writePEM(t, rb.path("public-intermediate.pem"), public.Intermediate)
	rb.sslAddr = freeAddr(t)
	ssl := exec.Command("openssl", "s_server", "-quiet", "-accept", rb.sslAddr, "-cert", srvCert, "-cert_chain", inter, "-key", srvKey,
		"-CAfile", roots, "-Verify", "1", "-verify_return_error", "-www")
	if err := ssl.Start(); err != nil {
		t.Fatalf("openssl s_server: %v", err)
	}
	t.Cleanup(func() { ssl.Process.Kill(); ssl.Wait() })
	waitListening(t, rb.sslAddr)
	rb.sslRoots = public.Pool()
	if got, want := mtlsThroughOpenSSL(t, rb.client, runbookLabel, rb.sslAddr, rb.sslRoots), k.Chain[0].SerialNumber.Text(16); got != want {
		t.Fatalf("the client presented serial %s, the agent serves %s", got, want)
	}
}

// served is the key labelled label as ListKeys serves it to clients (to
// root here), or with admin as the Admin service lists the token's keys.
func (rb *runbook) served(t *testing.T, label string, admin bool) agent.Key {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	list := rb.client.Keys
	if admin {
		list = rb.client.AdminKeys
	}
	keys, err := list(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range keys {
		if k.Label == label {
			return k
		}
	}
	t.Fatalf("the agent does not list key %q", label)
	return agent.Key{}
}

// checkPending: after keys rotate, the label still serves its key, and a
// successor waits beside it, which status names.
func (rb *runbook) checkPending(t *testing.T) {
	t.Helper()
	succ := rotation.SuccessorLabel(runbookLabel)
	rb.watch.waitFor(t, "the pending successor", listed(succ))
	if k := rb.served(t, runbookLabel, false); !samePublic(k.Public, rb.firstPub) {
		t.Errorf("after keys rotate, %q serves another key already", runbookLabel)
	}
	if s := rb.served(t, succ, true); samePublic(s.Public, rb.firstPub) || len(s.Chain) != 0 {
		t.Errorf("the successor %q: the current key's public key %v, %d certificate(s)", succ, samePublic(s.Public, rb.firstPub), len(s.Chain))
	}
}

// checkServes: after an import, the agent, unrestarted, serves the
// certificate just imported with the intermediate it had, under the
// same label; after a promotion with a new key pair (the old one
// retired), after a renewal with the same one. The Go client presents the
// new certificate to openssl s_server, which verifies it.
func (rb *runbook) checkServes(t *testing.T, block, step string, newKey bool) {
	t.Helper()
	certFile := certFlag.FindStringSubmatch(block)[1]
	leaf := readCert(t, rb.path("work/"+certFile))
	serial := leaf.SerialNumber.Text(16)
	rb.watch.waitFor(t, "the "+step+"'s certificate", servedLeaf(runbookLabel, serial))
	k := rb.served(t, runbookLabel, false)
	switch {
	case len(k.Chain) != 2 || k.Chain[0].SerialNumber.Text(16) != serial || !k.Chain[1].Equal(rb.thales.Intermediate):
		t.Errorf("%s: the agent serves %d certificate(s) with %q, want the new leaf %s and the intermediate", step, len(k.Chain), runbookLabel, serial)
	case !samePublic(k.Public, leaf.PublicKey):
		t.Errorf("%s: the served public key is not the new certificate's", step)
	case newKey == samePublic(k.Public, rb.firstPub):
		t.Errorf("%s: the served key pair is the first one: %v (want %v)", step, !newKey, newKey)
	}
	if newKey {
		var retired []agent.Key
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		keys, err := rb.client.AdminKeys(ctx)
		if err != nil {
			t.Fatal(err)
		}
		for _, k := range keys {
			if base, kind := rotation.Parse(k.Label); base == runbookLabel && kind == rotation.Retired {
				retired = append(retired, k)
			} else if kind == rotation.Successor {
				t.Errorf("after the promotion the agent still lists %q", k.Label)
			}
		}
		if len(retired) != 1 || !samePublic(retired[0].Public, rb.firstPub) {
			t.Errorf("after the promotion: %d retired key(s) of %q, want the first key pair", len(retired), runbookLabel)
		}
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		got := mtlsThroughOpenSSL(t, rb.client, runbookLabel, rb.sslAddr, rb.sslRoots)
		if got == serial {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: the client presents serial %s to openssl s_server, not %s", step, got, serial)
		}
		time.Sleep(50 * time.Millisecond)
	}
	rb.checkSameAgent(t, step)
}

// checkSameAgent: the agent the runbook started still runs, was never
// reloaded, and its HSM worker was never replaced.
func (rb *runbook) checkSameAgent(t *testing.T, step string) {
	t.Helper()
	if err := syscall.Kill(rb.agentPID, 0); err != nil {
		t.Fatalf("%s: the agent (pid %d) is gone: %v", step, rb.agentPID, err)
	}
	data, _ := os.ReadFile(rb.path("agent.log"))
	log := string(data)
	if n := strings.Count(log, `"msg":"agent serving"`); n != 1 {
		t.Errorf("%s: the agent started %d times:\n%s", step, n, log)
	}
	for _, bad := range []string{`"msg":"reloaded"`, `"msg":"the HSM worker ended`} {
		if strings.Contains(log, bad) {
			t.Errorf("%s: the agent's log has %s:\n%s", step, bad, log)
		}
	}
}

// finish: the runbook did each step, and the audit trail holds each
// change, made as root, through the agent.
func (rb *runbook) finish(t *testing.T) {
	t.Helper()
	for what, done := range map[string]bool{"generated the key directly": rb.generated, "started the agent": rb.started,
		"renewed the certificate through the agent": rb.renewed, "made a successor": rb.rotated, "promoted it": rb.promoted} {
		if !done {
			t.Errorf("the runbook never %s", what)
		}
	}
	outputs, _ := filepath.Glob(rb.path("out/*"))
	for _, f := range append(outputs, rb.path("agent.log"), rb.path("log/audit.jsonl")) {
		if data, _ := os.ReadFile(f); strings.Contains(string(data), rb.fx.PIN) {
			t.Errorf("%s holds the PIN", f)
		}
	}
	data, err := os.ReadFile(rb.path("log/audit.jsonl"))
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]string{"import-certificate": runbookLabel, "rotate-key": runbookLabel,
		"create-csr": rotation.SuccessorLabel(runbookLabel), "promote-key": runbookLabel}
	for _, line := range strings.Split(string(data), "\n") {
		var rec map[string]any
		if json.Unmarshal([]byte(line), &rec) != nil || rec["msg"] != "admin" {
			continue
		}
		op, _ := rec["op"].(string)
		if rec["result"] != "ok" || rec["uid"] != float64(0) {
			t.Errorf("audit record %s", line)
		}
		if label, ok := want[op]; ok && rec["key"] == label {
			if op == "promote-key" {
				if r, _ := rec["retired"].(string); !strings.HasPrefix(r, runbookLabel+"/retired-") {
					t.Errorf("promote-key record without the retired label: %s", line)
				}
			}
			delete(want, op)
		}
	}
	for op, label := range want {
		t.Errorf("no admin record of %s for key %q in the audit trail", op, label)
	}
}

func readCert(t *testing.T, path string) *x509.Certificate {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := pem.Decode(data)
	if b == nil || b.Type != "CERTIFICATE" {
		t.Fatalf("%s holds no PEM certificate", path)
	}
	c, err := x509.ParseCertificate(b.Bytes)
	if err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	return c
}
