package p11rpc

import "encoding/binary"

// The PKCS #11 numbers this package uses (PKCS #11 2.40 base and current
// mechanisms specifications).

// Return values.
const (
	ckrOK                          = 0x000
	ckrSlotIDInvalid               = 0x003
	ckrFunctionFailed              = 0x006
	ckrAttributeSensitive          = 0x011
	ckrAttributeTypeInvalid        = 0x012
	ckrDataInvalid                 = 0x020
	ckrDataLenRange                = 0x021
	ckrDeviceError                 = 0x030
	ckrFunctionCanceled            = 0x050
	ckrFunctionNotSupported        = 0x054
	ckrKeyHandleInvalid            = 0x060
	ckrKeyTypeInconsistent         = 0x063
	ckrKeyFunctionNotPermitted     = 0x068
	ckrMechanismInvalid            = 0x070
	ckrMechanismParamInvalid       = 0x071
	ckrObjectHandleInvalid         = 0x082
	ckrOperationActive             = 0x090
	ckrOperationNotInitialized     = 0x091
	ckrSessionCount                = 0x0B1
	ckrSessionHandleInvalid        = 0x0B3
	ckrSessionParallelNotSupported = 0x0B4
	ckrSessionReadOnly             = 0x0B5
	ckrTokenWriteProtected         = 0x0E2
	ckrUserAlreadyLoggedIn         = 0x100
	ckrUserNotLoggedIn             = 0x101
	ckrUserTypeInvalid             = 0x103
	ckrRandomNoRNG                 = 0x121
	ckrBufferTooSmall              = 0x150
)

// Attribute types.
const (
	ckaClass               = 0x000
	ckaToken               = 0x001
	ckaPrivate             = 0x002
	ckaLabel               = 0x003
	ckaValue               = 0x011
	ckaCertificateType     = 0x080
	ckaIssuer              = 0x081
	ckaSerialNumber        = 0x082
	ckaTrusted             = 0x086
	ckaCertificateCategory = 0x087
	ckaKeyType             = 0x100
	ckaSubject             = 0x101
	ckaID                  = 0x102
	ckaSensitive           = 0x103
	ckaEncrypt             = 0x104
	ckaDecrypt             = 0x105
	ckaWrap                = 0x106
	ckaUnwrap              = 0x107
	ckaSign                = 0x108
	ckaSignRecover         = 0x109
	ckaVerify              = 0x10A
	ckaVerifyRecover       = 0x10B
	ckaDerive              = 0x10C
	ckaModulus             = 0x120
	ckaModulusBits         = 0x121
	ckaPublicExponent      = 0x122
	ckaPrivateExponent     = 0x123
	ckaPrime1              = 0x124
	ckaPrime2              = 0x125
	ckaExponent1           = 0x126
	ckaExponent2           = 0x127
	ckaCoefficient         = 0x128
	ckaPublicKeyInfo       = 0x129
	ckaExtractable         = 0x162
	ckaNeverExtractable    = 0x164
	ckaAlwaysSensitive     = 0x165
	ckaModifiable          = 0x170
	ckaCopyable            = 0x171
	ckaDestroyable         = 0x172
	ckaECParams            = 0x180
	ckaECPoint             = 0x181
	ckaAlwaysAuthenticate  = 0x202
	ckaWrapWithTrusted     = 0x210
	ckfArrayAttribute      = 0x40000000
)

// Object classes, key and certificate types.
const (
	ckoCertificate = 1
	ckoPublicKey   = 2
	ckoPrivateKey  = 3
	ckkRSA         = 0
	ckkEC          = 3
	ckcX509        = 0
)

// Mechanisms, and the MGF1 functions of PSS.
const (
	ckmRSAPKCS          = 0x0001
	ckmRSAPKCSPSS       = 0x000D
	ckmSHA1RSAPKCSPSS   = 0x000E
	ckmSHA256RSAPKCS    = 0x0040
	ckmSHA384RSAPKCS    = 0x0041
	ckmSHA512RSAPKCS    = 0x0042
	ckmSHA256RSAPKCSPSS = 0x0043
	ckmSHA384RSAPKCSPSS = 0x0044
	ckmSHA512RSAPKCSPSS = 0x0045
	ckmSHA224RSAPKCSPSS = 0x0047
	ckmSHA256           = 0x0250
	ckmSHA384           = 0x0260
	ckmSHA512           = 0x0270
	ckmECDSA            = 0x1041
	ckmECDSASHA256      = 0x1044
	ckmECDSASHA384      = 0x1045
	ckmECDSASHA512      = 0x1046
	nullMechanism       = 0xffffffff // a NULL CK_MECHANISM_PTR, from p11-kit 0.25.3
	oldNullMechanism    = 0          // the same before 0.25.3

	ckgMGF1SHA256 = 2
	ckgMGF1SHA384 = 3
	ckgMGF1SHA512 = 4
)

// Flags.
const (
	ckfTokenPresent       = 0x1
	ckfWriteProtected     = 0x2
	ckfUserPinInitialized = 0x8
	ckfTokenInitialized   = 0x400
	ckfRWSession          = 0x2
	ckfSerialSession      = 0x4
	ckfDigest             = 0x400
	ckfSign               = 0x800
	ckfECFP               = 0x100000
	ckfECNamedCurve       = 0x800000
	ckfECUncompress       = 0x1000000

	ckuSO              = 0
	ckuUser            = 1
	ckuContextSpecific = 2

	cksROPublic = 0
	cksROUser   = 1

	unavailable = ^uint64(0) // CK_UNAVAILABLE_INFORMATION
)

