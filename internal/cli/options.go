package cli

import (
	"errors"
	"fmt"
	"math"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/pflag"
)

// Version is this implementation's version; the Makefile may override it
// with -ldflags "-X github.com/fi-backup/fi-backup/internal/cli.Version=…".
var Version = "3.0.0"

// Exit codes. 1, 2 and 3 keep the old script's meanings.
const (
	ExitOK          = 0
	ExitFailure     = 1 // bad or incompatible options, -h, or a domain failed
	ExitNoDomain    = 2 // no domain given, or domains given together with -r
	ExitDependency  = 3 // libvirt/qemu-img missing, unreachable or too old
	ExitInterrupted = 130
	ExitTerminated  = 143
)

// Consolidation methods.
const (
	MethodCommit = "blockcommit"
	MethodPull   = "blockpull"
)

// Options is the parsed command line.
type Options struct {
	BackupDir   string
	Consolidate bool // -c or -C
	Snapshot    bool // false only with -c
	Method      string
	MethodSet   bool
	Quiesce     bool
	AllRunning  bool
	DumpDir     string
	Debug       bool
	Verbose     bool
	JobTimeout  time.Duration
	RateLimit   int64    // bytes/s, 0: unlimited
	Args        []string // positional arguments as given
}

// exitNow stops option processing with an exit code; its output has been
// printed already.
type exitNow struct{ code int }

func (e exitNow) Error() string { return fmt.Sprintf("exit %d", e.code) }

// longOrder is getopt's long option list as the old script passed it; the
// order decides how ambiguity diagnostics list their possibilities.
var longOrder = []string{"backup_dir", "consolidate_only", "consolidate_and_snapshot", "method",
	"quiesce", "all_running", "dump_state_dir", "debug", "help", "version", "verbose", "job_timeout", "rate_limit"}

func newFlagSet() *pflag.FlagSet {
	fs := pflag.NewFlagSet("fi-backup", pflag.ContinueOnError)
	fs.SetOutput(discard{})
	fs.StringP("backup_dir", "b", "", "Copy previous snapshot/base image to the specified <directory>")
	fs.BoolP("consolidate_only", "c", false, "Consolidation only")
	fs.BoolP("consolidate_and_snapshot", "C", false, "Snapshot and consolidation")
	fs.StringP("method", "m", "", "Consolidation method: blockcommit or blockpull")
	fs.BoolP("quiesce", "q", false, "Use quiescence (qemu agent must be installed in the domain)")
	fs.BoolP("all_running", "r", false, "Backup all running domains")
	fs.StringP("dump_state_dir", "s", "", "Dump domain status in the specified directory")
	fs.BoolP("debug", "d", false, "Debug")
	fs.BoolP("help", "h", false, "Print usage and exit")
	fs.BoolP("verbose", "v", false, "Verbose")
	fs.BoolP("version", "V", false, "Print version and exit")
	fs.Duration("job_timeout", defaultJobTimeout, "Give up a consolidation job that is not ready after this long")
	fs.String("rate_limit", "", "Copy and consolidate at most this many bytes per second (K, M, G suffixes)")
	return fs
}

const defaultJobTimeout = 30 * time.Minute

type discard struct{}

func (discard) Write(p []byte) (int, error) { return len(p), nil }

// getoptDefs derives getopt's option table from the pflag definitions.
func getoptDefs(fs *pflag.FlagSet) []optDef {
	defs := make([]optDef, 0, len(longOrder))
	for _, name := range longOrder {
		f := fs.Lookup(name)
		d := optDef{long: f.Name, hasArg: f.NoOptDefVal == ""}
		if f.Shorthand != "" {
			d.short = f.Shorthand[0]
		}
		defs = append(defs, d)
	}
	return defs
}

