#!/usr/bin/env bash
# mk-agent-guest.sh OUTDIR — build a tiny real Linux guest that runs
# qemu-guest-agent, for fi-backup's libvirt integration tests (quiesced
# snapshots, agent shutdown, ...).
#
# Output (in OUTDIR, created if missing):
#   vmlinuz     Debian 12 cloud kernel (linux-image-*-cloud-amd64)
#   initrd.gz   gzip'd newc initramfs: static busybox, qemu-ga + its shared
#               libraries, the virtio modules, and an /init (busybox sh)
#   .cache/     downloaded .debs (kept, so rebuilds need no network)
#   .stamp      hash of this script; when it matches and both files exist, a
#               run exits at once and prints nothing
#
# Everything comes from Debian 12 packages fetched with `apt-get download` and
# unpacked with `dpkg-deb -x`; nothing is installed on the host. The host
# needs apt-get, apt-cache, dpkg-deb, gzip, ldd, chroot (all in a base Debian)
# and, only if the kernel modules are compressed, xz or zstd.
#
# The guest's /init (see write_init below):
#   - mounts proc, sys, devtmpfs (/dev), tmpfs (/run, /tmp);
#   - insmods the virtio modules (and ext4 & co. if they are modules) in
#     dependency order — the kernel package has no modules.dep;
#   - makes /dev/virtio-ports/<name> links (there is no udev);
#   - mounts every ext4 virtio disk /dev/vdX (or partition) on /mnt/vdX, rw;
#   - if the kernel command line has fibt.writer=1, starts a writer that keeps
#     writing/appending and fsync-ing files on /mnt/vda;
#   - runs qemu-ga on /dev/virtio-ports/org.qemu.guest_agent.0 in a respawn
#     loop and prints FIBT-GUEST-READY on the console once it has the port open.
# /sbin/shutdown, poweroff, halt and reboot stop the writer, unmount /mnt/* and
# power off (or reboot) at once, so the agent's guest-shutdown works.
#
# See testdata/agent-guest/domain.xml.tmpl for a matching libvirt domain.
set -euo pipefail
shopt -s inherit_errexit # helpers run in $(...): let errors there stop them too

prog=mk-agent-guest
# Messages go to stderr: several helpers run inside $(...).
say() { printf '%s: %s\n' "$prog" "$*" >&2; }
die() {
	printf '%s: error: %s\n' "$prog" "$*" >&2
	exit 1
}

# Any failure that has no message of its own still says where it happened.
trap 'printf "%s: error: command failed (line %s): %s\n" "$prog" "$LINENO" "$BASH_COMMAND" >&2' ERR

if [ "$#" -ne 1 ] || [ -z "$1" ]; then
	echo "usage: $0 OUTDIR" >&2
	exit 2
fi

# Kernel modules the guest needs; their dependencies are added automatically.
# Names that are built into the kernel are skipped; crc32c_generic is what
# ext4's metadata_csum asks the crypto API for.
want_modules=(virtio_pci virtio_blk virtio_console ext4 crc32c_generic)
# The kernel metapackage; the real linux-image-<version>-cloud-amd64 it depends
# on is what gets downloaded.
kernel_meta=linux-image-cloud-amd64
multiarch=x86_64-linux-gnu

mkdir -p "$1" || die "cannot create $1"
out=$(cd "$1" && pwd)
cache=$out/.cache
stamp_file=$out/.stamp
self=${BASH_SOURCE[0]}
recipe=$(sha256sum <"$self" | cut -d' ' -f1)

# Fast path: everything is already there for this version of the script.
up_to_date() {
	[ -s "$out/vmlinuz" ] && [ -s "$out/initrd.gz" ] && [ -f "$stamp_file" ] &&
		[ "$(cat "$stamp_file")" = "$recipe" ]
}
up_to_date && exit 0

