#!/usr/bin/env bash
# The mount against its alternatives, on one guide-board-sim run.
#
#   benches/mount.sh [--size 256MiB] [--seed 1] [--debug]
#
# Generates one guide-board-sim run of SIZE and measures, in one go:
#   - `cp -a` of the run into an open run of a fresh mount, then `artifactfs seal` (through the
#     mount's control socket), against `cp -a` to a local directory and against
#     `artifactfs ingest` of the same tree into a fresh store;
#   - `tar -cf - . | wc -c` of the sealed run read back through the mount, cold (the mount was
#     just started: empty chunk cache, empty page cache for its files) and warm (again), against
#     the same of the source directory;
#   - listings: `ls -lR` of a run of 20,000 small files (100 directories of 200) through the
#     mount, first after the mount started and again, of the run sealed (`artifactfs ingest`)
#     and of the same tree copied into an open run (`cp -a`, then a remount);
#   - the FUSE floor: the same `cp -a` and `tar` (cold, warm) through bindfs, a FUSE
#     passthrough that stores nothing itself, over a local directory (with kernel_cache and
#     big_writes, multithreaded). It does no chunking, hashing, compression or indexing, so
#     its rows are what the kernel's FUSE round trips alone cost on this machine for this
#     tree. Skipped when bindfs is not installed (apt-get install bindfs).
# and prints, in Markdown, MB, wall seconds and MB/s of each, the CPU seconds (user+sys, from
# /proc/PID/stat) the mount process spent on each step, and its peak RSS (VmHWM from
# /proc/PID/status). MB = 10^6 bytes. The source is read once before timing (warm page cache).
#
# --debug uses the debug binaries (a quick check that the script works; not for figures).
# Work files go to a fresh directory under $BENCH_DIR (default: a mktemp directory under /tmp),
# removed on exit unless KEEP=1; any mount in it is unmounted first. Needs /dev/fuse, fusermount3.
# Dirty pages are written back (sync) before each timed step.
set -euo pipefail

size=256MiB
seed=1
debug=0

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
while [[ $# -gt 0 ]]; do
    case $1 in
    --size) size=${2:?--size needs a value}; shift 2 ;;
    --seed) seed=${2:?--seed needs a value}; shift 2 ;;
    --debug) debug=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "unknown argument $1" >&2; usage >&2; exit 2 ;;
    esac
done

# shellcheck source=benches/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
check_tools
command -v fusermount3 >/dev/null || die "fusermount3 is needed (apt-get install fuse3)"
[[ -e /dev/fuse ]] || die "/dev/fuse is needed"
make_work mount
mnt=$WORK/mnt
# shellcheck disable=SC2064 # expand now
bmnt=$WORK/bindfs-mnt
# shellcheck disable=SC2064 # expand now
trap "fusermount3 -uz '$mnt' 2>/dev/null || true; fusermount -uz '$bmnt' 2>/dev/null || true; cleanup '$WORK'" EXIT
if ((debug)); then
    AFS=$REPO/target/debug/artifactfs
    # shellcheck disable=SC2034 # used by generate (common.sh)
    SIM=$REPO/target/debug/guide-board-sim
    echo "building debug binaries ..." >&2
    (cd "$REPO" && cargo build --quiet -p artifactfs -p guide-board-sim) >&2
else
    build
fi

data=$WORK/data
src=$data/run-0000
mkdir -p "$mnt"
generate "$data" "$seed" 1 "$size"
warm "$src"
bytes=$(du -sb --apparent-size "$src" | cut -f1)
tck=$(getconf CLK_TCK)

# mount_cpu PID: user+sys CPU seconds of PID so far.
mount_cpu() { awk -v t="$tck" '{printf "%.2f", ($14 + $15) / t}' "/proc/$1/stat"; }
# peak_rss PID: VmHWM in MiB.
peak_rss() { awk '/^VmHWM:/ {printf "%.0f", $2 / 1024}' "/proc/$1/status"; }
# start_mount STORE: mounts STORE at $mnt and sets MPID.
start_mount() {
    local out
    out=$("$AFS" --store "$1" mount "$mnt" --seal-after 1h)
    MPID=$(sed -n 's/.*(pid \([0-9]*\)).*/\1/p' <<<"$out")
    [[ -n $MPID ]] || die "cannot tell the mount's pid from: $out"
}
stop_mount() {
    "$AFS" umount "$mnt"
    while kill -0 "$MPID" 2>/dev/null; do sleep 0.1; done
}
# timed NAME CMD...: runs CMD under GNU time; appends "NAME wall user sys maxrss" to $WORK/times.
timed() {
    local name=$1
    shift
    sync
    wait_quiet
    prio "$GNU_TIME" -o "$WORK/t" -f '%e %U %S %M' "$@" >/dev/null
    echo "$name $(cat "$WORK/t")" >>"$WORK/times"
}
rows=()
# row NAME MOUNT_CPU MOUNT_RSS: a table row from the last timing of NAME.
row() {
    local wall
    wall=$(awk -v n="$1" '$1 == n {w = $2} END {print w}' "$WORK/times")
    rows+=("$(awk -v n="$1" -v b="$bytes" -v w="$wall" -v c="$2" -v r="$3" \
        'BEGIN {printf "| %s | %.1f | %.2f | %.1f | %s | %s |", n, b / 1e6, w, (w > 0 ? b / 1e6 / w : 0), c, r}')")
}

# 1. Writing.
timed cp-local cp -a "$src/." "$WORK/local"
row cp-local - -

