package wire

import (
	"strings"
	"testing"

	"github.com/hsmagent/hsmagent/agent/agentpb"
	"google.golang.org/protobuf/proto"
)

// TestTakeBatch: a message never carries more than the agent takes (64
// items, MaxRequestSize bytes), whatever the labels' lengths, and what is
// taken leaves the queue in order.
func TestTakeBatch(t *testing.T) {
	items := func(n, label int) []*agentpb.SignStreamItem {
		var out []*agentpb.SignStreamItem
		for i := range n {
			out = append(out, &agentpb.SignStreamItem{Id: uint64(i + 1), TimeoutMs: 5000,
				Request: &agentpb.SignRequest{Key: strings.Repeat("k", label), Digest: make([]byte, 64), Hash: agentpb.Hash_HASH_SHA512}})
		}
		return out
	}
	for _, tc := range []struct {
		name         string
		queued       []*agentpb.SignStreamItem
		want, atMost int
	}{
		{"one", items(1, 10), 1, 1},
		{"short labels: 64 at most", items(100, 10), 64, 64},
		{"labels at the agent's limit: all 64 fit", items(64, MaxLabel), 64, 64},
		{"long labels: cut by size", items(64, 1000), 0, 15},
		{"one item larger than a message still goes (the agent refuses it)", items(2, 20000), 1, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			queue := tc.queued
			batch := TakeBatch(&queue, 64, MaxRequestSize)
			n := len(batch)
			if tc.want > 0 && n != tc.want || n < 1 || n > tc.atMost {
				t.Fatalf("took %d, want %d (at most %d)", n, tc.want, tc.atMost)
			}
			if size := proto.Size(&agentpb.SignStreamRequest{Items: batch}); n > 1 && size > MaxRequestSize {
				t.Errorf("a message of %d bytes; the agent takes %d", size, MaxRequestSize)
			}
			if len(queue) != len(tc.queued)-n {
				t.Errorf("left %d in the queue; want %d", len(queue), len(tc.queued)-n)
			} else if len(queue) > 0 && queue[0].Id != uint64(n+1) {
				t.Errorf("the queue goes on with id %d; want %d", queue[0].Id, n+1)
			}
		})
	}
}
