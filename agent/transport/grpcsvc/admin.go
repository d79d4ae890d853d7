package grpcsvc

import (
	"context"

	"github.com/hsmagent/hsmagent/agent/agentpb"
	"github.com/hsmagent/hsmagent/agent/core"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// adminService serves hsmagent.v1.Admin: each call is the core's, which
// decides who may make it and audits it.
type adminService struct {
	agentpb.UnimplementedAdminServer
	core *core.Core
}

// peer is the caller of ctx, as the core knows it; every Admin call counts
// as handled for the bad-request audit.
func (s adminService) peer(ctx context.Context) (core.Peer, error) {
	markHandled(ctx)
	p, err := peerFrom(ctx)
	if err != nil {
		return p, status.Error(codes.Unauthenticated, err.Error())
	}
	return p, nil
}

func (s adminService) Token(ctx context.Context, _ *agentpb.AdminTokenRequest) (*agentpb.AdminTokenResponse, error) {
	p, err := s.peer(ctx)
	if err != nil {
		return nil, err
	}
	label, rid, err := s.core.AdminToken(ctx, p)
	sendRequestID(ctx, rid)
	if err != nil {
		return nil, toStatus(err)
	}
	return &agentpb.AdminTokenResponse{Label: label, RequestId: rid}, nil
}

func (s adminService) Keys(ctx context.Context, _ *agentpb.AdminKeysRequest) (*agentpb.ListKeysResponse, error) {
	p, err := s.peer(ctx)
	if err != nil {
		return nil, err
	}
	resp, rid, err := s.core.AdminKeys(ctx, p)
	sendRequestID(ctx, rid)
	return resp, toStatus(err)
}

func (s adminService) GenerateKey(ctx context.Context, req *agentpb.GenerateKeyRequest) (*agentpb.GenerateKeyResponse, error) {
	p, err := s.peer(ctx)
	if err != nil {
		return nil, err
	}
	k, rid, err := s.core.GenerateKey(ctx, p, req.GetLabel(), req.GetKeyType())
	sendRequestID(ctx, rid)
	if err != nil {
		return nil, toStatus(err)
	}
	return &agentpb.GenerateKeyResponse{Key: k, RequestId: rid}, nil
}

func (s adminService) DeleteKey(ctx context.Context, req *agentpb.DeleteKeyRequest) (*agentpb.DeleteKeyResponse, error) {
	p, err := s.peer(ctx)
	if err != nil {
		return nil, err
	}
	rid, err := s.core.DeleteKey(ctx, p, req.GetLabel())
	sendRequestID(ctx, rid)
	if err != nil {
		return nil, toStatus(err)
	}
	return &agentpb.DeleteKeyResponse{RequestId: rid}, nil
}

func (s adminService) ImportCertificate(ctx context.Context, req *agentpb.ImportCertificateRequest) (*agentpb.ImportCertificateResponse, error) {
	p, err := s.peer(ctx)
	if err != nil {
		return nil, err
	}
	resp, err := s.core.ImportCertificate(ctx, p, req)
	if rid := core.RequestIDOf(err); rid != "" {
		sendRequestID(ctx, rid)
	}
	return resp, toStatus(err)
}

func (s adminService) CreateCSR(ctx context.Context, req *agentpb.CreateCSRRequest) (*agentpb.CreateCSRResponse, error) {
	p, err := s.peer(ctx)
	if err != nil {
		return nil, err
	}
	der, rid, err := s.core.CreateCSR(ctx, p, req.GetLabel(), req.GetTemplate())
	sendRequestID(ctx, rid)
	if err != nil {
		return nil, toStatus(err)
	}
	return &agentpb.CreateCSRResponse{Csr: der, RequestId: rid}, nil
}

func (s adminService) RotateKey(ctx context.Context, req *agentpb.RotateKeyRequest) (*agentpb.RotateKeyResponse, error) {
	p, err := s.peer(ctx)
	if err != nil {
		return nil, err
	}
	k, rid, err := s.core.RotateKey(ctx, p, req.GetLabel(), req.GetKeyType(), req.GetReplace())
	sendRequestID(ctx, rid)
	if err != nil {
		return nil, toStatus(err)
	}
	return &agentpb.RotateKeyResponse{Successor: k, RequestId: rid}, nil
}

func (s adminService) PromoteKey(ctx context.Context, req *agentpb.PromoteKeyRequest) (*agentpb.PromoteKeyResponse, error) {
	p, err := s.peer(ctx)
	if err != nil {
		return nil, err
	}
	resp, err := s.core.PromoteKey(ctx, p, req)
	if rid := core.RequestIDOf(err); rid != "" {
		sendRequestID(ctx, rid)
	} else if resp != nil {
		sendRequestID(ctx, resp.RequestId)
	}
	return resp, toStatus(err)
}
