# Shared helpers of benches/ingest.sh and benches/chunk_sweep.sh; sourced, not run.
#
# Sets REPO (the workspace root), WORK (a fresh directory under $BENCH_DIR, or a mktemp directory
# under /tmp, removed on exit unless KEEP=1), AFS and SIM (the release binaries).

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
AFS=$REPO/target/release/artifactfs
SIM=$REPO/target/release/guide-board-sim
STAGE_LIMITS=$REPO/target/release/examples/stage_limits
GNU_TIME=/usr/bin/time

die() {
    echo "$(basename "$0"): $*" >&2
    exit 2
}

# make_work NAME: creates WORK and arranges for its removal.
make_work() {
    local name=$1
    if [[ -n ${BENCH_DIR:-} ]]; then
        mkdir -p "$BENCH_DIR"
        WORK=$(mktemp -d "$BENCH_DIR/$name.XXXXXX")
    else
        WORK=$(mktemp -d "/tmp/afs-$name.XXXXXX")
    fi
    # shellcheck disable=SC2064 # expand WORK now
    trap "cleanup '$WORK'" EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
}

cleanup() {
    if [[ ${KEEP:-0} == 1 ]]; then
        echo "kept work directory $1" >&2
    else
        rm -rf -- "$1"
    fi
}

check_tools() {
    [[ -x $GNU_TIME ]] || die "GNU time is needed at $GNU_TIME (apt-get install time)"
    command -v python3 >/dev/null || die "python3 is needed"
    command -v cargo >/dev/null || die "cargo is needed"
}

# build: the release binaries and the stage_limits example (not timed).
build() {
    echo "building release binaries ..." >&2
    (cd "$REPO" && cargo build --release --quiet -p artifactfs -p guide-board-sim &&
        cargo build --release --quiet -p artifactfs --example stage_limits) >&2
}

# print_versions: what was measured, on what.
print_versions() {
    local commit dirty
    commit=$(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo unknown)
    dirty=$(git -C "$REPO" status --porcelain 2>/dev/null | wc -l)
    echo "- commit: \`$commit\`$([[ $dirty -gt 0 ]] && echo " (work tree has $dirty changed or untracked paths)")"
    echo "- binaries: \`$("$AFS" --version)\`, \`$("$SIM" --version)\`; $(rustc --version)"
    echo "- machine: $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')), \
$(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), Linux $(uname -r), \
work directory on $(df -T "$WORK" | awk 'NR==2 {print $2}') ($(df -T "$WORK" | awk 'NR==2 {print $1}'))"
    echo "- load average before measuring: $(cut -d' ' -f1-3 /proc/loadavg)"
}

# generate OUT SEED RUNS SIZE: guide-board-sim runs OUT/run-0000 ...
generate() {
    echo "generating $3 runs of $4 (seed $2) ..." >&2
    "$SIM" generate --out "$1" --seed "$2" --runs "$3" --size "$4" >&2
    sync
}

# warm DIR...: reads every file once, so each ingest below measures warm-cache reads.
warm() {
    find "$@" -type f -exec cat {} + >/dev/null
}

# timed_ingest STORE SRC RUN OUT: ingests with GNU time; writes OUT.json (the ingest report),
# OUT.time ("wall user sys maxrss_kib") and OUT.cpu (the machine's busy and total CPU ticks
# before and after, from /proc/stat, to tell how busy other processes kept the cores).
timed_ingest() {
    local store=$1 src=$2 run=$3 out=$4
    cpu_ticks >"$out.cpu"
    "$GNU_TIME" -o "$out.time" -f '%e %U %S %M' \
        "$AFS" --store "$store" ingest "$src" "$run" --json >"$out.json"
    cpu_ticks >>"$out.cpu"
}

# cpu_ticks: "busy total" ticks of all CPUs since boot.
cpu_ticks() {
    awk '/^cpu / {t = 0; for (i = 2; i <= NF; i++) t += $i; print t - $5 - $6, t}' /proc/stat
}