# Serialise concurrent runs on the same OUTDIR (e.g. parallel test packages),
# then look again: another run may have just finished the job.
if command -v flock >/dev/null; then
	exec 9>"$out/.lock"
	flock 9
	up_to_date && exit 0
fi

for t in apt-get apt-cache dpkg-deb gzip ldd chroot sha256sum; do
	command -v "$t" >/dev/null || die "$t not found on the host"
done

debs=$cache/debs
work=$out/.work # scratch tree, rebuilt on every (slow-path) run
mkdir -p "$debs"
rm -rf "$work"
mkdir -p "$work"
trap 'rm -rf "$work"' EXIT

# --- Downloading -------------------------------------------------------------

# apt_update_once: refresh the package lists once per run, when a look-up or a
# download failed (a fresh machine may have no or stale lists). Returns 1 if it
# already ran. A marker file, not a variable: callers run in subshells.
apt_update_once() {
	[ ! -e "$work/apt-updated" ] || return 1
	: >"$work/apt-updated"
	say "running apt-get update"
	apt-get update -qq >/dev/null 2>"$work/apt-update.err" ||
		die "apt-get update failed: $(tail -n 3 "$work/apt-update.err")"
}

# cached_deb PKG: print the cached .deb of PKG, if there is one.
cached_deb() {
	local f
	for f in "$debs/$1"_*.deb; do
		if [ -f "$f" ]; then
			printf '%s\n' "$f"
			return 0
		fi
	done
	return 1
}

# fetch PKG: make sure PKG's .deb is in the cache; print its path.
fetch() {
	local pkg=$1 tmp f
	if f=$(cached_deb "$pkg"); then
		printf '%s\n' "$f"
		return 0
	fi
	say "downloading $pkg"
	tmp=$work/dl.$pkg
	mkdir -p "$tmp"
	# apt-get download writes into the current directory. Download into a
	# scratch directory so that a failed download never leaves a partial
	# file in the cache.
	until (cd "$tmp" && apt-get download -qq "$pkg" >/dev/null 2>"$work/apt.err"); do
		apt_update_once || die "apt-get download $pkg failed: $(grep -v '^W:' "$work/apt.err" | tail -n 3)"
	done
	for f in "$tmp"/*.deb; do
		[ -f "$f" ] || die "apt-get download $pkg produced no .deb"
		dpkg-deb --info "$f" >/dev/null 2>&1 || die "downloaded $f is not a valid .deb"
		mv "$f" "$debs/"
	done
	rm -rf "$tmp"
	cached_deb "$pkg" || die "no $pkg .deb in $debs after download"
}

# kernel_pkg: the real kernel package behind $kernel_meta. A cached one wins,
# so that a rebuild does not silently change kernels when the archive moves on.
kernel_pkg() {
	local f deps
	for f in "$debs"/linux-image-[0-9]*-cloud-amd64_*.deb; do
		if [ -f "$f" ]; then
			f=${f##*/}
			printf '%s\n' "${f%%_*}"
			return 0
		fi
	done
	while :; do
		deps=$(apt-cache depends --important "$kernel_meta" 2>/dev/null |
			sed -n 's/^ *Depends: \(linux-image-[0-9].*-cloud-amd64\)$/\1/p' | head -n 1 || true)
		[ -z "$deps" ] || break
		apt_update_once || die "cannot find the kernel package behind $kernel_meta (apt-cache depends $kernel_meta)"
	done
	printf '%s\n' "$deps"
}

# unpack PKG: extract PKG's cached .deb into $work/pkg/PKG; print that dir.
unpack() {
	local deb dir=$work/pkg/$1
	deb=$(fetch "$1")
	if [ ! -d "$dir" ]; then
		mkdir -p "$dir"
		dpkg-deb -x "$deb" "$dir" || die "dpkg-deb -x $deb failed"
	fi
	printf '%s\n' "$dir"
}

# --- Fetch and unpack --------------------------------------------------------

