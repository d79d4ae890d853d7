package server_test

import (
	"testing"

	"github.com/hsmagent/hsmagent/agent/server"
	"github.com/hsmagent/hsmagent/agent/server/storetest"
)

func TestMemoryStoreContract(t *testing.T) {
	storetest.Run(t, func(*testing.T) storetest.Store { return server.NewMemoryStore() })
}
