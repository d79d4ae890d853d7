package p11rpc

import (
	"crypto"
	"crypto/x509/pkix"
	"encoding/asn1"
	"errors"
	"hash"
	"math/big"

	"github.com/hsmagent/hsmagent/agent/agentpb"
	"github.com/hsmagent/hsmagent/agent/core"
)

// mechanisms are the signature mechanisms the token offers, in the order
// C_GetMechanismList gives them.
var mechanisms = []uint64{ckmECDSA, ckmECDSASHA256, ckmECDSASHA384, ckmECDSASHA512,
	ckmRSAPKCS, ckmSHA256RSAPKCS, ckmSHA384RSAPKCS, ckmSHA512RSAPKCS,
	ckmRSAPKCSPSS, ckmSHA256RSAPKCSPSS, ckmSHA384RSAPKCSPSS, ckmSHA512RSAPKCSPSS,
	ckmSHA256, ckmSHA384, ckmSHA512}

// mechanism is what one signature mechanism asks of the agent.
type mechanism struct {
	rsa    bool
	pss    bool
	digest crypto.Hash // the agent hashes the data (0: the client sends the digest)
}

var mechanismInfo = map[uint32]mechanism{
	ckmECDSA:            {},
	ckmECDSASHA256:      {digest: crypto.SHA256},
	ckmECDSASHA384:      {digest: crypto.SHA384},
	ckmECDSASHA512:      {digest: crypto.SHA512},
	ckmRSAPKCS:          {rsa: true},
	ckmSHA256RSAPKCS:    {rsa: true, digest: crypto.SHA256},
	ckmSHA384RSAPKCS:    {rsa: true, digest: crypto.SHA384},
	ckmSHA512RSAPKCS:    {rsa: true, digest: crypto.SHA512},
	ckmRSAPKCSPSS:       {rsa: true, pss: true},
	ckmSHA256RSAPKCSPSS: {rsa: true, pss: true, digest: crypto.SHA256},
	ckmSHA384RSAPKCSPSS: {rsa: true, pss: true, digest: crypto.SHA384},
	ckmSHA512RSAPKCSPSS: {rsa: true, pss: true, digest: crypto.SHA512},
}

func signs(m uint32) bool { _, ok := mechanismInfo[m]; return ok }

// maxRawInput bounds what a mechanism without hashing accumulates: a
// DigestInfo of SHA-512 is 83 bytes.
const maxRawInput = 128

// signOp is a session's signature under way, from C_SignInit to the
// signature (or an error).
type signOp struct {
	key   *object
	mech  mechanism
	hash  crypto.Hash // PSS: the parameter's hash, which the digest must be
	salt  int32
	h     hash.Hash // the data hashed so far, for the hashing mechanisms
	data  []byte    // the data so far, for the others
	parts bool      // C_SignUpdate was called: only C_SignFinal may end it
}

// newSignOp checks m against the key and returns the operation, or the
// PKCS#11 error.
func newSignOp(m Mechanism, key *object) (*signOp, uint64) {
	info, ok := mechanismInfo[m.Type]
	if !ok || m.Unknown {
		return nil, ckrMechanismInvalid
	}
	if key.class != ckoPrivateKey || key.key == nil {
		return nil, ckrKeyFunctionNotPermitted
	}
	if info.rsa != key.key.rsa {
		return nil, ckrKeyTypeInconsistent
	}
	op := &signOp{key: key, mech: info}
	if info.pss {
		if m.PSS == nil {
			return nil, ckrMechanismParamInvalid
		}
		h, mgf := hashOf(m.PSS.Hash)
		// Go signs PSS with MGF1 of the message's hash, and a salt of at least a byte.
		if h == 0 || m.PSS.MGF != mgf || (info.digest != 0 && h != info.digest) ||
			m.PSS.SaltLength == 0 || m.PSS.SaltLength > 1<<16 {
			return nil, ckrMechanismParamInvalid
		}
		op.hash, op.salt = h, int32(m.PSS.SaltLength)
	} else if m.PSS != nil || len(m.Param) > 0 {
		return nil, ckrMechanismParamInvalid
	}
	if info.digest != 0 {
		op.h = info.digest.New()
	}
	return op, ckrOK
}

// hashOf maps a CKM_SHA* to its hash and the CKG_MGF1 of the same hash.
func hashOf(m uint64) (crypto.Hash, uint64) {
	switch m {
	case ckmSHA256:
		return crypto.SHA256, ckgMGF1SHA256
	case ckmSHA384:
		return crypto.SHA384, ckgMGF1SHA384
	case ckmSHA512:
		return crypto.SHA512, ckgMGF1SHA512
	}
	return 0, 0
}

// update adds data to the operation.
func (op *signOp) update(data []byte) uint64 {
	if op.h != nil {
		op.h.Write(data)
		return ckrOK
	}
	if len(op.data)+len(data) > maxRawInput {
		return ckrDataLenRange
	}
	op.data = append(op.data, data...)
	return ckrOK
}

