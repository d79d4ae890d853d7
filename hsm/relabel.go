package hsm

import (
	"bytes"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/ThalesGroup/crypto11"
	"github.com/hsmagent/hsmagent/agent/rotation"
	"github.com/miekg/pkcs11"
)

// A promotion makes the successor of key L ("L/successor") the key L, and
// L's key before "L/retired-<time>", by relabelling objects: crypto11 cannot
// set CKA_LABEL, so this file speaks raw PKCS#11 on a session of its own.
//
// The relabels run in this order, one object each:
//
//	A  old private key  L          -> R   (the pivot: L names no key pair now)
//	B  old chain        L/chain/i  -> R/chain/i
//	C  old leaf         L          -> R
//	D  old public key   L          -> R
//	E  new chain        S/chain/i  -> L/chain/i
//	F  new leaf         S          -> L
//	G  new public key   S          -> L
//	H  new private key  S          -> L
//
// At every point each key pair is whole under one label (a private key
// finds its public half by CKA_ID), and what is left to do can be read
// from the token alone: a successor's private key with none under L means
// a promotion under way, which promotionSteps finishes forward.

// ErrNoSuccessor is a promotion asked of a key that has no pending successor.
var ErrNoSuccessor = errors.New("hsm: no successor key")

// object is a token object as a promotion sees it.
type object struct {
	handle pkcs11.ObjectHandle
	class  uint // CKO_PRIVATE_KEY, CKO_PUBLIC_KEY or CKO_CERTIFICATE
	label  string
	id     []byte
}

// relabel is one step of a promotion.
type relabel struct {
	obj object
	to  string
}

func (r relabel) String() string {
	return fmt.Sprintf("%s %q -> %q", className(r.obj.class), r.obj.label, r.to)
}

func className(c uint) string {
	switch c {
	case pkcs11.CKO_PRIVATE_KEY:
		return "private key"
	case pkcs11.CKO_PUBLIC_KEY:
		return "public key"
	case pkcs11.CKO_CERTIFICATE:
		return "certificate"
	}
	return fmt.Sprintf("object class %d", c)
}

// promotionSteps returns the relabels left to promote base's successor.
// retired is the label the current key gets when the promotion has not
// begun; with retired "" only a promotion under way is finished (nil when
// there is none). Nothing here touches the token.
func promotionSteps(objs []object, base, retired string) ([]relabel, error) {
	succ := rotation.SuccessorLabel(base)
	sPriv := pick(objs, pkcs11.CKO_PRIVATE_KEY, func(o object) bool { return o.label == succ })
	switch {
	case len(sPriv) == 0 && retired == "":
		return nil, nil
	case len(sPriv) == 0:
		return nil, fmt.Errorf("%w for key %q: make one with 'hsmagent keys rotate --label %s'", ErrNoSuccessor, base, base)
	case len(sPriv) > 1:
		return nil, fmt.Errorf("hsm: %d private keys are labelled %q; delete the extra ones", len(sPriv), succ)
	}
	succID := sPriv[0].id
	isSucc := func(o object) bool { return bytes.Equal(o.id, succID) }
	hasLeaf := len(pick(objs, pkcs11.CKO_CERTIFICATE, func(o object) bool {
		return isSucc(o) && (o.label == succ || o.label == base)
	})) > 0
	bPriv := pick(objs, pkcs11.CKO_PRIVATE_KEY, func(o object) bool { return o.label == base })
	// The old key's objects still labelled base (its leaf and public key).
	olds := func(id []byte) []object {
		return pickAny(objs, func(o object) bool {
			return o.class != pkcs11.CKO_PRIVATE_KEY && o.label == base && bytes.Equal(o.id, id)
		})
	}
	var steps []relabel
	var oldID []byte
	switch {
	case len(bPriv) > 1:
		return nil, fmt.Errorf("hsm: %d private keys are labelled %q; delete the extra ones", len(bPriv), base)
	case len(bPriv) == 1 && retired == "":
		return nil, nil // not begun: a pending successor
	case len(bPriv) == 1:
		oldID = bPriv[0].id
		switch {
		case isSucc(bPriv[0]):
			return nil, fmt.Errorf("hsm: key %q and its successor share CKA_ID %x", base, oldID)
		case !hasLeaf:
			return nil, fmt.Errorf("hsm: the successor of key %q has no certificate; import one first", base)
		case len(pick(objs, pkcs11.CKO_PUBLIC_KEY, func(o object) bool { return o.label == base && bytes.Equal(o.id, oldID) })) != 1:
			return nil, fmt.Errorf("hsm: key %q has no public key object labelled %q, which a rotation needs", base, base)
		case len(pickAny(objs, func(o object) bool { return o.label == retired || strings.HasPrefix(o.label, retired+chainLabelSep) })) > 0:
			return nil, fmt.Errorf("hsm: label %q is in use already", retired)
		}
		steps = append(steps, relabel{bPriv[0], retired}) // A
	default: // A is done, or base's key is gone
		left := pickAny(objs, func(o object) bool {
			return o.class != pkcs11.CKO_PRIVATE_KEY && o.label == base && !isSucc(o)
		})
		if len(left) == 0 {
			if !hasLeaf {
				// No promotion began: base was deleted beside a pending successor.
				return nil, nil
			}
			break
		}
		oldID = left[0].id
		rp := pick(objs, pkcs11.CKO_PRIVATE_KEY, func(o object) bool {
			b, kind := rotation.Parse(o.label)
			return kind == rotation.Retired && b == base && bytes.Equal(o.id, oldID)
		})
		if len(rp) != 1 {
			return nil, fmt.Errorf("hsm: a promotion of key %q stopped halfway, and the key before (CKA_ID %x) has no retired private key", base, oldID)
		}
		retired = rp[0].label
	}
	if oldID != nil {
		for _, o := range pick(objs, pkcs11.CKO_CERTIFICATE, func(o object) bool { return strings.HasPrefix(o.label, base+chainLabelSep) }) {
			steps = append(steps, relabel{o, retired + strings.TrimPrefix(o.label, base)}) // B
		}
		for _, o := range olds(oldID) {
			if o.class == pkcs11.CKO_CERTIFICATE {
				steps = append(steps, relabel{o, retired}) // C
			}
		}
		for _, o := range olds(oldID) {
			if o.class == pkcs11.CKO_PUBLIC_KEY {
				steps = append(steps, relabel{o, retired}) // D
			}
		}
	}
	for _, o := range pick(objs, pkcs11.CKO_CERTIFICATE, func(o object) bool { return strings.HasPrefix(o.label, succ+chainLabelSep) }) {
		steps = append(steps, relabel{o, base + strings.TrimPrefix(o.label, succ)}) // E
	}
	for _, class := range []uint{pkcs11.CKO_CERTIFICATE, pkcs11.CKO_PUBLIC_KEY} { // F, G
		for _, o := range pick(objs, class, func(o object) bool { return o.label == succ && isSucc(o) }) {
			steps = append(steps, relabel{o, base})
		}
	}
	return append(steps, relabel{sPriv[0], base}), nil // H
}

