package hsm_test

import (
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"testing"
	"time"

	"github.com/hsmagent/hsmagent/agent/rotation"
	"github.com/hsmagent/hsmagent/hsm"
	softhsmtest "github.com/hsmagent/hsmagent/softhsm-test"
)

// promotionStepCount is the number of relabels of a promotion of a key with a
// leaf and one chain certificate, to a successor with the same: the private
// key, the chain certificate, the leaf, the public key, for each key.
const promotionStepCount = 8

// commitStep is the step after which a promotion is completed, not rolled
// back: the successor's private key labelled L.
const commitStep = 7

// TestPromotionInterrupted stops a promotion after each step, as a crash
// would, and checks that the key before is never lost (a whole key pair
// under L or the retired label at every step), and that FinishPromotions,
// run by a fresh open of the token as a restarted agent does, rolls back
// a promotion stopped before its commit (L serves the old key and chain, the
// successor stays pending with its certificate, and promoting again works)
// and completes one stopped after it.
func TestPromotionInterrupted(t *testing.T) {
	const label = "d1-ppr-mtls"
	for stop := 0; stop <= promotionStepCount; stop++ {
		fx := softhsmtest.New(t)
		tok := fx.Open(t)
		ca := softhsmtest.NewCAWithIntermediate(t, "rotation CA")
		now := time.Now()
		old, err := tok.GenerateKey(label, hsm.ECDSAP256, nil)
		if err != nil {
			t.Fatal(err)
		}
		oldLeaf := ca.Leaf(t, pkix.Name{CommonName: label}, old.Public, now.Add(-time.Hour), now.Add(time.Hour))
		if err := tok.ImportChain(label, append([]*x509.Certificate{oldLeaf}, ca.Chain()...)); err != nil {
			t.Fatal(err)
		}
		succ, err := tok.GenerateKey(rotation.SuccessorLabel(label), hsm.ECDSAP384, nil)
		if err != nil {
			t.Fatal(err)
		}
		newLeaf := ca.Leaf(t, pkix.Name{CommonName: label}, succ.Public, now.Add(-time.Hour), now.Add(time.Hour))
		if err := tok.ImportChain(rotation.SuccessorLabel(label), append([]*x509.Certificate{newLeaf}, ca.Chain()...)); err != nil {
			t.Fatal(err)
		}
		retired, err := tok.PromoteSteps(label, stop)
		if err != nil {
			t.Fatalf("stop %d: %v", stop, err)
		}
		keys, err := tok.Keys()
		if err != nil {
			t.Fatal(err)
		}
		oldWhole := false
		for _, k := range keys {
			if (k.Label == label || k.Label == retired) && x509PubEqual(k.Public, old.Public) {
				oldWhole = true
			}
		}
		if !oldWhole {
			t.Errorf("stop %d: the key before is under neither %q nor %q: %v", stop, label, retired, labels(keys))
		}
		tok.Close()

		tok = fx.Open(t) // as a restarted agent
		done, err := tok.FinishPromotions()
		if err != nil {
			t.Fatalf("stop %d: FinishPromotions: %v", stop, err)
		}
		if (len(done) == 1) != (stop > 0 && stop < promotionStepCount) {
			t.Errorf("stop %d: FinishPromotions repaired %v", stop, done)
		}
		promoted := stop >= commitStep
		if !promoted { // rolled back, or never begun: promoting again works
			if _, err := tok.Key(rotation.SuccessorLabel(label)); err != nil {
				t.Errorf("stop %d: the successor is no longer pending: %v", stop, err)
			}
			cur, err := tok.Key(label)
			if err != nil || !x509PubEqual(cur.Public, old.Public) || len(cur.Chain) != 2 || !cur.Chain[0].Equal(oldLeaf) {
				t.Errorf("stop %d: after the roll-back %q is not the old key with its chain (%v)", stop, label, err)
			}
			if retired, err = tok.Promote(label); err != nil {
				t.Fatalf("stop %d: promoting again: %v", stop, err)
			}
		}
		cur, err := tok.Key(label)
		if err != nil {
			t.Fatalf("stop %d: %v", stop, err)
		}
		if !x509PubEqual(cur.Public, succ.Public) || len(cur.Chain) != 2 || !cur.Chain[0].Equal(newLeaf) {
			t.Errorf("stop %d: %q serves the wrong key or chain (%d certificates)", stop, label, len(cur.Chain))
		}
		if _, err = tok.Key(rotation.SuccessorLabel(label)); !errors.Is(err, hsm.ErrKeyNotFound) {
			t.Errorf("stop %d: the successor label still names a key: %v", stop, err)
		}
		r, err := tok.Key(retired)
		if err != nil {
			t.Fatalf("stop %d: retired key: %v", stop, err)
		}
		if !x509PubEqual(r.Public, old.Public) || len(r.Chain) != 2 || !r.Chain[0].Equal(oldLeaf) {
			t.Errorf("stop %d: %q is not the key before with its chain", stop, retired)
		}
		if again, err := tok.FinishPromotions(); err != nil || len(again) != 0 {
			t.Errorf("stop %d: a second FinishPromotions did %v, %v", stop, again, err)
		}
		tok.Close()
	}
}

// TestPromoteRefusals: a promotion without a successor, or with one that
// has no certificate, is refused and changes nothing.
func TestPromoteRefusals(t *testing.T) {
	fx := softhsmtest.New(t)
	tok := fx.Open(t)
	if _, err := tok.GenerateKey("k", hsm.ECDSAP256, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := tok.Promote("k"); !errors.Is(err, hsm.ErrNoSuccessor) {
		t.Errorf("promotion without a successor: %v, want ErrNoSuccessor", err)
	}
	if _, err := tok.GenerateKey(rotation.SuccessorLabel("k"), hsm.ECDSAP256, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := tok.Promote("k"); err == nil {
		t.Error("a successor without a certificate was promoted")
	}
	if _, err := tok.Key("k"); err != nil {
		t.Errorf("after the refusals: %v", err)
	}
}

func x509PubEqual(a, b any) bool {
	da, err1 := x509.MarshalPKIXPublicKey(a)
	db, err2 := x509.MarshalPKIXPublicKey(b)
	return err1 == nil && err2 == nil && string(da) == string(db)
}

func labels(keys []*hsm.Key) []string {
	var out []string
	for _, k := range keys {
		out = append(out, k.Label)
	}
	return out
}
