package main

import (
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"

	"github.com/hsmagent/hsmagent/agent/server"
	"go.yaml.in/yaml/v3"
)

// loadConfig reads path strictly: an unknown setting is an error, so a
// misspelt access rule is not silently ignored, and so is a value its
// setting cannot take. Errors name the setting and its line, and what the
// setting takes.
func loadConfig(path string) (*config, error) {
	cfg := &config{path: path, pos: map[string]settingPos{}}
	if path == "" {
		return cfg, nil
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, usagef("--config: %v", err)
	}
	var doc yaml.Node
	if err := yaml.Unmarshal(data, &doc); err != nil {
		return nil, fmt.Errorf("config %q: %s", path, strings.ReplaceAll(strings.TrimPrefix(err.Error(), "yaml: "), "\n", `\n`))
	}
	r := &fileReader{cfg: cfg, merges: maxMerges}
	if doc.Kind == yaml.DocumentNode && len(doc.Content) > 0 {
		r.mapping(doc.Content[0], "", cfg.settings(), map[string]section{"access": r.access, "admin": r.admin, "d1": r.d1})
	}
	switch {
	case len(r.wrong) > 0:
		return nil, fmt.Errorf("config %q %s", path, strings.Join(r.wrong, "; "))
	case r.bad != nil:
		return nil, r.bad
	}
	return cfg, nil
}

// settingPos is where a setting stands in the file: the line of its key (or
// list item) for errors about it, and whether it gives a value (not null or
// empty), which then overrides the flag's default.
type settingPos struct {
	line int
	set  bool
}

// lineOf says where a setting is, for errors: " (FILE line N)" or "".
func (cfg *config) lineOf(setting string) string {
	if at, ok := cfg.pos[setting]; ok {
		return fmt.Sprintf(" (%s line %d)", cfg.path, at.line)
	}
	return ""
}

// fileReader decodes the file's YAML nodes into a config, walking them
// itself so that every error names the setting and its line in its own
// words: the YAML library's are about Go types.
type fileReader struct {
	cfg    *config
	wrong  []string // what does not fit the settings' shape: "line 2: unknown setting ..."
	bad    error    // the first value a setting cannot take
	merges int      // merge keys (<<) left to follow
}

// maxMerges bounds the merge keys followed, which may refer to each other
// (or to the mapping they are in) however often.
const maxMerges = 100

// A section decodes the node of a setting that holds others.
type section func(n *yaml.Node, path string)

func (r *fileReader) wrongf(line int, format string, args ...any) {
	r.wrong = append(r.wrong, fmt.Sprintf("line %d: ", line)+fmt.Sprintf(format, args...))
}

// mapping decodes n, the mapping at path, of the given settings and sections.
func (r *fileReader) mapping(n *yaml.Node, path string, settings []setting, sections map[string]section) {
	r.entries(n, path, func(key string, v *yaml.Node, p string) {
		if sec, ok := sections[key]; ok {
			sec(v, p)
			return
		}
		for _, s := range settings {
			if s.key == key {
				r.scalar(s.val, v, p)
				return
			}
		}
		var names []string
		for _, s := range settings {
			names = append(names, s.key)
		}
		for k := range sections {
			names = append(names, k)
		}
		slices.Sort(names) // the same suggestion every time
		line := r.cfg.pos[p].line
		if near := nearest(key, names); near != "" {
			r.wrongf(line, "unknown setting %q: did you mean %q?", p, join(path, near))
		} else {
			r.wrongf(line, "unknown setting %q", p)
		}
	})
}

// entries calls fn with each key of the mapping n, its value and its path,
// after those its merge keys (<<) bring in, which its own override; it
// records where each is. A null n is an empty mapping.
func (r *fileReader) entries(n *yaml.Node, path string, fn func(key string, v *yaml.Node, p string)) {
	n = resolve(n)
	if isNull(n) || !r.is(n, yaml.MappingNode, path, "a mapping") {
		return
	}
	var own [][2]*yaml.Node
	for i := 0; i+1 < len(n.Content); i += 2 {
		k, v := n.Content[i], resolve(n.Content[i+1])
		if k.Kind == yaml.ScalarNode && k.ShortTag() == "!!merge" {
			r.merge(v, path, fn)
			continue
		}
		own = append(own, [2]*yaml.Node{k, v})
	}
	seen := map[string]bool{}
	for _, kv := range own {
		k, v := kv[0], kv[1]
		if k = resolve(k); k.Kind != yaml.ScalarNode {
			r.wrongf(k.Line, "a setting's name must be a string, not %s", given(k))
			continue
		}
		p := join(path, k.Value)
		if seen[k.Value] {
			r.wrongf(k.Line, "setting %q given twice", p)
			continue
		}
		seen[k.Value] = true
		r.cfg.pos[p] = settingPos{line: k.Line, set: !isNull(v)}
		fn(k.Value, v, p)
	}
}

