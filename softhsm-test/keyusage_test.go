package softhsmtest

import (
	"encoding/json"
	"os"
	"os/exec"
	"strings"
	"testing"
)

// TestKeysListWarnsAboutForeignKeys makes a key with pkcs11-tool, as an
// operator might have before hsmagent, and checks that 'keys list' shows its
// usage and warns about it, and says nothing about a key hsmagent made.
func TestKeysListWarnsAboutForeignKeys(t *testing.T) {
	fx := New(t)
	tool, err := exec.LookPath("pkcs11-tool")
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal("pkcs11-tool is missing: run 'make deps' or apt-get install opensc")
		}
		t.Skip("pkcs11-tool is missing (apt-get install opensc)")
	}
	fx.ok(t, fx.args([]string{"keys", "generate"}, "--label", "ours", "--type", "ecdsa-p256")...)
	// The PIN on pkcs11-tool's command line is acceptable for a throwaway test token only.
	gen := exec.Command(tool, "--module", fx.ModulePath, "--token-label", fx.Label, "--login", "--pin", fx.PIN,
		"--keypairgen", "--key-type", "EC:prime256v1", "--label", "foreign", "--id", "0a0b")
	gen.Env = fx.Env()
	if out, err := gen.CombinedOutput(); err != nil {
		t.Fatalf("pkcs11-tool --keypairgen: %v\n%s", err, out)
	}

	r := fx.ok(t, fx.args([]string{"keys", "list"})...)
	rows := map[string][]string{}
	lines := strings.Split(strings.TrimSpace(r.stdout), "\n")
	header := strings.Fields(lines[0])
	usageCol := -1
	for i, h := range header {
		if h == "USAGE" {
			usageCol = i
		}
	}
	if usageCol < 0 {
		t.Fatalf("no USAGE column:\n%s", r.stdout)
	}
	for _, l := range lines[1:] {
		f := strings.Fields(l)
		rows[f[0]] = f
	}
	if got := rows["ours"][usageCol]; got != "sign" {
		t.Errorf("usage of ours: %q, want sign\n%s", got, r.stdout)
	}
	if got := rows["foreign"][usageCol]; got != "sign,decrypt,unwrap,derive" && got != "sign,sign-recover,decrypt,unwrap,derive" {
		t.Errorf("usage of foreign: %q\n%s", got, r.stdout)
	}
	warnings := strings.Split(strings.TrimSpace(r.stderr), "\n")
	if len(warnings) != 1 {
		t.Fatalf("want one warning line on stderr, got:\n%s", r.stderr)
	}
	for _, want := range []string{"warning: ", `key "foreign"`, "decrypt", "unwrap", "derive", "hsmagent keys generate", `keys delete --label "foreign"`} {
		if !strings.Contains(warnings[0], want) {
			t.Errorf("warning lacks %q: %s", want, warnings[0])
		}
	}

	// --json keeps its fields and adds the usage.
	r = fx.ok(t, fx.args([]string{"keys", "list"}, "--json")...)
	var keys []map[string]any
	if err := json.Unmarshal([]byte(r.stdout), &keys); err != nil {
		t.Fatalf("keys list --json: %v\n%s", err, r.stdout)
	}
	if len(keys) != 2 {
		t.Fatalf("keys list --json: %s", r.stdout)
	}
	for _, k := range keys {
		for _, field := range []string{"label", "id", "type", "publicKeySha256", "hasCertificate", "chainLength", "usage", "signOnly"} {
			if _, ok := k[field]; !ok {
				t.Errorf("key %v lacks %q", k["label"], field)
			}
		}
	}
	if keys[1]["label"] != "ours" || keys[1]["usage"] != "sign" || keys[1]["signOnly"] != true || keys[1]["problems"] != nil {
		t.Errorf("ours in JSON: %v", keys[1])
	}
	if keys[0]["label"] != "foreign" || keys[0]["signOnly"] != false || keys[0]["problems"] == nil {
		t.Errorf("foreign in JSON: %v", keys[0])
	}
	if !strings.Contains(r.stderr, `warning: key "foreign"`) {
		t.Errorf("no warning with --json: %s", r.stderr)
	}
}
