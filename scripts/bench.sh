#!/usr/bin/env bash
# bench.sh — `make bench`: fi-backup's performance against its targets, in one
# markdown table (on stdout, and in bin/performance.md), measured side by side
# in one run on the same files; progress goes to stderr. The README's
# "Performance" section quotes the last run worth recording. Needs root and libvirtd (scripts/setup-host.sh); installs
# hyperfine with apt when missing. Takes about 5 minutes on 2 cores.
#
#   1. copy engine vs cp --sparse=auto vs cat (dense, sparse, chain of overlays)
#   2. peak RSS of fi-backup while copying a 4 GiB image
#   3. end-to-end backup of a running 2-disk and 10-disk domain; -c consolidation
#   4. backup of 1, 5 and 20 running domains (`all`)
#   5. -s state dump: guest pause time, 256 MiB and 1 GiB domains
#
# Environment:
#   BENCH_DIR    parent of the scratch directory (default /var/tmp)
#   BENCH_QUICK=1  small sizes, few runs: a smoke test, not for the record
#   BENCH_ALL=1  row 4 runs `fi-backup all` instead of naming its domains,
#                if the host has no other domain (`all` backs up every
#                domain defined: only on a machine nobody else uses)
#   BENCH_DOC    report file, relative to the repository (default
#                bin/performance.md, beside the binary; empty: none)
# Everything the benchmark creates (fibb-* domains, their lock files, the
# scratch directory) is removed at the end, also on failure or Ctrl-C. The
# raw hyperfine output stays in /tmp/fibb-bench.log.
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
LOG=/tmp/fibb-bench.log
: >"$LOG"

# --- sizes and repetitions -------------------------------------------------------
if [ "$QUICK" = 1 ]; then
	DENSE_MIB=256 SPARSE_GIB=1 SPARSE_STEP_MIB=16 CHAIN_N=8 RSS_GIB=1
	R_DENSE=2 R_COPY=2 R_E2E=3 R_PH=2 R_CONS=2 R_DUMP=2 NS=(1 2 4) RS=(2 2 2)
else
	DENSE_MIB=2048 SPARSE_GIB=4 SPARSE_STEP_MIB=16 CHAIN_N=40 RSS_GIB=4
	R_DENSE=5 R_COPY=5 R_E2E=10 R_PH=5 R_CONS=5 R_DUMP=3 NS=(1 5 20) RS=(5 5 3)
fi
WRITE_MIB=8 # new data per disk before each run of row 4

