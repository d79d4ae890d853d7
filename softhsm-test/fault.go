package softhsmtest

import (
	"bytes"
	"crypto/sha256"
	_ "embed"                // the fault module's C source
	binenc "encoding/binary" // "binary" is the hsmagent binary in the tests
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hsmagent/hsmagent/hsm"
)

//go:embed faultmodule/fault.c
var faultSource []byte

// faultCFlags are the gcc flags of the Makefile's fault-module target.
var faultCFlags = []string{"-shared", "-fPIC", "-O2", "-Wall", "-Werror"}

// FaultModule is the fault-injecting PKCS#11 module (faultmodule/fault.c)
// standing in front of a SoftHSM token: it forwards every call to SoftHSM and
// adds the latency, errors, hangs and token removal set through its methods.
//
// The methods write the control file, which the module checks on every call,
// so they take effect at once in this process and in child processes started
// with Env. They fail the test on error and must be called from the test's
// goroutine.
type FaultModule struct {
	Path        string // the module to load in place of SoftHSM
	ControlFile string // key=value controls, see faultmodule/README.md
	StatsFile   string // per-op counters written by the module
	Real        string // the SoftHSM library the module forwards to

	tb  testing.TB
	tok *Token

	mu         sync.Mutex
	controls   map[string]string
	generation int
}

// FaultStats are the module's counters for one op, over every process using the stats file.
type FaultStats struct {
	Calls     int // calls received (length queries of C_Sign are not counted)
	Forwarded int // calls passed to SoftHSM
	Failed    int // calls answered with an injected error (or as if the token were absent)
	Hung      int // calls that waited on hang
	Waiting   int // calls waiting on hang right now
	Replayed  int // signatures answered from the replay table, without SoftHSM (SetReplay)
	Slept     int // calls that slept their latency
	SleptNS   int // what those sleeps took in all, in nanoseconds
	LateNS    int // how much longer than asked they took in all: the process's wake-up delay
}

// FaultOps are the names of the wrapped call groups, as fail_ops, hang_ops and Stats use them.
var FaultOps = []string{"initialize", "finalize", "slots", "tokeninfo", "open", "login",
	"find", "attr", "generate", "signinit", "sign"}

// faultKeys are the control keys; HSMAGENT_FAULT_<KEY> gives initial values.
var faultKeys = []string{"sign_latency_us", "latency_us", "fail", "fail_count", "fail_ops",
	"hang", "hang_ops", "crash", "crash_ops", "token_absent", "replay", "generation"}

// NewFaultModule builds the fault module (once per test binary, cached by
// content), gives this test its own copy of it, and points it at tok: the
// environment is set for the rest of the test so that the module, loaded in
// this process, forwards to SoftHSM and reads its own control and stats files.
//
// Each test gets a separate copy of the library so that its per-process state
// (fail counts, the files it reads) starts afresh even if an earlier test left
// the module loaded.
func NewFaultModule(tb testing.TB, tok *Token) *FaultModule {
	tb.Helper()
	built, err := buildFaultModule()
	if err != nil {
		tb.Fatal(err)
	}
	dir := tb.TempDir()
	fm := &FaultModule{
		Path:        filepath.Join(dir, "libhsmagent-fault.so"),
		ControlFile: filepath.Join(dir, "fault.control"),
		StatsFile:   filepath.Join(dir, "fault.stats"),
		Real:        tok.ModulePath,
		tb:          tb,
		tok:         tok,
		controls:    map[string]string{},
	}
	if err := copyFile(built, fm.Path); err != nil {
		tb.Fatal(err)
	}
	// Initial values from the caller's environment would surprise a test.
	for _, k := range faultKeys {
		tb.Setenv("HSMAGENT_FAULT_"+strings.ToUpper(k), "")
	}
	for _, kv := range fm.moduleEnv() {
		k, v, _ := strings.Cut(kv, "=")
		tb.Setenv(k, v)
	}
	fm.write()
	return fm
}

func (f *FaultModule) moduleEnv() []string {
	return []string{
		"HSMAGENT_FAULT_MODULE=" + f.Real,
		"HSMAGENT_FAULT_CONTROL=" + f.ControlFile,
		"HSMAGENT_FAULT_STATS=" + f.StatsFile,
	}
}

