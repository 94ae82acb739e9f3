#!/usr/bin/env bash
# artifactfs side by side with restic, borg and casync, and with the machine's limits, on the same runs.
#
#   benches/peers/run.sh [--preset small|large] [--runs 8] [--seed 1] [--out DIR] [--size SIZE]
#
# Presets: small = guide-board-sim runs of 150MiB each, large = runs of 1536MiB each; --size
# overrides the preset's run size (e.g. 16MiB for a quick check of the script).
# DIR defaults to benches/peers/results/PRESET.
# Run i of `guide-board-sim generate --seed SEED --runs RUNS --size SIZE` is written (alone, with
# --first-run i), then each tool stores it into its own repository, one after the other:
#   artifactfs-mount   `cp -a` into an open run of one long-lived `artifactfs mount`, then `artifactfs seal`
#   artifactfs-ingest  `artifactfs ingest` (store defaults)
#   restic             `restic backup` into one repository (restic always encrypts; RESTIC_PASSWORD)
#   borg               `borg create --compression zstd,3` into one repository, `borg init --encryption none`
#   casync             `casync make --store=STORE --compression=zstd` into one shared chunk store
#   cp-a, b3sum, zstd-1, zstd-3   the machine's limits on the same bytes: `cp -a` to a local directory,
#                      `b3sum` of every file, `zstd -1 -T1` / `zstd -3 -T1` of every file's bytes in a stream
# Each command runs under GNU time (wall, user+sys CPU, peak RSS); for the mount, the mount process's
# CPU (/proc/PID/stat, before and after) is added to that of cp and seal, and its VmHWM is the peak RSS.
# Every source run is read once before each tool stores it (warm page cache for the source).
# After the last run: the bytes each repository takes (`du -sb`; for artifactfs without the
# store's fixed 8 MiB `reserve`, room kept for deletions on a full disk, ADR 0023), then, cold (page cache dropped with
# /proc/sys/vm/drop_caches before each), the restore of the last run (artifactfs export, restic
# restore, borg extract, casync extract, each checked with `diff -r` against the source) and
# `tar -cf - . | wc -c` of the last run read through each one's FUSE mount (artifactfs mount,
# restic mount, borg mount, casync mount of the last run's index). tar writes to a pipe, not to
# /dev/null: GNU tar does not read file contents when its archive is /dev/null.
# Writes DIR/results.md (tables) and DIR/results.json, and prints the Markdown to standard output.
# MB = 10^6 bytes, MiB = 2^20 bytes.
#
# On a shared machine: before each timed command the script waits up to BENCH_QUIET_WAIT seconds
# (default 5) for the other processes to go quiet, records how many cores they kept busy during it,
# and records `uptime` before and after; BENCH_NICE=-10 (as root) raises the measured commands'
# priority. Work files go to a fresh directory under $BENCH_DIR (default: a mktemp directory under
# /tmp), removed on exit unless KEEP=1; repositories are deleted as soon as they are measured.
# Needs about 2 x SIZE plus the five repositories of free space there. Installs restic, borgbackup,
# casync, b3sum and zstd with apt-get when run as root and they are missing; builds the release
# binaries (a no-op when they are fresh).
set -euo pipefail

preset=small
runs=8
seed=1
out=
size_override=

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
while [[ $# -gt 0 ]]; do
    case $1 in
    --preset) preset=${2:?--preset needs a value}; shift 2 ;;
    --runs) runs=${2:?--runs needs a value}; shift 2 ;;
    --seed) seed=${2:?--seed needs a value}; shift 2 ;;
    --out) out=${2:?--out needs a directory}; shift 2 ;;
    --size) size_override=${2:?--size needs a value}; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) echo "unknown argument $1" >&2; usage >&2; exit 2 ;;
    esac
done
case $preset in
small) size=150MiB ;;
large) size=1536MiB ;;
*) echo "--preset must be small or large" >&2; exit 2 ;;
esac
size=${size_override:-$size}
[[ $runs =~ ^[1-9][0-9]*$ ]] || { echo "--runs must be a positive integer" >&2; exit 2; }

# shellcheck source=benches/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
export BENCH_QUIET_WAIT=${BENCH_QUIET_WAIT:-5}
out=$(realpath -m -- "${out:-$REPO/benches/peers/results/$preset}")

log() { echo "[$(date -u +%H:%M:%S)] $*" >&2; }

# Tools: install what is missing (root only), then insist.
check_tools
need=()
for pair in restic:restic borg:borgbackup casync:casync b3sum:b3sum zstd:zstd fusermount3:fuse3 \
    fusermount:fuse; do
    command -v "${pair%%:*}" >/dev/null || need+=("${pair#*:}")
