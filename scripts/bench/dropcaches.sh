#!/usr/bin/env bash
# dropcaches.sh [--mkdir DIR] [PATH...] — hyperfine --prepare for the copy
# rows: remove the previous run's destination(s), flush dirty data, drop the
# page cache (so every run reads its source from the disk, as a backup of a
# large image does). Writeback of the previous run happens here, untimed.
set -u
mk=
if [ "${1:-}" = --mkdir ]; then mk=$2; shift 2; fi
rm -rf -- "$@" ${mk:+"$mk"}
[ -n "$mk" ] && mkdir -p -- "$mk"
sync
echo 3 >/proc/sys/vm/drop_caches
