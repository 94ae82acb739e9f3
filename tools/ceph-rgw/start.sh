#!/usr/bin/env bash
# Starts a throwaway one-node Ceph cluster (one mon, one memstore OSD, no mgr, no cephx)
# with a radosgw S3 gateway on 127.0.0.1, for the S3 tests of artifactfs.
# Usage: tools/ceph-rgw/start.sh [--port N] [--dir DIR]
# See README.md beside this file. Stop it with tools/ceph-rgw/stop.sh.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
port=${ARTIFACTFS_RGW_PORT:-7480}
dir=${ARTIFACTFS_RGW_DIR:-/tmp/artifactfs-ceph}
store=${ARTIFACTFS_RGW_OSD_STORE:-memstore}        # memstore | bluestore
mem_bytes=${ARTIFACTFS_RGW_MEMSTORE_BYTES:-8589934592}   # capacity the memstore OSD reports (8 GiB)
bs_file=${ARTIFACTFS_RGW_BLUESTORE_FILE:-}         # default: DIR/osd-block.img (sparse)
bs_bytes=${ARTIFACTFS_RGW_BLUESTORE_BYTES:-21474836480}  # size of the sparse file (20 GiB)
timeout_s=${ARTIFACTFS_RGW_TIMEOUT:-60}

access_key=artifactfs-test
secret_key=artifactfs-test-secret
uid=artifactfs-test
extra_class=STANDARD_IA

usage() { sed -n '2,5s/^# \{0,1\}//p' "$0"; exit "${1:-0}"; }
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
[[ $store == memstore || $store == bluestore ]] || { echo "start.sh: ARTIFACTFS_RGW_OSD_STORE must be memstore or bluestore" >&2; exit 2; }
mkdir -p "$(dirname "$dir")"
dir=$(cd "$(dirname "$dir")" && pwd)/$(basename "$dir")
conf=$dir/ceph.conf
endpoint=http://127.0.0.1:$port
t0=$SECONDS

log() { echo "start.sh: $*" >&2; }

# Signed ListBuckets with the test credentials: 0 when the gateway answers and accepts
# them (an anonymous ListBuckets also succeeds, so the owner is checked). curl 7.88
# leaves x-amz-content-sha256 out of its SigV4 and RGW then says SignatureDoesNotMatch.
s3_ok() {
    command -v curl >/dev/null || return 1
    local body
    body=$(curl -sf -m 5 --aws-sigv4 "aws:amz:us-east-1:s3" --user "$access_key:$secret_key" \
        -H "x-amz-content-sha256: UNSIGNED-PAYLOAD" "$endpoint/" 2>/dev/null) || return 1
    [[ $body == *ListAllMyBucketsResult*"<ID>$uid</ID>"* ]]
}
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# One start at a time per DIR (parallel test runners may race here).
exec 9>"$dir.lock"
if command -v flock >/dev/null && ! flock -w 300 9; then
    echo "start.sh: another start.sh holds $dir.lock since 300 s" >&2
    exit 1
fi

if s3_ok; then
    log "gateway already running on $endpoint"
    exit 0
fi
if port_busy "$port"; then
    log "port $port is taken by something that is not this gateway (or rejects the test credentials)"
    exit 1
fi

if [[ -d $dir && ! -e $dir/.artifactfs-ceph && -n $(ls -A "$dir") ]]; then
    log "$dir exists and was not made by start.sh; choose another --dir"
    exit 1
fi
# Leftovers of an earlier run in DIR (daemons and files) go first.
"$here/stop.sh" --dir "$dir" --quiet --keep-lock

mkdir -p "$dir"/{log,run,crash,rgw}
touch "$dir/.artifactfs-ceph"

# Packages.
need=()
for p in ceph-mon ceph-osd radosgw ceph-common curl; do
    [[ $(dpkg-query -W -f='${Status}' "$p" 2>/dev/null) == "install ok installed" ]] || need+=("$p")
