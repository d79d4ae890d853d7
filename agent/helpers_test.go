package agent_test

import "crypto/elliptic"

func ecdsaCurve() elliptic.Curve { return elliptic.P256() }
