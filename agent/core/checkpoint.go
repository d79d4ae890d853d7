package core

import (
	"context"
	"crypto"
	"crypto/rand"
	"encoding/base64"
	"log/slog"
	"time"

	"github.com/hsmagent/hsmagent/agent/auditchain"
)

// checkpoints writes a checkpoint every c.checkpoint until Drain.
func (c *Core) checkpoints() {
	t := time.NewTicker(c.checkpoint)
	defer t.Stop()
	for {
		select {
		case <-t.C:
			c.Checkpoint("interval")
		case <-c.stopping:
			return
		}
	}
}

// Checkpoint writes a checkpoint record: the seq and line hash of the last
// record written, signed in the HSM with the audit signing key, so that
// the chain up to there cannot be rewritten without the key. The
// signature goes through the gate, bounded by the HSM timeout, as any
// other; a failure is logged and leaves the chain as it was. reason names
// what asked for it: interval, sighup, shutdown.
func (c *Core) Checkpoint(reason string) {
	if c.auditSig == nil {
		return
	}
	c.checkMu.Lock()
	defer c.checkMu.Unlock()
	seq, head := c.audit.head()
	if head == "" || (c.checkedSeq != 0 && seq == c.checkedSeq+1) {
		return // nothing written yet, or nothing since the last checkpoint but itself
	}
	digest := auditchain.CheckpointDigest(head, seq)
	sig, err := c.gate.do(context.Background(), agentUID, func() ([]byte, error) {
		return c.auditSig.Sign(rand.Reader, digest, crypto.SHA256)
	}, nil)
	if err != nil {
		c.log.Error("the audit checkpoint could not be signed; the chain goes on unsigned until the next", "reason", reason, "key", c.auditKey, "err", err)
		return
	}
	if err := c.audit.write(context.Background(), slog.LevelInfo, auditchain.CheckpointMsg,
		slog.String("reason", reason), slog.String("key", c.auditKey), slog.Uint64("covers_seq", seq),
		slog.String("covers", head), slog.String("sig", base64.StdEncoding.EncodeToString(sig))); err != nil {
		c.log.Error("the audit checkpoint could not be written", "reason", reason, "err", err)
		return
	}
	c.checkedSeq = seq
}