// Env is the environment for a child process (an hsmagent binary) that should
// use the token through the fault module.
func (f *FaultModule) Env() []string {
	return append(f.tok.Env(), append(f.moduleEnv(), "HSMAGENT_MODULE="+f.Path)...)
}

// Config selects the token, through the fault module, with its PIN file.
func (f *FaultModule) Config() hsm.Config {
	cfg := f.tok.Config()
	cfg.ModulePath = f.Path
	return cfg
}

// Set writes one control key; an empty value removes it (back to its initial value).
func (f *FaultModule) Set(key, value string) {
	f.tb.Helper()
	f.set(key, value)
}

// SetSignLatency delays every C_Sign, C_SignUpdate and C_SignFinal by d.
func (f *FaultModule) SetSignLatency(d time.Duration) {
	f.tb.Helper()
	f.set("sign_latency_us", micros(d))
}

// SetReplay turns on the off-host shape of a network HSM: a C_Sign of a key,
// mechanism and digest already signed once returns that signature again
// after the sign latency without calling SoftHSM, and C_SignInit costs
// nothing, so that this host spends on a signature only what the caller
// does. Benchmarks sign the same digest over and over.
func (f *FaultModule) SetReplay(on bool) {
	f.tb.Helper()
	v := "0"
	if on {
		v = "1"
	}
	f.set("replay", v)
}

// SetLatency delays every other wrapped call (session, login, find, attributes...) by d.
func (f *FaultModule) SetLatency(d time.Duration) {
	f.tb.Helper()
	f.set("latency_us", micros(d))
}

// FailNext makes the next n calls of ops (default: sign) in each process fail
// with code, without reaching SoftHSM.
func (f *FaultModule) FailNext(code uint, n int, ops ...string) {
	f.tb.Helper()
	f.set("fail", fmt.Sprintf("0x%x", code), "fail_count", fmt.Sprint(n), "fail_ops", f.opList(ops))
}

// FailWhile makes every call of ops (default: sign) fail with code until ClearFail or Reset.
func (f *FaultModule) FailWhile(code uint, ops ...string) {
	f.tb.Helper()
	f.set("fail", fmt.Sprintf("0x%x", code), "fail_count", "", "fail_ops", f.opList(ops))
}

// ClearFail stops injecting errors.
func (f *FaultModule) ClearFail() {
	f.tb.Helper()
	f.set("fail", "", "fail_count", "", "fail_ops", "")
}

// Hang blocks calls of ops (default: sign) before they reach SoftHSM, until Release.
func (f *FaultModule) Hang(ops ...string) {
	f.tb.Helper()
	f.set("hang", "1", "hang_ops", f.opList(ops))
}

// Release lets hung calls go on to SoftHSM (within about 5 ms).
func (f *FaultModule) Release() {
	f.tb.Helper()
	f.set("hang", "", "hang_ops", "")
}

// RemoveToken makes the token look pulled out: no slot lists it, opening a
// session fails with CKR_TOKEN_NOT_PRESENT, and the sessions a process held
// are closed in SoftHSM when it next calls the module.
func (f *FaultModule) RemoveToken() {
	f.tb.Helper()
	f.set("token_absent", "1")
}

// RestoreToken puts the token back. Sessions closed by RemoveToken stay closed.
func (f *FaultModule) RestoreToken() {
	f.tb.Helper()
	f.set("token_absent", "")
}

// Reset clears every control; the counters keep counting.
func (f *FaultModule) Reset() {
	f.tb.Helper()
	f.mu.Lock()
	f.controls = map[string]string{}
	f.mu.Unlock()
	f.write()
}

// Calls is how many calls of op reached SoftHSM, in every process using the module.
func (f *FaultModule) Calls(op string) int {
	f.tb.Helper()
	return f.Stats(op).Forwarded
}

// Stats returns the counters of op (one of FaultOps).
func (f *FaultModule) Stats(op string) FaultStats {
	f.tb.Helper()
	all, err := readFaultStats(f.StatsFile)
	if err != nil {
		f.tb.Fatal(err)
	}
	s, ok := all[op]
	if !ok && !slices.Contains(FaultOps, op) {
		f.tb.Fatalf("softhsmtest: unknown fault module op %q; ops are %s", op, strings.Join(FaultOps, ", "))
	}
	return s
}

