# shellcheck shell=bash
# lib.sh — helpers for scripts/bench.sh (sourced, not run). Every domain the
# benchmark makes is named fibt-bench-* and recorded in $W/domains, so cleanup
# removes exactly those (never the other fibt-* test domains or anyone else's).

URI=qemu:///system
LETTERS=abcdefghijklmnopqrstuvwxyz
vsh() { virsh -q -c "$URI" "$@"; }

# log: progress on stderr with the seconds since the start of the benchmark.
T0=${EPOCHREALTIME/./}
log() {
	local t=${EPOCHREALTIME/./}
	printf '[bench %4ds] %s\n' $(((t - T0) / 1000000)) "$*" >&2
}

# --- numbers -----------------------------------------------------------------

# calc EXPR: floating point arithmetic (awk), e.g. calc "2/3".
calc() { awk "BEGIN { printf \"%.6g\", $1 }"; }

# median/min/max of numbers given as arguments.
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {if (NR==0) exit; print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
minof() { printf '%s\n' "$@" | sort -g | head -n 1; }
maxof() { printf '%s\n' "$@" | sort -g | tail -n 1; }

# ms SECONDS / s SECONDS: human formats.
ms() { awk "BEGIN { v = $1 * 1000; printf (v < 10 ? \"%.1f ms\" : \"%.0f ms\"), v }"; }
sec() { awk "BEGIN { v = $1; printf (v < 10 ? \"%.2f s\" : \"%.1f s\"), v }"; }
# spread_ms/spread_s MIN MAX N: "min–max (n=N)".
spread_ms() { printf '%s–%s (n=%s)' "$(ms "$1" | sed 's/ ms//')" "$(ms "$2")" "$3"; }
spread_s() { printf '%s–%s (n=%s)' "$(sec "$1" | sed 's/ s//')" "$(sec "$2")" "$3"; }

# --- hyperfine -----------------------------------------------------------------

# hf ID [hyperfine args...]: run hyperfine, JSON into $W/json/ID.json, its
# human output appended to $LOG.
hf() {
	local id=$1
	shift
	mkdir -p "$W/json"
	echo "### hyperfine $id: $*" >>"$LOG"
	hyperfine --show-output --export-json "$W/json/$id.json" "$@" >>"$LOG" 2>&1
}

# hfv ID INDEX FIELD: a field (median, min, max, mean, stddev) of the INDEXth
# command of a hyperfine result, in seconds; "n" gives the number of runs.
hfv() {
	local f=$3
	[ "$f" = n ] && f='times | length'
	jq -r ".results[$2].$f" "$W/json/$1.json"
}

# --- table -------------------------------------------------------------------

# row ROW MEASUREMENT MEDIAN SPREAD DERIVED TARGET VERDICT: one table line.
row() {
	local IFS='|'
	printf '| %s |\n' "$(printf '%s|' "$@" | sed 's/|$//; s/|/ | /g')" >>"$TABLE"
}

# --- domains -----------------------------------------------------------------

# dom_create NAME MEMORY_MIB NDISKS [DISKSIZE] [nostart]: a no-OS domain
# (it spins in the firmware, enough for snapshots, block jobs and dumps)
# with NDISKS empty qcow2 disks $W/doms/NAME/NAME-diskI.qcow2 (names unique
# across domains: one backup directory is flat, equal basenames clash, B12).
dom_create() {
	local name=$1 mem=$2 nd=$3 size=${4:-64M} start=${5:-start}
	local dir="$W/doms/$name" disks="" i
	dom_remove "$name" # leftover of a crashed run
	echo "$name" >>"$W/domains"
	mkdir -p "$dir"
	for ((i = 0; i < nd; i++)); do
		qemu-img create -q -f qcow2 "$dir/$name-disk$i.qcow2" "$size"
		disks+="<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='$dir/$name-disk$i.qcow2'/><target dev='vd${LETTERS:i:1}' bus='virtio'/></disk>"
	done
	cat >"$dir/dom.xml" <<XML
<domain type='qemu'><name>$name</name><memory unit='MiB'>$mem</memory><vcpu>1</vcpu>
<os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os><on_crash>destroy</on_crash>
<devices>$disks</devices></domain>
XML
	vsh define "$dir/dom.xml" >/dev/null
	[ "$start" = start ] && vsh start "$name" >/dev/null
	return 0
}

# dom_remove NAME: destroy and undefine a fibt-bench-* domain, remove its lock
# file. Fails when the domain is still defined: its files must then stay, a
# defined domain with missing files makes every -C on the host fail closed.
dom_remove() {
	case $1 in fibt-bench-*) ;; *) return 0 ;; esac
	vsh destroy "$1" >/dev/null 2>&1
	# Checkpoints (virtnbdbackup's) keep a domain from being undefined.
	vsh undefine "$1" --checkpoints-metadata >/dev/null 2>&1 || vsh undefine "$1" >/dev/null 2>&1
	rm -f "/var/lock/$1.fi-backup.lock"
	if vsh domstate "$1" >/dev/null 2>&1; then
		log "cannot undefine $1: its files are kept"
		return 1
	fi
	return 0
}

# other_domains NAME...: the domains defined on the host that are not in the
# list (other people's test domains on a shared host).
other_domains() {
	local d keep
	vsh list --all --name 2>/dev/null | while IFS= read -r d; do
		[ -n "$d" ] || continue
		keep=1
		for n in "$@"; do [ "$d" = "$n" ] && keep=0; done
		[ $keep = 1 ] && echo "$d"
	done
}

# --- -d phase timing -----------------------------------------------------------

# phases FILE: from a tsrun.sh transcript of `fi-backup -d`, print
# "total snapshot copies rest nsnap" in seconds: total wall time, the sum of
# the libvirt snapshot calls (from the [VER] virsh line to "successful"),
# the copies ("Copied ... in Xs": data, fsync, backing reference) and the
# rest (process start, libvirt connection and queries, dependency checks,
# chain walk, cp -u checks, lock, manifest). The disks of a domain are
# copied at once, so "copies" is the longest disk's copy time (a disk's
# lines start with "Getting all backing files"): never more than the wall
# time the copies took, so the rest is never understated.
phases() {
	awk '
	/\[VER\] \/usr\/bin\/virsh -q snapshot-create-as/ { s = $1 }
	/\[VER\] Snapshot for block devices of .* successful/ { snap += $1 - s; n++ }
	/\[DEB\] Getting all backing files for: / { disk++ }
	/\[DEB\] Copied [0-9]+ bytes of .* in [0-9.]+s$/ { t = $NF; sub(/s$/, "", t); c[disk] += t }
	/^[0-9.]+ END rc=/ { total = $1 }
	END {
		for (d in c) if (c[d] > copy) copy = c[d]
		printf "%.4f %.4f %.4f %.4f %d\n", total/1000, snap/1000, copy, total/1000 - snap/1000 - copy, n
	}
	' "$1"
}
