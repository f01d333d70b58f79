#!/usr/bin/env bash
# bench.sh — `make bench`: fi-backup against its performance targets (issue 15)
# and against its peers, side by side in one run on the same host, as one
# markdown table with a PASS/FAIL per target (stdout, and bin/performance.md;
# the README's "Performance" section quotes it). Progress goes to stderr. Needs
# root and libvirtd (scripts/setup-host.sh); installs virtnbdbackup with apt
# when it is missing. About 5–10 minutes on 2 cores.
#
#   A  live full backup of a running domain, 4 GiB-virtual qcow2 holding 1 GiB,
#      cold cache: fi-backup, the old fi-backup.sh, cp -p, cp -p && sync,
#      virtnbdbackup -l full (alternated rounds); peak RSS of each
#   B  incremental: a second fi-backup run vs virtnbdbackup -l inc after the
#      same 64 MiB of guest writes
#   C  durable copy of a dense 1 GiB image, cold cache: the copy engine vs
#      cp -p && sync, without and with the SHA-256 of the manifests
#   D  a live 2-disk backup of tiny images vs the floor (virsh
#      snapshot-create-as --disk-only --atomic --no-metadata, cp -u, sync),
#      median of alternated runs; the tool's own time
#   E  -C over 5 and 20 running domains: time per domain
#
# Environment:
#   FI_BACKUP_OLD  the old script (default ../shared/oracle/fi-backup.sh; its
#                  row is skipped when neither exists)
#   BENCH_DIR      parent of the scratch directory (default /var/tmp)
#   BENCH_QUICK=1  fewer runs and domains: a smoke test, not for the record
#   BENCH_DOC      report file (default bin/performance.md; empty: none)
#   BENCH_GROUPS   the groups to run (default "AB C D E"); a subset is for
#                  working on one target, not for the record
# Every domain the benchmark makes is named fibt-bench-* and removed at the
# end with the scratch directory, also on failure or Ctrl-C. Command output
# goes to /tmp/fibt-bench.log.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
B=$ROOT/scripts/bench
export PATH=/usr/local/go/bin:$PATH
# shellcheck source=bench/lib.sh
. "$B/lib.sh"

if [ "$(id -u)" -ne 0 ]; then
	echo "bench: must run as root (libvirtd domains, drop_caches)" >&2
	exit 1
fi
QUICK=${BENCH_QUICK:-0}
DOC=${BENCH_DOC-bin/performance.md}
LOG=/tmp/fibt-bench.log
: >"$LOG"
if [ "$QUICK" = 1 ]; then
	R_BIG=1 R_INC=1 R_COPY=2 R_FLOOR=5 R_PH=2 R_C=1 NS=(2 4) DATA_MIB=256
else
	R_BIG=3 R_INC=3 R_COPY=5 R_FLOOR=11 R_PH=5 R_C=3 NS=(5 20) DATA_MIB=1024
fi
INC_MIB=64