kpkg=$(kernel_pkg)
kdir=$(unpack "$kpkg")
bbdir=$(unpack busybox-static)
gadir=$(unpack qemu-guest-agent)

# qemu-ga's direct library dependencies come from their Debian packages too;
# libc6 is taken from the host (the loader that ldd runs is the host's, and
# libc and the loader must match). Anything else ldd finds (glib's own deps)
# comes from the host, which is Debian 12 as well.
libdirs=()
ga_deps=$(dpkg-deb -f "$(fetch qemu-guest-agent)" Depends | tr ',' '\n' |
	sed 's/[(|].*//; s/^ *//; s/ *$//' | grep -v '^libc6$' | grep '^lib' || true)
for p in $ga_deps; do
	d=$(unpack "$p")
	for sub in lib/$multiarch usr/lib/$multiarch; do
		[ -d "$d/$sub" ] && libdirs+=("$d/$sub")
	done
done

bb=$bbdir/bin/busybox
[ -x "$bb" ] || die "no bin/busybox in busybox-static"
qga=$gadir/usr/sbin/qemu-ga
[ -x "$qga" ] || die "no usr/sbin/qemu-ga in qemu-guest-agent"

vmlinuz=
for f in "$kdir"/boot/vmlinuz-*; do
	[ -f "$f" ] && vmlinuz=$f && break
done
[ -n "$vmlinuz" ] || die "no boot/vmlinuz-* in $kpkg"
kver=${vmlinuz##*/vmlinuz-}
moddir=$kdir/lib/modules/$kver
[ -d "$moddir" ] || die "no lib/modules/$kver in $kpkg"

# --- Build the initramfs tree ------------------------------------------------

root=$work/root
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc,dev,proc,sys,run,tmp,mnt,root,var} \
	"$root/lib/$multiarch" "$root/lib64" "$root/lib/modules/fibt"
ln -s ../run "$root/var/run"
chmod 1777 "$root/tmp"

# busybox and its applets. shutdown/poweroff/halt/reboot are our own script.
cp "$bb" "$root/bin/busybox"
own_power=" sbin/poweroff sbin/halt sbin/reboot sbin/shutdown "
while read -r applet; do
	case "$own_power" in *" $applet "*) continue ;; esac
	[ -e "$root/$applet" ] || [ -L "$root/$applet" ] || ln -s /bin/busybox "$root/$applet"
done < <("$bb" --list-full)
[ -L "$root/bin/sh" ] || die "busybox-static has no sh applet"

# qemu-ga and the shared libraries it needs, all in /lib/$multiarch (plus the
# loader at its fixed path /lib64/ld-linux-x86-64.so.2).
cp "$qga" "$root/usr/sbin/qemu-ga"
ldpath=$(IFS=:; echo "${libdirs[*]}")
ldd_out=$(LD_LIBRARY_PATH=$ldpath ldd "$qga") || die "ldd $qga failed"
if grep -q 'not found' <<<"$ldd_out"; then
	die "qemu-ga needs libraries that neither the packages nor the host have:
$(grep 'not found' <<<"$ldd_out")"
fi
while read -r a b c _; do
	if [ "$b" = "=>" ] && [ "${c:0:1}" = / ]; then
		cp -L "$c" "$root/lib/$multiarch/$a"
	elif [ "${a:0:1}" = / ]; then # the loader
		mkdir -p "$root${a%/*}"
		cp -L "$a" "$root$a"
	fi
done <<<"$ldd_out"
# Check on the host that qemu-ga starts with exactly this tree's libraries.
chroot "$root" /usr/sbin/qemu-ga -V >/dev/null 2>"$work/qga.err" ||
	die "qemu-ga does not run inside the initramfs tree: $(cat "$work/qga.err")"

