#!/usr/bin/env bash
# End-to-end ingest benchmark, next to the machine's limits measured on the same bytes.
#
#   benches/ingest.sh [--size 256MiB] [--runs 4] [--seed 1] [--json OUT]
#
# Builds the release binaries, generates RUNS successive guide-board-sim runs of SIZE each,
# ingests them one by one into a fresh store (default settings) under GNU time, then re-ingests
# the first run under a new name (every chunk already stored). Prints, in Markdown:
#   - per run: raw MB, wall s, raw MB/s, CPU s (user+sys), cores busy, peak RSS, new stored
#     bytes and the store's cumulative stored bytes (`artifactfs stats --json`);
#   - the stage limits of examples/stage_limits.rs on the first run's bytes (BLAKE3, FastCDC and
#     zstd alone, CPU ns per byte, and what 2 cores could do at best);
#   - the first run's ingest rate (new data) and the re-ingest rate (stored data) as a percentage
#     of those limits.
# The page cache is not dropped (that needs root and a quiet machine): every run is read once
# before timing, so all numbers are warm-cache ingest. MB = 10^6 bytes, MiB = 2^20 bytes.
#
# On a shared machine, BENCH_NICE=-10 (as root) runs the measured commands at that niceness;
# the "other processes" column shows how busy the rest of the machine kept the cores anyway.
#
# Work files go to a fresh directory under $BENCH_DIR (default: a mktemp directory under /tmp),
# removed on exit unless KEEP=1. Needs about (RUNS + 1) x SIZE of free space there.
set -euo pipefail

size=256MiB
runs=4
seed=1
json_out=

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
while [[ $# -gt 0 ]]; do
    case $1 in
    --size) size=${2:?--size needs a value}; shift 2 ;;
    --runs) runs=${2:?--runs needs a value}; shift 2 ;;
    --seed) seed=${2:?--seed needs a value}; shift 2 ;;
    --json) json_out=${2:?--json needs a file}; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) echo "unknown argument $1" >&2; usage >&2; exit 2 ;;
    esac
done
[[ $runs =~ ^[1-9][0-9]*$ ]] || { echo "--runs must be a positive integer" >&2; exit 2; }
if [[ -n $json_out ]]; then
    json_out=$(realpath -m -- "$json_out")
fi

# shellcheck source=benches/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
check_tools
make_work ingest
build

data=$WORK/data
store=$WORK/store
res=$WORK/results
mkdir -p "$res"
generate "$data" "$seed" "$runs" "$size"
run_dirs=()
for ((i = 0; i < runs; i++)); do run_dirs+=("$data/$(printf 'run-%04d' "$i")"); done
warm "${run_dirs[@]}"

"$AFS" --store "$store" init >/dev/null
for ((i = 0; i < runs; i++)); do
    name=$(printf 'run-%04d' "$i")
    echo "ingesting $name ..." >&2
    timed_ingest "$store" "${run_dirs[$i]}" "bench/$name" "$res/$i"
    "$AFS" --store "$store" stats --json >"$res/$i.stats.json"
done
echo "re-ingesting run-0000 (identical, all chunks stored) ..." >&2
warm "${run_dirs[0]}"
timed_ingest "$store" "${run_dirs[0]}" "bench/run-0000-again" "$res/again"
"$AFS" --store "$store" stats --json >"$res/again.stats.json"

echo "measuring stage limits on run-0000 ..." >&2
wait_quiet
# The zstd stage at the store's own level, so the limit is the one this store's ingest has.
level=$(sed -n 's/^compression_level *= *//p' "$store/config.toml")
prio "$STAGE_LIMITS" "${run_dirs[0]}" --level "${level:?no compression_level in $store/config.toml}" \
    --json "$res/limits.json" >"$res/limits.md"

{
    echo "# artifactfs ingest benchmark"
    echo
    print_versions
    echo "- data: \`guide-board-sim generate --seed $seed --runs $runs --size $size\`; store: \`artifactfs init\` defaults ($(grep -A3 '^\[chunker\]' "$store/config.toml" | tail -3 | tr -d ' ' | paste -sd' '), $(grep -E '^compression_level|^pack_target_size' "$store/config.toml" | tr -d ' ' | paste -sd' '))"
    echo "- warm cache: every run was read once (cat > /dev/null) before timing; the page cache was not dropped, so this is warm-cache ingest"
    echo "- rerun: \`benches/ingest.sh --size $size --runs $runs --seed $seed\`"
} >"$res/header.md"

