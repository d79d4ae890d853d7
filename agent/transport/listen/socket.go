package listen

import (
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// safeDirHint ends the errors about an unsafe socket directory.
const safeDirHint = "use a directory only the agent's user can write, such as /run/hsmagent"

// maxSocketPath is the size of sun_path on Linux.
const maxSocketPath = 108

// Listen creates the agent's Unix socket at path with the given file mode.
//
// The socket's directory decides who can replace the socket, and so who can
// impersonate the agent to its clients: it must belong to the agent's user
// or root and be writable by nobody else, and so must every directory above
// it unless it has the sticky bit (as /tmp does). Symbolic links in path are
// resolved and the directory they lead to is the one checked and used. A
// missing directory is created with mode 0750.
//
// An existing socket is replaced only when connecting to it is refused
// (ECONNREFUSED), which proves that nothing listens; any other answer (a full
// accept queue gives EAGAIN) may come from a live agent and is refused.
//
// Closing the listener removes the socket file only if it is still the one
// this listener created.
func Listen(path string, mode os.FileMode) (net.Listener, error) {
	return ListenWith(path, ListenOptions{Mode: mode})
}

// ListenOptions are the socket file's permissions.
type ListenOptions struct {
	// Mode is the socket file's permission bits.
	Mode os.FileMode
	// Group, a group name or numeric gid, owns the socket file; "" keeps
	// the group the file was created with (the agent's group, or the
	// directory's group if the directory is setgid). Members of the group
	// get the group bits of Mode: the first gate before the access rules.
	Group string
}

// ListenWith is Listen with the socket's group as well as its mode. The
// group is set while the socket is still in the private directory, so it is
// never reachable with the wrong group; when the socket already has it (a
// setgid directory of that group), no chown is made, which a system call
// filter without @chown needs.
func ListenWith(path string, opts ListenOptions) (net.Listener, error) {
	gid := -1
	if opts.Group != "" {
		var err error
		if gid, err = lookupGroup(opts.Group); err != nil {
			return nil, err
		}
	}
	if path == "" {
		return nil, errors.New("agent: no socket path; pass --socket or set HSMAGENT_SOCKET")
	}
	dir, err := socketDir(filepath.Dir(path))
	if err != nil {
		return nil, err
	}
	root, err := os.OpenRoot(dir)
	if err != nil {
		return nil, fmt.Errorf("agent: opening socket directory %q: %w", dir, err)
	}
	defer root.Close()
	b := &binder{root: root, dir: dir, name: filepath.Base(path), gid: gid, group: opts.Group}
	l, err := b.listen(opts.Mode.Perm())
	if err != nil {
		return nil, err
	}
	l.addr = &net.UnixAddr{Name: path, Net: "unix"}
	return l, nil
}

// lookupGroup returns the gid of a group name or number.
func lookupGroup(name string) (int, error) {
	if gid, err := strconv.Atoi(name); err == nil && gid >= 0 {
		return gid, nil
	}
	g, err := user.LookupGroup(name)
	if err != nil {
		return -1, fmt.Errorf("agent: socket group %q: %w", name, err)
	}
	gid, err := strconv.Atoi(g.Gid)
	if err != nil {
		return -1, fmt.Errorf("agent: socket group %q has gid %q", name, g.Gid)
	}
	return gid, nil
}

// socketDir creates dir if missing and returns its real path once it and the
// directories above it are safe (see Listen).
func socketDir(dir string) (string, error) {
	if err := checkGivenPath(dir); err != nil {
		return "", err
	}
	_, missing := os.Lstat(dir)
	if err := os.MkdirAll(dir, 0o750); err != nil {
		return "", fmt.Errorf("agent: creating socket directory: %w", err)
	}
	real, err := filepath.EvalSymlinks(dir)
	if err != nil {
		return "", fmt.Errorf("agent: resolving socket directory %q: %w", dir, err)
	}
	if real, err = filepath.Abs(real); err != nil {
		return "", fmt.Errorf("agent: resolving socket directory %q: %w", dir, err)
	}
	if err := checkDir(real, fmt.Sprintf("socket directory %q", real), false); err != nil {
		return "", err
	}
	for d := real; d != filepath.Dir(d); {
		d = filepath.Dir(d)
		if err := checkDir(d, fmt.Sprintf("%q, above the socket directory,", d), true); err != nil {
			return "", err
		}
	}
	if missing != nil {
		// 0750 whatever the umask (serve sets 077): the socket's group
		// needs to reach it. Checked above, so this cannot follow a swap.
		if err := os.Chmod(real, 0o750); err != nil {
			return "", fmt.Errorf("agent: socket directory %q: %w", real, err)
		}
	}
	return real, nil
}

// checkGivenPath checks the socket directory's path as clients will walk it,
// before anything is created. The real directory is checked later, but a
// symlink on the way, or a directory another user can write, would let that
// user point the path (and so every client) at a socket of their own.
func checkGivenPath(dir string) error {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return fmt.Errorf("agent: socket directory %q: %w", dir, err)
	}
	euid := os.Geteuid()
	cur := "/"
	parts := strings.Split(strings.Trim(abs, "/"), "/")
	for i, part := range parts {
		if part == "" {
			continue
		}
		next := filepath.Join(cur, part)
		fi, err := os.Lstat(next)
		if errors.Is(err, fs.ErrNotExist) {
			return nil // created below cur, which passed
		}
		if err != nil {
			return fmt.Errorf("agent: checking socket directory: %w", err)
		}
		if fi.Mode()&os.ModeSymlink != 0 {
			if st, ok := fi.Sys().(*syscall.Stat_t); ok && int(st.Uid) != 0 && int(st.Uid) != euid {
				return fmt.Errorf("agent: the socket path goes through %q, a symlink owned by uid %d (not the agent's uid %d or root), who could point it elsewhere; %s", next, st.Uid, euid, safeDirHint)
			}
			real, err := filepath.EvalSymlinks(next)
			if err != nil {
				return fmt.Errorf("agent: resolving socket directory %q: %w", next, err)
			}
			cur = real
			continue
		}
		if i == len(parts)-1 {
			return nil // the socket directory itself: checked, stricter, once resolved
		}
		if err := checkDir(next, fmt.Sprintf("%q, on the socket path,", next), true); err != nil {
			return err
		}
		cur = next
	}
	return nil
}