W=$(mktemp -d "${BENCH_DIR:-/var/tmp}/fibt-bench.XXXXXX") || exit 1
: >"$W/domains"
cleanup() {
	local rc=$?
	trap - EXIT INT TERM
	if [ -s "$W/domains" ]; then
		log "cleaning up $(sort -u "$W/domains" | wc -l) fibt-bench-* domains and $W"
		while IFS= read -r d; do
			dom_remove "$d" || keep=1
		done < <(sort -u "$W/domains")
	fi
	if [ -z "${keep:-}" ]; then rm -rf "$W"; else log "$W kept: a domain could not be removed"; fi
	exit "$rc"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT
trap 'log "terminated"; exit 143' TERM

# --- prerequisites ---------------------------------------------------------------
bash scripts/setup-host.sh >&2 || exit 1 # stdout is the table's
apt_install() {
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >>"$LOG" 2>&1 ||
		{ apt-get update -qq >>"$LOG" 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >>"$LOG" 2>&1; }
}
command -v jq >/dev/null || apt_install jq
[ -x /usr/bin/time ] || apt_install time
command -v virtnbdbackup >/dev/null || { log "installing virtnbdbackup"; apt_install virtnbdbackup; }
NBD=$(command -v virtnbdbackup || true)
OLD=${FI_BACKUP_OLD:-$ROOT/../shared/oracle/fi-backup.sh}
[ -f "$OLD" ] || OLD=""
if [ -z "${MAKELEVEL:-}" ] || [ ! -x bin/fi-backup ]; then # make bench has just built it
	go build -o bin/fi-backup ./cmd/fi-backup || exit 1
fi
FIB=$ROOT/bin/fi-backup
CB=$W/copybench
go build -o "$CB" ./scripts/bench/copybench || exit 1

TABLE=$W/table
: >"$TABLE"
# row GROUP MEASUREMENT RESULT DETAIL TARGET VERDICT
row() { printf '| %s | %s | %s | %s | %s | %s |\n' "$@" >>"$TABLE"; }
pass() { awk "BEGIN { exit !($1) }" && echo "**PASS**" || echo "**FAIL**"; }
alloc() { du -s -B1 "$@" | awk '{s += $1} END {print s}'; } # allocated bytes
r2() { printf '%.2f' "$1"; }

# timed FILE CMD...: run CMD (output to the log) under /usr/bin/time; append
# "seconds peak-RSS-KiB rc" to FILE. The wall time is the shell's own clock
# (µs), /usr/bin/time gives the RSS.
timed() {
	local f=$1 t0 t1 rc
	shift
	echo "### $*" >>"$LOG"
	t0=${EPOCHREALTIME/./}
	/usr/bin/time -f '%M' -o "$W/rss" "$@" >>"$LOG" 2>&1
	rc=$?
	t1=${EPOCHREALTIME/./}
	echo "$(calc "($t1 - $t0) / 1e6") $(tail -n1 "$W/rss") $rc" >>"$f"
	[ $rc -eq 0 ] || log "FAILED (rc=$rc): $*"
	return $rc
}
col() { awk -v c="$2" '{print $c}' "$1"; }          # col FILE N
med() { median $(col "$1" 1); }                     # median seconds
spread() { printf '%s–%s s, n=%s' "$(r2 "$(minof $(col "$1" 1))")" "$(r2 "$(maxof $(col "$1" 1))")" "$(wc -l <"$1")"; }
maxrss() { calc "$(maxof $(col "$1" 2)) / 1024"; }  # MiB
failed() { awk '$3 != 0 {n++} END {exit !n}' "$1"; }
dropcaches() { sync; echo 3 >/proc/sys/vm/drop_caches; }

# --- machine ---------------------------------------------------------------------
MACHINE=$(
	cat <<EOF
| | |
|---|---|
| date | $(date -u '+%Y-%m-%d %H:%M UTC') |
| CPU | $(nproc) × $(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo) ($(grep -qw hypervisor /proc/cpuinfo && echo "virtual machine" || echo "bare metal")) |
| memory | $(awk '/^MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo) |
| scratch disk | $(df -T "$W" | awk 'NR==2 {print $2" on "$1}') |
| kernel | $(uname -r) |
| libvirt / QEMU | $(virsh -c $URI version 2>/dev/null | awk '/Using library/ {l=$NF} /Running hypervisor/ {q=$NF} END {print "libvirt " l ", QEMU " q}') (domains: TCG, no OS) |
| tools | $(go version | awk '{print $3}'), $(cp --version | head -n1)$([ -n "$NBD" ] && echo ", virtnbdbackup $(virtnbdbackup -V 2>/dev/null | tail -n1)") |
| load average at start | $(cut -d' ' -f1-3 /proc/loadavg) |
EOF
)
log "scratch dir $W; command output in $LOG"

# big_domain NAME: a running domain whose one disk is a 4 GiB-virtual qcow2
# holding DATA_MIB MiB of data.
big_domain() {
	dom_create "$1" 64 1 4G nostart
	qemu-io -c "write -P 77 0 ${DATA_MIB}M" "$W/doms/$1/$1-disk0.qcow2" >/dev/null
	vsh start "$1" >/dev/null
}

# ================================================================================
# A, B: live full and incremental backups of the big domain.
# ================================================================================
# nbd_reset: drop virtnbdbackup's checkpoints and their bitmaps (a new full
# backup needs a domain without them).
nbd_reset() {
	local c
	for c in $(vsh checkpoint-list $NBDDOM --name 2>/dev/null); do
		vsh checkpoint-delete $NBDDOM "$c" >>"$LOG" 2>&1 || vsh checkpoint-delete $NBDDOM "$c" --metadata >>"$LOG" 2>&1
	done
}
BIGDOM=fibt-bench-big
NBDDOM=fibt-bench-nbd
groupAB() {
	log "A: two running domains with a 4 GiB-virtual qcow2 holding $DATA_MIB MiB"
	big_domain $BIGDOM
	[ -n "$NBD" ] && big_domain $NBDDOM
	local img=$W/doms/$BIGDOM/$BIGDOM-disk0.qcow2 r k j cands=(ours cp cpsync)
	[ -n "$OLD" ] && cands+=(old)
	[ -n "$NBD" ] && cands+=(nbd)
	local n=${#cands[@]}
	for ((r = 0; r < R_BIG; r++)); do
		for ((k = 0; k < n; k++)); do
			j=${cands[$(((k + r) % n))]}
			log "A round $((r + 1))/$R_BIG: $j"
			case $j in
			ours | old)
				# Untimed: fold the previous run's overlay back, so each
				# run copies the same 1 GiB chain into an empty directory.
				"$FIB" -c $BIGDOM >>"$LOG" 2>&1
				rm -rf "$W/bk-$j" && mkdir -p "$W/bk-$j"
				"$B/nextsec.sh"
				dropcaches
				if [ $j = ours ]; then
					timed "$W/A-ours" "$FIB" -b "$W/bk-ours" $BIGDOM
				else
					timed "$W/A-old" bash "$OLD" -b "$W/bk-old" $BIGDOM
				fi
				;;
			cp | cpsync)
				"$FIB" -c $BIGDOM >>"$LOG" 2>&1
				rm -f "$W/cp.qcow2"
				dropcaches
				if [ $j = cp ]; then
					timed "$W/A-cp" cp -p "$img" "$W/cp.qcow2"
				else
					timed "$W/A-cpsync" sh -c 'cp -p "$1" "$2" && sync' - "$img" "$W/cp.qcow2"
				fi
				;;
			nbd)
				rm -rf "$W/nbd-full"
				nbd_reset
				dropcaches
				timed "$W/A-nbd" "$NBD" -d $NBDDOM -l full -o "$W/nbd-full"
				;;
			esac
		done
	done
	rm -f "$W/cp.qcow2"
	local cps t
	cps=$(med "$W/A-cpsync")
	t=$(med "$W/A-ours")
	row A "**fi-backup** \`-b DIR dom\`, live full backup, cold cache" "$(r2 "$t") s" \
		"$(spread "$W/A-ours"); $(r2 "$(calc "$t / $cps")")× \`cp -p && sync\`; peak RSS $(r2 "$(maxrss "$W/A-ours")") MiB" \
		"—" "$(failed "$W/A-ours" && echo "**FAIL** (error)" || echo "—")"
	row A "peak RSS of fi-backup backing up the 4 GiB image" "$(r2 "$(maxrss "$W/A-ours")") MiB" "max of $(wc -l <"$W/A-ours") runs (/usr/bin/time)" \
		"≤ 32 MiB" "$(pass "$(maxrss "$W/A-ours") <= 32")"
	if [ -n "$OLD" ]; then
		t=$(med "$W/A-old")
		row A "old \`fi-backup.sh -b DIR dom\` (no fsync)" "$(r2 "$t") s" "$(spread "$W/A-old"); $(r2 "$(calc "$(med "$W/A-ours") / $t")")× for fi-backup$(failed "$W/A-old" && echo "; **some runs failed**")" "—" "—"
	else
		row A "old \`fi-backup.sh\`" "skipped" "neither FI_BACKUP_OLD nor ../shared/oracle/fi-backup.sh exists" "—" "—"
	fi
	row A "\`cp -p\` of the image (page cache only)" "$(r2 "$(med "$W/A-cp")") s" "$(spread "$W/A-cp")" "—" "—"
	row A "\`cp -p && sync\`" "$(r2 "$cps") s" "$(spread "$W/A-cpsync")" "—" "—"
	if [ -n "$NBD" ]; then
		t=$(med "$W/A-nbd")
		row A "virtnbdbackup \`-l full\`" "$(r2 "$t") s" "$(spread "$W/A-nbd"); peak RSS $(r2 "$(maxrss "$W/A-nbd")") MiB; fi-backup takes $(r2 "$(calc "$(med "$W/A-ours") / $t")")×$(failed "$W/A-nbd" && echo "; **some runs failed**")" "—" "—"
	else
		row A "virtnbdbackup" "skipped" "not installable here" "—" "—"
	fi

	# B: incremental after the same guest writes.
	log "B: incremental backups after $INC_MIB MiB of guest writes"
	"$FIB" -c $BIGDOM >>"$LOG" 2>&1
	rm -rf "$W/bk-inc" && mkdir -p "$W/bk-inc"
	"$B/nextsec.sh"
	"$FIB" -b "$W/bk-inc" $BIGDOM >>"$LOG" 2>&1 # the full one, untimed
	if [ -n "$NBD" ]; then
		rm -rf "$W/nbd-inc"
		nbd_reset
		"$NBD" -d $NBDDOM -l full -o "$W/nbd-inc" >>"$LOG" 2>&1
	fi
	for ((r = 0; r < R_INC; r++)); do
		"$B/guestwrite.sh" $INC_MIB 1 $BIGDOM
		dropcaches
		timed "$W/B-ours" "$FIB" -b "$W/bk-inc" $BIGDOM
		if [ -n "$NBD" ]; then
			"$B/guestwrite.sh" $INC_MIB 1 $NBDDOM
			dropcaches
			timed "$W/B-nbd" "$NBD" -d $NBDDOM -l inc -o "$W/nbd-inc"
		fi
	done
	t=$(med "$W/B-ours")
	if [ -n "$NBD" ]; then
		local tn
		tn=$(med "$W/B-nbd")
		row B "**fi-backup** second run after $INC_MIB MiB of guest writes" "$(r2 "$t") s" "$(spread "$W/B-ours"); $(r2 "$(calc "$t / $tn")")× virtnbdbackup \`-l inc\`" \
			"≤ virtnbdbackup \`-l inc\`" "$(failed "$W/B-ours" && echo "**FAIL** (error)" || pass "$t <= $tn")"
		row B "virtnbdbackup \`-l inc\` after the same writes" "$(r2 "$tn") s" "$(spread "$W/B-nbd"); peak RSS $(r2 "$(maxrss "$W/B-nbd")") MiB$(failed "$W/B-nbd" && echo "; **some runs failed**")" "—" "—"
	else
		row B "**fi-backup** second run after $INC_MIB MiB of guest writes" "$(r2 "$t") s" "$(spread "$W/B-ours"); no virtnbdbackup to compare" "≤ virtnbdbackup \`-l inc\`" "n/a"
	fi
	# B with --cbt: the same writes, only the changed clusters copied, no
	# overlay; the host's files must not grow run after run.
	log "B: --cbt incremental backups after $INC_MIB MiB of guest writes"
	"$FIB" -c $BIGDOM >>"$LOG" 2>&1
	rm -rf "$W/bk-cbt" && mkdir -p "$W/bk-cbt"
	"$B/nextsec.sh"
	"$FIB" --cbt -b "$W/bk-cbt" $BIGDOM >>"$LOG" 2>&1 # the full one, untimed
	local host0 host1
	host0=$(alloc "$W/doms/$BIGDOM")
	for ((r = 0; r < R_INC; r++)); do
		"$B/guestwrite.sh" $INC_MIB 1 $BIGDOM
		dropcaches
		timed "$W/B-cbt" "$FIB" --cbt -b "$W/bk-cbt" $BIGDOM
	done
	host1=$(alloc "$W/doms/$BIGDOM")
	t=$(med "$W/B-cbt")
	if [ -n "$NBD" ]; then
		row B "**fi-backup \`--cbt\`** incremental run after the same $INC_MIB MiB of writes" "$(r2 "$t") s" "$(spread "$W/B-cbt"); $(r2 "$(calc "$t / $(med "$W/B-nbd")")")× virtnbdbackup \`-l inc\`" \
			"≤ 0.2× virtnbdbackup \`-l inc\`" "$(failed "$W/B-cbt" && echo "**FAIL** (error)" || pass "$t <= 0.2 * $(med "$W/B-nbd")")"
	else
		row B "**fi-backup \`--cbt\`** incremental run after the same $INC_MIB MiB of writes" "$(r2 "$t") s" "$(spread "$W/B-cbt"); no virtnbdbackup to compare" "≤ 0.2× virtnbdbackup \`-l inc\`" "n/a"
	fi
	row B "host files of the domain across the \`--cbt\` runs" "$(r2 "$(calc "($host1 - $host0) / 1048576")") MiB" "allocated bytes of its image directory after the full run and after $R_INC increments" \
		"no growth (≤ 1 MiB)" "$(pass "$host1 - $host0 <= 1048576")"
	rm -rf "$W/bk-ours" "$W/bk-old" "$W/bk-inc" "$W/bk-cbt" "$W/nbd-full" "$W/nbd-inc"
	dom_remove $BIGDOM && rm -rf "$W/doms/$BIGDOM"
	dom_remove $NBDDOM && rm -rf "$W/doms/$NBDDOM"
}

