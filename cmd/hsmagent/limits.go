package main

import (
	"github.com/hsmagent/hsmagent/agent/server"
	"github.com/urfave/cli/v2"
)

// limitFlags are serve's limits on what one local user can make the agent
// hold (see server.Options); each has a config setting of the same name.
func limitFlags() []cli.Flag {
	return []cli.Flag{
		&cli.IntFlag{Name: "max-connections", Usage: "open connections of all callers; the last eighth is kept for root and the agent's user", Value: server.DefaultMaxConnections, EnvVars: []string{"HSMAGENT_MAX_CONNECTIONS"}},
		&cli.IntFlag{Name: "max-connections-per-uid", Usage: "open connections of one uid (root and the agent's user are exempt)", Value: server.DefaultMaxConnectionsPerUID, EnvVars: []string{"HSMAGENT_MAX_CONNECTIONS_PER_UID"}},
		&cli.IntFlag{Name: "max-streams-per-connection", Usage: "calls open at once on one connection", Value: server.DefaultMaxStreamsPerConnection, EnvVars: []string{"HSMAGENT_MAX_STREAMS_PER_CONNECTION"}},
		&cli.DurationFlag{Name: "idle-timeout", Usage: "close a connection with no call open for this long", Value: server.DefaultIdleTimeout, EnvVars: []string{"HSMAGENT_IDLE_TIMEOUT"}},
		&cli.DurationFlag{Name: "stream-send-timeout", Usage: "close the connection of a SignStream client that reads no results for this long", Value: server.DefaultStreamSendTimeout, EnvVars: []string{"HSMAGENT_STREAM_SEND_TIMEOUT"}},
		&cli.IntFlag{Name: "max-signatures-per-uid", Usage: "signatures of one uid waiting for the HSM or in it; more are refused (ResourceExhausted)", Value: server.DefaultMaxSignaturesPerUID, EnvVars: []string{"HSMAGENT_MAX_SIGNATURES_PER_UID"}},
		&cli.IntFlag{Name: "max-sign-streams", Usage: "SignStreams open at once for all callers; the last eighth is kept for root and the agent's user", Value: server.DefaultMaxSignStreams, EnvVars: []string{"HSMAGENT_MAX_SIGN_STREAMS"}},
		&cli.IntFlag{Name: "max-sign-streams-per-uid", Usage: "SignStreams one uid may hold open (root and the agent's user are exempt)", Value: server.DefaultMaxSignStreamsPerUID, EnvVars: []string{"HSMAGENT_MAX_SIGN_STREAMS_PER_UID"}},
		&cli.IntFlag{Name: "connection-rate-per-uid", Usage: "connections per second one uid may open, bursts of twice as many (root and the agent's user are exempt)", Value: server.DefaultConnectionRatePerUID, EnvVars: []string{"HSMAGENT_CONNECTION_RATE_PER_UID"}},
		&cli.IntFlag{Name: "audit-refusal-burst", Usage: "refusals of one uid audited one record each before the rest are counted in summaries", Value: server.DefaultAuditRefusalBurst, EnvVars: []string{"HSMAGENT_AUDIT_REFUSAL_BURST"}},
	}
}

// limitOptions sets the limits of opts from the flags, all of which must be positive.
func limitOptions(c *cli.Context, opts *server.Options) error {
	for _, name := range []string{"max-connections", "max-connections-per-uid", "max-streams-per-connection", "max-signatures-per-uid", "max-sign-streams", "max-sign-streams-per-uid", "connection-rate-per-uid", "audit-refusal-burst"} {
		if c.Int(name) < 1 {
			return usagef("--%s must be positive", name)
		}
	}
	for _, name := range []string{"idle-timeout", "stream-send-timeout"} {
		if c.Duration(name) <= 0 {
			return usagef("--%s must be positive", name)
		}
	}
	opts.MaxConnections = c.Int("max-connections")
	opts.MaxConnectionsPerUID = c.Int("max-connections-per-uid")
	opts.MaxStreamsPerConnection = c.Int("max-streams-per-connection")
	opts.IdleTimeout = c.Duration("idle-timeout")
	opts.StreamSendTimeout = c.Duration("stream-send-timeout")
	opts.MaxSignaturesPerUID = c.Int("max-signatures-per-uid")
	opts.AuditRefusalBurst = c.Int("audit-refusal-burst")
	opts.MaxSignStreams = c.Int("max-sign-streams")
	opts.MaxSignStreamsPerUID = c.Int("max-sign-streams-per-uid")
	opts.ConnectionRatePerUID = c.Int("connection-rate-per-uid")
	return nil
}
