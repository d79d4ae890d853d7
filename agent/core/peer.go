package core

// Peer is the process on the other end of a connection, as the kernel
// reports it when the connection is accepted: effective uid and gid and pid
// from SO_PEERCRED, supplementary groups from SO_PEERGROUPS. All are the
// caller's credentials at connect(2). Transports read them; the core
// decides on them.
type Peer struct {
	UID, GID, PID int
	// Groups are the supplementary group ids the peer's process held. They
	// come from the kernel, never from the user database: a user listed in
	// /etc/group who dropped the group (setpriv --clear-groups, a service
	// without SupplementaryGroups=) does not have it, and one given a group
	// at run time does.
	Groups []int
}