# ================================================================================
# C: durable copy of a dense 1 GiB image.
# ================================================================================
groupC() {
	log "C: dense $DATA_MIB MiB image: cp -p && sync vs the copy engine, $R_COPY alternated rounds"
	local src=$W/dense.qcow2 r k j cands=(cpsync engine hash)
	qemu-img create -q -f qcow2 "$src" "${DATA_MIB}M"
	qemu-io -c "write -P 91 0 ${DATA_MIB}M" "$src" >/dev/null
	for ((r = 0; r < R_COPY; r++)); do
		for ((k = 0; k < 3; k++)); do
			j=${cands[$(((k + r) % 3))]}
			rm -f "$W/dst.qcow2"
			dropcaches
			case $j in
			cpsync) timed "$W/C-cpsync" sh -c 'cp -p "$1" "$2" && sync' - "$src" "$W/dst.qcow2" ;;
			engine) timed "$W/C-engine" "$CB" -p "$src" "$W/dst.qcow2" ;;
			hash) timed "$W/C-hash" "$CB" -p -hash "$src" "$W/dst.qcow2" ;;
			esac
		done
	done
	local cps te th
	cps=$(med "$W/C-cpsync") te=$(med "$W/C-engine") th=$(med "$W/C-hash")
	row C "\`cp -p && sync\`, dense $DATA_MIB MiB qcow2, cold cache" "$(r2 "$cps") s" "$(spread "$W/C-cpsync")" "—" "—"
	row C "**copy engine** (temp file, writeback while copying, fsync, rename)" "$(r2 "$te") s" "$(spread "$W/C-engine"); **$(r2 "$(calc "$te / $cps")")×** \`cp -p && sync\`; peak RSS $(r2 "$(maxrss "$W/C-engine")") MiB" \
		"≤ 0.8× \`cp -p && sync\`" "$(pass "$te <= 0.8 * $cps")"
	row C "**copy engine with SHA-256** (the manifests' checksum)" "$(r2 "$th") s" "$(spread "$W/C-hash"); **$(r2 "$(calc "$th / $cps")")×** \`cp -p && sync\`" \
		"≤ 1.0× \`cp -p && sync\`" "$(pass "$th <= $cps")"
	rm -f "$src" "$W/dst.qcow2"
}

