#!/usr/bin/env bash
# Runs every test of artifactfs on a fresh Debian 12 machine: installs what the tests need,
# then checks formatting and lints, then runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v fusermount3 >/dev/null || need+=(fuse3)
command -v setfattr >/dev/null || need+=(attr)
command -v setpriv >/dev/null || need+=(util-linux)
command -v rsync >/dev/null || need+=(rsync)
if ((${#need[@]})); then
    echo "test.sh: installing ${need[*]}" >&2
    if [[ $(id -u) -eq 0 ]]; then sudo=(); else sudo=(sudo); fi
    "${sudo[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq "${need[@]}" >/dev/null
fi

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# The S3 backend's tests run against a real Ceph RGW on 127.0.0.1:7480 (installed on first
# use); it keeps everything in RAM, so it is stopped and wiped whatever the tests did.
tools/ceph-rgw/start.sh
trap 'tools/ceph-rgw/stop.sh' EXIT
cargo test --workspace --locked
