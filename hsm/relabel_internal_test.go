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
	full := []string{R, R + "/chain/1", R, R, "k/chain/1", "k", "k", "k"}
	// after applies the first n steps of the full promotion to pending.
	after := func(n int) []object {
		objs := slices.Clone(pending)
		order := []uint{1, 4, 3, 2, 8, 7, 6, 5}
		for i := range n {
			objs[order[i]-1].label = full[i]
		}
		return objs
	}
	for _, tc := range []struct {
		name    string
		objs    []object
		retired string
		want    []string
		err     error
	}{
		{"pending, promoted", pending, R, full, nil},
		{"pending, nothing to finish", pending, "", nil, nil},
		{"after A", after(1), "", full[1:], nil},
		{"after B", after(2), "", full[2:], nil},
		{"after D", after(4), "", full[4:], nil},
		{"after G", after(7), "", full[7:], nil},
		{"done", after(8), "", nil, nil},
		{"done, promoted again", after(8), R, nil, ErrNoSuccessor},
		{"no successor", pending[:4], R, nil, ErrNoSuccessor},
		{"key deleted beside an uncertified successor", []object{obj(5, priv, "k/successor", nu), obj(6, pub, "k/successor", nu)}, "", nil, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			steps, err := promotionSteps(tc.objs, "k", tc.retired)
			if tc.err != nil {
				if !errors.Is(err, tc.err) {
					t.Fatalf("err %v, want %v", err, tc.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			var got []string
			for _, s := range steps {
				got = append(got, s.to)
			}
			if !slices.Equal(got, tc.want) {
				t.Errorf("steps to %q, want %q", got, tc.want)
			}
		})
	}
	refused := []struct {
		name string
		objs []object
	}{
		{"successor without a certificate", slices.Clone(pending[:6])},
		{"retired label taken", append(slices.Clone(pending), obj(9, cert, R, nil))},
		{"no public key under the label", append(slices.Clone(pending[:1]), pending[2:]...)},
	}
	for _, tc := range refused {
		if _, err := promotionSteps(tc.objs, "k", R); err == nil {
			t.Errorf("%s: promoted", tc.name)
		}
	}
}