# ================================================================================
# D: orchestration at libvirt's floor, 2 tiny disks.
# ================================================================================
TINY=fibt-bench-tiny
groupD() {
	log "D: $TINY (2 tiny disks): floor vs fi-backup, $R_FLOOR alternated rounds"
	dom_create $TINY 32 2
	sleep 1
	mkdir -p "$W/bk-floor" "$W/bk-tiny"
	# Warm-up: the first backup of each copies the base images.
	"$B/nextsec.sh"
	"$FIB" -b "$W/bk-tiny" $TINY >>"$LOG" 2>&1
	local ctr=0 r k j
	for ((r = 0; r < R_FLOOR; r++)); do
		for ((k = 0; k < 2; k++)); do
			j=$(((k + r) % 2))
			if [ $j = 0 ]; then
				ctr=$((ctr + 1))
				# The floor: libvirt's snapshot call (through virsh), cp -u
				# of the files that just became read-only, sync. The list
				# of files is made before, untimed.
				local files=()
				mapfile -t files < <(vsh domblklist $TINY --details | awk '$2 == "disk" {print $4}')
				local chain=()
				for f in "${files[@]}"; do
					while IFS= read -r c; do chain+=("$c"); done < <(qemu-img info -U --backing-chain --output=json "$f" | jq -r '.[].filename')
				done
				timed "$W/D-floor" sh -c 'virsh -q -c qemu:///system snapshot-create-as "$1" "$2" --disk-only --atomic --no-metadata >/dev/null && shift 3 && cp -u "$@" && sync' - \
					$TINY "$(printf 'bimg-20010101-%06d' $ctr)" "$W/bk-floor" "${chain[@]}" "$W/bk-floor/"
			else
				"$B/nextsec.sh"
				timed "$W/D-ours" "$FIB" -b "$W/bk-tiny" $TINY
			fi
		done
	done
	local tf to
	tf=$(med "$W/D-floor") to=$(med "$W/D-ours")
	row D "floor: \`virsh snapshot-create-as --disk-only --atomic --no-metadata\` + \`cp -u\` + \`sync\`, 2 tiny disks" "$(r2 "$tf") s" "$(spread "$W/D-floor")" "—" "—"
	row D "**fi-backup** \`-b DIR dom\`, same domain, alternated with the floor" "$(r2 "$to") s" "$(spread "$W/D-ours"); **$(r2 "$(calc "$to / $tf")")× the floor** (median of $(wc -l <"$W/D-ours"))" \
		"≤ 1.1× the floor" "$(pass "$to <= 1.1 * $tf")"
	# The tool's own time: wall time minus process start (-V), libvirt's
	# snapshot call and the copies, from -d transcripts.
	local i st=() p own=() snap=() cop=()
	for ((i = 0; i < 20; i++)); do
		local t0=${EPOCHREALTIME/./}
		"$FIB" -V >/dev/null
		st+=("$(calc "(${EPOCHREALTIME/./} - $t0) / 1e6")")
	done
	local start
	start=$(median "${st[@]}")
	for ((i = 0; i < R_PH; i++)); do
		"$B/nextsec.sh"
		"$B/tsrun.sh" "$FIB" -d -b "$W/bk-tiny" $TINY >"$W/ph-$i.txt"
		read -r -a p < <(phases "$W/ph-$i.txt")
		snap+=("${p[1]}") cop+=("${p[2]}")
		own+=("$(calc "${p[3]} - $start")")
	done
	local o
	o=$(median "${own[@]}")
	row D "tool's own time: wall − process start (\`-V\`, $(ms "$start")) − snapshot call ($(ms "$(median "${snap[@]}")")) − copies ($(ms "$(median "${cop[@]}")"))" "$(ms "$o")" \
		"median of $R_PH \`-d\` runs ($(ms "$(minof "${own[@]}")")–$(ms "$(maxof "${own[@]}")")); still includes libvirt's connect, lookup and XML calls" \
		"≤ 30 ms" "$(pass "$o <= 0.030")"
	dom_remove $TINY && rm -rf "$W/doms/$TINY"
	rm -rf "$W/bk-floor" "$W/bk-tiny"
}

