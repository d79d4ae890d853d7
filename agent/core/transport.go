package core

import "context"

type transportKey struct{}

// WithTransport names the transport a call came by (the gRPC service
// names none): the audit records of the call carry it as "transport".
func WithTransport(ctx context.Context, name string) context.Context {
	return context.WithValue(ctx, transportKey{}, name)
}

func transportOf(ctx context.Context) string {
	name, _ := ctx.Value(transportKey{}).(string)
	return name
}
