package main

import (
	"bytes"
	"os"
	"os/exec"
	"strings"
	"testing"
)

// TestManPage: the generated page has a section per command with its
// usage, description and examples, a synopsis line per command that runs,
// and man renders it without a warning.
func TestManPage(t *testing.T) {
	code, page, stderr := runCLI(t, "man")
	if code != 0 || stderr != "" {
		t.Fatalf("man: exit %d, stderr %q", code, stderr)
	}
	app := newApp(nil, nil)
	for _, e := range manCommands(app.Commands, "") {
		if !strings.Contains(page, `.SS "hsmagent `+roffQuoted(e.name)+`"`+"\n"+roffText(e.cmd.Usage)+"\n") {
			t.Errorf("no section with the usage of %q", e.name)
		}
		for _, ex := range examples[e.name] {
			if !strings.Contains(page, roffText(ex)+"\n") {
				t.Errorf("%q: example %q missing", e.name, ex)
			}
		}
		if len(visibleSubcommands(e.cmd)) == 0 && !strings.Contains(page, `\fBhsmagent `+roffText(e.name)+`\fR`) {
			t.Errorf("no synopsis line for %q", e.name)
		}
	}
	for _, want := range []string{
		`.TP` + "\n" + `\fB\-\-label\fR \fILABEL\fR`, // an option with its placeholder
		"environment: HSMAGENT_TOKEN",
		"Exit status, for scripts:", // doctor's description
		".SH FILES",
	} {
		if !strings.Contains(page, want) {
			t.Errorf("page lacks %q", want)
		}
	}
	if _, err := exec.LookPath("man"); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal("man is not installed (apt-get install man-db)")
		}
		t.Skip("man is not installed")
	}
	cmd := exec.Command("man", "--warnings", "-l", "-")
	cmd.Env = append(os.Environ(), "MANWIDTH=80", "MANPAGER=cat", "PAGER=cat")
	cmd.Stdin = strings.NewReader(page)
	var out, errs bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errs
	if err := cmd.Run(); err != nil || errs.Len() > 0 {
		t.Fatalf("man --warnings: %v\n%s", err, errs.String())
	}
	if !strings.Contains(out.String(), "hsmagent keys generate --token issuer --label d1-ppr-mtls") {
		t.Errorf("the rendered page lacks an example:\n%s", out.String()[:min(out.Len(), 2000)])
	}
}