# ================================================================================
# E: -C over N domains; --parallel over the larger N.
# ================================================================================
groupE() {
	local names=() have=0 n i r per=()
	for n in "${NS[@]}"; do
		for ((i = have + 1; i <= n; i++)); do
			names+=("$(printf 'fibt-bench-c%02d' "$i")")
			dom_create "${names[-1]}" 32 2
		done
		have=$n
		sleep 1
		rm -rf "$W/bk-C" && mkdir -p "$W/bk-C"
		"$B/nextsec.sh"
		"$FIB" -C -b "$W/bk-C" "${names[*]}" >>"$LOG" 2>&1 # warm-up: copies the bases
		log "E: -C over $n domains × $R_C runs"
		for ((r = 0; r < R_C; r++)); do
			"$B/guestwrite.sh" 8 2 "${names[@]}"
			timed "$W/E-$n" "$FIB" -C -b "$W/bk-C" "${names[*]}"
		done
		per+=("$(calc "$(med "$W/E-$n") / $n")")
		row E "\`fi-backup -C -b DIR\` over N=$n running domains (2 disks, 8 MiB new each)" "$(r2 "$(med "$W/E-$n")") s" \
			"$(spread "$W/E-$n"); $(ms "${per[-1]}") per domain$(failed "$W/E-$n" && echo "; **some runs failed**")" "—" "—"
	done
	local ratio
	ratio=$(calc "${per[1]} / ${per[0]}")
	row E "time per domain, N=${NS[1]} vs N=${NS[0]}" "$(r2 "$ratio")×" "the other domains' chains are read once per run" "linear: ≤ 1.25×" \
		"$( (failed "$W/E-${NS[0]}" || failed "$W/E-${NS[1]}") && echo "**FAIL** (errors)" || pass "$ratio <= 1.25")"
	# --parallel: the same N domains, -C with 1 and 4 turns at once,
	# alternated, while the guests keep writing (a 16 MiB write per disk of
	# every domain runs beside each backup). No target: on 2 cores under TCG
	# the guests' writes and the block jobs compete for the same CPUs.
	local p bg
	for ((r = 0; r < R_C; r++)); do
		for p in 1 4; do
			"$B/guestwrite.sh" 8 2 "${names[@]}"
			"$B/guestwrite.sh" 16 2 "${names[@]}" >/dev/null 2>&1 &
			bg=$!
			timed "$W/E-par$p" "$FIB" -C --parallel="$p" -b "$W/bk-C" "${names[*]}"
			wait "$bg"
		done
	done
	for p in 1 4; do
		row E "\`fi-backup -C --parallel=$p -b DIR\` over N=${NS[1]} domains, guests writing meanwhile" "$(r2 "$(med "$W/E-par$p")") s" \
			"$(spread "$W/E-par$p")$( [ "$p" = 4 ] && echo "; $(r2 "$(calc "$(med "$W/E-par4") / $(med "$W/E-par1")")")× --parallel=1")$(failed "$W/E-par$p" && echo "; **some runs failed**")" "—" "—"
	done
	for n in "${names[@]}"; do dom_remove "$n"; done
	rm -rf "$W/bk-C"
}

for g in ${BENCH_GROUPS:-AB C D E}; do
	case $g in
	AB | C | D | E) "group$g" ;;
	*) log "unknown group '$g' in BENCH_GROUPS (AB C D E)"; exit 2 ;;
	esac
done

# --- report ------------------------------------------------------------------------
MACHINE+=$'\n'"| load average at end | $(cut -d' ' -f1-3 /proc/loadavg) |"
elapsed=$(((${EPOCHREALTIME/./} - T0) / 1000000))
report=$(
	cat <<EOF
| | measurement | result | detail | target | verdict |
|---|---|---|---|---|---|
$(cat "$TABLE")

Machine:

$MACHINE

\`make bench\` (\`bash scripts/bench.sh\`) as root; this run took ${elapsed} s$([ "$QUICK" = 1 ] && echo " (BENCH_QUICK=1: smoke-test sizes, not for the record)").
EOF
)
printf '%s\n' "$report"
if [ -n "$DOC" ]; then
	mkdir -p "$(dirname "$DOC")"
	printf '# fi-backup performance\n\n%s\n' "$report" >"$DOC"
	log "report written to $DOC"
fi
