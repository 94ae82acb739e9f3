#!/usr/bin/env bash
# The HTTP API against the mount, on one guide-board-sim run.
#
#   benches/http.sh [--size 256MiB] [--seed 1] [--debug]
#
# Generates one guide-board-sim run of SIZE and measures:
#   - ingest: every regular file of the run uploaded with `curl -T` (4 connections) into an open
#     run of `artifactfs serve`, then POST .../seal, against `cp -a` of the run into an open run
#     of a fresh mount, then `artifactfs seal` (HTTP carries regular files only; the byte
#     counts are of the regular files);
#   - reads: the largest file of the sealed run fetched with curl, cold and warm, against
#     `cat` of the same file through the mount, warm;
#   - metadata: GET /v1/runs/NS/RUN with wrk (--latency) at 1, 16 and 64 connections, 10 s each:
#     p50, p99 and requests/s.
# and prints a Markdown table. MB = 10^6 bytes. The source is read once before timing.
#
# --debug uses the debug binaries (a quick check that the script works; not for figures).
# Work files go to a fresh directory under $BENCH_DIR (default: a mktemp directory under /tmp),
# removed on exit unless KEEP=1. Needs curl, wrk, /dev/fuse and fusermount3.
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
for t in curl wrk fusermount3; do command -v $t >/dev/null || die "$t is needed"; done
make_work http
mnt=$WORK/mnt
SPID=
# shellcheck disable=SC2064 # expand now
trap "[[ -n \$SPID ]] && kill \$SPID 2>/dev/null; fusermount3 -uz '$mnt' 2>/dev/null || true; cleanup '$WORK'" EXIT
if ((debug)); then
    AFS=$REPO/target/debug/artifactfs
    # shellcheck disable=SC2034 # used by generate (common.sh)
    SIM=$REPO/target/debug/guide-board-sim
    (cd "$REPO" && cargo build --quiet -p artifactfs -p guide-board-sim) >&2
else
    echo "building release binaries ..." >&2
    (cd "$REPO" && cargo build --release --quiet -p artifactfs -p guide-board-sim) >&2
fi

data=$WORK/data
src=$data/run-0000
mkdir -p "$mnt"
generate "$data" "$seed" 1 "$size"
warm "$src"
bytes=$(find "$src" -type f -printf '%s\n' | awk '{s += $1} END {print s}')
big=$(cd "$src" && find . -type f -printf '%s %P\n' | sort -n | tail -1 | cut -d' ' -f2-)
big_bytes=$(stat -c %s "$src/$big")

rows=()
# timed NAME BYTES CMD...: runs CMD, adds a row with its wall time and MB/s.
timed() {
    local name=$1 b=$2 t0 t1
    shift 2
    wait_quiet
    t0=$(date +%s.%N)
    "$@" >/dev/null
    t1=$(date +%s.%N)
    rows+=("$(awk -v n="$name" -v b="$b" -v a="$t0" -v z="$t1" \
        'BEGIN {w = z - a; printf "| %s | %.1f | %.2f | %.1f |", n, b / 1e6, w, b / 1e6 / w}')")
}

# 1. Ingest over HTTP.
"$AFS" --store "$WORK/store-http" serve --listen 127.0.0.1:0 >"$WORK/serve.out" 2>"$WORK/serve.log" &
SPID=$!
while ! grep -q listening "$WORK/serve.out" 2>/dev/null; do sleep 0.1; done
base=$(sed 's/listening on //' "$WORK/serve.out")
upload() {
    curl -fsS -X POST "$base/v1/runs" -H 'content-type: application/json' \
        -d '{"namespace": "bench", "run": "run-0000"}' >/dev/null
    # Four curl processes, each one connection for its share of the files (curl -K lists).
    local i
    for i in 0 1 2 3; do : >"$WORK/curl-$i.cfg"; done
    (cd "$src" && find . -type f -printf '%P\n') | python3 -c '
import sys, urllib.parse
src, base, work = sys.argv[1:]
for n, p in enumerate(l.rstrip("\n") for l in sys.stdin):
    with open(f"{work}/curl-{n % 4}.cfg", "a") as f:
        url = base + "/v1/runs/bench/run-0000/files/" + urllib.parse.quote(p)
        f.write(f"upload-file = \"{src}/{p}\"\nurl = \"{url}\"\noutput = /dev/null\n")
' "$src" "$base" "$WORK"
    local pids=()
    for i in 0 1 2 3; do
        curl -fsS -K "$WORK/curl-$i.cfg" &
        pids+=($!)
    done
    for i in "${pids[@]}"; do wait "$i"; done
    curl -fsS -X POST "$base/v1/runs/bench/run-0000/seal" >/dev/null
}
timed http-upload-seal "$bytes" upload
# 2. Reads over HTTP.
timed http-get-cold "$big_bytes" curl -fsS -o /dev/null "$base/v1/runs/bench/run-0000/files/$big"
timed http-get-warm "$big_bytes" curl -fsS -o /dev/null "$base/v1/runs/bench/run-0000/files/$big"
# 3. Metadata latency.
lat=()
for c in 1 16 64; do
    t=$((c < 2 ? 1 : 2))
    out=$(wrk -t"$t" -c"$c" -d10s --latency "$base/v1/runs/bench/run-0000")
    p50=$(awk '$1 == "50%" {print $2}' <<<"$out")
    p99=$(awk '$1 == "99%" {print $2}' <<<"$out")
    rps=$(awk '/^Requests\/sec/ {print $2}' <<<"$out")
    lat+=("| $c | $p50 | $p99 | $rps |")
done
kill "$SPID"
wait "$SPID" || true
SPID=

# 4. The same through the mount.
out=$("$AFS" --store "$WORK/store-mount" mount "$mnt" --seal-after 1h)
MPID=$(sed -n 's/.*(pid \([0-9]*\)).*/\1/p' <<<"$out")
mkdir -p "$mnt/bench/run-0000"
# shellcheck disable=SC2016 # expanded by the inner shell
timed fuse-cp-seal "$bytes" bash -c 'cp -a "$1/." "$2/bench/run-0000/" && "$3" --store "$4" seal bench/run-0000' \
    _ "$src" "$mnt" "$AFS" "$WORK/store-mount"
cat "$mnt/bench/run-0000/$big" >/dev/null
timed fuse-cat-warm "$big_bytes" cat "$mnt/bench/run-0000/$big"
"$AFS" umount "$mnt"
while kill -0 "$MPID" 2>/dev/null; do sleep 0.1; done

echo "## benches/http.sh --size $size --seed $seed$( ((debug)) && echo ' --debug (debug binaries: not for figures)')"
echo
print_versions
echo
echo "| step | MB | wall s | MB/s |"
echo "|---|---|---|---|"
printf '%s\n' "${rows[@]}"
echo
echo "GET /v1/runs/bench/run-0000 with wrk, 10 s each:"
echo
echo "| connections | p50 | p99 | requests/s |"
echo "|---|---|---|---|"
printf '%s\n' "${lat[@]}"
