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
# The event publisher's tests run against a real nats-server with JetStream on 127.0.0.1:4222
# (installed on first use; some tests start their own on other ports); stopped and wiped too.
trap 'tools/nats/stop.sh; tools/ceph-rgw/stop.sh' EXIT
tools/ceph-rgw/start.sh
tools/nats/start.sh
export ARTIFACTFS_TEST_NATS=${ARTIFACTFS_TEST_NATS:-nats://127.0.0.1:4222}
cargo test --workspace --locked
