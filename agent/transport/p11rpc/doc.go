// Package p11rpc is the agent's PKCS#11 transport: the p11-kit RPC protocol
// (draft-ueno-pkcs11-rpc), which p11-kit's client module p11-kit-client.so
// speaks over a Unix socket, served by the signing core. Any program that
// loads a PKCS#11 module (OpenSSL's pkcs11 engine, Java's SunPKCS11,
// pkcs11-tool, curl, nginx) then signs with the agent's keys under the
// agent's rules, without the HSM's module or PIN.
//
// # The token
//
// One slot holds one read-only token named after the agent. Each
// connection sees the keys its caller may use (core.List), each as a
// private key, a public key, its certificate and its chain certificates.
// No login is needed: the caller is known from the kernel (SO_PEERCRED),
// the token says so in its flags, and a C_Login is accepted whatever PIN it
// carries. It signs with ECDSA, RSA PKCS #1 v1.5 and RSA-PSS, hashing in
// the agent for the mechanisms that hash, and digests with SHA-2 itself.
// Writes get CKR_TOKEN_WRITE_PROTECTED or CKR_SESSION_READ_ONLY, calls the
// agent has no use for CKR_FUNCTION_NOT_SUPPORTED.
//
// # Protocol versions
//
// The client's first byte is the highest version it speaks; the server
// answers min(that, 2). Versions 0 and 1 encode messages alike (1 adds the
// PKCS #11 3.0 calls, answered CKR_FUNCTION_NOT_SUPPORTED); version 2
// changes how a mechanism is encoded (no parameter field for mechanisms
// without one, a presence byte before the others). A NULL mechanism (a
// C_SignInit that cancels) is the type 0xffffffff in every version, and
// the type 0 alone from the p11-kit clients (0.25.0 to 0.25.2) that sent it so.
//
// # Limits
//
// Each message is bounded (MaxMessage), each connection's sessions
// (Options.MaxSessions) and its idle time (Options.IdleTimeout). A message
// that does not decode closes its connection, with an audit record, and
// nothing else.
package p11rpc
