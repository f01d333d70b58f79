package cli

import (
	"errors"
	"syscall"

	"golang.org/x/sys/unix"
)

// Exit codes. 1, 2 and 3 keep the old script's meanings; 130 and 143 are
// what a shell shows for a process stopped by SIGINT and SIGTERM. New codes
// may come for new situations: scripts should treat any non-zero code as a
// failure.
const (
	ExitOK          = 0
	ExitFailure     = 1   // bad or incompatible options, -h, a domain failed, output lost
	ExitNoDomain    = 2   // no domain given, or domains given together with -r
	ExitDependency  = 3   // libvirt/qemu-img missing, unreachable or too old
	ExitInterrupted = 130 // SIGINT, after cleaning up
	ExitTerminated  = 143 // SIGTERM, after cleaning up
)

// What a run's outcome means; the message has been printed already.
var (
	errUsage      = errors.New("bad or incompatible options")
	errHelp       = errors.New("usage shown")
	errDone       = errors.New("nothing more to do") // -V: the version is printed
	errNoDomain   = errors.New("no domain given, or domains given with -r")
	errDependency = errors.New("dependency check failed")
	errOutputLost = errors.New("output lost")
	errReport     = errors.New("report not written")
)

// signalError is a run stopped by a signal.
type signalError struct{ sig syscall.Signal }

func (e signalError) Error() string { return "interrupted by " + unix.SignalName(e.sig) }

// isStop reports whether err ends option processing (with its own code).
func isStop(err error) bool {
	return errors.Is(err, errUsage) || errors.Is(err, errHelp) || errors.Is(err, errDone)
}

// exitCode is the one place where a run's outcome becomes the exit code.
// An interruption wins over everything; then the dependency check, then a
// missing domain; any other failure is 1.
func exitCode(err error) int {
	var se signalError
	switch {
	case err == nil, errors.Is(err, errDone):
		return ExitOK
	case errors.As(err, &se):
		switch se.sig {
		case syscall.SIGINT:
			return ExitInterrupted
		case syscall.SIGTERM:
			return ExitTerminated
		}
		return 128 + int(se.sig)
	case errors.Is(err, errDependency):
		return ExitDependency
	case errors.Is(err, errNoDomain):
		return ExitNoDomain
	}
	return ExitFailure
}
