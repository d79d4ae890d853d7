package hsm

import (
	"strings"
	"testing"
)

// FuzzParseSubject: any operator input gives a subject or an "hsm:" error, never a panic.
func FuzzParseSubject(f *testing.F) {
	for _, s := range []string{"CN=a,O=b,C=FR", `CN=a\,b`, "CN=", "=", ",,,", `\`, "C=FRA", "OU=x+y"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		if _, err := ParseSubject(s); err != nil && !strings.HasPrefix(err.Error(), "hsm: ") {
			t.Errorf("error without prefix: %v", err)
		}
	})
}

// FuzzParseCertificatesPEM: any file content gives certificates or an "hsm:" error.
func FuzzParseCertificatesPEM(f *testing.F) {
	f.Add([]byte("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"))
	f.Add([]byte("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"))
	f.Add([]byte("garbage"))
	f.Fuzz(func(t *testing.T, data []byte) {
		certs, err := ParseCertificatesPEM("f.pem", data)
		if err == nil && len(certs) == 0 {
			t.Error("no error and no certificate")
		}
		if err != nil && !strings.HasPrefix(err.Error(), "hsm: ") {
			t.Errorf("error without prefix: %v", err)
		}
	})
}