func pick(objs []object, class uint, f func(object) bool) []object {
	return pickAny(objs, func(o object) bool { return o.class == class && f(o) })
}

func pickAny(objs []object, f func(object) bool) []object {
	var out []object
	for _, o := range objs {
		if f(o) {
			out = append(out, o)
		}
	}
	return out
}

// Promote makes the successor of the key labelled label (which must have
// its certificate) that key, and returns the label the key before now has.
func (t *Token) Promote(label string) (string, error) {
	return t.promote(label, -1)
}

// promote runs at most limit steps (all when negative): tests stop there
// to see what a crash at that point leaves.
func (t *Token) promote(label string, limit int) (string, error) {
	if err := rotation.CheckRotatable(label); err != nil {
		return "", fmt.Errorf("hsm: %w", err)
	}
	var retired string
	err := t.withRawSession(func(p *pkcs11.Ctx, sh pkcs11.SessionHandle) error {
		objs, err := listObjects(p, sh)
		if err != nil {
			return err
		}
		retired = rotation.RetiredLabel(label, time.Now())
		steps, err := promotionSteps(objs, label, retired)
		if err != nil {
			return err
		}
		return applySteps(p, sh, steps, limit)
	})
	return retired, err
}

// FinishPromotions finishes every promotion a crash or a lost session
// stopped halfway, logging each, and returns the labels it finished. The
// key store calls it before listing the keys.
func (t *Token) FinishPromotions() ([]string, error) {
	var done []string
	err := t.withRawSession(func(p *pkcs11.Ctx, sh pkcs11.SessionHandle) error {
		done = nil
		objs, err := listObjects(p, sh)
		if err != nil {
			return err
		}
		var errs []error
		for _, o := range objs {
			base, kind := rotation.Parse(o.label)
			if o.class != pkcs11.CKO_PRIVATE_KEY || kind != rotation.Successor {
				continue
			}
			steps, err := promotionSteps(objs, base, "")
			if err == nil && len(steps) > 0 {
				t.log.Warn("finishing the promotion of a successor key that stopped halfway", "key", base, "steps_left", len(steps), "first", steps[0].String())
				err = applySteps(p, sh, steps, -1)
			}
			if err != nil {
				errs = append(errs, err)
				continue
			}
			if len(steps) > 0 {
				t.log.Warn("promotion finished: the successor is now the key", "key", base)
				done = append(done, base)
			}
		}
		return errors.Join(errs...)
	})
	return done, err
}

