package softhsmtest

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/hsmagent/hsmagent/agent"
	"github.com/hsmagent/hsmagent/agent/server"
)

// TestAgentRefusesReplacedKey replaces a key while the agent serves it, with
// 'hsmagent keys delete' and 'keys generate' from another process (issue 8
// item 8). The next signature is refused with FailedPrecondition and audited
// key-changed, not made with a key the agent does not advertise; the agent
// then reloads by itself, advertises the new public key with a new revision,
// and signs with it.
func TestAgentRefusesReplacedKey(t *testing.T) {
	fx := New(t)
	fx.ok(t, fx.args([]string{"keys", "generate"}, "--label", "swap", "--type", "ecdsa-p256")...)
	audit := &lockedBuffer{}
	a := StartAgent(t, fx.Open(t), server.Options{Audit: slog.New(slog.NewTextHandler(audit, nil))})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	client, err := agent.Dial(ctx, a.Socket)
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	signer, err := client.Signer(ctx, "swap")
	if err != nil {
		t.Fatal(err)
	}
	oldPub := signer.Public().(*ecdsa.PublicKey)
	digest := sha256.Sum256([]byte("swap"))
	if _, err := signer.Sign(rand.Reader, digest[:], crypto.SHA256); err != nil {
		t.Fatal(err)
	}
	rev := a.Server.Revision()

	fx.ok(t, fx.args([]string{"keys", "delete"}, "--label", "swap", "--yes")...)
	fx.ok(t, fx.args([]string{"keys", "generate"}, "--label", "swap", "--type", "ecdsa-p256")...)

	sig, err := signer.Sign(rand.Reader, digest[:], crypto.SHA256)
	var ce *agent.CallError
	switch {
	case err == nil && ecdsa.VerifyASN1(oldPub, digest[:], sig):
		t.Fatal("signed with the deleted key")
	case err == nil:
		t.Fatal("signed with the replacement key while advertising the old one")
	case !errors.As(err, &ce) || ce.Code != "FailedPrecondition" || !strings.Contains(ce.Msg, `key "swap" was replaced`):
		t.Fatalf("sign after the swap: %v, want FailedPrecondition saying the key was replaced", err)
	}
	t.Logf("refused: %v", err)
	if audit.count("result=key-changed") != 1 {
		t.Errorf("audit:\n%s", audit.String())
	}

	// The agent reloads by itself: a new revision with the new public key.
	deadline := time.Now().Add(10 * time.Second)
	for a.Server.Revision() == rev {
		if time.Now().After(deadline) {
			t.Fatal("no reload within 10s of the refusal")
		}
		time.Sleep(20 * time.Millisecond)
	}
	keys, err := client.Keys(ctx)
	if err != nil || len(keys) != 1 {
		t.Fatalf("keys after the reload: %v %v", keys, err)
	}
	newPub := keys[0].Public.(*ecdsa.PublicKey)
	if newPub.Equal(oldPub) {
		t.Fatal("the agent still advertises the old public key")
	}
	fresh, err := client.Signer(ctx, "swap")
	if err != nil {
		t.Fatal(err)
	}
	sig, err = fresh.Sign(rand.Reader, digest[:], crypto.SHA256)
	if err != nil || !ecdsa.VerifyASN1(newPub, digest[:], sig) {
		t.Fatalf("sign with the new key: %v", err)
	}
}
