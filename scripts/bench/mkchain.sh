#!/usr/bin/env bash
# mkchain.sh DOMAIN DEPTH COUNTERFILE — add DEPTH external disk-only
# snapshots to every disk of a running domain with virsh, so a following
# `fi-backup -c` has a DEPTH-deep chain to consolidate. The overlays get
# fi-backup's own naming (bimg-YYYYMMDD-HHMMSS) from a counter (fake dates
# in 2001), so they are unique without waiting a second between them and
# the consolidation deletes them as it would its own.
set -eu
dom=$1 depth=$2 ctr=$3
n=$(cat "$ctr" 2>/dev/null || echo 0)
for ((i = 0; i < depth; i++)); do
	n=$((n + 1))
	name=$(printf 'bimg-20010101-%06d' "$n")
	virsh -q -c qemu:///system snapshot-create-as "$dom" "$name" --no-metadata --disk-only --atomic >/dev/null
done
echo "$n" >"$ctr"
