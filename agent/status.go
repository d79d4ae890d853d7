package agent

import (
	"context"

	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
)

// versionHeader is server.VersionHeader; the client does not import the server.
const versionHeader = "hsmagent-version"

func (c *Client) noteVersion(md metadata.MD) {
	if v := md.Get(versionHeader); len(v) > 0 {
		c.version.Store(&v[0])
	}
}

// AgentVersion returns the version the agent reported on the last Keys call:
// empty before one, or for an agent that does not report it.
func (c *Client) AgentVersion() string {
	if v := c.version.Load(); v != nil {
		return *v
	}
	return ""
}

// Health asks the agent's standard gRPC health service for the agent's
// overall status: "SERVING", or "NOT_SERVING" while the HSM is stuck or the
// agent is shutting down.
func (c *Client) Health(ctx context.Context) (string, error) {
	resp, err := healthpb.NewHealthClient(c.conn).Check(ctx, &healthpb.HealthCheckRequest{})
	if err != nil {
		return "", callError("checking health", err)
	}
	return resp.Status.String(), nil
}
