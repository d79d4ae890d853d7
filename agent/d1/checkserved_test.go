package d1

import (
	"crypto/x509"
	"slices"
	"strings"
	"testing"
	"time"
)

// TestCheckServed compares keys made in memory: each case changes what the
// agent serves and lists the findings it expects, key -> differences.
func TestCheckServed(t *testing.T) {
	ca := newTestCA(t, "Served CA")
	other := newTestCA(t, "Other CA")
	pub := newP256(t).Public()
	leaf := ca.issue(t, "web", pub, 30*24*time.Hour)
	newer := ca.issue(t, "web", pub, 60*24*time.Hour)
	web := Key{Label: "web", ID: []byte{1}, Public: pub, Chain: []*x509.Certificate{leaf, ca.cert}}
	served := ServedKey{Label: "web", ID: []byte{1}, Public: pub, Chain: []*x509.Certificate{leaf, ca.cert}}
	tests := []struct {
		name    string
		change  func(k *ServedKey)
		token   []Key
		limited bool // the agent offers this caller only some keys
		skip    []string
		want    map[string][]Difference
		status  Status
		detail  string
	}{
		{name: "agree", change: func(*ServedKey) {}, status: Pass},
		{name: "id", change: func(k *ServedKey) { k.ID = []byte{2} }, want: map[string][]Difference{"web": {IDDiffers}}, status: Fail, detail: "CKA_ID 01 on the token, 02 served"},
		{name: "public key", change: func(k *ServedKey) { k.Public = newP256(t).Public() }, want: map[string][]Difference{"web": {PublicKeyDiffers}}, status: Fail},
		{name: "older certificate served", change: func(k *ServedKey) { k.Chain = []*x509.Certificate{leaf, ca.cert} },
			token: []Key{{Label: "web", ID: []byte{1}, Public: pub, Chain: []*x509.Certificate{newer, ca.cert}}},
			want:  map[string][]Difference{"web": {CertificateDiffers}}, status: Fail, detail: "the token holds a newer certificate"},
		{name: "no certificate served", change: func(k *ServedKey) { k.Chain = nil }, want: map[string][]Difference{"web": {CertificateDiffers}}, status: Fail, detail: "that the agent does not serve"},
		{name: "chain", change: func(k *ServedKey) { k.Chain = []*x509.Certificate{leaf, other.cert} }, want: map[string][]Difference{"web": {ChainDiffers}}, status: Fail},
		{name: "not served", change: func(k *ServedKey) { k.Label = "gone" },
			want: map[string][]Difference{"web": {NotServed}, "gone": {NotOnToken}}, status: Fail},
		{name: "not offered to this user", change: func(k *ServedKey) { k.Label = "gone" }, limited: true,
			want: map[string][]Difference{"web": {NotServed}, "gone": {NotOnToken}}, status: Warn},
		{name: "audit key skipped", change: func(*ServedKey) {}, token: []Key{web, {Label: "audit", Public: newP256(t).Public()}}, skip: []string{"audit"}, status: Pass},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := served
			tt.change(&s)
			token := tt.token
			if token == nil {
				token = []Key{web}
			}
			got := CheckServed(ServedView{Token: token, Served: []ServedKey{s}, EveryKey: !tt.limited, Skip: tt.skip})
			if tt.want == nil {
				if len(got) != 1 || got[0].Status != Pass || got[0].Key != "" {
					t.Fatalf("got %+v, want one pass", got)
				}
				return
			}
			byKey := map[string]Finding{}
			for _, f := range got {
				byKey[f.Key] = f
			}
			if len(byKey) != len(tt.want) {
				t.Errorf("findings %+v, want %v", got, tt.want)
			}
			for key, diffs := range tt.want {
				f := byKey[key]
				if !slices.Equal(f.Differences, diffs) || f.Check != ServedCheck || f.Fix == "" {
					t.Errorf("%s: %+v, want differences %v", key, f, diffs)
				}
				if key == "web" && f.Status != tt.status {
					t.Errorf("%s: status %v, want %v", key, f.Status, tt.status)
				}
				if !strings.Contains(f.Message, `"`+key+`"`) || !strings.Contains(f.Message, tt.detail) {
					t.Errorf("%s: message %q, want the key and %q", key, f.Message, tt.detail)
				}
			}
		})
	}
}