# Kernel modules: resolve each wanted module and its `depends=` (read from the
# .ko's .modinfo section) into a load order; built-in ones are skipped.
declare -A modfile=() seen=()
while IFS= read -r f; do
	n=${f##*/}
	n=${n%%.ko*}
	modfile[${n//-/_}]=$f
done < <(find "$moddir/kernel" -name '*.ko' -o -name '*.ko.xz' -o -name '*.ko.zst' -o -name '*.ko.gz')
load_order=()

# add_module NAME: copy NAME (decompressed) and its dependencies into the tree.
add_module() {
	local name=${1//-/_} src dst dep deps
	[ -z "${seen[$name]:-}" ] || return 0
	seen[$name]=1
	src=${modfile[$name]:-}
	if [ -z "$src" ]; then
		grep -q "/${name}.ko\$\|/${name//_/-}.ko\$" "$moddir/modules.builtin" ||
			die "kernel module $name is neither a module nor built into $kpkg"
		return 0 # built in
	fi
	dst=$root/lib/modules/fibt/$name.ko
	case "$src" in
	*.ko) cp "$src" "$dst" ;;
	*.ko.xz) xz -dc "$src" >"$dst" || die "cannot decompress $src (is xz installed?)" ;;
	*.ko.zst) zstd -qdc "$src" >"$dst" || die "cannot decompress $src (is zstd installed?)" ;;
	*.ko.gz) gzip -dc "$src" >"$dst" || die "cannot decompress $src" ;;
	esac
	deps=$(tr '\0' '\n' <"$dst" | sed -n 's/^depends=//p' | head -n 1)
	for dep in ${deps//,/ }; do
		add_module "$dep"
	done
	load_order+=("$name")
}
for m in "${want_modules[@]}"; do
	add_module "$m"
done
printf '%s\n' "${load_order[@]}" >"$root/etc/fibt-modules"

# write_init: the guest's /init (PID 1, busybox sh).
write_init() {
	cat >"$root/init" <<'EOF'
#!/bin/sh
# /init of the fi-backup agent test guest (made by scripts/mk-agent-guest.sh).
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
mount -t tmpfs -o mode=0755 tmpfs /run
mount -t tmpfs -o mode=1777 tmpfs /tmp
log() { echo "fibt-guest: $*"; }

# Modules, in dependency order (there is no modules.dep / modprobe).
for m in $(cat /etc/fibt-modules); do
	insmod "/lib/modules/fibt/$m.ko" || log "insmod $m failed"
done

# /dev/virtio-ports/<name> links (udev's job elsewhere). Port names arrive
# from the host shortly after the device appears: wait up to 5 s for the
# agent's.
mkdir -p /dev/virtio-ports
i=0
while [ "$i" -lt 50 ]; do
	for p in /sys/class/virtio-ports/vport*; do
		[ -r "$p/name" ] || continue
		n=$(cat "$p/name")
		[ -n "$n" ] && [ ! -e "/dev/virtio-ports/$n" ] && ln -s "../${p##*/}" "/dev/virtio-ports/$n"
	done
	[ -e /dev/virtio-ports/org.qemu.guest_agent.0 ] && break
	sleep 0.1
	i=$((i + 1))
done
[ -e /dev/virtio-ports/org.qemu.guest_agent.0 ] || log "no org.qemu.guest_agent.0 port"

# Mount every ext4 virtio disk (or partition) /dev/vdX on /mnt/vdX, rw.
for dev in /dev/vd*; do
	[ -b "$dev" ] || continue
	n=${dev##*/}
	mkdir -p "/mnt/$n"
	if mount -t ext4 -o rw "$dev" "/mnt/$n" 2>/dev/null; then
		log "mounted $dev on /mnt/$n"
	else
		rmdir "/mnt/$n"
	fi
done

# fibt.writer=1: keep writing and fsync-ing files on /mnt/vda, so that an
# unquiesced snapshot catches the file system mid-transaction. It runs in its
# own session so that poweroff can stop it as a whole.
case " $(cat /proc/cmdline) " in
*" fibt.writer=1 "*)
	if grep -q '^/dev/vda /mnt/vda ' /proc/mounts; then
		setsid /sbin/fibt-writer /mnt/vda &
		echo $! >/run/fibt-writer.pid
		log "writer started on /mnt/vda"
	else
		log "fibt.writer=1 but /mnt/vda is not mounted"
	fi
	;;
esac

# The guest agent, restarted whenever it exits.
(
	while :; do
		qemu-ga -m virtio-serial -p /dev/virtio-ports/org.qemu.guest_agent.0 \
			-t /run -f /run/qemu-ga.pid
		log "qemu-ga exited with $?; restarting"
		rm -f /run/qemu-ga.pid
		sleep 1
	done
) &

# Ready once qemu-ga holds the port open (up to 10 s).
i=0
while [ "$i" -lt 100 ]; do
	# (qemu-ga writes its -f pid file only when it daemonizes.)
	pid=$(pidof qemu-ga || true)
	if [ -n "$pid" ] && ls -l "/proc/$pid/fd" 2>/dev/null | grep -q '/dev/vport'; then
		echo FIBT-GUEST-READY
		break
	fi
	sleep 0.1
	i=$((i + 1))
done
[ "$i" -lt 100 ] || log "qemu-ga did not open its port"

# PID 1 must never exit.
while :; do
	sleep 3600 &
	wait $!
done
EOF
	chmod 755 "$root/init"

	cat >"$root/sbin/fibt-writer" <<'EOF'
#!/bin/sh
# fibt-writer DIR: rewrite eight 1 MiB files and append to a log in DIR, with
# fsync, forever.
dir=$1
i=0
while :; do
	dd if=/dev/urandom of="$dir/w.$((i % 8))" bs=64k count=16 conv=fsync 2>/dev/null
	[ $((i % 256)) -ne 0 ] || : >"$dir/append.log"
	dd if=/dev/urandom of="$dir/append.log" bs=4k count=1 oflag=append conv=notrunc,fsync 2>/dev/null
	i=$((i + 1))
done
EOF
	chmod 755 "$root/sbin/fibt-writer"

	cat >"$root/sbin/shutdown" <<'EOF'
#!/bin/sh
# shutdown/poweroff/halt/reboot for the agent test guest. There is no real
# init to signal: stop the writer, sync, unmount /mnt/* and power off (or
# reboot) at once. qemu-ga runs `/sbin/shutdown -P|-H|-r +0 MESSAGE`.
action=poweroff
[ "${0##*/}" = reboot ] && action=reboot
for a in "$@"; do
	[ "$a" = -r ] && action=reboot
done
if [ -f /run/fibt-writer.pid ]; then
	kill -TERM "-$(cat /run/fibt-writer.pid)" 2>/dev/null
	sleep 0.2
fi
sync
for m in /mnt/*; do
	grep -q " $m " /proc/mounts || continue
	umount "$m" 2>/dev/null || mount -o remount,ro "$m" 2>/dev/null
done
sync
echo "fibt-guest: $action" >/dev/console
exec busybox "$action" -f
EOF
	chmod 755 "$root/sbin/shutdown"
	for n in poweroff halt reboot; do
		ln -s shutdown "$root/sbin/$n"
	done
}
write_init

# --- Pack, then publish atomically ---------------------------------------------

(cd "$root" && find . | LC_ALL=C sort | "$bb" cpio -o -H newc 2>/dev/null) |
	gzip -9 -n >"$work/initrd.gz" || die "building the initramfs failed"
[ -s "$work/initrd.gz" ] || die "empty initramfs"
cp "$vmlinuz" "$work/vmlinuz"
mv -f "$work/vmlinuz" "$out/vmlinuz"
mv -f "$work/initrd.gz" "$out/initrd.gz"
printf '%s\n' "$recipe" >"$stamp_file"
say "built $out/vmlinuz ($kver) and $out/initrd.gz ($(du -k "$out/initrd.gz" | cut -f1) KiB; modules: ${load_order[*]})"
