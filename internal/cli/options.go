package cli

import (
	"fmt"
	"math"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/pflag"

	"github.com/fi-backup/fi-backup/internal/blockjob"
)

// Version is this implementation's version; the Makefile sets it at link
// time with -ldflags "-X github.com/fi-backup/fi-backup/internal/cli.Version=…".
var Version = "3.1.0"

// Options is the parsed command line.
type Options struct {
	BackupDir   string
	Consolidate bool // -c or -C
	Snapshot    bool // false only with -c
	Method      blockjob.Method
	MethodSet   bool
	Quiesce     bool
	AllRunning  bool
	DumpDir     string
	Debug       bool
	Verbose     bool
	JobTimeout  time.Duration
	RateLimit   int64    // bytes/s, 0: unlimited
	Keep        int      // --keep: restore points to keep per domain; 0: all
	Report      string   // --report: the JSON report's path
	TextfileDir string   // --textfile_dir: where the Prometheus textfiles go
	Parallel    int      // --parallel: domains at once (1: one after the other)
	Command     string   // "list", "verify", "restore"; "" for a backup
	RestoreAt   string   // --restore's moment (or "latest")
	TargetDir   string   // --target_dir
	Format      string   // --format
	CBT         bool     // --cbt
	Args        []string // positional arguments as given

	consolidationSeen bool
}

const defaultJobTimeout = 30 * time.Minute

// option is one command-line option: its one definition. The table below
// gives getopt its option list (in this order, which decides how ambiguity
// diagnostics list their possibilities), pflag its flags, the usage its
// lines for the long-only options; set is where the option takes effect,
// in command-line order (so "-V -b /missing" prints the version while
// "-b /missing -V" fails on the directory, as with the old script).
type option struct {
	long  string
	short byte   // 0: long-only
	arg   string // the argument's name in the usage ("<directory>"); "" for a flag
	help  string // the usage line of a long-only option; the old ones' text is fixed
	set   func(a *app, o *Options, value string) error
}

