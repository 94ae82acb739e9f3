#!/usr/bin/env bash
# gc benchmark: wall time and peak RSS of `artifactfs gc --dry-run` and of a real gc that expires
# half the runs, on stores of growing size, so the growth with chunks and packs shows.
#
#   benches/gc.sh [--sizes "250 500 1000"] [--run-bytes 1MiB] [--avg-chunk 1KiB]
#
# For each size N: examples/gc_store.rs builds a store of N runs of RUN-BYTES each with chunks of
# about AVG-CHUNK (so 1000 runs of 1 MiB with 1 KiB chunks is about a million chunks), half of
# them expired; then, under GNU time, a dry run and a real run (`--grace 0s`). Prints a Markdown
# table: runs, chunks, packs, then wall s and peak RSS of each, and the real run's work (runs
# expired, chunks swept, packs deleted and rewritten), and the time per million chunks.
#
# Work files go to a fresh directory under $BENCH_DIR (default: a mktemp directory under /tmp),
# removed on exit unless KEEP=1.
set -euo pipefail

sizes="250 500 1000"
run_bytes=1MiB
avg_chunk=1KiB

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
while (($#)); do
    case $1 in
    --sizes) sizes=$2; shift 2 ;;
    --run-bytes) run_bytes=$2; shift 2 ;;
    --avg-chunk) avg_chunk=$2; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
    esac
done

# shellcheck source=benches/common.sh
source "$(dirname "$0")/common.sh"
make_work gc
GC_STORE=$REPO/target/release/examples/gc_store
(cd "$REPO" && cargo build --release --quiet --bin artifactfs --example gc_store)

# timed OUT_JSON -- CMD…: runs CMD under GNU time; prints "wall_s peak_rss_kib".
timed() {
    local out=$1
    shift 2
    "$GNU_TIME" -f '%e %M' -o "$WORK/time" "$@" >"$out"
    cat "$WORK/time"
}

echo "| runs | chunks | packs | dry run s | dry run peak RSS MiB | gc s | gc peak RSS MiB | expired | chunks swept | packs deleted | packs rewritten | gc s per M chunks |"
echo "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
for n in $sizes; do
    store=$WORK/store-$n
    stats=$("$GC_STORE" "$store" --runs "$n" --run-bytes "$run_bytes" --avg-chunk "$avg_chunk")
    chunks=$(jq .chunks <<<"$stats")
    packs=$(jq .packs <<<"$stats")
    read -r dry_s dry_kib < <(timed "$WORK/dry.json" -- "$AFS" --store "$store" gc --dry-run --grace 0s --json)
    read -r gc_s gc_kib < <(timed "$WORK/gc.json" -- "$AFS" --store "$store" gc --grace 0s --json)
    expired=$(jq '.runs_expired | length' "$WORK/gc.json")
    swept=$(jq .chunks_swept "$WORK/gc.json")
    deleted=$(jq .packs_deleted "$WORK/gc.json")
    rewritten=$(jq .packs_rewritten "$WORK/gc.json")
    per_m=$(awk -v s="$gc_s" -v c="$chunks" 'BEGIN { printf "%.1f", s / (c / 1e6) }')
    printf '| %s | %s | %s | %s | %d | %s | %d | %s | %s | %s | %s | %s |\n' \
        "$n" "$chunks" "$packs" "$dry_s" $((dry_kib / 1024)) "$gc_s" $((gc_kib / 1024)) \
        "$expired" "$swept" "$deleted" "$rewritten" "$per_m"
    "$AFS" --store "$store" verify >/dev/null || die "verify failed after gc of $n runs"
    rm -rf -- "$store"
done