# --- scratch directory, cleanup --------------------------------------------------
W=$(mktemp -d "${BENCH_DIR:-/var/tmp}/fibb-bench.XXXXXX") || exit 1
: >"$W/domains"
cleanup() {
	local rc=$?
	trap - EXIT INT TERM
	if [ -s "$W/domains" ]; then
		log "cleaning up $(sort -u "$W/domains" | wc -l) fibb-* domains and $W"
		while IFS= read -r d; do dom_remove "$d"; done < <(sort -u "$W/domains")
	fi
	rm -rf /dev/shm/fibb-bench-* "$W"
	exit "$rc"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT
trap 'log "terminated"; exit 143' TERM

# --- prerequisites ---------------------------------------------------------------
bash scripts/setup-host.sh >&2 || exit 1 # stdout is the table's
command -v hyperfine >/dev/null || {
	log "installing hyperfine"
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq hyperfine >/dev/null 2>&1 ||
		{ apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq hyperfine >/dev/null; } || exit 1
}
for t in jq /usr/bin/time; do
	command -v "$t" >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${t##*/}" >/dev/null
done
if [ -z "${MAKELEVEL:-}" ] || [ ! -x bin/fi-backup ]; then # make bench has just built it
	go build -o bin/fi-backup ./cmd/fi-backup || exit 1
fi
FIB=$ROOT/bin/fi-backup
CB=$W/copybench
go build -o "$CB" ./scripts/bench/copybench || exit 1
mkdir -p "$W/img" "$W/out"

# --- machine ---------------------------------------------------------------------
vfs=$(df -T /var/tmp | awk 'NR==2 {print $2" on "$1}')
wfs=$(df -T "$W" | awk 'NR==2 {print $2" on "$1}')
MACHINE=$(
	cat <<EOF
| | |
|---|---|
| date | $(date -u '+%Y-%m-%d %H:%M UTC') |
| CPU | $(nproc) × $(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo) ($(grep -qw hypervisor /proc/cpuinfo && echo "virtual machine" || echo "bare metal")) |
| memory | $(awk '/^MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo) |
| /var/tmp | $vfs$([ "$vfs" != "$wfs" ] && echo "; scratch dir: $wfs") |
| kernel | $(uname -r) |
| libvirt / QEMU | $(virsh -c $URI version 2>/dev/null | awk '/Using library/ {l=$NF} /Running hypervisor/ {q=$NF} END {print "libvirt " l ", QEMU " q}') (domains: TCG, no OS) |
| tools | $(go version | awk '{print $3}'), $(cp --version | head -n1), hyperfine $(hyperfine --version | awk '{print $2}') |
| load average at start | $(cut -d' ' -f1-3 /proc/loadavg) |
EOF
)
log "scratch dir $W ($wfs); raw output in $LOG"

TABLE=$W/table
# verdict COND: MET/NOT MET from an awk condition.
verdict() { awk "BEGIN { exit !($1) }" && echo "**met**" || echo "**NOT met**"; }
mb() { calc "$1 / $2 / 1e6"; } # MB/s from bytes and seconds
alloc() { du -s -B1 "$@" | awk '{s += $1} END {print s}'; }

# ================================================================================
# Row 1: copy engine vs cp vs cat, page cache dropped before every run.
# ================================================================================
# copy_case ID LABEL SRC: SRC is a file, or a directory (the chain: every
# *.qcow2 in it, copied into a directory).
copy_case() {
	local id=$1 label=$2 src=$3 o="$W/out/$1" glob cmd_cat cmd_cp cmd_cps cmd_eng cmd_eng_st p_cp p_cps p_eng
	if [ -d "$src" ]; then
		glob="$src/*.qcow2"
		cmd_cat="cat $glob >/dev/null"
		cmd_cp="cp --sparse=auto $glob $o-cp/"
		cmd_cps="cp --sparse=auto $glob $o-cps/ && sync $o-cps/* $o-cps"
		cmd_eng="$CB $glob $o-eng/"
		cmd_eng_st="$CB $glob $o-st/"
		p_cp="$B/dropcaches.sh --mkdir $o-cp" p_cps="$B/dropcaches.sh --mkdir $o-cps" p_eng="$B/dropcaches.sh --mkdir $o-eng"
	else
		cmd_cat="cat $src >/dev/null"
		cmd_cp="cp --sparse=auto $src $o-cp"
		cmd_cps="cp --sparse=auto $src $o-cps && sync $o-cps"
		cmd_eng="$CB $src $o-eng"
		cmd_eng_st="$CB $src $o-st"
		p_cp="$B/dropcaches.sh $o-cp" p_cps="$B/dropcaches.sh $o-cps" p_eng="$B/dropcaches.sh $o-eng"
	fi
	local runs=$R_COPY
	[ "$id" = dense ] && runs=$R_DENSE
	log "row 1 $label: cat, cp, cp+fsync, engine; $runs interleaved rounds (cold cache)"
	# Interleaved rounds (one run of each command per round, the order
	# rotated) rather than hyperfine's N runs of one command then N of the
	# next: on a shared machine the load drifts within a minute, and blocks
	# of runs would charge the drift to one command.
	local cmds=("cat|$B/dropcaches.sh|$cmd_cat" "cp|$p_cp|$cmd_cp" "cp+fsync|$p_cps|$cmd_cps" "engine|$p_eng|$cmd_eng")
	local r k j args nm pp cc
	for ((r = 0; r < runs; r++)); do
		args=()
		for ((k = 0; k < 4; k++)); do
			j=$(((k + r) % 4))
			IFS='|' read -r nm pp cc <<<"${cmds[$j]}"
			args+=(--prepare "$pp" -n "$nm" "$cc")
		done
		hf "copy-$id-r$r" -r 1 "${args[@]}" || { row 1 "$label" error "" "hyperfine failed, see $LOG" "" ""; return; }
	done
	jq -s '{results: [group_by(.command)[] | {command: .[0].command, times: [.[].times[]]}]
		| sort_by({"cat":0,"cp":1,"cp+fsync":2,"engine":3}[.command])
		| map(. + {median: (.times | sort | if length % 2 == 1 then .[length/2|floor] else (.[length/2-1] + .[length/2]) / 2 end), min: (.times | min), max: (.times | max)})}' \
		<(jq -c '.results[]' "$W/json/copy-$id-r"*.json) >"$W/json/copy-$id.json"
	local bytes sa da_cp da_eng names=(cat cp cp+fsync engine) i t m
	sa=$(alloc "$src")          # allocated bytes of the source(s)
	bytes=$sa                   # the data each tool has to move
	[ -f "$src" ] && [ "$id" = dense ] && bytes=$(stat -c %s "$src")
	da_cp=$(alloc "$o-cp")
	da_eng=$(alloc "$o-eng")
	local tcp tcps teng
	tcp=$(hfv "copy-$id" 1 median) tcps=$(hfv "copy-$id" 2 median) teng=$(hfv "copy-$id" 3 median)
	for i in 0 1 2 3; do
		t=$(hfv "copy-$id" $i median)
		m="$(printf '%.0f' "$(mb "$bytes" "$t")") MB/s"
		case $i in
		0) [ "$id" = sparse ] && m+=" of data (cat reads all $(calc "$(stat -c %s "$src")/1073741824" | xargs printf '%.0f') GiB, holes as zeros)" ;;
		1) m+=" (1.00× cp)" ;;
		2) m+=" ($(printf '%.2f' "$(calc "$tcp / $t")")× cp)" ;;
		esac
		if [ $i -lt 3 ]; then
			row 1 "$label: \`${names[$i]}\`" "$(sec "$t")" "$(spread_s "$(hfv "copy-$id" $i min)" "$(hfv "copy-$id" $i max)" "$(hfv "copy-$id" $i n)")" "$m" "" ""
		fi
	done
	# Where the engine's time goes: one more cold run under strace (wall
	# time inside fsync, which cp does not do).
	local fs=""
	if command -v strace >/dev/null; then
		if [ -d "$src" ]; then "$B/dropcaches.sh" --mkdir "$o-st"; else "$B/dropcaches.sh" "$o-st"; fi
		# shellcheck disable=SC2086
		strace -f -w -c -qq -e trace=fsync,copy_file_range,pread64,pwrite64 -o "$W/strace-copy-$id" $cmd_eng_st >/dev/null 2>&1 &&
			fs=$(awk '$NF == "fsync" {print $2}' "$W/strace-copy-$id")
		rm -rf "$o-st"
	fi
	local ratio ratio_s ratio_min v
	ratio=$(calc "$tcp / $teng") ratio_s=$(calc "$tcps / $teng")
	ratio_min=$(calc "$(hfv "copy-$id" 1 min) / $(hfv "copy-$id" 3 min)")
	m+=" — **$(printf '%.2f' "$ratio")× cp** (best run vs best run: $(printf '%.2f' "$ratio_min")×), $(printf '%.2f' "$ratio_s")× cp+fsync${fs:+; fsync $(sec "$fs") of a run (strace)}; allocated: dst $(calc "$da_eng/1048576" | xargs printf '%.0f') MiB, src $(calc "$sa/1048576" | xargs printf '%.0f') MiB (cp's dst $(calc "$da_cp/1048576" | xargs printf '%.0f') MiB)"
	v=$(verdict "$da_eng <= $sa")
	case $id in
	dense | sparse) v="vs cp: $(verdict "$ratio >= 1.0"); vs cp+fsync: $(verdict "$ratio_s >= 1.0"); dst ≤ src blocks: $v" ;;
	*) v="(no ratio target); dst ≤ src blocks: $v" ;;
	esac
	row 1 "$label: **fi-backup copy engine**" "$(sec "$teng")" "$(spread_s "$(hfv "copy-$id" 3 min)" "$(hfv "copy-$id" 3 max)" "$(hfv "copy-$id" 3 n)")" "$m" "≥ 1.0× cp, dst blocks ≤ src" "$v"
}

