#!/usr/bin/env bash
# The S3 tier against the test gateway (tools/ceph-rgw/start.sh), one store, one run.
#
#   benches/s3.sh [--size MIB] [--debug]
#
# Writes SIZE MiB (default 512) of random bytes (incompressible, so stored bytes = raw bytes)
# as four files, ingests them into a store tiered to a fresh bucket, and measures:
#   - `artifactfs tier push` (upload and the configured check of every pack), wall and MB/s;
#   - `aws s3 cp --recursive` of the same pack files up to the same gateway and back down
#     (awscli's defaults: 10 requests at once, multipart above 8 MiB): the limit;
#   - `artifactfs export` of the run with every pack local (warm), then, with every pack
#     evicted and no range cache, cold `export`, cold `cat` of one file, cold `verify`;
#   - when /dev/fuse and fusermount3 are there, `cat` of another file through a fresh mount,
#     page cache dropped, once with every pack local (warm) and once evicted (cold);
# each read checked bit-exact; and prints a Markdown table with the ratios push/aws-up,
# cold-read/aws-down and, through the mount, cold/warm.
# MB = 10^6 bytes. The bucket is removed at the end.
#
# --debug uses the debug binary (a quick check that the script works; not for figures).
# Work files go to a fresh directory under $BENCH_DIR (default: a mktemp directory under /tmp),
# removed on exit unless KEEP=1. Needs awscli (`aws`) and curl.
set -euo pipefail

mib=512
debug=0
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
while [[ $# -gt 0 ]]; do
    case $1 in
    --size) mib=${2:?--size needs a value}; shift 2 ;;
    --debug) debug=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "unknown argument $1" >&2; usage >&2; exit 2 ;;
    esac
done
[[ $mib =~ ^[0-9]+$ && $mib -ge 4 ]] || die "--size must be a whole number of MiB, at least 4"

# shellcheck source=benches/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
command -v aws >/dev/null || die "aws (awscli) is needed"
command -v curl >/dev/null || die "curl is needed"

if [[ $debug == 1 ]]; then
    AFS=$REPO/target/debug/artifactfs
    (cd "$REPO" && cargo build --quiet -p artifactfs) >&2
else
    echo "building the release binary ..." >&2
    (cd "$REPO" && cargo build --release --quiet -p artifactfs) >&2
fi

# A gateway this script starts is stopped at the end (it holds GiBs of RAM and a core's share).
rgw_log=$(bash "$REPO/tools/ceph-rgw/start.sh" 2>&1 >/dev/null) || die "$rgw_log"
echo "$rgw_log" >&2
grep -q "already running" <<<"$rgw_log" && stop_rgw=0 || stop_rgw=1
eval "$(bash "$REPO/tools/ceph-rgw/env.sh")"
make_work s3
bucket=afs-bench-$$-$RANDOM
mnt=$WORK/mnt
s3() { aws --endpoint-url "$AWS_ENDPOINT_URL" s3 "$@"; }
on_exit() {
    fusermount3 -uz "$mnt" 2>/dev/null || true
    s3 rb --force "s3://$bucket" >/dev/null 2>&1 || true
    cleanup "$WORK"
    if [[ $stop_rgw == 1 ]]; then bash "$REPO/tools/ceph-rgw/stop.sh" >&2 || true; fi
}
trap on_exit EXIT
s3 mb "s3://$bucket" >/dev/null

afs() { "$AFS" --store "$WORK/store" "$@"; }
# timed OUT CMD...: runs CMD, writes its wall seconds to OUT.
timed() {
    local out=$1 t0 t1
    shift
    wait_quiet
    t0=$(date +%s.%N)
    prio "$@"
    t1=$(date +%s.%N)
    echo "$t1 - $t0" | bc -l >"$out"
}
mbps() { echo "scale=1; $1 / 1000000 / $(cat "$2")" | bc -l; }
secs() { printf '%.2f' "$(cat "$1")"; }