// An attribute value's kind decides its encoding on the wire: p11-kit
// encodes CK_BBOOLs as a byte, CK_ULONGs as 8 bytes, attribute arrays and
// mechanism arrays element by element, and everything else (byte arrays,
// dates, attributes it does not know) as a byte array.
type kind uint8

const (
	kindBytes kind = iota
	kindBool
	kindUlong
	kindAttrs
	kindMechs
)

func kindOf(t uint32) kind {
	switch t {
	case ckaToken, ckaPrivate, ckaTrusted, ckaSensitive, ckaEncrypt, ckaDecrypt, ckaWrap, ckaUnwrap,
		ckaSign, ckaSignRecover, ckaVerify, ckaVerifyRecover, ckaDerive, ckaExtractable,
		0x163 /* LOCAL */, ckaNeverExtractable, ckaAlwaysSensitive, ckaModifiable, ckaCopyable,
		0x200 /* SECONDARY_AUTH */, ckaAlwaysAuthenticate, ckaWrapWithTrusted,
		0x301 /* RESET_ON_INIT */, 0x302 /* HAS_RESET */, 0x405 /* COLOR */ :
		return kindBool
	case ckaClass, ckaCertificateType, ckaCertificateCategory, 0x088 /* JAVA_MIDP_SECURITY_DOMAIN */, ckaKeyType,
		ckaModulusBits, 0x133 /* PRIME_BITS */, 0x134 /* SUB_PRIME_BITS */, 0x160 /* VALUE_BITS */, 0x161, /* VALUE_LEN */
		0x166 /* KEY_GEN_MECHANISM */, 0x201 /* AUTH_PIN_FLAGS */, 0x300, /* HW_FEATURE_TYPE */
		0x400, 0x401, 0x402, 0x403, 0x404, 0x406 /* display attributes */, 0x500 /* MECHANISM_TYPE */ :
		return kindUlong
	case ckfArrayAttribute | 0x211, ckfArrayAttribute | 0x212, ckfArrayAttribute | 0x213: // WRAP, UNWRAP, DERIVE_TEMPLATE
		return kindAttrs
	case ckfArrayAttribute | 0x600: // ALLOWED_MECHANISMS
		return kindMechs
	}
	return kindBytes
}

// noParameter reports the mechanisms p11-kit sends without a parameter
// field from protocol version 2 on: those of its list that an agent client
// may name (signatures, digests, key generation).
func noParameter(m uint32) bool {
	switch m {
	case 0x0000, 0x0001, 0x0002, 0x0003, 0x0004, 0x0005, 0x0006, 0x000A, // RSA generation, PKCS, 9796, X_509, MD2/MD5/SHA1_RSA_PKCS, X9_31
		0x000B, 0x000C, // SHA1_RSA_X9_31, X9_31 generation
		ckmSHA256RSAPKCS, ckmSHA384RSAPKCS, ckmSHA512RSAPKCS, 0x0046, // SHA*_RSA_PKCS
		0x0010, 0x0011, 0x0012, 0x0013, // DSA
		0x1040, ckmECDSA, 0x1042, 0x1043, ckmECDSASHA256, ckmECDSASHA384, ckmECDSASHA512, // EC generation, ECDSA
		0x0200, 0x0210, 0x0220, 0x0221, 0x0255, 0x0256, ckmSHA256, 0x0251, ckmSHA384, 0x0261, ckmSHA512, 0x0271: // digests and HMACs
		return true
	}
	return false
}

func isPSS(m uint32) bool {
	switch m {
	case ckmRSAPKCSPSS, ckmSHA1RSAPKCSPSS, ckmSHA256RSAPKCSPSS, ckmSHA384RSAPKCSPSS, ckmSHA512RSAPKCSPSS, ckmSHA224RSAPKCSPSS:
		return true
	}
	return false
}

// Attribute is one CK_ATTRIBUTE. Value holds a CK_BBOOL as one byte and a
// CK_ULONG as 8 bytes big-endian, whatever the client's own CK_ULONG.
type Attribute struct {
	Type        uint32
	Value       []byte
	Nested      []Attribute // an attribute array's attributes
	Room        uint32      // the value's length; in a template, the client's room for it
	Unavailable bool        // CK_UNAVAILABLE_INFORMATION
}

// Mechanism is one CK_MECHANISM.
type Mechanism struct {
	Type  uint32
	Null  bool       // a NULL mechanism pointer: cancel the operation
	PSS   *PSSParams // CKM_*RSA_PKCS_PSS
	Param []byte     // any other parameter
	// Unknown: a mechanism with a parameter the agent cannot decode; the
	// message's other arguments are then not read.
	Unknown bool
}

// PSSParams is CK_RSA_PKCS_PSS_PARAMS.
type PSSParams struct{ Hash, MGF, SaltLength uint64 }

func boolAttr(t uint32, v bool) Attribute {
	b := byte(0)
	if v {
		b = 1
	}
	return Attribute{Type: t, Value: []byte{b}, Room: 1}
}

func ulongAttr(t uint32, v uint64) Attribute {
	return Attribute{Type: t, Value: binary.BigEndian.AppendUint64(nil, v), Room: 8}
}

func bytesAttr(t uint32, v []byte) Attribute {
	if v == nil {
		v = []byte{}
	}
	return Attribute{Type: t, Value: v, Room: uint32(len(v))}
}
