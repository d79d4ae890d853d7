package main

import (
	"go/ast"
	"go/parser"
	"go/token"
	"path/filepath"
	"strings"
	"testing"
)

// maxActionLines keeps commands thin: an action parses, wires and prints,
// and what it decides lives in a package of its own (agent/d1, hsm).
const maxActionLines = 60

// TestActionsAreShort finds every function used as a command's Action and
// checks its length in lines, braces included.
func TestActionsAreShort(t *testing.T) {
	// serveAction is being split by the owner of serve.go (issue 15).
	exempt := map[string]bool{"serveAction": true}
	fset := token.NewFileSet()
	files, err := filepath.Glob("*.go")
	if err != nil {
		t.Fatal(err)
	}
	funcs := map[string]*ast.FuncDecl{}
	var actions []string
	for _, name := range files {
		if strings.HasSuffix(name, "_test.go") {
			continue
		}
		f, err := parser.ParseFile(fset, name, nil, 0)
		if err != nil {
			t.Fatal(err)
		}
		ast.Inspect(f, func(n ast.Node) bool {
			switch n := n.(type) {
			case *ast.FuncDecl:
				if n.Recv == nil {
					funcs[n.Name.Name] = n
				}
			case *ast.KeyValueExpr:
				if key, ok := n.Key.(*ast.Ident); ok && key.Name == "Action" {
					if fn, ok := n.Value.(*ast.Ident); ok {
						actions = append(actions, fn.Name)
					}
				}
			}
			return true
		})
	}
	if len(actions) < 10 {
		t.Fatalf("found only the actions %v", actions)
	}
	for _, name := range actions {
		fn := funcs[name]
		if fn == nil {
			t.Errorf("action %s: no function of that name", name)
			continue
		}
		lines := fset.Position(fn.End()).Line - fset.Position(fn.Pos()).Line + 1
		if lines > maxActionLines && !exempt[name] {
			t.Errorf("%s is %d lines (%s); keep actions to %d: move what it decides into its package", name, lines, fset.Position(fn.Pos()), maxActionLines)
		}
	}
}