// options lists the old script's options first, in its getopt order, then
// the long-only additions. A new option is one more entry here.
func options() []option {
	return []option{
		{long: "backup_dir", short: 'b', arg: "<directory>", set: func(a *app, o *Options, v string) error {
			if !isDir(v) {
				a.p.Err("Backup directory '%s' doesn't exist!", v)
				return errUsage
			}
			o.BackupDir = v
			return nil
		}},
		{long: "consolidate_only", short: 'c', set: setConsolidate(false)},
		{long: "consolidate_and_snapshot", short: 'C', set: setConsolidate(true)},
		{long: "method", short: 'm', arg: "<method>", set: func(a *app, o *Options, v string) error {
			if m := blockjob.Method(v); m == blockjob.Commit || m == blockjob.Pull {
				o.Method, o.MethodSet = m, true
				return nil
			}
			return a.usageErr("-m requires specifying 'blockcommit' or 'blockpull'")
		}},
		{long: "quiesce", short: 'q', set: func(_ *app, o *Options, _ string) error { o.Quiesce = true; return nil }},
		{long: "all_running", short: 'r', set: func(_ *app, o *Options, _ string) error { o.AllRunning = true; return nil }},
		{long: "dump_state_dir", short: 's', arg: "<directory>", set: func(a *app, o *Options, v string) error {
			if !isDir(v) {
				a.p.Err("Dump state directory '%s' doesn't exist!", v)
				return errUsage
			}
			o.DumpDir = v
			return nil
		}},
		{long: "debug", short: 'd', set: func(a *app, o *Options, _ string) error {
			o.Debug, o.Verbose = true, true
			a.p.SetLevels(true, true)
			return nil
		}},
		{long: "help", short: 'h', set: func(a *app, _ *Options, _ string) error {
			a.usage("")
			return errHelp
		}},
		{long: "version", short: 'V', set: func(a *app, _ *Options, _ string) error {
			fmt.Fprintf(a.Stdout, "fi-backup version %s\n", Version)
			return errDone
		}},
		{long: "verbose", short: 'v', set: func(a *app, o *Options, _ string) error {
			o.Verbose = true
			a.p.SetLevels(true, o.Debug)
			return nil
		}},
		{long: "job_timeout", arg: "<duration>", help: "Consolidation and --cbt backup job timeout (default 30m)", set: func(a *app, o *Options, v string) error {
			d, err := time.ParseDuration(v)
			if err != nil || d <= 0 {
				return a.usageErr("--job_timeout requires a positive duration such as 90s or 30m")
			}
			o.JobTimeout = d
			return nil
		}},
		{long: "rate_limit", arg: "<rate>", help: "Copy and consolidate at most <rate> bytes/s (K, M, G suffixes)", set: func(a *app, o *Options, v string) error {
			n, err := parseRate(v)
			if err != nil {
				return a.usageErr("--rate_limit requires a positive number of bytes per second, with an optional K, M or G suffix (e.g. 50M)")
			}
			o.RateLimit = n
			return nil
		}},
		{long: "keep", arg: "<n>", help: "Keep only the <n> newest restore points of each domain in -b", set: func(a *app, o *Options, v string) error {
			n, err := strconv.Atoi(v)
			if err != nil || n < 1 {
				return a.usageErr("--keep requires a number of restore points, at least 1")
			}
			o.Keep = n
			return nil
		}},
		{long: "report", arg: "<file>", help: "Write a JSON report of the run to <file> at its end", set: func(a *app, o *Options, v string) error {
			if v == "" || v == "-" {
				return a.usageErr("--report requires a file name (stdout carries the log lines)")
			}
			o.Report = v
			return nil
		}},
		{long: "textfile_dir", arg: "<directory>", help: "Write Prometheus metrics fi-backup-<domain>.prom into <directory>", set: func(a *app, o *Options, v string) error {
			if v == "" {
				return a.usageErr("--textfile_dir requires a directory")
			}
			o.TextfileDir = v
			return nil
		}},
		{long: "parallel", arg: "<n>", help: "Back up to <n> domains at once (default 1)", set: func(a *app, o *Options, v string) error {
			n, err := strconv.Atoi(v)
			if err != nil || n < 1 || n > 64 {
				return a.usageErr("--parallel requires a number of domains from 1 to 64")
			}
			o.Parallel = n
			return nil
		}},
		{long: "list", help: "List the restore points in the backup directory (-b)", set: setCommand("list")},
		{long: "verify", help: "Verify the restore points in the backup directory (-b)", set: setCommand("verify")},
		{long: "restore", arg: "<moment>", help: "Restore the point YYYYMMDD-HHMMSS (or latest) of one domain", set: func(a *app, o *Options, v string) error {
			if err := setCommand("restore")(a, o, v); err != nil {
				return err
			}
			if _, err := time.Parse(momentLayout, v); err != nil && v != "latest" {
				return a.usageErr("--restore requires a moment YYYYMMDD-HHMMSS or 'latest'")
			}
			o.RestoreAt = v
			return nil
		}},
		{long: "target_dir", arg: "<directory>", help: "Where --restore writes the restored domain", set: func(_ *app, o *Options, v string) error {
			o.TargetDir = v
			return nil
		}},
		{long: "format", arg: "<format>", help: "--list output: text (default) or json", set: func(a *app, o *Options, v string) error {
			if v != "text" && v != "json" {
				return a.usageErr("--format requires 'text' or 'json'")
			}
			o.Format = v
			return nil
		}},
		{long: "cbt", help: "Back up running domains through changed-block tracking (needs -b)", set: func(_ *app, o *Options, _ string) error {
			o.CBT = true
			return nil
		}},
	}
}

// OptionName is how one option of the table is written on the command
// line; the documentation and completion tests check against it.
type OptionName struct {
	Long  string // without the leading "--"
	Short string // the letter; "" for a long-only option
	Arg   bool   // takes an argument
}

// OptionNames lists every option, in the table's order.
func OptionNames() []OptionName {
	opts := options()
	names := make([]OptionName, len(opts))
	for i, opt := range opts {
		names[i] = OptionName{Long: opt.long, Arg: opt.arg != ""}
		if opt.short != 0 {
			names[i].Short = string(opt.short)
		}
	}
	return names
}

// momentLayout is how a restore point's moment is written.
const momentLayout = "20060102-150405"

