package main

import (
	"log/slog"
	"net"
	"os"

	"github.com/hsmagent/hsmagent/agent/server"
	"github.com/urfave/cli/v2"
)

// serveListener returns the agent's socket and its path: the one systemd
// passed (socket activation), whose file, mode and group are systemd's and
// stay when the agent exits, or a new one at --socket with --socket-mode and
// --socket-group.
func serveListener(c *cli.Context, inherited net.Listener, mode os.FileMode, log *slog.Logger) (net.Listener, string, error) {
	if inherited != nil {
		path := inherited.Addr().String()
		log.Info("using the socket passed by systemd (socket activation)", "socket", path)
		if want := c.String("socket"); want != "" && want != path {
			log.Warn("the socket passed by systemd is not the configured one; clients using the configured path will not find the agent",
				"systemd", path, "configured", want)
		}
		if c.IsSet("socket-group") || c.IsSet("socket-mode") {
			log.Debug("socket_mode and socket_group do not apply to a socket passed by systemd: its SocketMode= and SocketGroup= do")
		}
		return inherited, path, nil
	}
	path := c.String("socket")
	l, err := server.ListenWith(path, server.ListenOptions{Mode: mode, Group: c.String("socket-group")})
	return l, path, err
}

// pkcs11Listener returns the PKCS#11 transport's socket at pkcs11_socket,
// made as the agent's own is (mode, group, the directory's checks), or nil
// when none is configured.
func pkcs11Listener(c *cli.Context, cfg *config) (net.Listener, error) {
	if cfg.PKCS11Socket == "" {
		return nil, nil
	}
	return server.ListenWith(cfg.PKCS11Socket, server.ListenOptions{Mode: cfg.SocketMode, Group: c.String("socket-group")})
}
