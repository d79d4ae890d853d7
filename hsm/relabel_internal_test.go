package hsm

import (
	"errors"
	"slices"
	"testing"

	"github.com/miekg/pkcs11"
)

// TestPromotionSteps: what is left of a promotion, read from the objects
// alone, at each point of one, and the states that are no promotion.
func TestPromotionSteps(t *testing.T) {
	const (
		priv = pkcs11.CKO_PRIVATE_KEY
		pub  = pkcs11.CKO_PUBLIC_KEY
		cert = pkcs11.CKO_CERTIFICATE
		R    = "k/retired-20261202T180000Z"
	)
	old, nu := []byte{1}, []byte{2}
	obj := func(h uint, class uint, label string, id []byte) object {
		return object{handle: pkcs11.ObjectHandle(h), class: class, label: label, id: id}
	}
	pending := []object{
		obj(1, priv, "k", old), obj(2, pub, "k", old), obj(3, cert, "k", old), obj(4, cert, "k/chain/1", nil),
		obj(5, priv, "k/successor", nu), obj(6, pub, "k/successor", nu), obj(7, cert, "k/successor", nu), obj(8, cert, "k/successor/chain/1", nil),
	}
	full := []string{R, R + "/chain/1", R, "k/chain/1", "k", "k", "k", R}
	// after applies the first n steps of the full promotion to pending.
	after := func(n int) []object {
		objs := slices.Clone(pending)
		order := []uint{1, 4, 3, 8, 7, 6, 5, 2}
		for i := range n {
			objs[order[i]-1].label = full[i]
		}
		return objs
	}
	steps, err := promotionSteps(pending, "k", R)
	if err != nil || !slices.Equal(targets(steps), full) {
		t.Fatalf("the promotion's steps go to %q (%v), want %q", targets(steps), err, full)
	}
	if _, err := promotionSteps(after(8), "k", R); !errors.Is(err, ErrNoSuccessor) {
		t.Errorf("a second promotion: %v, want ErrNoSuccessor", err)
	}
	if _, err := promotionSteps(pending[:4], "k", R); !errors.Is(err, ErrNoSuccessor) {
		t.Errorf("no successor: %v, want ErrNoSuccessor", err)
	}
	back := func(labels ...string) []string { return labels }
	for _, tc := range []struct {
		name     string
		objs     []object
		want     []string
		rollback bool
	}{
		{"pending", after(0), nil, false},
		{"after A", after(1), back("k"), true},
		{"after B", after(2), back("k/chain/1", "k"), true},
		{"after C", after(3), back("k", "k/chain/1", "k"), true},
		{"after E", after(4), back("k/successor/chain/1", "k", "k/chain/1", "k"), true},
		{"after G", after(6), back("k/successor", "k/successor", "k/successor/chain/1", "k", "k/chain/1", "k"), true},
		{"after H, the commit", after(7), back(R), false},
		{"done", after(8), nil, false},
		{"key deleted beside a pending successor", pending[4:], nil, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			steps, rollback, err := recoverySteps(tc.objs, "k")
			if err != nil {
				t.Fatal(err)
			}
			if got := targets(steps); !slices.Equal(got, tc.want) || rollback != tc.rollback {
				t.Errorf("steps to %q (rollback %v), want %q (rollback %v)", got, rollback, tc.want, tc.rollback)
			}
		})
	}
	refused := []struct {
		name string
		objs []object
	}{
		{"successor without a certificate", slices.Clone(pending[:6])},
		{"half-done", after(3)},
		{"retired label taken", append(slices.Clone(pending), obj(9, cert, R, nil))},
		{"no public key under the label", append(slices.Clone(pending[:1]), pending[2:]...)},
	}
	for _, tc := range refused {
		if _, err := promotionSteps(tc.objs, "k", R); err == nil {
			t.Errorf("%s: promoted", tc.name)
		}
	}
}

func targets(steps []relabel) []string {
	var out []string
	for _, s := range steps {
		out = append(out, s.to)
	}
	return out
}
