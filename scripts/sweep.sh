#!/usr/bin/env bash
# sweep.sh — destroy and undefine leftover fibt-* test domains (from a crashed
# test run) and remove their lock files. Quiet when there is nothing to do.
set -uo pipefail
command -v virsh >/dev/null || exit 0
virsh -q -c qemu:///system uri >/dev/null 2>&1 || exit 0
while IFS= read -r dom; do
	[ -n "$dom" ] || continue
	case "$dom" in fibt-*) ;; *) continue ;; esac
	virsh -q -c qemu:///system destroy "$dom" >/dev/null 2>&1
	# A domain with checkpoint or snapshot metadata (--cbt tests) is only
	# undefined together with it.
	virsh -q -c qemu:///system undefine "$dom" --checkpoints-metadata --snapshots-metadata >/dev/null 2>&1 ||
		virsh -q -c qemu:///system undefine "$dom" >/dev/null 2>&1
	rm -f "/var/lock/$dom.fi-backup.lock" "/var/lock/$dom.fi-backup.job"
	echo "sweep: removed domain $dom"
done < <(virsh -q -c qemu:///system list --all --name 2>/dev/null)
# A definition libvirtd wrote for a transient domain stays on disk after the
# domain is gone; the next libvirtd start would load it as a defined domain.
for f in /etc/libvirt/qemu/fibt-*.xml; do
	[ -e "$f" ] || continue
	rm -f "$f"
	echo "sweep: removed stale definition $f"
done
rm -f /var/lock/fibt-*.fi-backup.job
rm -rf /tmp/fibt-* 2>/dev/null
exit 0