// merge brings in the mappings of a merge key: one, or a list of them.
func (r *fileReader) merge(v *yaml.Node, path string, fn func(string, *yaml.Node, string)) {
	if r.merges--; r.merges < 0 {
		if r.merges == -1 {
			r.wrongf(v.Line, "more than %d merges (<<)", maxMerges)
		}
		return
	}
	if v.Kind != yaml.SequenceNode {
		r.entries(v, path, fn)
		return
	}
	for _, m := range v.Content {
		r.entries(m, path, fn)
	}
}

// scalar decodes a setting's value; null or empty leaves it to its flag.
func (r *fileReader) scalar(val value, v *yaml.Node, p string) {
	if isNull(v) || !r.is(v, yaml.ScalarNode, p, val.takes()) {
		return
	}
	if err := val.set(v.Value); err != nil && r.bad == nil {
		r.bad = fmt.Errorf("config setting %q%s: %w", p, r.cfg.lineOf(p), err)
	}
}

// access decodes the access rules, a list of mappings.
func (r *fileReader) access(n *yaml.Node, path string) {
	r.cfg.Access = nil // one list: its own, or the one a merge brought in
	if isNull(n) || !r.is(n, yaml.SequenceNode, path, "a list") {
		return
	}
	for i, item := range n.Content {
		p := join(path, strconv.Itoa(i))
		r.cfg.pos[p] = settingPos{line: item.Line, set: true}
		var rule server.Rule
		r.mapping(item, p, nil, map[string]section{
			"keys": r.list(&rule.Keys), "users": r.list(&rule.Users), "groups": r.list(&rule.Groups)})
		r.cfg.Access = append(r.cfg.Access, rule)
	}
}

// admin decodes the admin rule: who may change the token through the
// agent besides root.
func (r *fileReader) admin(n *yaml.Node, path string) {
	r.cfg.Admin = server.AdminRule{}
	if isNull(n) {
		return
	}
	r.mapping(n, path, nil, map[string]section{"users": r.list(&r.cfg.Admin.Users), "groups": r.list(&r.cfg.Admin.Groups)})
}

// list decodes a list of strings into dst.
func (r *fileReader) list(dst *[]string) section {
	return func(n *yaml.Node, path string) {
		*dst = nil
		if isNull(n) || !r.is(n, yaml.SequenceNode, path, "a list") {
			return
		}
		for i, item := range n.Content {
			if item = resolve(item); r.is(item, yaml.ScalarNode, join(path, strconv.Itoa(i)), "a string") {
				*dst = append(*dst, item.Value)
			}
		}
	}
}

// d1 decodes the D1 sections, one per environment; the environments'
// names are checked where they are used (mergeD1, doctor).
func (r *fileReader) d1(n *yaml.Node, path string) {
	if r.cfg.D1 == nil {
		r.cfg.D1 = map[string]*d1Section{}
	}
	r.entries(n, path, func(env string, v *yaml.Node, p string) {
		if isNull(v) {
			r.cfg.D1[env] = nil
			return
		}
		sec := &d1Section{}
		r.mapping(v, p, sec.settings(), map[string]section{
			"jwt":    func(n *yaml.Node, p string) { r.mapping(n, p, sec.JWT.settings(), nil) },
			"server": func(n *yaml.Node, p string) { r.mapping(n, p, sec.Server.settings(), nil) },
		})
		r.cfg.D1[env] = sec
	})
}

// is reports whether n is of kind; if not, it says what the setting at path
// must be instead.
func (r *fileReader) is(n *yaml.Node, kind yaml.Kind, path, takes string) bool {
	if n.Kind == kind {
		return true
	}
	name := "the file"
	if path != "" {
		name = strconv.Quote(path)
	}
	r.wrongf(n.Line, "%s must be %s, not %s", name, takes, given(n))
	return false
}

// given names what the file gives: a list, a mapping or its text.
func given(n *yaml.Node) string {
	switch n.Kind {
	case yaml.SequenceNode:
		return "a list"
	case yaml.MappingNode:
		return "a mapping"
	case yaml.ScalarNode:
		return strconv.Quote(n.Value)
	}
	return "another kind of value"
}

// resolve follows an alias (*name) to the node it names.
func resolve(n *yaml.Node) *yaml.Node {
	if n.Kind == yaml.AliasNode && n.Alias != nil {
		return n.Alias
	}
	return n
}

// isNull: no value (null, ~ or nothing) or an empty one, which leaves a
// setting to its flag and default.
func isNull(n *yaml.Node) bool {
	return n.Kind == yaml.ScalarNode && (n.Value == "" || n.ShortTag() == "!!null")
}

func join(prefix, name string) string {
	if prefix == "" {
		return name
	}
	return prefix + "." + name
}
