#!/usr/bin/env bash
# Chunk-size sweep: the same successive runs ingested into fresh stores with different FastCDC
# (min, avg, max) settings.
#
#   benches/chunk_sweep.sh [--size 256MiB] [--runs 6] [--seed 1] [--settings LIST] [--json OUT]
#
# LIST is space- or comma-separated MIN/AVG/MAX triples with K/M suffixes (binary), by default
#   16K/64K/256K 32K/128K/512K 64K/256K/1M 128K/512K/2M 256K/1M/4M 512K/2M/8M 1M/4M/16M
# For each setting: `artifactfs init --chunk-min --chunk-avg --chunk-max` (other settings at their
# defaults), ingest every run in order under GNU time, then report the total stored bytes (packs
# and manifests), the reduction over all runs (sum of raw bytes / stored bytes), the dedup alone
# (sum of raw bytes / new chunk plaintext), the number of chunks and packs, the size of
# index.sqlite, the manifest bytes, and the total ingest wall time and MB/s.
# Every run is read once before timing (warm page cache). MB = 10^6 bytes.
#
# On a shared machine, BENCH_NICE=-10 (as root) runs the ingests at that niceness.
#
# Work files go to a fresh directory under $BENCH_DIR (default: a mktemp directory under /tmp),
# removed on exit unless KEEP=1. Needs about RUNS x SIZE plus one store of free space there.
set -euo pipefail

size=256MiB
runs=6
seed=1
settings="16K/64K/256K 32K/128K/512K 64K/256K/1M 128K/512K/2M 256K/1M/4M 512K/2M/8M 1M/4M/16M"
json_out=

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
while [[ $# -gt 0 ]]; do
    case $1 in
    --size) size=${2:?--size needs a value}; shift 2 ;;
    --runs) runs=${2:?--runs needs a value}; shift 2 ;;
    --seed) seed=${2:?--seed needs a value}; shift 2 ;;
    --settings) settings=${2:?--settings needs a value}; shift 2 ;;
    --json) json_out=${2:?--json needs a file}; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) echo "unknown argument $1" >&2; usage >&2; exit 2 ;;
    esac