// request is the core's request for the operation's data, or the PKCS#11
// error of data that cannot be signed.
func (op *signOp) request() (*agentpb.SignRequest, uint64) {
	// The handle names a key, not the label: after a rotation it signs with
	// the key it was found for (the core lets a just-retired key finish), or
	// is CKR_KEY_HANDLE_INVALID.
	req := &agentpb.SignRequest{Key: op.key.label, KeyId: op.key.key.keyID}
	var h crypto.Hash
	var digest []byte
	switch {
	case op.h != nil:
		h, digest = op.mech.digest, op.h.Sum(nil)
	case op.mech.pss:
		h, digest = op.hash, op.data
		if len(digest) != h.Size() {
			return nil, ckrDataLenRange
		}
	case op.mech.rsa: // CKM_RSA_PKCS: a DigestInfo
		var ok bool
		if h, digest, ok = parseDigestInfo(op.data); !ok {
			return nil, ckrDataInvalid
		}
	default: // CKM_ECDSA: the digest, whose length names the hash
		digest = op.data
		switch len(digest) {
		case 32:
			h = crypto.SHA256
		case 48:
			h = crypto.SHA384
		case 64:
			h = crypto.SHA512
		default:
			return nil, ckrDataLenRange
		}
	}
	req.Digest = digest
	req.Hash = protoHash(h)
	switch {
	case op.mech.pss:
		req.Padding, req.PssSaltLength = agentpb.Padding_PADDING_PSS, op.salt
	case op.mech.rsa:
		req.Padding = agentpb.Padding_PADDING_PKCS1V15
	}
	return req, ckrOK
}

func protoHash(h crypto.Hash) agentpb.Hash {
	switch h {
	case crypto.SHA256:
		return agentpb.Hash_HASH_SHA256
	case crypto.SHA384:
		return agentpb.Hash_HASH_SHA384
	case crypto.SHA512:
		return agentpb.Hash_HASH_SHA512
	}
	return agentpb.Hash_HASH_UNSPECIFIED
}

var digestOIDs = map[string]crypto.Hash{
	"2.16.840.1.101.3.4.2.1": crypto.SHA256,
	"2.16.840.1.101.3.4.2.2": crypto.SHA384,
	"2.16.840.1.101.3.4.2.3": crypto.SHA512,
}

// parseDigestInfo reads the DigestInfo that CKM_RSA_PKCS signs (RFC 8017
// 9.2): the hash's OID, with NULL or absent parameters, and the digest.
func parseDigestInfo(der []byte) (crypto.Hash, []byte, bool) {
	var di struct {
		Alg    pkix.AlgorithmIdentifier
		Digest []byte
	}
	rest, err := asn1.Unmarshal(der, &di)
	if err != nil || len(rest) != 0 {
		return 0, nil, false
	}
	h, ok := digestOIDs[di.Alg.Algorithm.String()]
	if !ok || (len(di.Alg.Parameters.FullBytes) != 0 && !equalNull(di.Alg.Parameters.FullBytes)) || len(di.Digest) != h.Size() {
		return 0, nil, false
	}
	return h, di.Digest, true
}

func equalNull(b []byte) bool { return len(b) == 2 && b[0] == 5 && b[1] == 0 }

// rawECDSA turns the DER signature Go's signers return into PKCS#11's
// r||s, each padded to half of size.
func rawECDSA(der []byte, size int) ([]byte, error) {
	var sig struct{ R, S *big.Int }
	rest, err := asn1.Unmarshal(der, &sig)
	if err != nil || len(rest) != 0 || sig.R == nil || sig.S == nil {
		return nil, errors.New("p11rpc: the key store returned an ECDSA signature that is not DER")
	}
	half := size / 2
	if sig.R.Sign() < 0 || sig.S.Sign() < 0 || len(sig.R.Bytes()) > half || len(sig.S.Bytes()) > half {
		return nil, errors.New("p11rpc: the key store returned an ECDSA signature too long for its curve")
	}
	out := make([]byte, size)
	sig.R.FillBytes(out[:half])
	sig.S.FillBytes(out[half:])
	return out, nil
}

// ckrOf maps the core's refusal of a signature to a PKCS#11 error.
func ckrOf(err error) uint64 {
	switch core.CodeOf(err) {
	case core.CodePermissionDenied:
		return ckrKeyFunctionNotPermitted
	case core.CodeNotFound, core.CodeFailedPrecondition:
		return ckrKeyHandleInvalid
	case core.CodeInvalidArgument:
		return ckrDataInvalid
	case core.CodeCanceled:
		return ckrFunctionCanceled
	case core.CodeUnavailable, core.CodeInternal:
		return ckrDeviceError
	}
	return ckrFunctionFailed // busy, or the caller's deadline: worth trying again
}