// parse handles the command line the way the old script did: getopt
// grammar, then each option acted on in order, so "-V -b /missing" prints
// the version while "-b /missing -V" fails on the directory.
func (a *app) parse(args []string) (*Options, error) {
	fs := newFlagSet()
	scannedOpts, positional, ok := getoptScan("fi-backup", getoptDefs(fs), args, a.Getenv("POSIXLY_CORRECT") != "", a.Stderr)
	if !ok {
		fmt.Fprintln(a.Stderr, "Failed parsing options.")
		return nil, exitNow{ExitFailure}
	}
	norm := make([]string, 0, len(scannedOpts)+1+len(positional))
	for _, s := range scannedOpts {
		if s.def.hasArg {
			norm = append(norm, "--"+s.def.long+"="+s.value)
		} else {
			norm = append(norm, "--"+s.def.long)
		}
	}
	norm = append(norm, "--")
	norm = append(norm, positional...)

	o := &Options{Snapshot: true, Method: MethodPull, JobTimeout: defaultJobTimeout}
	consolidationSeen := false
	err := fs.ParseAll(norm, func(f *pflag.Flag, value string) error {
		if err := f.Value.Set(value); err != nil {
			return err
		}
		switch f.Name {
		case "backup_dir":
			if !isDir(value) {
				a.p.Err("Backup directory '%s' doesn't exist!", value)
				return exitNow{ExitFailure}
			}
			o.BackupDir = value
		case "consolidate_only", "consolidate_and_snapshot":
			if consolidationSeen {
				a.usage("-c or -C already specified!")
				return exitNow{ExitFailure}
			}
			consolidationSeen = true
			o.Consolidate = true
			o.Snapshot = f.Name == "consolidate_and_snapshot"
		case "method":
			if value != MethodCommit && value != MethodPull {
				a.usage("-m requires specifying 'blockcommit' or 'blockpull'")
				return exitNow{ExitFailure}
			}
			o.Method, o.MethodSet = value, true
		case "quiesce":
			o.Quiesce = true
		case "all_running":
			o.AllRunning = true
		case "dump_state_dir":
			if !isDir(value) {
				a.p.Err("Dump state directory '%s' doesn't exist!", value)
				return exitNow{ExitFailure}
			}
			o.DumpDir = value
		case "debug":
			o.Debug, o.Verbose = true, true
			a.p.SetLevels(true, true)
		case "verbose":
			o.Verbose = true
			a.p.SetLevels(true, o.Debug)
		case "help":
			a.usage("")
			return exitNow{ExitFailure}
		case "version":
			fmt.Fprintf(a.Stdout, "fi-backup version %s\n", Version)
			return exitNow{ExitOK}
		case "job_timeout":
			d, err := time.ParseDuration(value)
			if err != nil || d <= 0 {
				a.usage("--job_timeout requires a positive duration such as 90s or 30m")
				return exitNow{ExitFailure}
			}
			o.JobTimeout = d
		case "rate_limit":
			n, err := parseRate(value)
			if err != nil {
				a.usage("--rate_limit requires a positive number of bytes per second, with an optional K, M or G suffix (e.g. 50M)")
				return exitNow{ExitFailure}
			}
			o.RateLimit = n
		}
		return nil
	})
	if err != nil {
		var en exitNow
		if errors.As(err, &en) {
			return nil, en
		}
		// getoptScan accepted everything pflag can reject; this is a bug guard.
		fmt.Fprintf(a.Stderr, "fi-backup: %v\nFailed parsing options.\n", err)
		return nil, exitNow{ExitFailure}
	}
	o.Args = fs.Args()
	return o, nil
}

func isDir(p string) bool {
	st, err := os.Stat(p)
	return err == nil && st.IsDir()
}

// usage prints the usage block, preceded by "[ERR] msg" when msg is set,
// all on stdout as the old script did.
func (a *app) usage(msg string) {
	var b strings.Builder
	if msg != "" {
		fmt.Fprintf(&b, "\n[ERR] %s\n\n", msg)
	}
	fmt.Fprintf(&b, usageText, Version, a.Prog)
	a.p.Raw(b.String())
}

const usageText = `   fi-backup version %s - Go reimplementation of fi-backup.sh by Davide Guerri <davide.guerri@gmail.com>

   Usage:

   %s [-c|-C] [-q|-s <directory>] [-h] [-d] [-v] [-V] [-b <directory>] [-m <method>] <domain name>|all|-r

   Options:
      -b <directory>    Copy previous snapshot/base image to the specified <directory>
      -c                Consolidation only
      -C                Snapshot and consolidation
      -m <method>       Consolidation method: blockcommit or blockpull
      -q                Use quiescence (qemu agent must be installed in the domain)
      -r                Backup all running domains
      -s <directory>    Dump domain status in the specified directory
      -d                Debug
      -h                Print usage and exit
      -v                Verbose
      -V                Print version and exit

   Long options (any unambiguous prefix works):
      --backup_dir --consolidate_only --consolidate_and_snapshot --method --quiesce
      --all_running --dump_state_dir --debug --help --verbose --version
      --job_timeout <duration>   Consolidation job timeout (default 30m)
      --rate_limit <rate>        Copy and consolidate at most <rate> bytes/s (K, M, G suffixes)

   Version Requirements:
      qemu_img >= 1.2.0
      qemu     >= 1.2.0
      libvirt  >= 0.9.13

`

// parseRate reads a rate in bytes per second: digits with an optional K, M,
// G or T suffix (powers of 1024, any case).
func parseRate(v string) (int64, error) {
	mult := int64(1)
	if n := len(v); n > 0 {
		switch v[n-1] {
		case 'k', 'K':
			mult = 1 << 10
		case 'm', 'M':
			mult = 1 << 20
		case 'g', 'G':
			mult = 1 << 30
		case 't', 'T':
			mult = 1 << 40
		}
		if mult > 1 {
			v = v[:n-1]
		}
	}
	n, err := strconv.ParseInt(v, 10, 64)
	if err != nil || n <= 0 || n > math.MaxInt64/mult {
		return 0, fmt.Errorf("invalid rate %q", v)
	}
	return n * mult, nil
}
