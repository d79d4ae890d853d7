package wire

import (
	"math"
	"strings"
	"testing"

	"github.com/hsmagent/hsmagent/agent/agentpb"
	"google.golang.org/protobuf/proto"
)

// The fullest batch a client may send, each item with a key_id, fits one
// message the agent takes: MaxBatch items of the longest label, a SHA-512
// digest, every field at its longest encoding.
func TestFullestBatchWithKeyIDFits(t *testing.T) {
	items := make([]*agentpb.SignStreamItem, MaxBatch)
	for i := range items {
		items[i] = &agentpb.SignStreamItem{Id: math.MaxUint64, TimeoutMs: math.MaxUint32, Request: &agentpb.SignRequest{
			Key: strings.Repeat("k", MaxLabel), Digest: make([]byte, 64), Hash: agentpb.Hash_HASH_SHA512,
			Padding: agentpb.Padding_PADDING_PSS, PssSaltLength: math.MinInt32, KeyId: make([]byte, KeyIDSize)}}
	}
	size := proto.Size(&agentpb.SignStreamRequest{Items: items})
	if size > MaxRequestSize {
		t.Fatalf("%d items of the longest request are %d bytes; the agent takes %d", MaxBatch, size, MaxRequestSize)
	}
	t.Logf("%d items of the longest request: %d bytes of %d", MaxBatch, size, MaxRequestSize)
}
