package server_test

import (
	"bufio"
	"fmt"
	"net"
	"os"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/hsmagent/hsmagent/agent/agenttest"
	"github.com/hsmagent/hsmagent/agent/server"
)

// TestReadPeerGroupsFromKernel: the peer's groups are the ones its process
// holds (SO_PEERGROUPS), the same list getgroups(2) gives the process itself.
func TestReadPeerGroupsFromKernel(t *testing.T) {
	path := filepath.Join(agenttest.SocketDir(t), "agent.sock")
	l, err := server.Listen(path, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	sc, err := l.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer sc.Close()
	p, err := server.ReadPeer(sc)
	if err != nil {
		t.Fatal(err)
	}
	want, err := os.Getgroups()
	if err != nil {
		t.Fatal(err)
	}
	got := slices.Clone(p.Groups)
	slices.Sort(got)
	slices.Sort(want)
	if p.UID != os.Geteuid() || p.GID != os.Getegid() || p.PID != os.Getpid() || !slices.Equal(got, want) {
		t.Errorf("peer %+v, want uid %d gid %d pid %d groups %v", p, os.Geteuid(), os.Getegid(), os.Getpid(), want)
	}
}

// TestGroupRulesUseKernelGroups runs clients under setpriv with chosen groups:
// a group rule matches the groups the client process really holds, never the
// user database's idea of them (issue 8, item 6).
func TestGroupRulesUseKernelGroups(t *testing.T) {
	needOtherUsers(t)
	member, memberGroup, found := dbOnlyMember(t)
	rules := []server.Rule{{Keys: []string{"ec"}, Groups: []string{"4242"}}}
	if found {
		rules = append(rules, server.Rule{Keys: []string{"rsa"}, Groups: []string{memberGroup.Name}})
	}
	policy, err := server.NewPolicy(rules)
	if err != nil {
		t.Fatal(err)
	}
	dir := agenttest.SocketDir(t)
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	a := agenttest.StartAt(t, filepath.Join(dir, "agent.sock"), 0o666, newMemStore(t), server.Options{Policy: policy})
	bin := copyTestBinary(t, dir)

	many := []string{}
	for g := 5000; g < 5300; g++ {
		many = append(many, strconv.Itoa(g))
	}
	tests := []groupCase{
		{"supplementary group 4242", []string{"--reuid=65534", "--regid=65534", "--groups=4242"}, "ec", "OK"},
		{"no supplementary groups", []string{"--reuid=65534", "--regid=65534", "--clear-groups"}, "ec", "PermissionDenied"},
		{"primary group 4242", []string{"--reuid=65534", "--regid=4242", "--clear-groups"}, "ec", "OK"},
		{"4242 after 300 other groups", []string{"--reuid=65534", "--regid=65534", "--groups=" + strings.Join(append(many, "4242"), ",")}, "ec", "OK"},
	}
	if found {
		uid, gid := "--reuid="+member.Uid, "--regid="+member.Gid
		tests = append(tests,
			groupCase{fmt.Sprintf("%s listed in group %s but running without it", member.Username, memberGroup.Name), []string{uid, gid, "--clear-groups"}, "rsa", "PermissionDenied"},
			groupCase{fmt.Sprintf("%s holding group %s", member.Username, memberGroup.Name), []string{uid, gid, "--init-groups"}, "rsa", "OK"},
		)
	} else {
		t.Log("no user is a supplementary member of a group in /etc/group: the user-database case is not run " +
			"(to run it: groupadd -g 4343 hsmtestgrp && usermod -aG hsmtestgrp nobody)")
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			out, err := clientAs(bin, "sign", a.Socket, tt.ids, "HSMAGENT_TEST_KEY="+tt.key).CombinedOutput()
			if got := strings.TrimSpace(string(out)); err != nil || got != tt.want {
				t.Errorf("client got %q (%v), want %q", got, err, tt.want)
			}
		})
	}
}

// groupCase is a client run under setpriv and the status it must get.
type groupCase struct {
	name string
	ids  []string // setpriv options for uid, gid and groups
	key  string
	want string
}

// dbOnlyMember finds, without changing the host, a user that /etc/group lists
// as a member of a group other than its primary one.
func dbOnlyMember(t *testing.T) (*user.User, *user.Group, bool) {
	t.Helper()
	f, err := os.Open("/etc/group")
	if err != nil {
		return nil, nil, false
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Split(sc.Text(), ":")
		if len(fields) != 4 || fields[3] == "" {
			continue
		}
		for _, name := range strings.Split(fields[3], ",") {
			u, err := user.Lookup(name)
			if err != nil || u.Gid == fields[2] || u.Uid == "0" {
				continue
			}
			if g, err := user.LookupGroupId(fields[2]); err == nil {
				return u, g, true
			}
		}
	}
	return nil, nil, false
}
