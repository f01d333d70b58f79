#!/usr/bin/env bash
# demo.sh — fi-backup's main job on a throwaway domain: define a running
# no-OS domain with two qcow2 disks (one path with a space), back it up twice
# into a temporary directory with -v, show the backup chain, clean up.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-host.sh
[ -x bin/fi-backup ] || go build -o bin/fi-backup ./cmd/fi-backup
dom=fibt-demo
work=$(mktemp -d /tmp/fibt-demo.XXXXXX)
cleanup() {
	virsh -q destroy "$dom" >/dev/null 2>&1 || true
	virsh -q undefine "$dom" >/dev/null 2>&1 || true
	rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$work/vm disks" "$work/backup"
qemu-img create -q -f qcow2 "$work/vm disks/system.qcow2" 256M
qemu-img create -q -f qcow2 "$work/vm disks/data disk.qcow2" 256M
cat >"$work/dom.xml" <<XML
<domain type='qemu'>
  <name>$dom</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='$work/vm disks/system.qcow2'/><target dev='vda' bus='virtio'/></disk>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='$work/vm disks/data disk.qcow2'/><target dev='vdb' bus='virtio'/></disk>
  </devices>
</domain>
XML
virsh -q define "$work/dom.xml" >/dev/null
virsh -q start "$dom" >/dev/null
write() { virsh -q qemu-monitor-command "$dom" --hmp "qemu-io -d /machine/peripheral/virtio-disk$1/virtio-backend \"write -P $2 $3 4M\"" >/dev/null; }

echo "== writing 4 MiB into each disk, then: fi-backup -v -b $work/backup $dom"
write 0 0x11 0; write 1 0x22 0
./bin/fi-backup -v -b "$work/backup" "$dom"
sleep 1.1 # overlay names have one-second resolution
echo
echo "== writing more, then the second backup"
write 0 0x33 4M; write 1 0x44 4M
./bin/fi-backup -v -b "$work/backup" "$dom"
echo
echo "== host disks (the domain now runs on the newest overlays):"
ls -1 "$work/vm disks"
echo
echo "== backup directory:"
ls -l "$work/backup"
echo
newest=$(ls -1 "$work/backup"/system.bimg-* | tail -n 1)
echo "== qemu-img info --backing-chain '$newest'"
qemu-img info --backing-chain "$newest" | grep -E '^(image|backing file|file format|virtual size)'
echo
echo "== demo done; cleaning up $dom and $work"