# mount_cat LABEL FILE: `cat` of FILE of the run through a fresh mount of the store (page cache
# dropped first, as root), timed and checked; appends its table row to $WORK/mount-rows.
# Without /dev/fuse and fusermount3, does nothing.
mount_cat() {
    local label=$1 file=$2 bytes
    [[ -e /dev/fuse ]] && command -v fusermount3 >/dev/null || return 0
    mkdir -p "$mnt"
    "$AFS" --store "$WORK/store" mount "$mnt" >/dev/null
    sync
    [[ -w /proc/sys/vm/drop_caches ]] && echo 3 >/proc/sys/vm/drop_caches
    timed "$WORK/mcat-$label.t" bash -c "cat '$mnt/bench/run/$file' >'$WORK/mcat.out'"
    cmp -s "$WORK/src/$file" "$WORK/mcat.out" || die "$label cat through the mount differs"
    bytes=$(stat -c %s "$WORK/mcat.out")
    rm -f "$WORK/mcat.out"
    "$AFS" umount "$mnt"
    echo "| \`cat\` of one file through the mount, $label | $bytes | $(secs "$WORK/mcat-$label.t") | $(mbps "$bytes" "$WORK/mcat-$label.t") |" >>"$WORK/mount-rows"
}

echo "writing $mib MiB of random bytes ..." >&2
mkdir -p "$WORK/src"
quarter=$((mib / 4))
for i in 0 1 2; do head -c $((quarter << 20)) /dev/urandom >"$WORK/src/part-$i.bin"; done
head -c $(((mib - 3 * quarter) << 20)) /dev/urandom >"$WORK/src/part-3.bin"
raw=$((mib << 20))

afs init --backend "s3://$bucket/site" --cache-size 64GiB >/dev/null
afs ingest "$WORK/src" bench/run >/dev/null
packs_dir=$WORK/store/objects/packs
pack_bytes=$(find "$packs_dir" -type f -printf "%s\n" | awk "{s += \$1} END {print s}")
packs=$(find "$packs_dir" -type f | wc -l)

echo "tier push ..." >&2
timed "$WORK/push.t" "$AFS" --store "$WORK/store" tier push --json >"$WORK/push.json"
pushed=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["pack_bytes"])' "$WORK/push.json")
[[ $pushed -eq $pack_bytes ]] || die "push uploaded $pushed bytes of packs, expected $pack_bytes"

echo "warm export ..." >&2
timed "$WORK/warm.t" "$AFS" --store "$WORK/store" export bench/run "$WORK/warm"
cmp -s "$WORK/src/part-0.bin" "$WORK/warm/part-0.bin" || die "warm export differs"
rm -rf "$WORK/warm"
echo "warm cat through a mount ..." >&2
mount_cat warm part-2.bin

echo "aws s3 cp up and down ..." >&2
timed "$WORK/awsup.t" aws --endpoint-url "$AWS_ENDPOINT_URL" s3 cp --recursive --only-show-errors "$packs_dir" "s3://$bucket/awscp/"
timed "$WORK/awsdown.t" aws --endpoint-url "$AWS_ENDPOINT_URL" s3 cp --recursive --only-show-errors "s3://$bucket/awscp/" "$WORK/down/"
diff -r "$packs_dir" "$WORK/down" >/dev/null || die "aws s3 cp round trip differs"
rm -rf "$WORK/down"
s3 rm --recursive --only-show-errors "s3://$bucket/awscp/"

echo "evicting every pack ..." >&2
sed -i 's/^cache_size = .*/cache_size = 0/' "$WORK/store/config.toml"
afs tier push --json >"$WORK/evict.json"
remote_only=$(afs tier status --json | python3 -c 'import json,sys; s=json.load(sys.stdin); print(s["remote_only_packs"], s["cache_bytes"])')
[[ $remote_only == "$packs 0" ]] || die "after eviction: remote-only packs and cache bytes are $remote_only, expected $packs 0"

