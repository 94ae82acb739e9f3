# shellcheck shell=bash disable=SC2034 # sourced: the variables are used by the scripts
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
    echo "- load average before measuring: $(cut -d' ' -f1-3 /proc/loadavg); measured commands ran at niceness ${BENCH_NICE:-0} (BENCH_NICE)"
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
    wait_quiet
    cpu_ticks >"$out.cpu"
    prio "$GNU_TIME" -o "$out.time" -f '%e %U %S %M' \
        "$AFS" --store "$store" ingest "$src" "$run" --json >"$out.json"
    cpu_ticks >>"$out.cpu"
}

# prio CMD...: runs CMD at niceness $BENCH_NICE if set (e.g. -10 as root: the measured command
# then wins the cores from other work on a shared machine), else as is. With the kernel's
# autogroup scheduling, niceness only counts within a session, so CMD gets a session of its own
# whose autogroup gets the same niceness.
prio() {
    if [[ -n ${BENCH_NICE:-} ]]; then
        # shellcheck disable=SC2016 # expanded by the inner shell
        setsid --wait bash -c 'if [[ -w /proc/self/autogroup ]]; then echo "$0" >/proc/self/autogroup 2>/dev/null || true; fi; exec nice -n "$0" "$@"' "$BENCH_NICE" "$@"
    else
        "$@"
    fi
}

# wait_quiet: waits (at most $BENCH_QUIET_WAIT seconds, default 30) until other processes keep
# less than a quarter of a core busy, so that timings are not taken while, say, a compiler runs.
# The tables still show how busy the machine was during each timed command.
wait_quiet() {
    local deadline=$((SECONDS + ${BENCH_QUIET_WAIT:-30})) b0 t0 b1 t1
    while ((SECONDS < deadline)); do
        read -r b0 t0 < <(cpu_ticks)
        sleep 1
        read -r b1 t1 < <(cpu_ticks)
        if ((t1 > t0 && 4 * (b1 - b0) * $(nproc) < (t1 - t0))); then
            return 0
        fi
    done
    echo "machine still busy after ${BENCH_QUIET_WAIT:-30} s; measuring anyway" >&2
}

# cpu_ticks: "busy total" ticks of all CPUs since boot.
cpu_ticks() {
    awk '/^cpu / {t = 0; for (i = 2; i <= NF; i++) t += $i; print t - $5 - $6, t}' /proc/stat
}
