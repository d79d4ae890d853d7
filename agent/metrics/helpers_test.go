package metrics_test

import (
	"net"
	"strconv"
)

type (
	netConn   = net.Conn
	netDialer = net.Dialer
)

// formatFloat prints a Unix time as the text format does.
func formatFloat(v int64) string {
	return strconv.FormatFloat(float64(v), 'g', -1, 64)
}
