package main

import (
	"os"
	"syscall"

	"github.com/hsmagent/hsmagent/agent"
	"github.com/hsmagent/hsmagent/agent/d1"
	"github.com/hsmagent/hsmagent/hsm"
)

// checkServed compares the token's keys with those the agent offers.
func checkServed(keys []*hsm.Key, served []agent.Key, socket string, auditKey string) []d1.Finding {
	v := d1.ServedView{EveryKey: seesEveryKey(socket)}
	if auditKey != "" {
		v.Skip = []string{auditKey}
	}
	for _, k := range keys {
		v.Token = append(v.Token, tokenFact(k))
	}
	for _, k := range served {
		v.Served = append(v.Served, d1.ServedKey{Label: k.Label, ID: k.ID, Public: k.Public, Chain: k.Chain})
	}
	return d1.CheckServed(v)
}

// seesEveryKey reports whether the agent shows this process every key: root
// and the agent's own user (the owner of the socket it made) may use them all.
func seesEveryKey(socket string) bool {
	uid := os.Geteuid()
	if uid == 0 {
		return true
	}
	fi, err := os.Stat(socket)
	if err != nil {
		return false
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	return ok && int(st.Uid) == uid
}

func tokenFact(k *hsm.Key) d1.Key {
	return d1.Key{Label: k.Label, ID: k.ID, Type: k.Type, Public: k.Public, CanSign: k.Usage.Sign, PolicyProblems: k.Usage.Problems(), Chain: k.Chain}
}