// checkDir refuses a directory that another user could write; name is how
// errors call it. Above the socket directory (above), the sticky bit makes
// write access by others harmless: they can add entries but not rename or
// delete ours. In the socket directory itself it does not: they could take
// the socket's name while the agent is stopped.
func checkDir(dir, name string, above bool) error {
	fi, err := os.Lstat(dir)
	if err != nil {
		return fmt.Errorf("agent: checking socket directory: %w", err)
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok || !fi.IsDir() {
		return fmt.Errorf("agent: %s is not a directory", name)
	}
	euid := os.Geteuid()
	if owner := int(st.Uid); owner != 0 && owner != euid {
		// The directory is another user's: most often the packaged
		// agent's, whose user should run this agent too.
		who := fmt.Sprintf("uid %d", owner)
		if u, err := user.LookupId(strconv.Itoa(owner)); err == nil {
			who = fmt.Sprintf("user %s (uid %d)", u.Username, owner)
		}
		return fmt.Errorf("agent: %s is owned by %s, not the agent's uid %d or root: run the agent as %s (the packaged unit does: systemctl start hsmagent), or give --socket in a directory of your own", name, who, euid, who)
	}
	shared := fi.Mode()&os.ModeSticky != 0
	if above && shared {
		return nil
	}
	perm := uint32(st.Mode) & 0o7777
	var who, chmod string
	switch {
	case perm&0o002 != 0:
		who, chmod = "writable by others", "o-w"
	case perm&0o020 != 0:
		// Group members could replace the socket just as well. Clients get
		// access through the socket's mode and group instead (a setgid
		// directory gives the socket the directory's group).
		who, chmod = "writable by its group", "g-w"
	default:
		return nil
	}
	without, victim := "", "the socket"
	if above {
		without, victim = " without the sticky bit", "the socket directory"
	}
	fix := fmt.Sprintf("chmod %s %q or ", chmod, dir)
	if shared {
		fix = "" // a shared directory such as /tmp: taking away write access is not the fix
	}
	return fmt.Errorf("agent: %s is %s (mode %04o)%s: they could replace %s; %s%s", name, who, perm, without, victim, fix, safeDirHint)
}

// binder makes one socket in a checked directory, held open as root.
type binder struct {
	root  *os.Root
	dir   string // real path of root
	name  string // the socket's name in dir
	priv  string // a private directory in dir, relative to it
	gid   int    // the socket's group, -1 to keep it
	group string // as the user gave it, for errors
}

// listen binds the socket in a private directory, gives it its mode there and
// then links it into place. The mode is set by path, but in a directory only
// this process can write, so nobody can swap the file for a symlink in
// between; and unlike a umask around bind, this does not change the mode of
// files that other goroutines create meanwhile (the umask is process-wide).
// The link fails if anything has taken the name: an existing socket is never
// overwritten, only removed when proven stale.
func (b *binder) listen(mode os.FileMode) (*socketListener, error) {
	priv, err := os.MkdirTemp(b.dir, ".h")
	if err != nil {
		return nil, fmt.Errorf("agent: creating a private directory in %q: %w", b.dir, err)
	}
	b.priv = filepath.Base(priv)
	defer b.root.RemoveAll(b.priv)
	if err := b.clearStale(); err != nil {
		return nil, err
	}
	tmp := filepath.Join(b.priv, "s")
	ul, err := b.bind(filepath.Join(b.dir, tmp))
	if err != nil {
		return nil, err
	}
	created, err := b.place(tmp, mode)
	if err != nil {
		ul.Close()
		return nil, err
	}
	return &socketListener{UnixListener: ul, path: filepath.Join(b.dir, b.name), created: created}, nil
}

func (b *binder) bind(path string) (*net.UnixListener, error) {
	final := filepath.Join(b.dir, b.name)
	switch {
	case len(final) > maxSocketPath: // clients could not connect
		return nil, fmt.Errorf("agent: socket path %q is %d bytes; Unix socket paths are at most %d; use a shorter path", final, len(final), maxSocketPath)
	case len(path) > maxSocketPath:
		return nil, fmt.Errorf("agent: socket path %q is too long: it is bound as %q first, %d bytes, and Unix socket paths are at most %d; use a shorter directory",
			final, path, len(path), maxSocketPath)
	}
	ul, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("agent: listening on %q: %w", final, err)
	}
	// The listener's own unlink would remove the temporary name, or worse;
	// socketListener.Close removes the socket it created, checked by inode.
	ul.SetUnlinkOnClose(false)
	return ul, nil
}

