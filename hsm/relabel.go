package hsm

import (
	"bytes"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/hsmagent/hsmagent/agent/rotation"
	"github.com/miekg/pkcs11"
)

// A promotion makes the successor of key L ("L/successor") the key L, and
// L's key before "L/retired-<time>", by relabelling objects: crypto11 cannot
// set CKA_LABEL, so this file speaks raw PKCS#11 on a session of its own.
//
// The relabels run in this order, one object each:
//
//	A  old private key  L          -> R   (L names no key pair now)
//	B  old chain        L/chain/i  -> R/chain/i
//	C  old leaf         L          -> R
//	E  new chain        S/chain/i  -> L/chain/i
//	F  new leaf         S          -> L
//	G  new public key   S          -> L
//	H  new private key  S          -> L   (the commit: L names the new pair)
//	D  old public key   L          -> R
//
// A private key finds its public half by CKA_ID, so at every point the old
// key pair is whole under L or R, and the old public key, labelled L until
// the very end, names the promotion's R through its CKA_ID. A promotion that
// stopped before H (a crash, a lost session) is rolled back, so that L
// serves the old key and chain as before, and the successor stays pending
// with its certificate: importing it again promotes it. One that stopped
// after H has only D left, which is done.

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

// promotionSteps returns the relabels of the promotion of base's pending
// successor, the current key becoming retired. Nothing here touches the token.
func promotionSteps(objs []object, base, retired string) ([]relabel, error) {
	succ := rotation.SuccessorLabel(base)
	sPriv := pick(objs, pkcs11.CKO_PRIVATE_KEY, func(o object) bool { return o.label == succ })
	switch len(sPriv) {
	case 0:
		return nil, fmt.Errorf("%w for key %q: make one with 'hsmagent keys rotate --label %s'", ErrNoSuccessor, base, base)
	case 1:
	default:
		return nil, fmt.Errorf("hsm: %d private keys are labelled %q; delete the extra ones", len(sPriv), succ)
	}
	succID := sPriv[0].id
	bPriv := pick(objs, pkcs11.CKO_PRIVATE_KEY, func(o object) bool { return o.label == base })
	if len(bPriv) != 1 {
		return nil, fmt.Errorf("hsm: %d private keys are labelled %q; a promotion needs exactly one", len(bPriv), base)
	}
	oldID := bPriv[0].id
	is := func(class uint, label string, id []byte) []object {
		return pick(objs, class, func(o object) bool { return o.label == label && bytes.Equal(o.id, id) })
	}
	oldPub := is(pkcs11.CKO_PUBLIC_KEY, base, oldID)
	switch {
	case bytes.Equal(oldID, succID):
		return nil, fmt.Errorf("hsm: key %q and its successor share CKA_ID %x", base, oldID)
	case len(is(pkcs11.CKO_CERTIFICATE, succ, succID)) == 0:
		return nil, fmt.Errorf("hsm: the successor of key %q has no certificate; import one first", base)
	case len(oldPub) != 1:
		return nil, fmt.Errorf("hsm: key %q has no public key object labelled %q with its CKA_ID, which a rotation needs", base, base)
	case len(pickAny(objs, func(o object) bool { return o.label == retired || strings.HasPrefix(o.label, retired+chainLabelSep) })) > 0:
		return nil, fmt.Errorf("hsm: the retired label %q is taken: a key of %q was retired in this same second; run the import again", retired, base)
	}
	steps := []relabel{{bPriv[0], retired}}                                        // A
	steps = append(steps, moveChain(objs, base, retired)...)                       // B
	steps = append(steps, to(is(pkcs11.CKO_CERTIFICATE, base, oldID), retired)...) // C
	steps = append(steps, moveChain(objs, succ, base)...)                          // E
	steps = append(steps, to(is(pkcs11.CKO_CERTIFICATE, succ, succID), base)...)   // F
	steps = append(steps, to(is(pkcs11.CKO_PUBLIC_KEY, succ, succID), base)...)    // G
	steps = append(steps, relabel{sPriv[0], base})                                 // H
	return append(steps, relabel{oldPub[0], retired}), nil                         // D
}