row1() {
	local f
	log "row 1: making the images (dense ${DENSE_MIB} MiB, sparse ${SPARSE_GIB} GiB virtual, chain of $CHAIN_N overlays)"
	# Dense: every cluster written with a pattern.
	f=$W/img/dense.qcow2
	qemu-img create -q -f qcow2 "$f" "${DENSE_MIB}M"
	local args=() off
	for ((off = 0; off < DENSE_MIB; off += 512)); do args+=(-c "write -P $((off / 512 % 200 + 1)) ${off}M $((DENSE_MIB - off < 512 ? DENSE_MIB - off : 512))M"); done
	qemu-io "${args[@]}" "$f" >/dev/null
	# Sparse: metadata preallocation lays clusters out at their guest offset,
	# so the file is as long as the disk and the unwritten parts are holes;
	# 1 MiB of data every SPARSE_STEP_MIB.
	f=$W/img/sparse.qcow2
	qemu-img create -q -f qcow2 -o preallocation=metadata "$f" "${SPARSE_GIB}G"
	args=()
	for ((off = 0; off < SPARSE_GIB * 1024; off += SPARSE_STEP_MIB)); do args+=(-c "write -P 90 $((off + 3))M 1M"); done
	qemu-io "${args[@]}" "$f" >/dev/null
	# Chain: a 256 MiB base and CHAIN_N-1 overlays, 2 MiB of new data each.
	mkdir -p "$W/img/chain"
	local prev="" i name
	for ((i = 0; i < CHAIN_N; i++)); do
		name=$(printf 'vm.%03d.qcow2' "$i")
		if [ -z "$prev" ]; then
			qemu-img create -q -f qcow2 "$W/img/chain/$name" 256M
		else
			qemu-img create -q -f qcow2 -F qcow2 -b "$prev" "$W/img/chain/$name"
		fi
		qemu-io -c "write -P $((i % 200 + 1)) $(((i * 2) % 250))M 2M" "$W/img/chain/$name" >/dev/null
		prev=$name
	done
	copy_case dense "dense $(calc "$DENSE_MIB/1024") GiB qcow2" "$W/img/dense.qcow2"
	copy_case sparse "sparse qcow2 (${SPARSE_GIB} GiB file, $(calc "$(alloc "$W/img/sparse.qcow2")/1048576" | xargs printf '%.0f') MiB data)" "$W/img/sparse.qcow2"
	copy_case chain "chain of $CHAIN_N qcow2 (2 MiB each)" "$W/img/chain"
	gobench
	rm -rf "$W/out"/* "$W/img/dense.qcow2" "$W/img/sparse.qcow2" "$W/img/chain"
}

# gobench: internal/copyfile's BenchmarkCopy (256 MiB dense file, page cache
# warm, fsync included), both paths, summarised by benchstat.
gobench() {
	local count=6
	[ "$QUICK" = 1 ] && count=2
	log "row 1: go test -bench BenchmarkCopy -count $count (copy_file_range and read/write paths)"
	mkdir -p "$W/gotmp"
	TMPDIR=$W/gotmp go test -run '^$' -bench BenchmarkCopy -benchtime 2x -count "$count" ./internal/copyfile >"$W/gobench.txt" 2>&1 ||
		{ row 1 "Go BenchmarkCopy" error "" "go test failed, see $LOG" "" ""; cat "$W/gobench.txt" >>"$LOG"; return; }
	cat "$W/gobench.txt" >>"$LOG"
	local bs
	bs=$(command -v benchstat || echo "$(go env GOPATH)/bin/benchstat")
	[ -x "$bs" ] || GOFLAGS="" go install golang.org/x/perf/cmd/benchstat@latest >/dev/null 2>&1
	local sub ns mbs line
	for sub in default readwrite; do
		ns=$(awk -v s="Copy/$sub-" 'index($1, s) {print $3 / 1e9}' "$W/gobench.txt")
		mbs=$(awk -v s="Copy/$sub-" 'index($1, s) {print $5}' "$W/gobench.txt")
		line=""
		[ -x "$bs" ] && line=$("$bs" "$W/gobench.txt" 2>/dev/null | awk -v s="Copy/$sub-" '/B\/s/ {u=1} u && index($1, s) {print $2, $3, $4; exit}')
		# shellcheck disable=SC2086
		row 1 "Go \`BenchmarkCopy/$sub\` (256 MiB dense, warm cache, fsync included)" "$(sec "$(median $ns)")" \
			"$(spread_s "$(minof $ns)" "$(maxof $ns)" "$(wc -w <<<"$ns")")" "$(printf '%.0f' "$(median $mbs)") MB/s$([ -n "$line" ] && echo " (benchstat: $line B/s)")" "" ""
	done
}

# ================================================================================
# Row 3: end-to-end on running domains with tiny disks.
# ================================================================================
# e2e ID LABEL DOMAIN NDISKS: hyperfine of `fi-backup -b DIR DOMAIN` (one
# backup per second: overlay names have one-second resolution), then R_PH
# runs with -d for the phase split, one with strace for the process count.
E2E_2=""
e2e() {
	local id=$1 label=$2 dom=$3 nd=$4 bk="$W/bk-$1"
	mkdir -p "$bk"
	log "row 3 $label: fi-backup -b × $R_E2E runs (+1 warm-up: the first backup copies the base images)"
	hf "e2e-$id" -N -w 1 -r "$R_E2E" --prepare "$B/nextsec.sh" "$FIB -b $bk $dom" ||
		{ row 3 "$label" error "" "hyperfine failed, see $LOG" "" ""; return; }
	local i p tot=() snap=() copy=() rest=()
	for ((i = 0; i < R_PH; i++)); do
		"$B/nextsec.sh"
		"$B/tsrun.sh" "$FIB" -d -b "$bk" "$dom" >"$W/ph-$id-$i.txt"
		read -r -a p < <(phases "$W/ph-$id-$i.txt")
		tot+=("${p[0]}") snap+=("${p[1]}") copy+=("${p[2]}") rest+=("${p[3]}")
	done
	local execs="?"
	if command -v strace >/dev/null; then
		"$B/nextsec.sh"
		strace -f -qq -e trace=execve -e signal=none -o "$W/strace-$id" "$FIB" -b "$bk" "$dom" >/dev/null
		execs=$(($(grep -c 'execve(' "$W/strace-$id") - 1))
	fi
	local depth
	depth=$(ls "$W/doms/$dom/$dom"-disk0.bimg-* | wc -l)
	local t
	t=$(hfv "e2e-$id" 0 median)
	[ "$id" = 2d ] && E2E_2=$t
	local ms_snap ms_copy
	ms_snap=$(median "${snap[@]}") ms_copy=$(median "${copy[@]}")
	local d
	d="phases (median of $R_PH -d runs): libvirt snapshot call $(ms "$ms_snap"), copies $(ms "$ms_copy"), rest of the tool $(ms "$(median "${rest[@]}")"); per disk: snapshot $(ms "$(calc "$ms_snap / $nd")"), copy $(ms "$(calc "$ms_copy / $nd")"); $execs child processes; chain depth at the end $((depth + 1))"
	local target="" v=""
	case $id in
	2d) target="well under 0.15 s" v="$(verdict "$t < 0.15")" ;;
	10d)
		local per
		per=$(calc "($t - $E2E_2) / ($nd - 2)")
		d+="; **$(ms "$per") per extra disk**"
		target="per-disk cost ~constant" v="(see per extra disk)"
		;;
	esac
	row 3 "$label" "$(sec "$t")" "$(spread_s "$(hfv "e2e-$id" 0 min)" "$(hfv "e2e-$id" 0 max)" "$(hfv "e2e-$id" 0 n)")" "$d" "$target" "$v"
	# Row 2's "regardless of size" point: RSS of this small backup.
	if [ "$id" = 2d ]; then
		"$B/nextsec.sh"
		RSS_TINY=$(/usr/bin/time -f '%M' "$FIB" -b "$bk" "$dom" 2>&1 >/dev/null | tail -n1)
	fi
}

# cons LABEL DOMAIN DEPTH: `fi-backup -c` after DEPTH snapshots per run.
cons() {
	local label=$1 dom=$2 depth=$3 id=$4
	log "row 3 $label: fi-backup -c × $R_CONS runs, each after $depth snapshots"
	hf "cons-$id" -N -r "$R_CONS" --prepare "$B/mkchain.sh $dom $depth $W/ctr" "$FIB -c $dom" ||
		{ row 3 "$label" error "" "hyperfine failed, see $LOG" "" ""; return; }
	"$B/mkchain.sh" "$dom" "$depth" "$W/ctr"
	"$B/tsrun.sh" "$FIB" -d -c "$dom" >"$W/ph-cons-$id.txt"
	local list="" cdisks=""
	list=$(awk '/Consolidation method/ {a=$1} /Consolidation of .0. block device/ {printf "%.0f", $1-a; exit}' "$W/ph-cons-$id.txt")
	cdisks=$(awk '/DEB\] Consolidation of .* took/ {t=$NF; sub(/s$/,"",t); s+=t} END {printf "%.0f", s*1000}' "$W/ph-cons-$id.txt")
	local ndom
	ndom=$(vsh list --all --name | grep -c .)
	local t
	t=$(hfv "cons-$id" 0 median)
	row 3 "$label" "$(sec "$t")" "$(spread_s "$(hfv "cons-$id" 0 min)" "$(hfv "cons-$id" 0 max)" "$(hfv "cons-$id" 0 n)")" \
		"one -d run: block jobs (commit, READY, pivot) ${cdisks} ms; reading the other $((ndom - 1)) domains' chains before the jobs ${list} ms" "" ""
}

# startup: what every invocation pays before any work.
startup() {
	log "row 3: process start (-V) and a run that only connects and checks (unknown domain)"
	hf start -N -i -w 3 -r 30 -n version "$FIB -V" -n nodomain "$FIB fibb-no-such-domain" ||
		{ row 3 "process start" error "" "hyperfine failed, see $LOG" "" ""; return; }
	row 3 "\`fi-backup -V\` (process start only)" "$(ms "$(hfv start 0 median)")" "$(spread_ms "$(hfv start 0 min)" "$(hfv start 0 max)" "$(hfv start 0 n)")" \
		"loading libvirt and its $(ldd "$FIB" | wc -l) shared libraries (a Go binary without cgo starts in ~2 ms)" "" ""
	row 3 "\`fi-backup nosuchdom\` (start, connect, dependency checks, lookup)" "$(ms "$(hfv start 1 median)")" "$(spread_ms "$(hfv start 1 min)" "$(hfv start 1 max)" "$(hfv start 1 n)")" \
		"includes one \`qemu-img --version\` process" "" ""
}

row3() {
	startup
	dom_create fibb-e2e2 32 2
	dom_create fibb-e2e10 32 10
	dom_create fibb-cons 32 2
	sleep 2 # let the firmware settle before timing
	e2e 2d "\`fi-backup -b DIR dom\`, running, 2 tiny disks" fibb-e2e2 2
	e2e 10d "\`fi-backup -b DIR dom\`, running, 10 tiny disks" fibb-e2e10 10
	cons "\`fi-backup -c dom\`, 2 disks, 3-deep chain (blockcommit)" fibb-cons 3 c3
	dom_remove fibb-e2e2
	dom_remove fibb-e2e10
	dom_remove fibb-cons
}

# ================================================================================
# Row 2: peak RSS while copying a large image (offline backup of a shut-off
# domain whose disk is a fully allocated image), and of the read/write
# fallback (copy into tmpfs, where copy_file_range cannot go).
# ================================================================================
row2() {
	log "row 2: ${RSS_GIB} GiB fully allocated image, offline backup under /usr/bin/time -v"
	dom_create fibb-rss 32 1 "${RSS_GIB}G" nostart
	local img=$W/doms/fibb-rss/fibb-rss-disk0.qcow2
	rm -f "$img"
	qemu-img create -q -f qcow2 -o preallocation=full "$img" "${RSS_GIB}G"
	mkdir -p "$W/bk-rss"
	local out rss el
	out=$(/usr/bin/time -v "$FIB" -b "$W/bk-rss" fibb-rss 2>&1 >/dev/null)
	rss=$(awk -F': ' '/Maximum resident set size/ {print $2}' <<<"$out")
	el=$(awk -F': ' '/Elapsed \(wall clock\)/ {print $2}' <<<"$out")
	local sz
	sz=$(stat -c %s "$img")
	row 2 "peak RSS, \`fi-backup -b DIR dom\` (shut off) copying a ${RSS_GIB} GiB allocated image" "$(calc "$rss/1024" | xargs printf '%.1f') MiB" "1 run (${el} wall)" \
		"same tool, 2 tiny disks (row 3): $(calc "${RSS_TINY:-0}/1024" | xargs printf '%.1f') MiB" "≤ 64 MiB" "$(verdict "$rss <= 65536")"
	rm -rf "$W/bk-rss"
	local shm
	shm=$(df -B1 --output=avail /dev/shm 2>/dev/null | tail -n1)
	if [ -n "$shm" ] && [ "$shm" -gt $((sz + (2 << 30))) ]; then
		out=$(/usr/bin/time -v "$CB" "$img" /dev/shm/fibb-bench-rss 2>&1 >/dev/null)
		rss=$(awk -F': ' '/Maximum resident set size/ {print $2}' <<<"$out")
		el=$(awk -F': ' '/Elapsed \(wall clock\)/ {print $2}' <<<"$out")
		rm -f /dev/shm/fibb-bench-*
		row 2 "peak RSS, copy engine alone, same image into tmpfs (read/write fallback)" "$(calc "$rss/1024" | xargs printf '%.1f') MiB" "1 run (${el} wall)" "" "≤ 64 MiB" "$(verdict "$rss <= 65536")"
	fi
	dom_remove fibb-rss
	rm -rf "$W/doms/fibb-rss"
}

# ================================================================================
# Row 4: `all` over N running domains, WRITE_MIB MiB of new data per disk
# before every run.
# ================================================================================
row4() {
	local names=() i n k have=0 bk="$W/bk-all" idx=0
	mkdir -p "$bk"
	local base_per="" base_over=""
	for n in "${NS[@]}"; do
		for ((i = have + 1; i <= n; i++)); do
			names+=("$(printf 'fibb-all%02d' "$i")")
			dom_create "${names[-1]}" 32 2
		done
		have=$n
		sleep 1
		if [ "$n" = "${NS[-1]}" ]; then
			# Consolidation reads every other domain's chain first: row 3's
			# measurement again, on a fresh domain among these N.
			cons "\`fi-backup -c dom\` as above, with the $n row-4 domains defined" "${names[-1]}" 3 c3n
		fi
		local others mode args
		others=$(other_domains "${names[@]}")
		if [ "${BENCH_ALL:-0}" = 1 ] && [ -z "$others" ]; then
			mode="\`all\`" args=(all)
		else
			# `all` would also snapshot, copy and lock every other domain on
			# the host, e.g. the fibt-* domains of an integration test run
			# started meanwhile: name ours instead. The per-domain work is
			# the same; `all` only adds three libvirt list calls.
			mode="named (\`all\` with BENCH_ALL=1 on a host without other domains)" args=("${names[*]}")
		fi
		local runs=${RS[$idx]}
		log "row 4 N=$n: fi-backup -b DIR ${args[0]:0:40}… × $runs runs (+1 warm-up), $WRITE_MIB MiB new per disk"
		hf "all-$n" -N -w 1 -r "$runs" --prepare "$B/guestwrite.sh $WRITE_MIB 2 ${names[*]}" "$FIB -b $bk ${args[*]}" ||
			{ row 4 "N=$n" error "" "hyperfine failed, see $LOG" "" ""; idx=$((idx + 1)); continue; }
		"$B/guestwrite.sh" "$WRITE_MIB" 2 "${names[@]}"
		"$B/tsrun.sh" "$FIB" -d -b "$bk" "${args[@]}" >"$W/ph-all-$n.txt"
		local p t per
		read -r -a p < <(phases "$W/ph-all-$n.txt")
		t=$(hfv "all-$n" 0 median)
		per=$(calc "$t / $n")
		[ -z "$base_per" ] && base_per=$per base_over=$(calc "(${p[1]} + ${p[3]}) / $n")
		local target="" v=""
		if [ "$n" = "${NS[-1]}" ]; then
			target="linear in N; copies, not per-domain overhead, dominate"
			local over
			over=$(calc "(${p[1]} + ${p[3]}) / $n")
			v="time per domain $(printf '%.2f' "$(calc "$per / $base_per")")× N=${NS[0]}'s; non-copy cost per domain (snapshot + tool) $(printf '%.2f' "$(calc "$over / $base_over")")× N=${NS[0]}'s: $(verdict "$over <= 1.25 * $base_over") (≤ 1.25×); tool's own time < copies: $(verdict "${p[3]} < ${p[2]}")"
		fi
		row 4 "backup of N=$n running domains (2 disks, $WRITE_MIB MiB new each), $mode" "$(sec "$t")" \
			"$(spread_s "$(hfv "all-$n" 0 min)" "$(hfv "all-$n" 0 max)" "$(hfv "all-$n" 0 n)")" \
			"**$(ms "$per") per domain**; one -d run: snapshots $(ms "${p[1]}") ($(ms "$(calc "${p[1]} / $n")")/dom), copies $(ms "${p[2]}"), rest of the tool $(ms "${p[3]}") ($(ms "$(calc "${p[3]} / $n")")/dom)" \
			"$target" "$v"
		idx=$((idx + 1))
	done
	for n in "${names[@]}"; do dom_remove "$n"; done
}

# ================================================================================
# Row 5: -s state dump, guest pause time.
# ================================================================================
row5() {
	dom_create fibb-dump256 256 1
	dom_create fibb-dump1g 1024 1
	mkdir -p "$W/dump"
	sleep 1
	"$B/nextsec.sh"
	local out
	out=$("$FIB" -v -s "$W/dump" fibb-dump256 2>&1)
	if grep -qiE 'not available|refus' <<<"$out" || ! grep -qE 'paused for [0-9.]+s' <<<"$out"; then
		log "row 5: -s not available in this build"
		row 5 "\`fi-backup -s DIR dom\` guest pause, 256 MiB / 1 GiB" "n/a (-s not available)" "" "$(grep -m1 -E '^\[ERR\]' <<<"$out" | cut -c1-100)" "≤ 0.5 s (256 MiB)" "n/a"
		return
	fi
	local dom mem pauses walls i t0 p
	for dom in fibb-dump256 fibb-dump1g; do
		mem=256
		[ "$dom" = fibb-dump1g ] && mem=1024
		log "row 5: -s on $mem MiB × $R_DUMP runs"
		pauses=() walls=()
		for ((i = 0; i < R_DUMP; i++)); do
			rm -f "$W/dump"/*
			"$B/nextsec.sh"
			t0=${EPOCHREALTIME/./}
			out=$("$FIB" -v -s "$W/dump" "$dom" 2>&1)
			walls+=("$(calc "(${EPOCHREALTIME/./} - $t0) / 1e6")")
			p=$(grep -oE 'paused for [0-9.]+s' <<<"$out" | tail -n1 | grep -oE '[0-9.]+')
			[ -n "$p" ] && pauses+=("$p")
		done
		if [ ${#pauses[@]} -eq 0 ]; then
			row 5 "\`fi-backup -s\` guest pause, $mem MiB" "error" "" "$(grep -m1 -E '^\[ERR\]' <<<"$out" | cut -c1-100)" "" ""
			continue
		fi
		local pm target="" v=""
		pm=$(median "${pauses[@]}")
		[ $mem = 256 ] && target="≤ 0.5 s" v=$(verdict "$pm <= 0.5")
		row 5 "\`fi-backup -s DIR dom\` guest pause, $mem MiB no-OS domain" "$(sec "$pm")" "$(spread_s "$(minof "${pauses[@]}")" "$(maxof "${pauses[@]}")" ${#pauses[@]})" \
			"whole run $(sec "$(median "${walls[@]}")"); dump file $(du -h "$W/dump"/* 2>/dev/null | awk '{print $1}' | head -n1)" "$target" "$v"
	done
	dom_remove fibb-dump256
	dom_remove fibb-dump1g
}

# --- run -------------------------------------------------------------------------
RSS_TINY=""
row1
row3
row2
row4
row5

# --- report ------------------------------------------------------------------------
MACHINE+=$'\n'"| load average at end | $(cut -d' ' -f1-3 /proc/loadavg) |"
elapsed=$(((${EPOCHREALTIME/./} - T0) / 1000000))
report=$(
	cat <<EOF
| row | measurement | median | spread (min–max, runs) | derived | target | verdict |
|---|---|---|---|---|---|---|
$(sort -s -t'|' -k2,2n "$TABLE")

Machine:

$MACHINE

Reproduce: \`make bench\` (or \`bash scripts/bench.sh\`), as root; this run took ${elapsed} s$([ "$QUICK" = 1 ] && echo " (BENCH_QUICK=1: smoke-test sizes, not for the record)").
EOF
)
printf '%s\n' "$report"
if [ -n "$DOC" ]; then
	mkdir -p "$(dirname "$DOC")"
	printf '# fi-backup performance\n\n%s\n' "$report" >"$DOC"
	log "report written to $DOC"
fi
