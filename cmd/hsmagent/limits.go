package main

import (
	"github.com/hsmagent/hsmagent/agent/server"
)

// limitSettings are serve's limits on what one local user can make the
// agent hold: each is a field of server.Options, with its default there, a
// setting of the file and a flag of the same name.
func limitSettings(o *server.Options) []setting {
	return []setting{
		{key: "max_connections", usage: "open connections of all callers; the last eighth is kept for root and the agent's user", val: count{&o.MaxConnections, server.DefaultMaxConnections}},
		{key: "max_connections_per_uid", usage: "open connections of one uid (root and the agent's user are exempt)", val: count{&o.MaxConnectionsPerUID, server.DefaultMaxConnectionsPerUID}},
		{key: "max_streams_per_connection", usage: "calls open at once on one connection", val: count{&o.MaxStreamsPerConnection, server.DefaultMaxStreamsPerConnection}},
		{key: "idle_timeout", usage: "close a connection with no call open for this long", val: positive(&o.IdleTimeout, server.DefaultIdleTimeout)},
		{key: "stream_send_timeout", usage: "close the connection of a SignStream client that reads no results for this long", val: positive(&o.StreamSendTimeout, server.DefaultStreamSendTimeout)},
		{key: "max_signatures_per_uid", usage: "signatures of one uid waiting for the HSM or in it; more are refused (ResourceExhausted)", val: count{&o.MaxSignaturesPerUID, server.DefaultMaxSignaturesPerUID}},
		{key: "max_sign_streams", usage: "SignStreams open at once for all callers; the last eighth is kept for root and the agent's user", val: count{&o.MaxSignStreams, server.DefaultMaxSignStreams}},
		{key: "max_sign_streams_per_uid", usage: "SignStreams one uid may hold open (root and the agent's user are exempt)", val: count{&o.MaxSignStreamsPerUID, server.DefaultMaxSignStreamsPerUID}},
		{key: "connection_rate_per_uid", usage: "connections per second one uid may open, bursts of twice as many (root and the agent's user are exempt)", val: count{&o.ConnectionRatePerUID, server.DefaultConnectionRatePerUID}},
		{key: "audit_refusal_burst", usage: "refusals of one uid audited one record each before the rest are counted in summaries", val: count{&o.AuditRefusalBurst, server.DefaultAuditRefusalBurst}},
	}
}
