package main

import (
	"bufio"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/hsmagent/hsmagent/agent/d1"
	"github.com/hsmagent/hsmagent/hsm"
)

// SoftHSM writes each object into its token directory as a file of the
// process that made it, mode 0600. Run as root on a token the agent's user
// owns, a direct operation leaves files the agent cannot read, and SoftHSM
// then skips them without a word: a key that is never served, a certificate
// that never replaces the old one. Root's direct operations therefore give
// such files back to the token's owner when they end (see
// docs/operations.md), and doctor reports any that are left.

const ownershipCheck d1.Check = "ownership"

// softhsmConfDefault is where SoftHSM reads its configuration when
// SOFTHSM2_CONF is not set (Debian's build).
const softhsmConfDefault = "/etc/softhsm/softhsm2.conf"

// foreignFile is a file in a SoftHSM token directory that the token's owner
// (the owner of its token.object) may not read: it belongs to someone else.
type foreignFile struct {
	Path     string
	UID, GID int // the file's
	Owner    int // the token's owner, and the group its files should have
	OwnerGID int
	TokenDir string
}

// ownershipScan is what the token directories of SoftHSM's config hold.
type ownershipScan struct {
	TokenDir string // directories.tokendir; "" when the module is not SoftHSM
	Tokens   int    // token directories looked at
	Foreign  []foreignFile
}

// isSoftHSM reports whether the module is SoftHSM's, the only one whose
// objects are files of the calling user.
func isSoftHSM(module string) bool {
	if module == "" {
		module = hsm.DefaultModulePath()
	}
	return strings.Contains(strings.ToLower(filepath.Base(module)), "softhsm")
}

// softhsmTokenDir reads directories.tokendir from the config SoftHSM reads.
func softhsmTokenDir() (dir, conf string, err error) {
	conf = os.Getenv("SOFTHSM2_CONF")
	if conf == "" {
		conf = softhsmConfDefault
	}
	f, err := os.Open(conf)
	if err != nil {
		return "", conf, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if strings.HasPrefix(line, "#") {
			continue
		}
		if k, v, ok := strings.Cut(line, "="); ok && strings.TrimSpace(k) == "directories.tokendir" {
			dir = strings.TrimSpace(v)
		}
	}
	if err := sc.Err(); err != nil {
		return "", conf, err
	}
	if dir == "" {
		return "", conf, fmt.Errorf("%s sets no directories.tokendir", conf)
	}
	return dir, conf, nil
}

// scanTokenOwnership lists the files of every SoftHSM token directory that
// do not belong to the owner of that token's token.object. A module other
// than SoftHSM gives an empty scan.
func scanTokenOwnership(module string) (ownershipScan, error) {
	if !isSoftHSM(module) {
		return ownershipScan{}, nil
	}
	dir, _, err := softhsmTokenDir()
	if err != nil {
		return ownershipScan{}, err
	}
	scan := ownershipScan{TokenDir: dir}
	entries, err := os.ReadDir(dir)
	if err != nil {
		return scan, err
	}
	for _, e := range entries {
		if !e.IsDir() {
			continue
		}
		tokenDir := filepath.Join(dir, e.Name())
		owner, err := os.Lstat(filepath.Join(tokenDir, "token.object"))
		if err != nil {
			continue // not a token (or not yet one)
		}
		scan.Tokens++
		ost := owner.Sys().(*syscall.Stat_t)
		files, err := os.ReadDir(tokenDir)
		if err != nil {
			return scan, err
		}
		for _, f := range files {
			fi, err := f.Info()
			if err != nil || !fi.Mode().IsRegular() {
				continue
			}
			st := fi.Sys().(*syscall.Stat_t)
			if st.Uid != ost.Uid {
				scan.Foreign = append(scan.Foreign, foreignFile{Path: filepath.Join(tokenDir, f.Name()),
					UID: int(st.Uid), GID: int(st.Gid), Owner: int(ost.Uid), OwnerGID: int(ost.Gid), TokenDir: tokenDir})
			}
		}
	}
	return scan, nil
}