done
[[ $runs =~ ^[1-9][0-9]*$ ]] || { echo "--runs must be a positive integer" >&2; exit 2; }
settings=${settings//,/ }
for s in $settings; do
    [[ $s =~ ^[0-9]+[KM]?/[0-9]+[KM]?/[0-9]+[KM]?$ ]] || { echo "bad setting $s (want MIN/AVG/MAX)" >&2; exit 2; }
done
if [[ -n $json_out ]]; then
    json_out=$(realpath -m -- "$json_out")
fi

# shellcheck source=benches/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
check_tools
make_work sweep
build

# 64K -> 64KiB, 1M -> 1MiB (the CLI's binary suffixes).
cli_size() { [[ $1 =~ [KM]$ ]] && echo "${1}iB" || echo "$1"; }

data=$WORK/data
res=$WORK/results
mkdir -p "$res"
generate "$data" "$seed" "$runs" "$size"
run_dirs=()
for ((i = 0; i < runs; i++)); do run_dirs+=("$data/$(printf 'run-%04d' "$i")"); done

for s in $settings; do
    IFS=/ read -r min avg max <<<"$s"
    tag=${s//\//-}
    store=$WORK/store-$tag
    echo "setting $s ..." >&2
    "$AFS" --store "$store" init --chunk-min "$(cli_size "$min")" --chunk-avg "$(cli_size "$avg")" \
        --chunk-max "$(cli_size "$max")" >/dev/null
    warm "${run_dirs[@]}"
    for ((i = 0; i < runs; i++)); do
        timed_ingest "$store" "${run_dirs[$i]}" "sweep/$(printf 'run-%04d' "$i")" "$res/$tag.$i"
    done
    "$AFS" --store "$store" stats --json >"$res/$tag.stats.json"
    index_bytes=0
    for f in "$store"/index.sqlite "$store"/index.sqlite-wal; do
        [[ -f $f ]] && index_bytes=$((index_bytes + $(stat -c %s "$f")))
    done
    echo "$index_bytes" >"$res/$tag.index_bytes"
    grep -A3 '^\[chunker\]' "$store/config.toml" | tail -3 | tr -d ' ' | paste -sd' ' >"$res/$tag.config"
    rm -rf -- "$store"
done

{
    echo "# artifactfs chunk-size sweep"
    echo
    print_versions
    echo "- data: \`guide-board-sim generate --seed $seed --runs $runs --size $size\`, ingested in order into a fresh store per setting (zstd level 3, 16 MiB packs)"
    echo "- warm cache: every run was read once before timing each setting; the page cache was not dropped"
    echo "- rerun: \`benches/chunk_sweep.sh --size $size --runs $runs --seed $seed --settings '$settings'\`"
} >"$res/header.md"

# shellcheck disable=SC2086 # one argument per setting
python3 - "$res" "$runs" "$json_out" $settings <<'EOF'
import json, os, sys

NCPU = os.cpu_count()

def others_busy(prefix, own_cpu_s):
    """Cores kept busy by other processes during a timed ingest: machine busy minus this ingest."""
    (b0, t0), (b1, t1) = [[int(x) for x in l.split()] for l in open(f"{prefix}.cpu").read().splitlines()[:2]]
    if t1 <= t0:
        return 0.0
    machine_cores = (b1 - b0) / (t1 - t0) * NCPU
    wall_s = (t1 - t0) / NCPU / os.sysconf("SC_CLK_TCK")
    return max(0.0, machine_cores - own_cpu_s / wall_s)

res, runs, json_out, settings = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]
rows = []
for s in settings:
    tag = s.replace("/", "-")
    per_run = []
    for i in range(runs):
        rep = json.load(open(f"{res}/{tag}.{i}.json"))
        wall, user, sys_, rss = open(f"{res}/{tag}.{i}.time").read().split()[:4]
        cpu = float(user) + float(sys_)
        per_run.append({**rep, "wall_s": float(wall), "cpu_s": cpu, "peak_rss_kib": int(rss),
                        "others_busy_cores": others_busy(f"{res}/{tag}.{i}", cpu)})
    stats = json.load(open(f"{res}/{tag}.stats.json"))
    raw = sum(r["raw_bytes"] for r in per_run)
    new_raw = sum(r["new_raw_bytes"] for r in per_run)
    stored = sum(r["new_stored_bytes"] for r in per_run)
    wall = sum(r["wall_s"] for r in per_run)
    later = per_run[1:] or per_run
    rows.append({
        "setting": s,
        "config": open(f"{res}/{tag}.config").read().strip(),
        "raw_bytes": raw,
        "stored_bytes": stored,
        "pack_bytes": stats["stored_bytes"],
        "manifest_bytes": stored - stats["stored_bytes"],
        "reduction": raw / stored,
        "dedup_ratio": raw / new_raw,
        "chunks": stats["chunks"],
        "mean_chunk_bytes": stats["chunk_raw_bytes"] / max(stats["chunks"], 1),
        "packs": stats["packs"],
        "index_bytes": int(open(f"{res}/{tag}.index_bytes").read()),
        "wall_s": wall,
        "mb_s": raw / 1e6 / wall,
        "cpu_s": sum(r["cpu_s"] for r in per_run),
        "peak_rss_mib": max(r["peak_rss_kib"] for r in per_run) / 1024,
        "others_busy_cores": sum(r["others_busy_cores"] * r["wall_s"] for r in per_run) / wall,
        "later_run_new_stored_mean": sum(r["new_stored_bytes"] for r in later) / len(later),
        "runs": per_run,
    })

print(open(f"{res}/header.md").read())
print(f"## Totals over {runs} runs ({rows[0]['raw_bytes']/1e6:.0f} MB raw)\n")
print("| min/avg/max | stored MB (packs + manifests) | reduction (raw/stored) | dedup alone (raw/new raw) | "
      "stored MB per later run | chunks | mean chunk KiB | packs | index.sqlite KiB | manifests KiB | "
      "wall s | MB/s | CPU s | peak RSS MiB | other processes, cores |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for r in rows:
    print(f"| {r['setting']} | {r['stored_bytes']/1e6:.1f} | {r['reduction']:.2f} | {r['dedup_ratio']:.2f} | "
          f"{r['later_run_new_stored_mean']/1e6:.1f} | {r['chunks']:,} | {r['mean_chunk_bytes']/1024:.0f} | "
          f"{r['packs']} | {r['index_bytes']/1024:.0f} | {r['manifest_bytes']/1024:.0f} | {r['wall_s']:.1f} | "
          f"{r['mb_s']:.1f} | {r['cpu_s']:.1f} | {r['peak_rss_mib']:.0f} | {r['others_busy_cores']:.2f} |")
print()
print("stored MB per later run: mean new stored bytes of runs 2..N (what each successive run costs). "
      "other processes: mean cores the rest of the machine kept busy during the ingests (/proc/stat); "
      "above ~0.1 the timings of that row are pessimistic.")
print()
print("## New stored MB per run\n")
print("| min/avg/max | " + " | ".join(f"run {i}" for i in range(runs)) + " |")
print("|---|" + "---:|" * runs)
for r in rows:
    print(f"| {r['setting']} | " + " | ".join(f"{x['new_stored_bytes']/1e6:.1f}" for x in r["runs"]) + " |")

if json_out:
    with open(json_out, "w") as f:
        json.dump({"header": open(f"{res}/header.md").read(), "settings": rows}, f, indent=2)
        f.write("\n")
EOF