// WaitHung waits until n calls of op are hung, and fails the test if that
// does not happen within 10 seconds.
func (f *FaultModule) WaitHung(op string, n int) {
	f.tb.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for f.Stats(op).Waiting < n {
		if time.Now().After(deadline) {
			f.tb.Fatalf("softhsmtest: %d %s calls hung after 10s, want %d", f.Stats(op).Waiting, op, n)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

func (f *FaultModule) set(kv ...string) {
	f.mu.Lock()
	for i := 0; i+1 < len(kv); i += 2 {
		if kv[i+1] == "" {
			delete(f.controls, kv[i])
		} else {
			f.controls[kv[i]] = kv[i+1]
		}
	}
	f.mu.Unlock()
	f.write()
}

// write replaces the control file atomically: the module may read it at any time.
// The generation line makes every write differ, so that a repeated FailNext
// starts its count again.
func (f *FaultModule) write() {
	f.tb.Helper()
	f.mu.Lock()
	defer f.mu.Unlock()
	f.generation++
	var b bytes.Buffer
	fmt.Fprintf(&b, "# written by softhsmtest.FaultModule\ngeneration=%d\n", f.generation)
	keys := make([]string, 0, len(f.controls))
	for k := range f.controls {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, k := range keys {
		fmt.Fprintf(&b, "%s=%s\n", k, f.controls[k])
	}
	if err := writeFileAtomic(f.ControlFile, b.Bytes()); err != nil {
		f.tb.Fatal(err)
	}
}

func writeFileAtomic(path string, data []byte) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), ".control-*")
	if err != nil {
		return fmt.Errorf("softhsmtest: %w", err)
	}
	_, err = tmp.Write(data)
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp.Name(), path)
	}
	if err != nil {
		os.Remove(tmp.Name())
		return fmt.Errorf("softhsmtest: writing fault control file: %w", err)
	}
	return nil
}

// readFaultStats decodes the stats file: a 512-byte text header naming the
// ops and the fields, then one little-endian uint64 per op and field. A
// missing file means no process has loaded the module yet.
func readFaultStats(path string) (map[string]FaultStats, error) {
	const headerLen = 512
	data, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return map[string]FaultStats{}, nil
	}
	if err != nil {
		return nil, fmt.Errorf("softhsmtest: %w", err)
	}
	if len(data) < headerLen {
		return nil, fmt.Errorf("softhsmtest: fault stats file %s is truncated", path)
	}
	var ops, fields []string
	for _, line := range strings.Split(string(bytes.TrimRight(data[:headerLen], "\x00")), "\n") {
		if v, ok := strings.CutPrefix(line, "ops:"); ok {
			ops = strings.Fields(v)
		} else if v, ok := strings.CutPrefix(line, "fields:"); ok {
			fields = strings.Fields(v)
		}
	}
	if len(ops) == 0 || len(fields) == 0 || len(data) < headerLen+8*len(ops)*len(fields) {
		return nil, fmt.Errorf("softhsmtest: fault stats file %s has no readable header", path)
	}
	out := make(map[string]FaultStats, len(ops))
	for i, op := range ops {
		var s FaultStats
		for j, field := range fields {
			off := headerLen + 8*(i*len(fields)+j)
			v := int(int64(binenc.LittleEndian.Uint64(data[off:])))
			switch field {
			case "calls":
				s.Calls = v
			case "forwarded":
				s.Forwarded = v
			case "failed":
				s.Failed = v
			case "hung":
				s.Hung = v
			case "waiting":
				s.Waiting = v
			case "replayed":
				s.Replayed = v
			case "slept":
				s.Slept = v
			case "slept_ns":
				s.SleptNS = v
			case "late_ns":
				s.LateNS = v
			}
		}
		out[op] = s
	}
	return out, nil
}

var faultBuild struct {
	once sync.Once
	path string
	err  error
}