// repairTokenOwnership gives the files of SoftHSM's token directories that
// root wrote back to their token's owner, and says so on notify, once per
// token directory. It does nothing unless this process is root (nobody else
// may give files away, nor write into another user's token) and the module
// is SoftHSM.
func repairTokenOwnership(module string, notify func(format string, args ...any)) error {
	if os.Geteuid() != 0 {
		return nil
	}
	scan, err := scanTokenOwnership(module)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil // no SoftHSM config or token directory: nothing was written there
		}
		return fmt.Errorf("checking the ownership of SoftHSM's token files: %w", err)
	}
	given := map[string]int{}
	var owner = map[string]foreignFile{}
	var errs []error
	for _, f := range scan.Foreign {
		if err := os.Lchown(f.Path, f.Owner, f.OwnerGID); err != nil {
			errs = append(errs, err)
			continue
		}
		given[f.TokenDir]++
		owner[f.TokenDir] = f
	}
	for dir, n := range given {
		f := owner[dir]
		notify("SoftHSM wrote %d file(s) in %s as %s, which the token's owner %s could not read: gave them to %s:%s",
			n, dir, userName(uint32(f.UID)), userName(uint32(f.Owner)), userName(uint32(f.Owner)), groupName(uint32(f.OwnerGID)))
	}
	if len(errs) > 0 {
		return fmt.Errorf("giving SoftHSM's token files back to the token's owner: %w", errors.Join(errs...))
	}
	return nil
}

// checkTokenOwnership is doctor's line on SoftHSM's token files; none for
// another module.
func checkTokenOwnership(module string) []d1.Finding {
	if !isSoftHSM(module) {
		return nil
	}
	scan, err := scanTokenOwnership(module)
	if err != nil {
		return []d1.Finding{{Check: ownershipCheck, Status: d1.Warn, Message: "cannot check SoftHSM's token files: " + err.Error(),
			Fix: "run doctor as root, with the SOFTHSM2_CONF the agent uses"}}
	}
	if len(scan.Foreign) == 0 {
		return []d1.Finding{{Check: ownershipCheck, Status: d1.Pass,
			Message: fmt.Sprintf("every file of the %d SoftHSM token(s) in %s belongs to its token's owner", scan.Tokens, scan.TokenDir)}}
	}
	f := scan.Foreign[0]
	return []d1.Finding{{Check: ownershipCheck, Status: d1.Fail,
		Message: fmt.Sprintf("%d file(s) in SoftHSM token directory %s belong to %s, not to the token's owner %s, who cannot read them (first: %s)",
			len(scan.Foreign), f.TokenDir, userName(uint32(f.UID)), userName(uint32(f.Owner)), filepath.Base(f.Path)),
		Fix: fmt.Sprintf("chown %s:%s %s/*, then reload the agent (any direct hsmagent command run as root does the chown)",
			userName(uint32(f.Owner)), groupName(uint32(f.OwnerGID)), f.TokenDir)}}
}

// warnUnreadableTokenFiles is the agent's own word on the trap: at start
// and on each reload it logs the files of its SoftHSM tokens (those whose
// token.object is its own) that belong to another user, whose keys and
// certificates it therefore does not serve. Root reads them all anyway.
func warnUnreadableTokenFiles(module string, log *slog.Logger) {
	uid := os.Geteuid()
	if uid == 0 {
		return
	}
	scan, err := scanTokenOwnership(module)
	if err != nil {
		return // not SoftHSM's layout, or hidden from the agent: doctor checks it as root
	}
	byDir := map[string][]foreignFile{}
	for _, f := range scan.Foreign {
		if f.Owner == uid {
			byDir[f.TokenDir] = append(byDir[f.TokenDir], f)
		}
	}
	for dir, files := range byDir {
		f := files[0]
		log.Warn("SoftHSM token files of another user: the agent cannot read them and does not serve the keys or certificates in them",
			"dir", dir, "files", len(files), "owner", userName(uint32(f.UID)), "first", filepath.Base(f.Path),
			"fix", fmt.Sprintf("chown %s:%s %s/* and reload (any direct hsmagent command run as root does the chown)", userName(uint32(uid)), groupName(uint32(f.OwnerGID)), dir))
	}
}