func applySteps(p *pkcs11.Ctx, sh pkcs11.SessionHandle, steps []relabel, limit int) error {
	for i, s := range steps {
		if limit >= 0 && i >= limit {
			return nil
		}
		if err := p.SetAttributeValue(sh, s.obj.handle, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_LABEL, s.to)}); err != nil {
			return fmt.Errorf("hsm: relabelling %s (step %d of %d): %w", s, i+1, len(steps), explain(err))
		}
	}
	return nil
}

// listObjects reads the label and id of every key and certificate object.
func listObjects(p *pkcs11.Ctx, sh pkcs11.SessionHandle) ([]object, error) {
	var out []object
	for _, class := range []uint{pkcs11.CKO_PRIVATE_KEY, pkcs11.CKO_PUBLIC_KEY, pkcs11.CKO_CERTIFICATE} {
		if err := p.FindObjectsInit(sh, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_CLASS, class)}); err != nil {
			return nil, fmt.Errorf("hsm: listing objects: %w", explain(err))
		}
		var handles []pkcs11.ObjectHandle
		for {
			hs, _, err := p.FindObjects(sh, 64)
			if err != nil {
				_ = p.FindObjectsFinal(sh)
				return nil, fmt.Errorf("hsm: listing objects: %w", explain(err))
			}
			if len(hs) == 0 {
				break
			}
			handles = append(handles, hs...)
		}
		if err := p.FindObjectsFinal(sh); err != nil {
			return nil, fmt.Errorf("hsm: listing objects: %w", explain(err))
		}
		for _, h := range handles {
			attrs, err := p.GetAttributeValue(sh, h, []*pkcs11.Attribute{
				pkcs11.NewAttribute(pkcs11.CKA_LABEL, nil), pkcs11.NewAttribute(pkcs11.CKA_ID, nil),
			})
			if err != nil {
				return nil, fmt.Errorf("hsm: reading an object's label: %w", explain(err))
			}
			out = append(out, object{handle: h, class: class, label: string(attrs[0].Value), id: attrs[1].Value})
		}
	}
	return out, nil
}

// withRawSession runs f on a read-write session of the token opened
// beside crypto11's, on the same module: the application is logged in
// already, so the session sees the private objects without the PIN.
func (t *Token) withRawSession(f func(p *pkcs11.Ctx, sh pkcs11.SessionHandle) error) error {
	return t.do(func(_ *crypto11.Context, _ uint64) error {
		p := pkcs11.New(t.modulePath)
		if p == nil {
			return fmt.Errorf("hsm: cannot load PKCS#11 module %q", t.modulePath)
		}
		defer p.Destroy()
		switch err := p.Initialize(); {
		case err == nil:
			// crypto11 holds the module initialised while the token is
			// open; finalising here would end its sessions, so never do.
			_ = p.Finalize()
			return errors.New("hsm: the token's module was not initialised; open the token again")
		case !errors.Is(err, pkcs11.Error(pkcs11.CKR_CRYPTOKI_ALREADY_INITIALIZED)):
			return fmt.Errorf("hsm: initialising PKCS#11 module %q: %w", t.modulePath, explain(err))
		}
		slot, err := t.rawSlot(p)
		if err != nil {
			return err
		}
		sh, err := p.OpenSession(slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
		if err != nil {
			return fmt.Errorf("hsm: opening a session on %s: %w", t.cfg.tokenName(), explain(err))
		}
		defer func() { _ = p.CloseSession(sh) }()
		return f(p, sh)
	})
}

// rawSlot finds the configured token's slot as crypto11 does, by label or serial.
func (t *Token) rawSlot(p *pkcs11.Ctx) (uint, error) {
	slots, err := p.GetSlotList(true)
	if err != nil {
		return 0, fmt.Errorf("hsm: listing slots: %w", explain(err))
	}
	for _, slot := range slots {
		ti, err := p.GetTokenInfo(slot)
		if err != nil {
			continue
		}
		label, serial := strings.TrimRight(ti.Label, " \x00"), strings.TrimRight(ti.SerialNumber, " \x00")
		if (t.cfg.TokenSerial == "" || serial == t.cfg.TokenSerial) && (t.cfg.TokenLabel == "" || label == t.cfg.TokenLabel) {
			return slot, nil
		}
	}
	return 0, fmt.Errorf("hsm: %s not found", t.cfg.tokenName())
}