// buildFaultModule compiles faultmodule/fault.c into the user cache directory,
// under a name derived from the source, the headers' location and the flags,
// and returns the library's path. It compiles at most once per process, and
// not at all when an identical build is cached.
func buildFaultModule() (string, error) {
	faultBuild.once.Do(func() { faultBuild.path, faultBuild.err = compileFaultModule() })
	return faultBuild.path, faultBuild.err
}

func compileFaultModule() (string, error) {
	gcc, err := exec.LookPath("gcc")
	if err != nil {
		return "", errors.New("softhsmtest: gcc is needed to build the PKCS#11 fault module (apt-get install gcc)")
	}
	inc, err := pkcs11HeaderDir()
	if err != nil {
		return "", err
	}
	h := sha256.New()
	h.Write(faultSource)
	fmt.Fprintf(h, "\x00%s\x00%s", inc, strings.Join(faultCFlags, " "))
	cache, err := os.UserCacheDir()
	if err != nil {
		cache = os.TempDir()
	}
	dir := filepath.Join(cache, "hsmagent", "fault-"+hex.EncodeToString(h.Sum(nil))[:16])
	out := filepath.Join(dir, "libhsmagent-fault.so")
	if _, err := os.Stat(out); err == nil {
		return out, nil
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", fmt.Errorf("softhsmtest: %w", err)
	}
	// Built under temporary names and renamed: test binaries of several
	// packages may build it at the same time.
	work, err := os.MkdirTemp(dir, "build-")
	if err != nil {
		return "", fmt.Errorf("softhsmtest: %w", err)
	}
	defer os.RemoveAll(work)
	src := filepath.Join(work, "fault.c")
	if err := os.WriteFile(src, faultSource, 0o644); err != nil {
		return "", fmt.Errorf("softhsmtest: %w", err)
	}
	lib := filepath.Join(work, "libhsmagent-fault.so")
	args := append(append([]string{}, faultCFlags...), "-I", inc, "-o", lib, src, "-ldl", "-lpthread")
	if msg, err := exec.Command(gcc, args...).CombinedOutput(); err != nil {
		return "", fmt.Errorf("softhsmtest: building the fault module: gcc %s: %v\n%s", strings.Join(args, " "), err, msg)
	}
	if err := os.Rename(lib, out); err != nil {
		return "", fmt.Errorf("softhsmtest: %w", err)
	}
	return out, nil
}

// pkcs11HeaderDir is where the miekg/pkcs11 module, which ships pkcs11.h, sits in the module cache.
func pkcs11HeaderDir() (string, error) {
	cmd := exec.Command("go", "list", "-m", "-f", "{{.Dir}}", "github.com/miekg/pkcs11")
	// From this file's directory, so that it works whatever package's test is running.
	if _, file, _, ok := runtime.Caller(0); ok {
		if _, err := os.Stat(filepath.Dir(file)); err == nil {
			cmd.Dir = filepath.Dir(file)
		}
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	dir := strings.TrimSpace(string(out))
	if err != nil || dir == "" {
		return "", fmt.Errorf("softhsmtest: finding the PKCS#11 headers (go list -m github.com/miekg/pkcs11): %v %s", err, stderr.String())
	}
	if _, err := os.Stat(filepath.Join(dir, "pkcs11.h")); err != nil {
		return "", fmt.Errorf("softhsmtest: no pkcs11.h in %s: %w", dir, err)
	}
	return dir, nil
}

func copyFile(from, to string) error {
	data, err := os.ReadFile(from)
	if err != nil {
		return fmt.Errorf("softhsmtest: %w", err)
	}
	if err := os.WriteFile(to, data, 0o755); err != nil {
		return fmt.Errorf("softhsmtest: %w", err)
	}
	return nil
}

func micros(d time.Duration) string {
	if d <= 0 {
		return ""
	}
	return fmt.Sprint(d.Microseconds())
}

// opList checks op names here: the module would only warn on stderr and keep its default.
func (f *FaultModule) opList(ops []string) string {
	f.tb.Helper()
	if len(ops) == 0 {
		return "sign"
	}
	for _, op := range ops {
		if op != "all" && !slices.Contains(FaultOps, op) {
			f.tb.Fatalf("softhsmtest: unknown fault module op %q; ops are all, %s", op, strings.Join(FaultOps, ", "))
		}
	}
	return strings.Join(ops, ",")
}