timed ingest "$AFS" --store "$WORK/store-ingest" ingest "$src" bench/run-0000 --json
row ingest - -

start_mount "$WORK/store-mount"
c0=$(mount_cpu "$MPID")
mkdir -p "$mnt/bench/run-0000"
# shellcheck disable=SC2016 # expanded by the inner shell
timed cp-mount-seal bash -c 'cp -a "$1/." "$2/bench/run-0000/" && "$3" --store "$4" seal bench/run-0000' \
    _ "$src" "$mnt" "$AFS" "$WORK/store-mount"
row cp-mount-seal "$(awk -v a="$c0" -v b="$(mount_cpu "$MPID")" 'BEGIN {printf "%.2f", b - a}')" "$(peak_rss "$MPID")"
[[ $(getfattr --only-values -n user.artifactfs.state "$mnt/bench/run-0000" 2>/dev/null || echo sealed) == sealed ]] ||
    die "the run did not seal"
stop_mount

# 2. Reading back.
# shellcheck disable=SC2016 # expanded by the inner shell
timed tar-source bash -c 'tar -cf - -C "$1" . | wc -c' _ "$src"
row tar-source - -
start_mount "$WORK/store-mount"
for pass in cold warm; do
    c0=$(mount_cpu "$MPID")
    # shellcheck disable=SC2016 # expanded by the inner shell
    timed "tar-mount-$pass" bash -c 'tar -cf - -C "$1" . | wc -c' _ "$mnt/bench/run-0000"
    row "tar-mount-$pass" "$(awk -v a="$c0" -v b="$(mount_cpu "$MPID")" 'BEGIN {printf "%.2f", b - a}')" "$(peak_rss "$MPID")"
done
stop_mount

# 3. Listings of a run of 20,000 files, sealed and open.
many=$WORK/many
python3 - "$many" <<'PY'
import os, sys
for d in range(100):
    p = os.path.join(sys.argv[1], f"d{d:03}")
    os.makedirs(p)
    for f in range(200):
        with open(os.path.join(p, f"f{f:03}.json"), "w") as fh:
            fh.write('{"dir": %d, "file": %d}\n' % (d, f))
PY
nmany=$(find "$many" -type f | wc -l)
"$AFS" --store "$WORK/store-mount" ingest "$many" bench/many --json >/dev/null
start_mount "$WORK/store-mount"
mkdir -p "$mnt/bench/many-open"
cp -a "$many/." "$mnt/bench/many-open/"
stop_mount
start_mount "$WORK/store-mount"
lsrows=()
for run in many many-open; do
    for pass in first again; do
        c0=$(mount_cpu "$MPID")
        # shellcheck disable=SC2016 # expanded by the inner shell
        timed "ls-lR-$run-$pass" bash -c 'ls -lR "$1" | wc -l' _ "$mnt/bench/$run"
        wall=$(awk -v n="ls-lR-$run-$pass" '$1 == n {w = $2} END {print w}' "$WORK/times")
        lsrows+=("| $run ($([[ $run == many ]] && echo sealed || echo open)) | $pass | $nmany | $wall | $(awk -v a="$c0" -v b="$(mount_cpu "$MPID")" 'BEGIN {printf "%.2f", b - a}') |")
    done
done
[[ $(getfattr --only-values -n user.artifactfs.state "$mnt/bench/many-open" 2>/dev/null) == open ]] ||
    die "the open run of the listing test is not open"
stop_mount

# 4. The FUSE floor: a passthrough that does no work of its own.
if command -v bindfs >/dev/null; then
    mkdir -p "$WORK/bindfs-dir" "$bmnt"
    bindfs_mount() {
        bindfs --multithreaded -o kernel_cache,big_writes "$WORK/bindfs-dir" "$bmnt"
        BPID=$(pgrep -n -f "bindfs .*$bmnt")
    }
    bindfs_mount
    c0=$(mount_cpu "$BPID")
    timed cp-passthrough cp -a "$src/." "$bmnt/"
    row cp-passthrough "$(awk -v a="$c0" -v b="$(mount_cpu "$BPID")" 'BEGIN {printf "%.2f", b - a}')" "$(peak_rss "$BPID")"
    fusermount -u "$bmnt"
    bindfs_mount
    for pass in cold warm; do
        c0=$(mount_cpu "$BPID")
        # shellcheck disable=SC2016 # expanded by the inner shell
        timed "tar-passthrough-$pass" bash -c 'tar -cf - -C "$1" . | wc -c' _ "$bmnt"
        row "tar-passthrough-$pass" "$(awk -v a="$c0" -v b="$(mount_cpu "$BPID")" 'BEGIN {printf "%.2f", b - a}')" "$(peak_rss "$BPID")"
    done
    fusermount -u "$bmnt"
else
    echo "bindfs is not installed: no FUSE floor rows (apt-get install bindfs)" >&2
fi

echo "## benches/mount.sh --size $size --seed $seed$( ((debug)) && echo ' --debug (debug binaries: not for figures)')"
echo
print_versions
command -v bindfs >/dev/null && echo "- FUSE floor: $(bindfs --version | head -1) (its rows: bindfs's CPU and RSS in the mount columns)"
echo
echo "| step | MB | wall s | MB/s | mount CPU s | mount peak RSS MiB |"
echo "|---|---|---|---|---|---|"
printf '%s\n' "${rows[@]}"
echo
echo "\`ls -lR\` through the mount (target: under 1 s warm for 20,000 files):"
echo
echo "| run | pass | files | wall s | mount CPU s |"
echo "|---|---|---|---|---|"
printf '%s\n' "${lsrows[@]}"
