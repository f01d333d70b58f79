#!/usr/bin/env bash
# guestwrite.sh MIB NDISKS DOMAIN... — write MIB MiB of fresh data into each
# of the first NDISKS virtio disks of each running no-OS domain, through
# QEMU's HMP qemu-io, as a guest would. Used as hyperfine --prepare so every
# backup run has new data to copy. Waits for the next second at the end.
set -u
mib=$1 nd=$2; shift 2
pat=$(( (${EPOCHREALTIME/./} / 1000) % 200 + 16 ))
for dom in "$@"; do
	for ((i = 0; i < nd; i++)); do
		out=$(virsh -q -c qemu:///system qemu-monitor-command "$dom" --hmp \
			"qemu-io -d /machine/peripheral/virtio-disk$i/virtio-backend \"write -P $pat 0 ${mib}M\"" 2>&1)
		case $out in *rror*) echo "guestwrite: $dom disk $i: $out" >&2; exit 1 ;; esac
	done
done
exec "$(dirname "$0")/nextsec.sh"
