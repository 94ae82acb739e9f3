#!/usr/bin/env bash
# Runs every cargo-fuzz target of artifactfs (crates/server/fuzz) for SECONDS each (default 60),
# one after the other, with the nightly toolchain and cargo-fuzz (installed with rustup and
# `cargo install cargo-fuzz` if missing). A crash stops the script with libFuzzer's report; the
# input is kept under crates/server/fuzz/artifacts/TARGET/ (not committed). The corpus grows in
# crates/server/fuzz/corpus/TARGET/ (not committed either) and is reused by the next run.
# Usage: tools/fuzz.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/../crates/server/fuzz"

secs=${1:-60}
if ! [[ $secs =~ ^[0-9]+$ ]] || ((secs < 1)); then
    echo "fuzz.sh: SECONDS must be a positive whole number, not ${secs@Q}" >&2
    exit 2
fi
if ! rustup toolchain list | grep -q '^nightly'; then
    echo "fuzz.sh: installing the nightly toolchain" >&2
    rustup toolchain install nightly --profile minimal
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: installing cargo-fuzz" >&2
    cargo install --locked cargo-fuzz
fi

targets=$(cargo +nightly fuzz list)
cargo +nightly fuzz build
for t in $targets; do
    echo "fuzz.sh: $t for ${secs}s" >&2
    mkdir -p "corpus/$t"
    cargo +nightly fuzz run "$t" "corpus/$t" -- -max_total_time="$secs" -print_final_stats=1
done
echo "fuzz.sh: every target ran ${secs}s without a crash:" $targets >&2
