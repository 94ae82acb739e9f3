#!/usr/bin/env bash
# Starts a throwaway nats-server with JetStream on 127.0.0.1, for the event-stream tests of
# artifactfs (Debian's nats-server, installed with apt-get if missing).
# Usage: tools/nats/start.sh [--port N] [--dir DIR]
# Idempotent: a server already answering on the port with JetStream is left alone. Stop it
# (and wipe its JetStream store) with tools/nats/stop.sh.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
port=${ARTIFACTFS_NATS_PORT:-4222}
dir=${ARTIFACTFS_NATS_DIR:-/tmp/artifactfs-nats}
timeout_s=${ARTIFACTFS_NATS_TIMEOUT:-30}

usage() { sed -n '2,6s/^# \{0,1\}//p' "$0"; exit "${1:-0}"; }
while (($#)); do
    case $1 in
        --port) port=${2:?--port needs a value}; shift 2 ;;
        --port=*) port=${1#*=}; shift ;;
        --dir) dir=${2:?--dir needs a value}; shift 2 ;;
        --dir=*) dir=${1#*=}; shift ;;
        -h|--help) usage 0 ;;
        *) echo "start.sh: unknown argument: $1" >&2; usage 2 >&2 ;;
    esac
done
if ! [[ $port =~ ^[0-9]+$ ]] || ((port < 1 || port > 65535)); then echo "start.sh: bad port: $port" >&2; exit 2; fi
mkdir -p "$(dirname "$dir")"
dir=$(cd "$(dirname "$dir")" && pwd)/$(basename "$dir")
url=nats://127.0.0.1:$port

log() { echo "start.sh: $*" >&2; }

# The first line a NATS server sends is INFO {json}; with JetStream on it says "jetstream":true.
info_line() {
    local line
    exec 3<>"/dev/tcp/127.0.0.1/$port" || return 1
    IFS= read -r -t 2 line <&3 || { exec 3<&-; return 1; }
    exec 3<&-
    printf '%s\n' "$line"
}
nats_ok() {
    local line
    line=$(info_line 2>/dev/null) || return 1
    [[ $line == INFO* && $line == *'"jetstream":true'* ]]
}
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# One start at a time per DIR.
exec 9>"$dir.lock"
if command -v flock >/dev/null && ! flock -w 60 9; then
    log "another start.sh holds $dir.lock since 60 s"
    exit 1
fi

if nats_ok; then
    log "nats-server with JetStream already answers on $url"
    exit 0
fi
if port_busy "$port"; then
    log "port $port is taken by something that is not a NATS server with JetStream"
    exit 1
fi

bin=$(command -v nats-server || true)
[[ -z $bin && -x /usr/sbin/nats-server ]] && bin=/usr/sbin/nats-server
if [[ -z $bin ]]; then
    log "installing nats-server (apt-get)"
    if [[ $(id -u) -eq 0 ]]; then sudo=(); else sudo=(sudo); fi
    mkdir -p "$dir"
    { "${sudo[@]}" apt-get update -qq &&
        DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq nats-server; } \
        >"$dir.apt.log" 2>&1 || { log "apt-get install nats-server failed; see $dir.apt.log"; exit 1; }
    bin=/usr/sbin/nats-server
fi

if [[ -d $dir && ! -e $dir/.artifactfs-nats && -n $(ls -A "$dir") ]]; then
    log "$dir exists and was not made by start.sh; choose another --dir"
    exit 1
fi
# Leftovers of an earlier run in DIR go first.
"$here/stop.sh" --dir "$dir" --quiet --keep-lock
mkdir -p "$dir/jetstream"
touch "$dir/.artifactfs-nats"

# Its own flags only: Debian's /etc/nats-server.conf is not read.
setsid "$bin" -a 127.0.0.1 -p "$port" -js -sd "$dir/jetstream" \
    -P "$dir/nats-server.pid" -l "$dir/nats-server.log" </dev/null >/dev/null 2>&1 9>&- &
pid=$!
for ((i = 0; i < timeout_s * 10; i++)); do
    if nats_ok; then
        log "nats-server $("$bin" --version 2>/dev/null | sed 's/^nats-server: //') (pid $pid) with JetStream on $url, store in $dir/jetstream"
        exit 0
    fi
    if ! kill -0 "$pid" 2>/dev/null; then
        log "nats-server exited at start; its log:"
        tail -n 20 "$dir/nats-server.log" >&2 || true
        exit 1
    fi
    sleep 0.1
done
log "nats-server did not answer on $url within ${timeout_s}s; its log:"
tail -n 20 "$dir/nats-server.log" >&2 || true
exit 1