done
if ((${#need[@]})); then
    [[ $(id -u) == 0 ]] || die "missing tools; install them: apt-get install -y ${need[*]}"
    log "installing ${need[*]} ..."
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >&2
fi
for t in restic borg casync b3sum zstd fusermount3 fusermount diff tar; do
    command -v "$t" >/dev/null || die "$t is needed"
done
[[ -e /dev/fuse ]] || die "/dev/fuse is needed"
/usr/bin/python3 -c 'import pyfuse3' 2>/dev/null || /usr/bin/python3 -c 'import llfuse' 2>/dev/null ||
    die "borg mount needs python3-pyfuse3 (apt-get install python3-pyfuse3)"

make_work peers
MOUNTS=()
on_exit() {
    local m
    for m in "${MOUNTS[@]}"; do fusermount3 -uz "$m" 2>/dev/null || true; done
    cleanup "$WORK"
}
trap on_exit EXIT
log "building release binaries (no-op when fresh) ..."
(cd "$REPO" && cargo build --release --quiet -p artifactfs -p guide-board-sim) >&2

export RESTIC_PASSWORD=peers-bench RESTIC_CACHE_DIR=$WORK/restic-cache
export BORG_PASSPHRASE=peers-bench BORG_BASE_DIR=$WORK/borg-home
export BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK=yes BORG_RELOCATED_REPO_ACCESS_IS_OK=yes

data=$WORK/data
res=$WORK/results
A_MOUNT=$WORK/artifactfs-mount
A_INGEST=$WORK/artifactfs-ingest
R_RESTIC=$WORK/restic
R_BORG=$WORK/borg
R_CASYNC=$WORK/casync
mkdir -p "$data" "$res" "$R_CASYNC/store"
tck=$(getconf CLK_TCK)
uptime_before=$(uptime)
log "work directory $WORK ($(df -h --output=avail "$WORK" | tail -1 | tr -d ' ') free); $uptime_before"

# proc_cpu PID: user+sys CPU ticks of PID so far.
proc_cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# peak_rss_kib PID: VmHWM in KiB.
peak_rss_kib() { awk '/^VmHWM:/ {print $2}' "/proc/$1/status"; }
# wait_for PATH PID: waits (60 s at most) until PATH exists, or dies if PID is gone.
wait_for() {
    local i
    for ((i = 0; i < 600; i++)); do
        [[ -e $1 ]] && return 0
        kill -0 "$2" 2>/dev/null || die "the mount process $2 exited before $1 appeared"
        sleep 0.1
    done
    die "$1 did not appear within 60 s"
}
# wait_gone PID: waits until PID exited.
wait_gone() { while kill -0 "$1" 2>/dev/null; do sleep 0.1; done; }
drop_caches() {
    sync
    echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || { echo warm >"$res/cache_state"; return 0; }
}
echo cold >"$res/cache_state"

# timed FILE KEY CMD...: runs CMD under GNU time and appends to FILE the line
# "KEY wall user sys maxrss_kib busy0 total0 busy1 total1" (the last four: /proc/stat ticks).
timed() {
    local file=$1 key=$2 b0 t0 b1 t1
    shift 2
    wait_quiet
    read -r b0 t0 < <(cpu_ticks)
    if ! prio "$GNU_TIME" -o "$WORK/time" -f '%e %U %S %M' "$@" >/dev/null 2>"$WORK/stderr"; then
        tail -20 "$WORK/stderr" >&2
        die "$key failed: $*"
    fi
    read -r b1 t1 < <(cpu_ticks)
    echo "$key $(tail -1 "$WORK/time") $b0 $t0 $b1 $t1" >>"$file"
}
# tree_bytes DIR: the sum of the sizes of the regular files under DIR.
tree_bytes() { find "$1" -type f -printf '%s\n' | awk '{s += $1} END {printf "%d", s}'; }

# 1. Ingest: each run into each tool's repository, in sequence.
"$AFS" --store "$A_INGEST" init >/dev/null
"$AFS" --store "$A_MOUNT" init >/dev/null
restic --repo "$R_RESTIC" init -q >/dev/null
borg init --encryption none "$R_BORG" >&2
mkdir -p "$WORK/mnt-afs"
MOUNTS+=("$WORK/mnt-afs")
mount_out=$("$AFS" --store "$A_MOUNT" mount "$WORK/mnt-afs" --seal-after 1h)
MPID=$(sed -n 's/.*(pid \([0-9]*\)).*/\1/p' <<<"$mount_out")
[[ -n $MPID ]] || die "cannot tell the mount's pid from: $mount_out"

for ((i = 0; i < runs; i++)); do
    name=$(printf 'run-%04d' "$i")
    src=$data/$name
    log "$name: generating ($size) ..."
    "$SIM" generate --out "$data" --seed "$seed" --runs 1 --first-run "$i" --size "$size" >/dev/null
    sync
    bytes=$(tree_bytes "$src")
    files=$(find "$src" -type f | wc -l)
    echo "$i $bytes $files" >>"$res/runs"

    log "$name: artifactfs-mount ($((bytes / 1000000)) MB, $files files) ..."
    warm "$src"
    c0=$(proc_cpu "$MPID")
    # shellcheck disable=SC2016 # expanded by the inner shell
    timed "$res/ingest" "artifactfs-mount $i" bash -c \
        'mkdir "$2/bench" 2>/dev/null || true; mkdir "$2/bench/$5" && cp -a "$1/." "$2/bench/$5/" &&
         "$3" --store "$4" seal "bench/$5"' _ "$src" "$WORK/mnt-afs" "$AFS" "$A_MOUNT" "$name"
    echo "$i $(($(proc_cpu "$MPID") - c0)) $(peak_rss_kib "$MPID")" >>"$res/mount_proc"

    log "$name: artifactfs-ingest ..."
    warm "$src"
    timed "$res/ingest" "artifactfs-ingest $i" "$AFS" --store "$A_INGEST" ingest "$src" "bench/$name"

    log "$name: restic ..."
    warm "$src"
    (cd "$data" && timed "$res/ingest" "restic $i" restic --repo "$R_RESTIC" backup -q --host bench \
        --tag "$name" "$name")

    log "$name: borg ..."
    warm "$src"
    (cd "$src" && timed "$res/ingest" "borg $i" borg create --compression zstd,3 "$R_BORG::$name" .)

    log "$name: casync ..."
    warm "$src"
    timed "$res/ingest" "casync $i" casync make --store="$R_CASYNC/store" --compression=zstd \
        "$R_CASYNC/$name.caidx" "$src"

    log "$name: limits (cp -a, b3sum, zstd) ..."
    warm "$src"
    timed "$res/ingest" "cp-a $i" cp -a "$src" "$WORK/cp-copy"
    rm -rf "$WORK/cp-copy"
    warm "$src"
    # shellcheck disable=SC2016 # expanded by the inner shell
    timed "$res/ingest" "b3sum $i" bash -c 'find "$1" -type f -print0 | xargs -0 b3sum' _ "$src"
    for level in 1 3; do
        warm "$src"
        # shellcheck disable=SC2016 # expanded by the inner shell
        timed "$res/ingest" "zstd-$level $i" bash -c \
            'find "$1" -type f -print0 | xargs -0 cat | zstd "-$2" -T1 -c | wc -c' _ "$src" "$level"
    done
    if ((i + 1 < runs)); then rm -rf "$src"; fi
done
last=$(printf 'run-%04d' $((runs - 1)))
src=$data/$last
bytes=$(tree_bytes "$src")

"$AFS" umount "$WORK/mnt-afs"
wait_gone "$MPID"
{
    echo "artifactfs-mount $(du -sb --exclude=reserve "$A_MOUNT" | cut -f1)"
    echo "artifactfs-ingest $(du -sb --exclude=reserve "$A_INGEST" | cut -f1)"
    echo "restic $(du -sb "$R_RESTIC" | cut -f1)"
    echo "borg $(du -sb "$R_BORG" | cut -f1)"
    echo "casync $(du -sb "$R_CASYNC" | cut -f1)"
} >"$res/stored"
rm -rf "$A_MOUNT"

# 2. Restore the last run, cold, and check it; 3. read it through the tool's mount, cold.
# restore TOOL DEST CMD...: times CMD (which writes the last run into DEST, or DEST/$last for restic).
restore() {
    local tool=$1 dest=$2 tree
    shift 2
    log "$tool: restoring $last ..."
    drop_caches
    timed "$res/restore" "$tool" "$@"
    tree=$dest
    [[ $tool == restic ]] && tree=$dest/$last
    if diff -r "$src" "$tree" >"$WORK/diff" 2>&1; then
        echo "$tool ok" >>"$res/verified"
    else
        head -5 "$WORK/diff" >&2
        echo "$tool differs" >>"$res/verified"
    fi
    rm -rf "$dest"
}
# mount_read TOOL DIR PID: times a cold tar of DIR, served by the mount process PID.
mount_read() {
    local tool=$1 dir=$2 pid=$3 c0
    log "$tool: reading $last through the mount ..."
    drop_caches
    c0=$(proc_cpu "$pid")
    # shellcheck disable=SC2016 # expanded by the inner shell
    timed "$res/mount_read" "$tool" bash -c 'tar -cf - -C "$1" . | wc -c >"$2"' _ "$dir" "$WORK/tar_bytes"
    echo "$tool $(cat "$WORK/tar_bytes") $(($(proc_cpu "$pid") - c0)) $(peak_rss_kib "$pid")" >>"$res/mount_proc_read"
}
# stop_fuse DIR PID: unmounts DIR and waits for PID.
stop_fuse() {
    fusermount3 -u "$1" 2>/dev/null || fusermount -u "$1"
    wait_gone "$2"
}
mnt=$WORK/mnt
mkdir -p "$mnt"
MOUNTS+=("$mnt")

restore artifactfs-ingest "$WORK/restore" "$AFS" --store "$A_INGEST" export "bench/$last" "$WORK/restore"
mount_out=$("$AFS" --store "$A_INGEST" mount "$mnt" --seal-after 1h)
pid=$(sed -n 's/.*(pid \([0-9]*\)).*/\1/p' <<<"$mount_out")
[[ -n $pid ]] || die "cannot tell the mount's pid from: $mount_out"
mount_read artifactfs-ingest "$mnt/bench/$last" "$pid"
"$AFS" umount "$mnt"
wait_gone "$pid"
rm -rf "$A_INGEST"

mkdir -p "$WORK/restore"
restore restic "$WORK/restore" restic --repo "$R_RESTIC" restore latest --target "$WORK/restore"
restic --repo "$R_RESTIC" mount "$mnt" >"$WORK/restic-mount.log" 2>&1 &
pid=$!
wait_for "$mnt/snapshots/latest/$last/manifest.txt" "$pid"
mount_read restic "$mnt/snapshots/latest/$last" "$pid"
stop_fuse "$mnt" "$pid"
rm -rf "$R_RESTIC" "$RESTIC_CACHE_DIR"

mkdir -p "$WORK/restore"
(cd "$WORK/restore" && restore borg "$WORK/restore" borg extract "$R_BORG::$last")
borg mount -f "$R_BORG::$last" "$mnt" >"$WORK/borg-mount.log" 2>&1 &
pid=$!
wait_for "$mnt/manifest.txt" "$pid"
mount_read borg "$mnt" "$pid"
stop_fuse "$mnt" "$pid"
rm -rf "$R_BORG" "$BORG_BASE_DIR"

restore casync "$WORK/restore" casync extract --store="$R_CASYNC/store" "$R_CASYNC/$last.caidx" "$WORK/restore"
casync mount --store="$R_CASYNC/store" "$R_CASYNC/$last.caidx" "$mnt" >"$WORK/casync-mount.log" 2>&1 &
pid=$!
wait_for "$mnt/manifest.txt" "$pid"
mount_read casync "$mnt" "$pid"
stop_fuse "$mnt" "$pid"
rm -rf "$R_CASYNC"

# The source read back, cold, as the ceiling of every mount read.
drop_caches
# shellcheck disable=SC2016 # expanded by the inner shell
timed "$res/mount_read" source bash -c 'tar -cf - -C "$1" . | wc -c >/dev/null' _ "$src"
uptime_after=$(uptime)

# 4. Report.
{
    args="--preset $preset --runs $runs --seed $seed${size_override:+ --size $size_override}"
    echo "# benches/peers/run.sh $args"
    echo
    print_versions
    echo "- load: before \`${uptime_before# }\`; after \`${uptime_after# }\`"
    echo "- peers: $(restic version | cut -d' ' -f1-2); $(borg --version); $(casync --version | head -1);" \
        "$(b3sum --version); $(zstd --version | sed 's/^\*\*\* //; s/, by.*//'); $(cp --version | head -1)"
    echo "- data: \`guide-board-sim generate --seed $seed --runs $runs --size $size\` (each run generated alone with \`--first-run\`)"
    echo "- rerun: \`benches/peers/run.sh $args\`"
} >"$res/header.md"
mkdir -p "$out"
python3 "$REPO/benches/peers/report.py" "$res" "$preset" "$size" "$runs" "$seed" "$tck" \
    "$uptime_before" "$uptime_after" "$out/results.json" >"$res/tables.md"
cat "$res/header.md" - "$res/tables.md" <<<"" >"$out/results.md"
cat "$out/results.md"
log "wrote $out/results.md and $out/results.json"