// setCommand selects one of the restore-point commands.
func setCommand(cmd string) func(*app, *Options, string) error {
	return func(a *app, o *Options, _ string) error {
		if o.Command != "" && o.Command != cmd {
			return a.usageErr("--list, --verify and --restore are not compatible with each other")
		}
		o.Command = cmd
		return nil
	}
}

func setConsolidate(snapshot bool) func(*app, *Options, string) error {
	return func(a *app, o *Options, _ string) error {
		if o.consolidationSeen {
			return a.usageErr("-c or -C already specified!")
		}
		o.consolidationSeen, o.Consolidate, o.Snapshot = true, true, snapshot
		return nil
	}
}

// optionValue is an option as pflag sees it: setting it applies it.
type optionValue struct {
	a   *app
	o   *Options
	opt *option
	val string
}

func (v *optionValue) String() string { return v.val }
func (v *optionValue) Type() string   { return "string" }
func (v *optionValue) Set(s string) error {
	v.val = s
	return v.opt.set(v.a, v.o, s)
}

// getoptDefs is getopt's option table, from the options.
func getoptDefs() []optDef {
	opts := options()
	defs := make([]optDef, len(opts))
	for i, opt := range opts {
		defs[i] = optDef{long: opt.long, short: opt.short, hasArg: opt.arg != ""}
	}
	return defs
}

// parse handles the command line the way the old script did: util-linux
// getopt's grammar (getoptScan normalises argv: abbreviations, bundles,
// order), then pflag parses the normalised list once, applying each option
// in order.
func (a *app) parse(args []string) (*Options, error) {
	scannedOpts, positional, ok := getoptScan("fi-backup", getoptDefs(), args, a.Getenv("POSIXLY_CORRECT") != "", a.Stderr)
	if !ok {
		fmt.Fprintln(a.Stderr, "Failed parsing options.")
		return nil, errUsage
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

	o := &Options{Snapshot: true, Method: blockjob.Pull, JobTimeout: defaultJobTimeout, Parallel: 1}
	fs := pflag.NewFlagSet("fi-backup", pflag.ContinueOnError)
	fs.SetOutput(discard{})
	opts := options()
	for i := range opts {
		opt := &opts[i]
		short := ""
		if opt.short != 0 {
			short = string(opt.short)
		}
		f := fs.VarPF(&optionValue{a: a, o: o, opt: opt}, opt.long, short, opt.help)
		if opt.arg == "" {
			f.NoOptDefVal = "true"
		}
	}
	if err := fs.Parse(norm); err != nil {
		if isStop(err) {
			return nil, err
		}
		// getoptScan accepted everything pflag can reject; this is a bug guard.
		fmt.Fprintf(a.Stderr, "fi-backup: %v\nFailed parsing options.\n", err)
		return nil, errUsage
	}
	o.Args = fs.Args()
	return o, nil
}

type discard struct{}

func (discard) Write(p []byte) (int, error) { return len(p), nil }

func isDir(p string) bool {
	st, err := os.Stat(p)
	return err == nil && st.IsDir()
}

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

// usage prints the usage block, preceded by "[ERR] msg" when msg is set,
// all on stdout as the old script did.
func (a *app) usage(msg string) {
	var b strings.Builder
	if msg != "" {
		fmt.Fprintf(&b, "\n[ERR] %s\n\n", msg)
	}
	fmt.Fprintf(&b, usageHead, Version, a.Prog)
	for _, opt := range options() {
		if opt.help != "" {
			fmt.Fprintf(&b, "      %-26s %s\n", "--"+opt.long+" "+opt.arg, opt.help)
		}
	}
	b.WriteString(usageTail)
	a.p.Raw(b.String())
}

// usageErr prints the usage with msg and returns the error of bad options.
func (a *app) usageErr(msg string) error {
	a.usage(msg)
	return errUsage
}

const usageHead = `   fi-backup version %s - Go reimplementation of fi-backup.sh by Davide Guerri <davide.guerri@gmail.com>

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
`

const usageTail = `
   Version Requirements:
      qemu_img >= 1.2.0
      qemu     >= 1.2.0
      libvirt  >= 0.9.13

`