python3 - "$res" "$runs" "$size" "$seed" "$json_out" <<'EOF'
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

res, runs, size, seed, json_out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]

def load(prefix, label):
    rep = json.load(open(f"{res}/{prefix}.json"))
    wall, user, sys_, rss_kib = open(f"{res}/{prefix}.time").read().split()[:4]
    stats = json.load(open(f"{res}/{prefix}.stats.json"))
    wall, cpu = float(wall), float(user) + float(sys_)
    return {
        "run": label,
        "raw_bytes": rep["raw_bytes"],
        "files": rep["files"],
        "wall_s": wall,
        "raw_mb_s": rep["raw_bytes"] / 1e6 / wall if wall > 0 else float("inf"),
        "cpu_s": cpu,
        "cores_busy": cpu / wall if wall > 0 else 0.0,
        "others_busy_cores": others_busy(f"{res}/{prefix}", cpu),
        "peak_rss_mib": int(rss_kib) / 1024,
        "new_raw_bytes": rep["new_raw_bytes"],
        "new_stored_bytes": rep["new_stored_bytes"],
        "cumulative_stored_bytes": stats["stored_bytes"],
        "chunks": rep["chunks"],
        "new_chunks": rep["new_chunks"],
        "dedup_ratio": rep["dedup_ratio"],
    }

rows = [load(str(i), f"run-{i:04d}") for i in range(runs)]
again = load("again", "run-0000 again (all stored)")
limits = json.load(open(f"{res}/limits.json"))

print(open(f"{res}/header.md").read())
print("## Ingest per run\n")
print("| run | raw MB | wall s | raw MB/s | CPU s (user+sys) | cores busy | other processes, cores | peak RSS MiB | new stored bytes | cumulative stored bytes |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for r in rows + [again]:
    print(f"| {r['run']} | {r['raw_bytes']/1e6:.1f} | {r['wall_s']:.2f} | {r['raw_mb_s']:.1f} | "
          f"{r['cpu_s']:.2f} | {r['cores_busy']:.2f} | {r['others_busy_cores']:.2f} | {r['peak_rss_mib']:.0f} | "
          f"{r['new_stored_bytes']:,} | {r['cumulative_stored_bytes']:,} |")
print()
print("new stored bytes: packs and manifest this ingest wrote; cumulative stored bytes: pack bytes "
      "of the store after it (`stats --json` stored_bytes). cores busy = CPU s / wall s; other "
      "processes = cores the rest of the machine kept busy meanwhile (/proc/stat): above ~0.1 the "
      "run competed for the cores and its numbers are pessimistic.")
print()
print("## Stage limits (same bytes as run-0000)\n")
print(open(f"{res}/limits.md").read().rstrip())
print()
first = rows[0]
ach = [
    ("new data: first ingest of run-0000", first["raw_mb_s"], limits["limit_new_mb_s"]),
    ("already-stored data: re-ingest of run-0000", again["raw_mb_s"], limits["limit_stored_mb_s"]),
]
print("## Achieved vs. limits\n")
print("| case | achieved MB/s | limit MB/s | % of limit | cores busy |")
print("|---|---:|---:|---:|---:|")
for (name, a, l), r in zip(ach, [first, again]):
    print(f"| {name} | {a:.1f} | {l:.0f} | {100*a/l:.0f}% | {r['cores_busy']:.2f} of {limits['cores']} |")

if json_out:
    header = open(f"{res}/header.md").read()
    report = {
        "header": header,
        "params": {"size": size, "runs": runs, "seed": int(seed)},
        "runs": rows,
        "reingest": again,
        "stage_limits": limits,
        "achieved": [
            {"case": n, "mb_s": a, "limit_mb_s": l, "percent_of_limit": 100 * a / l}
            for n, a, l in ach
        ],
    }
    with open(json_out, "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
EOF
