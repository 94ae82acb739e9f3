#!/usr/bin/env bash
# Stops the nats-server that tools/nats/start.sh started and removes its directory with the
# JetStream store.
# Usage: tools/nats/stop.sh [--dir DIR] [--quiet]
# Safe to run at any time: after a failed or partial start, or when nothing runs.
set -euo pipefail

dir=${ARTIFACTFS_NATS_DIR:-/tmp/artifactfs-nats}
quiet=false
keep_lock=false
while (($#)); do
    case $1 in
        --dir) dir=${2:?--dir needs a value}; shift 2 ;;
        --dir=*) dir=${1#*=}; shift ;;
        --quiet|-q) quiet=true; shift ;;
        --keep-lock) keep_lock=true; shift ;;
        -h|--help) sed -n '2,5s/^# \{0,1\}//p' "$0"; exit 0 ;;
        *) echo "stop.sh: unknown argument: $1" >&2; exit 2 ;;
    esac
done
if [[ -d $(dirname "$dir") ]]; then dir=$(cd "$(dirname "$dir")" && pwd)/$(basename "$dir"); fi
log() { $quiet || echo "stop.sh: $*" >&2; }

# A nats-server is ours if its command line names this DIR's JetStream store (guards
# against a stale pid file whose pid now belongs to something else).
pids=()
while read -r f; do
    p=${f#/proc/}; p=${p%/cmdline}
    cmd=$({ tr '\0' ' ' <"$f"; } 2>/dev/null) || continue
    [[ $cmd == *nats-server*"-sd $dir/jetstream"* ]] && pids+=("$p")
done < <(grep -lsaF -- "$dir/jetstream" /proc/[0-9]*/cmdline || true)
alive() {
    local p st
    for p in "$@"; do
        st=$(sed 's/.*) //' "/proc/$p/stat" 2>/dev/null) || continue
        [[ -n $st && ${st%% *} != Z ]] && return 0
    done
    return 1
}
if ((${#pids[@]})); then
    log "stopping nats-server (pid ${pids[*]})"
    kill -TERM "${pids[@]}" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do alive "${pids[@]}" || break; sleep 0.1; done
    if alive "${pids[@]}"; then
        log "nats-server still alive after 10s, killing"
        kill -KILL "${pids[@]}" 2>/dev/null || true
        for ((i = 0; i < 50; i++)); do alive "${pids[@]}" || break; sleep 0.1; done
    fi
fi

if [[ -d $dir ]]; then
    if [[ -e $dir/.artifactfs-nats ]]; then
        rm -rf -- "$dir"
        log "removed $dir"
    elif [[ -z $(ls -A "$dir") ]]; then
        rmdir -- "$dir"
    else
        echo "stop.sh: $dir was not made by start.sh; left in place" >&2
    fi
else
    log "nothing at $dir"
fi
rm -f -- "$dir.apt.log"
$keep_lock || rm -f -- "$dir.lock"
