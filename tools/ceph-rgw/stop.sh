#!/usr/bin/env bash
# Stops the test cluster that tools/ceph-rgw/start.sh started (radosgw, OSD, mon) and
# removes its directory with everything the cluster stored.
# Usage: tools/ceph-rgw/stop.sh [--dir DIR] [--quiet]
# Safe to run at any time: after a failed or partial start, or when nothing runs.
set -euo pipefail

dir=${ARTIFACTFS_RGW_DIR:-/tmp/artifactfs-ceph}
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
conf=$dir/ceph.conf
log() { $quiet || echo "stop.sh: $*" >&2; }

# A pid is ours only if its command line names this DIR's ceph.conf (guards against
# stale pid files whose pid now belongs to something else).
ours() {
    local cmd
    cmd=$({ tr '\0' ' ' <"/proc/$1/cmdline"; } 2>/dev/null) || return 1
    [[ $cmd == *"$conf"* ]]
}
# Alive and not a zombie.
alive() {
    local p st
    for p in "$@"; do
        st=$(sed 's/.*) //' "/proc/$p/stat" 2>/dev/null) || continue
        [[ -n $st ]] || continue
        st=${st%% *}
        [[ $st != Z ]] && return 0
    done
    return 1
}

# pids of one kind: from the pid files, plus any process started with this conf
# whose pid file was never written (start.sh killed midway, radosgw-admin, ceph CLI).
pids_of() {
    local pattern=$1 f p cmd
    for f in "$dir"/run/$pattern.pid; do
        [[ -f $f ]] || continue
        p=$(cat "$f" 2>/dev/null) || continue
        [[ $p =~ ^[0-9]+$ ]] && ours "$p" && echo "$p"
    done
    grep -lsaF -- "$conf" /proc/[0-9]*/cmdline | while read -r f; do
        p=${f#/proc/}; p=${p%/cmdline}
        ((p == $$)) && continue
        cmd=$({ tr '\0' ' ' <"$f"; } 2>/dev/null) || continue
        [[ $cmd == *"$conf"* ]] || continue
        case $pattern in
            client.rgw.*) [[ $cmd == *radosgw\ * && $cmd != *radosgw-admin* ]] ;;
            osd.*) [[ $cmd == *ceph-osd\ * ]] ;;
            mon.*) [[ $cmd == *ceph-mon\ * ]] ;;
            other) [[ $cmd != *ceph-osd\ * && $cmd != *ceph-mon\ * && ! ($cmd == *radosgw\ * && $cmd != *radosgw-admin*) ]] ;;
        esac && echo "$p"
    done
}

stop_kind() {
    local kind=$1 grace=$2 pids i
    mapfile -t pids < <(pids_of "$kind" | sort -u)
    ((${#pids[@]})) || return 0
    log "stopping $kind (pid ${pids[*]})"
    if ((grace > 0)); then
        kill -TERM "${pids[@]}" 2>/dev/null || true
        for ((i = 0; i < grace * 10; i++)); do alive "${pids[@]}" || return 0; sleep 0.1; done
        log "$kind still alive after ${grace}s, killing"
    fi
    kill -KILL "${pids[@]}" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do alive "${pids[@]}" || return 0; sleep 0.1; done
    echo "stop.sh: could not kill ${pids[*]}" >&2
    return 1
}

# A memstore OSD writes all it holds into its data dir when it shuts down
# cleanly; the data is thrown away here, so it is killed outright.
osd_grace=10
if [[ ! -f $conf ]] || grep -qs '^osd objectstore = memstore' "$conf"; then osd_grace=0; fi
stop_kind other 2
stop_kind 'client.rgw.*' 10
stop_kind 'osd.*' "$osd_grace"
stop_kind 'mon.*' 10

if [[ -d $dir ]]; then
    if [[ -e $dir/.artifactfs-ceph ]]; then
        [[ -f $dir/bluestore-file ]] && rm -f -- "$(cat "$dir/bluestore-file")"
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
$keep_lock || rm -f -- "$dir.lock"