done
if ((${#need[@]})); then
    log "installing ${need[*]} (once per machine, about 45 s)"
    if [[ $(id -u) -eq 0 ]]; then sudo=(); else sudo=(sudo); fi
    if ! { "${sudo[@]}" apt-get update -qq &&
           "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"; } \
           >"$dir/log/apt.log" 2>&1; then
        tail -n 30 "$dir/log/apt.log" >&2
        log "package install failed"
        exit 1
    fi
fi

fail() {
    log "$*"
    for f in "$dir"/log/{setup,client.rgw.a,osd.0,mon.a,apt}.log "$dir"/log/*.out; do
        [[ -s $f ]] || continue
        echo "----- tail of $f" >&2
        tail -n 25 "$f" >&2
    done
    log "giving up; clean up with: $here/stop.sh --dir $dir"
    exit 1
}
deadline=$((SECONDS + timeout_s))
left() { local l=$((deadline - SECONDS)); echo $((l > 1 ? l : 1)); }
check_deadline() { ((SECONDS < deadline)) || fail "timed out after ${timeout_s}s"; }

# Mon port: near the S3 port, first free one.
mon_port=$((port + 10000 > 65000 ? port - 1000 : port + 10000))
while port_busy "$mon_port"; do mon_port=$((mon_port + 1)); done
fsid=$(cat /proc/sys/kernel/random/uuid)
osd_uuid=$(cat /proc/sys/kernel/random/uuid)

if [[ $store == bluestore ]]; then
    bs_file=${bs_file:-$dir/osd-block.img}
    [[ -e $bs_file && ! -f $bs_file ]] && { log "$bs_file exists and is not a regular file"; exit 2; }
    echo "$bs_file" >"$dir/bluestore-file"
    store_conf="osd objectstore = bluestore
bluestore block path = $bs_file
bluestore block create = true
bluestore block size = $bs_bytes
bluestore block db create = false
bluestore block wal create = false
bluestore cache autotune = false
bluestore cache size = 134217728
osd memory target = 939524096"
else
    store_conf="osd objectstore = memstore
memstore device bytes = $mem_bytes"
fi

cat >"$conf" <<EOF
# Throwaway test cluster written by tools/ceph-rgw/start.sh; removed by stop.sh.
[global]
fsid = $fsid
mon host = v2:127.0.0.1:$mon_port
public addr = 127.0.0.1
cluster addr = 127.0.0.1
auth cluster required = none
auth service required = none
auth client required = none
ms mon client mode = crc
keyring = $dir/keyring
run dir = $dir/run
admin socket = $dir/run/\$name.asok
log file = $dir/log/\$name.log
mon cluster log file = $dir/log/cluster.log
crash dir = $dir/crash
log to stderr = false
err to stderr = false
mon data = $dir/mon.\$id
osd data = $dir/osd.\$id
mon allow pool size one = true
mon warn on pool no redundancy = false
mon allow pool delete = true
mon data avail warn = 2
# Each pool radosgw creates costs two osdmap epochs: propose them quickly.
paxos propose interval = 0.1
paxos min wait = 0.01
mon warn on insecure global id reclaim allowed = false
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
$store_conf

[client.rgw.a]
rgw frontends = beast endpoint=127.0.0.1:$port
rgw data = $dir/rgw
rgw thread pool size = 64
# Deleted objects' tails are freed by garbage collection, 2 h later by default;
# a memstore OSD holds them in RAM until then.
rgw gc obj min wait = 30
rgw gc processor period = 30
${ARTIFACTFS_RGW_EXTRA_CONF:-}
EOF
: >"$dir/keyring"
echo "$port" >"$dir/port"

ceph=(ceph -c "$conf" --connect-timeout 10)

# Background daemon, foreground mode, pid file written here at once so stop.sh
# can find it whatever happens next.
daemon() {
    local name=$1; shift
    setsid "$@" -c "$conf" -f </dev/null >>"$dir/log/$name.out" 2>&1 9>&- &
    echo $! >"$dir/run/$name.pid"
}

# Mon.
monmaptool --create --clobber --fsid "$fsid" --addv a "[v2:127.0.0.1:$mon_port]" "$dir/monmap" >"$dir/log/setup.log" 2>&1 ||
    fail "monmaptool failed"
ceph-mon -c "$conf" --mkfs -i a --monmap "$dir/monmap" >>"$dir/log/setup.log" 2>&1 || fail "ceph-mon --mkfs failed"
daemon mon.a ceph-mon -i a

# OSD.
osd_id=$(timeout "$(left)" "${ceph[@]}" osd new "$osd_uuid" 2>>"$dir/log/setup.log") || fail "ceph osd new failed (mon not up?)"
mkdir -p "$dir/osd.$osd_id"
ceph-osd -c "$conf" -i "$osd_id" --mkfs --osd-uuid "$osd_uuid" >>"$dir/log/setup.log" 2>&1 || fail "ceph-osd --mkfs failed"
daemon "osd.$osd_id" ceph-osd -i "$osd_id"
until timeout "$(left)" "${ceph[@]}" osd dump 2>/dev/null | grep "^osd\.$osd_id up " >/dev/null; do
    kill -0 "$(cat "$dir/run/osd.$osd_id.pid")" 2>/dev/null || fail "ceph-osd exited"
    check_deadline
    sleep 0.5
done

rgwa() { timeout "$(left)" radosgw-admin -c "$conf" "$@" >>"$dir/log/setup.log" 2>&1 || fail "radosgw-admin $1 $2 failed"; }
# The test user (this first run of radosgw-admin creates the default zonegroup,
# zone and their pools), then one storage class besides STANDARD, which has to be
# in the zonegroup and zone placement before radosgw starts.
rgwa user create --uid "$uid" --display-name "artifactfs tests" --access-key "$access_key" --secret "$secret_key"
rgwa zonegroup placement add --rgw-zonegroup default --placement-id default-placement --storage-class "$extra_class"
rgwa zone placement add --rgw-zone default --placement-id default-placement --storage-class "$extra_class" \
    --data-pool "default.rgw.$extra_class.data"

# Gateway.
daemon client.rgw.a radosgw -n client.rgw.a
until s3_ok; do
    kill -0 "$(cat "$dir/run/client.rgw.a.pid")" 2>/dev/null || fail "radosgw exited"
    check_deadline
    sleep 0.3
done
log "S3 gateway up on $endpoint in $((SECONDS - t0))s ($store OSD; dir $dir)"
log "credentials: eval \"\$($here/env.sh --port $port)\""