// recoverySteps returns what finishes a promotion of base that stopped
// halfway: its roll-back before the commit, its last step after; nil when
// none is under way. rollback says which.
func recoverySteps(objs []object, base string) (steps []relabel, rollback bool, err error) {
	succ := rotation.SuccessorLabel(base)
	// The old public key labelled base, whose private key is retired: any
	// promotion under way has it, and it names the promotion's R.
	var oldPub *object
	var retired string
	for _, o := range pick(objs, pkcs11.CKO_PUBLIC_KEY, func(o object) bool { return o.label == base }) {
		for _, p := range pick(objs, pkcs11.CKO_PRIVATE_KEY, func(p object) bool { return bytes.Equal(p.id, o.id) }) {
			if b, kind := rotation.Parse(p.label); kind == rotation.Retired && b == base {
				oldPub, retired = &o, p.label
			}
		}
	}
	if oldPub == nil {
		return nil, false, nil
	}
	oldID := oldPub.id
	sPriv := pick(objs, pkcs11.CKO_PRIVATE_KEY, func(o object) bool { return o.label == succ })
	if len(sPriv) == 0 {
		// H is done: the new pair is the key; only D is left.
		return []relabel{{*oldPub, retired}}, false, nil
	}
	succID := sPriv[0].id
	is := func(class uint, label string, id []byte) []object {
		return pick(objs, class, func(o object) bool { return o.label == label && bytes.Equal(o.id, id) })
	}
	oldLeafHome := len(is(pkcs11.CKO_CERTIFICATE, base, oldID)) > 0
	// Undone in reverse: G, F, E (base's chain is the new one once C is
	// done, as B comes first), C, B, then A, which makes base the old key
	// again. A crash during the roll-back leaves a state it reads alike.
	steps = append(steps, to(is(pkcs11.CKO_PUBLIC_KEY, base, succID), succ)...)
	steps = append(steps, to(is(pkcs11.CKO_CERTIFICATE, base, succID), succ)...)
	if !oldLeafHome {
		steps = append(steps, moveChain(objs, base, succ)...)
	}
	steps = append(steps, to(is(pkcs11.CKO_CERTIFICATE, retired, oldID), base)...)
	steps = append(steps, moveChain(objs, retired, base)...)
	steps = append(steps, to(is(pkcs11.CKO_PRIVATE_KEY, retired, oldID), base)...)
	return steps, true, nil
}

// moveChain relabels the chain certificates of from to those of into.
func moveChain(objs []object, from, into string) []relabel {
	var out []relabel
	for _, o := range pick(objs, pkcs11.CKO_CERTIFICATE, func(o object) bool { return strings.HasPrefix(o.label, from+chainLabelSep) }) {
		out = append(out, relabel{o, into + strings.TrimPrefix(o.label, from)})
	}
	return out
}

func to(objs []object, label string) []relabel {
	out := make([]relabel, 0, len(objs))
	for _, o := range objs {
		out = append(out, relabel{o, label})
	}
	return out
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
		// A promotion of this key that stopped halfway is rolled back first.
		if back, _, err := recoverySteps(objs, label); err != nil || len(back) > 0 {
			if err == nil {
				t.log.Warn("rolling back a promotion that stopped halfway before promoting again", "key", label)
				err = applySteps(p, sh, back, -1)
			}
			if err == nil {
				objs, err = listObjects(p, sh)
			}
			if err != nil {
				return err
			}
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

// FinishPromotions rolls back each promotion that a crash or a lost
// session stopped before its commit, and completes each stopped after it,
// logging each; it returns the labels of the keys it repaired. The key
// store calls it before listing the keys, and so does every rotation.
func (t *Token) FinishPromotions() ([]string, error) {
	var done []string
	err := t.withRawSession(func(p *pkcs11.Ctx, sh pkcs11.SessionHandle) error {
		done = nil
		objs, err := listObjects(p, sh)
		if err != nil {
			return err
		}
		var errs []error
		seen := map[string]bool{}
		for _, o := range objs {
			if o.class != pkcs11.CKO_PUBLIC_KEY || seen[o.label] {
				continue
			}
			seen[o.label] = true
			steps, rollback, err := recoverySteps(objs, o.label)
			if err == nil && len(steps) > 0 {
				if rollback {
					t.log.Warn("rolling back the promotion of a successor key that stopped halfway: the key keeps its current key pair and chain, the successor stays pending", "key", o.label, "steps", len(steps))
				} else {
					t.log.Warn("completing the promotion of a successor key that stopped after its commit", "key", o.label, "steps", len(steps))
				}
				err = applySteps(p, sh, steps, -1)
			}
			if err != nil {
				errs = append(errs, err)
				continue
			}
			if len(steps) > 0 {
				done = append(done, o.label)
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
// No other operation of this process runs on the token meanwhile: SoftHSM
// fails a signature with a key's handle (CKR_OBJECT_HANDLE_INVALID) while
// another session relabels the key, and the reopen that error brings would
// make the signers of the key before look it up again by its label, which
// names the successor by then.
func (t *Token) withRawSession(f func(p *pkcs11.Ctx, sh pkcs11.SessionHandle) error) error {
	return t.doExclusive(func() error {
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
