#!/usr/bin/env bash
# tsrun.sh CMD... — run CMD with its stdout (the [DEB]/[VER] lines of
# fi-backup -d) prefixed by milliseconds since just before the exec, then a
# final "END rc=N" line. Bash builtins only, so the stamps cost no process.
t0=${EPOCHREALTIME/./}
{ "$@"; echo "END rc=$?"; } 2>&1 | while IFS= read -r l; do
	t=${EPOCHREALTIME/./}
	printf '%d.%03d %s\n' $(((t - t0) / 1000)) $(((t - t0) % 1000)) "$l"
done
