#!/usr/bin/env bash
# The main job on the embedded default: generate two successive guide-board runs, ingest both
# into the default local store (~/.local/share/artifactfs, or $ARTIFACTFS_STORE), then show
# what dedup saved, verify the store and export a run back bit-exact.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p artifactfs -p guide-board-sim
bin=target/release
work=$(mktemp -d /tmp/artifactfs-demo.XXXXXX)
trap 'rm -rf "$work"' EXIT
"$bin/guide-board-sim" generate --out "$work/src" --runs 2 --size 64MiB
stamp=$(date +%Y%m%d-%H%M%S)
for run in run-0000 run-0001; do
    echo "== artifactfs ingest $run demo/$stamp-$run"
    "$bin/artifactfs" ingest "$work/src/$run" "demo/$stamp-$run"
done
echo "== artifactfs stats"
"$bin/artifactfs" stats
echo "== artifactfs verify"
"$bin/artifactfs" verify
"$bin/artifactfs" export "demo/$stamp-run-0001" "$work/export"
diff -r "$work/src/run-0001" "$work/export" && echo "== export of demo/$stamp-run-0001 equals its source"
