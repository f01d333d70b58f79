package cli

import (
	"fmt"
	"io"
	"strings"
)

// The old script ran util-linux `getopt -n fi-backup` before its own option
// loop, so every caller of it relies on GNU getopt_long's grammar:
// permutation, bundled short options, attached and separate arguments, and
// unique-prefix abbreviation of long options. pflag knows none of the
// abbreviation rules and words its errors differently, so this file
// re-implements getopt_long's scanning and diagnostics, and hands pflag a
// normalised argument list (one "--long[=value]" per option, then "--", then
// the positional arguments). The diagnostics are pinned against the real
// getopt(1) in getopt_test.go.

// optDef is one option as getopt knows it.
type optDef struct {
	long   string
	short  byte // 0 if none
	hasArg bool
}

// scanned is one option occurrence, in command-line order.
type scanned struct {
	def   *optDef
	value string
	long  bool // given in its long form
}

// getoptScan parses args like getopt_long with optstring/longopts built from
// defs (in that order). Diagnostics go to stderr, prefixed with prog. ok is
// false when any diagnostic was printed; scanning continues past errors, as
// getopt(1) does, so every problem is reported.
func getoptScan(prog string, defs []optDef, args []string, posixlyCorrect bool, stderr io.Writer) (opts []scanned, positional []string, ok bool) {
	ok = true
	fail := func(format string, a ...any) {
		ok = false
		fmt.Fprintf(stderr, "%s: "+format+"\n", append([]any{prog}, a...)...)
	}
	byShort := func(c byte) *optDef {
		for i := range defs {
			if defs[i].short == c {
				return &defs[i]
			}
		}
		return nil
	}
	for i := 0; i < len(args); i++ {
		arg := args[i]
		switch {
		case arg == "--":
			positional = append(positional, args[i+1:]...)
			return opts, positional, ok
		case strings.HasPrefix(arg, "--"):
			body := arg[2:]
			name, value, hasValue := strings.Cut(body, "=")
			def, ambiguous := matchLong(defs, name)
			switch {
			case ambiguous != nil:
				var b strings.Builder
				for _, d := range ambiguous {
					fmt.Fprintf(&b, " '--%s'", d.long)
				}
				fail("option '--%s' is ambiguous; possibilities:%s", body, b.String())
			case def == nil:
				fail("unrecognized option '--%s'", body)
			case !def.hasArg && hasValue:
				fail("option '--%s' doesn't allow an argument", def.long)
			case def.hasArg && !hasValue:
				if i+1 >= len(args) {
					fail("option '--%s' requires an argument", def.long)
					break
				}
				i++
				opts = append(opts, scanned{def: def, value: args[i], long: true})
			default:
				opts = append(opts, scanned{def: def, value: value, long: true})
			}
		case len(arg) > 1 && arg[0] == '-':
			for j := 1; j < len(arg); j++ {
				c := arg[j]
				def := byShort(c)
				if def == nil || c == ':' {
					fail("invalid option -- '%c'", c)
					continue
				}
				if !def.hasArg {
					opts = append(opts, scanned{def: def})
					continue
				}
				if j+1 < len(arg) {
					opts = append(opts, scanned{def: def, value: arg[j+1:]})
				} else if i+1 < len(args) {
					i++
					opts = append(opts, scanned{def: def, value: args[i]})
				} else {
					fail("option requires an argument -- '%c'", c)
				}
				break
			}
		default:
			if posixlyCorrect {
				positional = append(positional, args[i:]...)
				return opts, positional, ok
			}
			positional = append(positional, arg)
		}
	}
	return opts, positional, ok
}

// matchLong finds the long option name abbreviates: an exact match wins;
// otherwise exactly one prefix match; several prefix matches are ambiguous.
// As in getopt_long, the empty name ("--=x") is a prefix of every option.
func matchLong(defs []optDef, name string) (*optDef, []*optDef) {
	var matches []*optDef
	for i := range defs {
		if defs[i].long == name {
			return &defs[i], nil
		}
		if strings.HasPrefix(defs[i].long, name) {
			matches = append(matches, &defs[i])
		}
	}
	switch len(matches) {
	case 0:
		return nil, nil
	case 1:
		return matches[0], nil
	}
	return nil, matches
}
