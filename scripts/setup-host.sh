#!/usr/bin/env bash
# setup-host.sh — turn a fresh Debian 12 machine (root, no systemd) into a
# libvirt + QEMU test host for fi-backup. Idempotent: it installs only what is
# missing, creates only what is missing, starts only what is not running, and
# is quiet when everything is already in place.
set -euo pipefail

say() { printf 'setup-host: %s\n' "$*"; }

if [ "$(id -u)" -ne 0 ]; then
	echo "setup-host: must run as root (libvirtd and the backup tool need it)" >&2
	exit 1
fi

# 1. Packages.
# locales + libvirt-l10n: the tests run fi-backup under a German locale in
# which virsh really prints translated state words (the old script's B17).
# groff-base, man-db, systemd: the tests of cmd/fi-backup render the man page
# and run systemd-analyze verify on the units (nothing starts systemd).
pkgs=(libvirt-dev libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients
	qemu-system-x86 qemu-utils qemu-block-extra pkg-config gcc util-linux
	e2fsprogs busybox-static locales libvirt-l10n groff-base man-db systemd)
missing=()
for p in "${pkgs[@]}"; do
	if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
		missing+=("$p")
	fi
done
if [ "${#missing[@]}" -gt 0 ]; then
	say "installing ${missing[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq >/dev/null
	apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! locale -a 2>/dev/null | grep -qx 'de_DE.utf8'; then
	sed -i 's/^# *de_DE.UTF-8 UTF-8/de_DE.UTF-8 UTF-8/' /etc/locale.gen
	grep -q '^de_DE.UTF-8 UTF-8' /etc/locale.gen || echo 'de_DE.UTF-8 UTF-8' >>/etc/locale.gen
	locale-gen >/dev/null
	say "generated the de_DE.UTF-8 locale"
fi

# 2. Directories, user and qemu.conf that libvirtd needs before its first start.
for d in /var/log/libvirt /var/lib/libvirt/images /var/lib/libvirt/qemu /run/libvirt /var/lock; do
	[ -d "$d" ] || { mkdir -p "$d"; say "created $d"; }
done
getent group kvm >/dev/null || { groupadd -r kvm; say "created group kvm"; }
getent group libvirt-qemu >/dev/null || { groupadd -r libvirt-qemu; say "created group libvirt-qemu"; }
if ! getent passwd libvirt-qemu >/dev/null; then
	useradd -r -g kvm -d /var/lib/libvirt -s /usr/sbin/nologin libvirt-qemu
	say "created user libvirt-qemu"
fi
conf=/etc/libvirt/qemu.conf
want='# fi-backup test host
user = "root"
group = "root"
security_driver = "none"
dynamic_ownership = 0'
if ! grep -q '^# fi-backup test host' "$conf" 2>/dev/null; then
	[ -f "$conf" ] && cp -n "$conf" "$conf.orig-fi-backup"
	printf '%s\n' "$want" >"$conf"
	say "wrote $conf"
	restart=1
fi

# 3. Daemons.
sock=/var/run/libvirt/libvirt-sock
if [ "${restart:-0}" = 1 ] && pgrep -x libvirtd >/dev/null; then
	say "restarting libvirtd for the new qemu.conf"
	pkill -x libvirtd || true
	for _ in $(seq 50); do pgrep -x libvirtd >/dev/null || break; sleep 0.1; done
fi
if ! pgrep -x virtlogd >/dev/null; then
	virtlogd -d
	say "started virtlogd"
fi
if ! pgrep -x libvirtd >/dev/null; then
	rm -f /var/run/libvirtd.pid
	libvirtd -d
	say "started libvirtd"
fi
for _ in $(seq 100); do
	if [ -S "$sock" ] && virsh -q -c qemu:///system uri >/dev/null 2>&1; then
		exit 0
	fi
	sleep 0.2
done
echo "setup-host: libvirtd did not answer on $sock within 20 s; see /var/log/libvirt/libvirtd.log" >&2
exit 1