// place sets the mode of the socket at tmp and links it to its name.
func (b *binder) place(tmp string, mode os.FileMode) (os.FileInfo, error) {
	final := filepath.Join(b.dir, b.name)
	if err := b.root.Chmod(tmp, mode); err != nil {
		return nil, fmt.Errorf("agent: setting mode of %q: %w", final, err)
	}
	created, err := b.root.Lstat(tmp)
	if err != nil {
		return nil, fmt.Errorf("agent: checking new socket %q: %w", final, err)
	}
	if st, ok := created.Sys().(*syscall.Stat_t); ok && b.gid >= 0 && int(st.Gid) != b.gid {
		if err := b.root.Lchown(tmp, -1, b.gid); err != nil {
			return nil, fmt.Errorf("agent: giving socket %q to group %q: %w (the agent's user must be a member of the group; or make the directory setgid with that group)", final, b.group, err)
		}
		if created, err = b.root.Lstat(tmp); err != nil {
			return nil, fmt.Errorf("agent: checking new socket %q: %w", final, err)
		}
	}
	if err := b.root.Link(tmp, b.name); err != nil {
		if errors.Is(err, fs.ErrExist) {
			return nil, fmt.Errorf("agent: %q appeared while this agent was starting; another agent may be starting too", final)
		}
		return nil, fmt.Errorf("agent: putting socket in place at %q: %w", final, err)
	}
	return created, nil
}