echo "cold export, cat, verify ..." >&2
timed "$WORK/cold.t" "$AFS" --store "$WORK/store" export bench/run "$WORK/cold"
for i in 0 1 2 3; do cmp -s "$WORK/src/part-$i.bin" "$WORK/cold/part-$i.bin" || die "cold export of part-$i differs"; done
rm -rf "$WORK/cold"
timed "$WORK/cat.t" bash -c "'$AFS' --store '$WORK/store' cat bench/run/part-3.bin >'$WORK/cat.out'"
cmp -s "$WORK/src/part-3.bin" "$WORK/cat.out" || die "cold cat differs"
cat_bytes=$(stat -c %s "$WORK/cat.out")
rm -f "$WORK/cat.out"
timed "$WORK/verify.t" "$AFS" --store "$WORK/store" verify >/dev/null

echo "cold cat through a mount ..." >&2
mount_cat cold part-2.bin

push_mbps=$(mbps "$pack_bytes" "$WORK/push.t")
up_mbps=$(mbps "$pack_bytes" "$WORK/awsup.t")
down_mbps=$(mbps "$pack_bytes" "$WORK/awsdown.t")
cold_mbps=$(mbps "$raw" "$WORK/cold.t")
cat_mbps=$(mbps "$cat_bytes" "$WORK/cat.t")
verify_mbps=$(mbps "$pack_bytes" "$WORK/verify.t")
warm_mbps=$(mbps "$raw" "$WORK/warm.t")
pct() { echo "scale=0; 100 * $1 / $2" | bc -l; }

verify_mode=$(grep -m1 '^verify' "$WORK/store/config.toml" | sed 's/.*= *//; s/"//g' || true)
cat <<EOF

## benches/s3.sh: $mib MiB of random bytes, $packs packs ($pack_bytes bytes), gateway $AWS_ENDPOINT_URL

$(SIM=true print_versions 2>/dev/null | sed 's/, ``;/;/')
- upload check: ${verify_mode:-reread (default)}; build: $([[ $debug == 1 ]] && echo debug || echo release)

| step | bytes | wall s | MB/s |
|---|---:|---:|---:|
| \`artifactfs tier push\` | $pack_bytes | $(secs "$WORK/push.t") | $push_mbps |
| \`aws s3 cp\` up (the limit) | $pack_bytes | $(secs "$WORK/awsup.t") | $up_mbps |
| \`aws s3 cp\` down (the limit) | $pack_bytes | $(secs "$WORK/awsdown.t") | $down_mbps |
| \`artifactfs export\`, warm (packs local) | $raw | $(secs "$WORK/warm.t") | $warm_mbps |
| \`artifactfs export\`, cold (all evicted) | $raw | $(secs "$WORK/cold.t") | $cold_mbps |
| \`artifactfs cat\` of one file, cold | $cat_bytes | $(secs "$WORK/cat.t") | $cat_mbps |
| \`artifactfs verify\`, cold | $pack_bytes | $(secs "$WORK/verify.t") | $verify_mbps |
$(cat "$WORK/mount-rows" 2>/dev/null)

- push / aws up: $(pct "$push_mbps" "$up_mbps")% (target ≥ 90%)
- cold export / aws down: $(pct "$cold_mbps" "$down_mbps")%; cold cat / aws down: $(pct "$cat_mbps" "$down_mbps")% (target ≥ 70%)
EOF
if [[ -e $WORK/mcat-cold.t ]]; then
    mcat_bytes=$(stat -c %s "$WORK/src/part-2.bin")
    mcold=$(mbps "$mcat_bytes" "$WORK/mcat-cold.t")
    echo "- through the mount: cold (evicted) / warm (packs local): $(pct "$mcold" "$(mbps "$mcat_bytes" "$WORK/mcat-warm.t")")%; cold / aws down: $(pct "$mcold" "$down_mbps")%"
fi
