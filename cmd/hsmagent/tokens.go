package main

import (
	"fmt"
	"text/tabwriter"

	"github.com/hsmagent/hsmagent/hsm"
	"github.com/urfave/cli/v2"
)

func tokensCommand() *cli.Command {
	return &cli.Command{
		Name:  "tokens",
		Usage: "list the tokens a PKCS#11 module offers",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "module", Usage: "PKCS#11 library `PATH` (default: SoftHSM where installed)", EnvVars: []string{"HSMAGENT_MODULE"}},
			jsonFlag,
		},
		Action: func(c *cli.Context) error {
			if c.NArg() > 0 {
				return usagef("tokens takes no arguments")
			}
			infos, err := hsm.ListTokens(c.String("module"))
			if err != nil {
				return err
			}
			if c.Bool("json") {
				if infos == nil {
					infos = []hsm.TokenInfo{}
				}
				return writeJSON(c, infos)
			}
			if len(infos) == 0 {
				infof(c, "no token present; create one with your HSM's tools (SoftHSM: softhsm2-util --init-token --free --label LABEL)")
				return nil
			}
			tw := tabwriter.NewWriter(c.App.Writer, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "LABEL\tSERIAL\tMODEL\tMANUFACTURER\tINITIALISED\tLOGIN")
			for _, t := range infos {
				login := "not needed"
				if t.LoginRequired {
					login = "required"
				}
				if t.UserPINLocked {
					login = "PIN LOCKED"
				}
				label := t.Label
				if !t.Initialized {
					label = "(free slot)"
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%t\t%s\n", label, t.Serial, t.Model, t.Manufacturer, t.Initialized, login)
			}
			return tw.Flush()
		},
	}
}
