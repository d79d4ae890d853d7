package hsmstore_test

import (
	"testing"

	"github.com/hsmagent/hsmagent/agent/server/storetest"
	"github.com/hsmagent/hsmagent/hsm/hsmstore"
	softhsmtest "github.com/hsmagent/hsmagent/softhsm-test"
)

// TestContract runs the key-store contract against a real SoftHSM token.
func TestContract(t *testing.T) {
	storetest.Run(t, func(t *testing.T) storetest.Store {
		return hsmstore.New(softhsmtest.New(t).Open(t))
	})
}
