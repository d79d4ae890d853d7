//go:build unix

package agent

import (
	"fmt"
	"os"
	"os/user"
	"strconv"
	"strings"
	"syscall"
)

// describe gives a file's owner, group and mode:
// "/run/x" (hsmagent:clients, uid 998 gid 997, mode 0660).
func describe(path string) string {
	fi, err := os.Lstat(path)
	if err != nil {
		return fmt.Sprintf("%q (%v)", path, err)
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return fmt.Sprintf("%q mode %04o", path, fi.Mode().Perm())
	}
	return fmt.Sprintf("%q (%s:%s, uid %d gid %d, mode %04o)", path,
		userName(int(st.Uid)), groupName(int(st.Gid)), st.Uid, st.Gid, uint32(st.Mode)&0o7777)
}

// callerFacts says who this process is to the kernel: its uid and the groups
// it holds now (a group added to the user since login is not among them).
func callerFacts() string {
	uid, gid := os.Geteuid(), os.Getegid()
	groups, _ := os.Getgroups()
	names := []string{fmt.Sprintf("%s(%d)", groupName(gid), gid)}
	for _, g := range groups {
		if g != gid {
			names = append(names, fmt.Sprintf("%s(%d)", groupName(g), g))
		}
	}
	return fmt.Sprintf("this process runs as uid %d (%s) with groups %s; the agent's socket_group (or the socket's group) must be among them, then an access rule must allow it",
		uid, userName(uid), strings.Join(names, ","))
}

func userName(uid int) string {
	if u, err := user.LookupId(strconv.Itoa(uid)); err == nil {
		return u.Username
	}
	return strconv.Itoa(uid)
}

func groupName(gid int) string {
	if g, err := user.LookupGroupId(strconv.Itoa(gid)); err == nil {
		return g.Name
	}
	return strconv.Itoa(gid)
}
