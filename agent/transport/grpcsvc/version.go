package grpcsvc

import (
	"context"

	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
)

// VersionHeader is the gRPC response header of ListKeys that carries the
// agent's version: a header rather than a protocol field, so that older
// clients and agents keep working unchanged.
const VersionHeader = "hsmagent-version"

func (s *Service) sendVersion(ctx context.Context) {
	if s.version == "" {
		return
	}
	// An error means the headers are gone already; the version is optional.
	_ = grpc.SetHeader(ctx, metadata.Pairs(VersionHeader, s.version))
}
