package hsm

// PromoteSteps runs at most limit steps of a promotion: what a crash after
// that step leaves on the token.
func (t *Token) PromoteSteps(label string, limit int) (string, error) { return t.promote(label, limit) }
