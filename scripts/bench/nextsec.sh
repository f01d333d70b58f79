#!/usr/bin/env bash
# nextsec.sh — sleep until just after the next wall-clock second. fi-backup
# names overlays bimg-YYYYMMDD-HHMMSS, so two backups of one domain must not
# start in the same second; hyperfine runs this as --prepare (not timed).
now=${EPOCHREALTIME/./}
us=$((now % 1000000))
left=$((1000000 - us + 15000))
sleep "$((left / 1000000)).$(printf '%06d' $((left % 1000000)))"