// clearStale removes a socket left by an agent that died, and refuses
// anything else at the socket's name.
func (b *binder) clearStale() error {
	final := filepath.Join(b.dir, b.name)
	fi, err := b.root.Lstat(b.name)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return nil
	case err != nil:
		return fmt.Errorf("agent: checking %q: %w", final, err)
	case fi.Mode()&os.ModeSocket == 0:
		return fmt.Errorf("agent: %q exists and is not a socket; remove it or choose another path", final)
	}
	if err := probeDead(final); err != nil {
		return err
	}
	return b.removeStale(fi)
}

// probeDead returns nil only if connecting to the socket at path is refused,
// which means that no process listens on it.
func probeDead(path string) error {
	c, err := net.DialTimeout("unix", path, time.Second)
	if err == nil {
		c.Close()
		return fmt.Errorf("agent: another agent is listening on %q", path)
	}
	if errors.Is(err, syscall.ECONNREFUSED) {
		return nil
	}
	var cause error = err
	var se *os.SyscallError
	if errors.As(err, &se) {
		cause = se // "connect: ...", without the path again
	}
	return fmt.Errorf("agent: %q may belong to a running agent (test connection: %w); stop that agent first, or remove the socket if it is dead", path, cause)
}

// removeStale removes the dead socket probed as probed. It is first moved
// into the private directory and compared there, so that a socket another
// agent put in its place after the probe is put back instead of deleted.
func (b *binder) removeStale(probed os.FileInfo) error {
	final := filepath.Join(b.dir, b.name)
	moved := filepath.Join(b.priv, "stale")
	if err := b.root.Rename(b.name, moved); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil // someone else removed it meanwhile
		}
		return fmt.Errorf("agent: removing stale socket %q: %w", final, err)
	}
	if fi, err := b.root.Lstat(moved); err == nil && os.SameFile(fi, probed) {
		return nil // deleted with the private directory
	}
	if err := b.root.Link(moved, b.name); err != nil {
		return fmt.Errorf("agent: %q changed while this agent checked it, and putting it back failed: %w", final, err)
	}
	return fmt.Errorf("agent: %q changed while this agent checked whether it was stale; another agent may be starting", final)
}

// socketListener is the agent's listener: Close removes the socket file
// only if it is still the one this listener created.
type socketListener struct {
	*net.UnixListener
	path    string      // where the socket was put, symbolic links resolved
	addr    net.Addr    // the path Listen was given
	created os.FileInfo // the socket file as created, for os.SameFile
	once    sync.Once
	err     error
}

// Addr returns the path given to Listen (the socket was bound under a
// temporary name, which the kernel would report).
func (l *socketListener) Addr() net.Addr { return l.addr }

// Close removes the socket file, unless another agent has since put its own
// there, and closes the listener. The file is removed first: while this
// listener still listens, no other agent can judge it stale and replace it
// between the check and the removal.
func (l *socketListener) Close() error {
	l.once.Do(func() {
		var removeErr error
		if fi, err := os.Lstat(l.path); err == nil && os.SameFile(fi, l.created) {
			if err := os.Remove(l.path); err != nil && !errors.Is(err, fs.ErrNotExist) {
				removeErr = fmt.Errorf("agent: removing socket %q: %w", l.path, err)
			}
		}
		l.err = errors.Join(removeErr, l.UnixListener.Close())
	})
	return l.err
}
