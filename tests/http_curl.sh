#!/usr/bin/env bash
# The HTTP API with curl alone: create a run, upload files, seal, download, compare hashes.
# Usage: tests/http_curl.sh BASE_URL SCRATCH_DIR   (run by `cargo test --test http`)
set -euo pipefail
base=$1
dir=$2
mkdir -p "$dir"
cd "$dir"
sum() { if command -v b3sum >/dev/null; then b3sum --no-names "$1"; else sha256sum "$1" | cut -d' ' -f1; fi; }

head -c 3000000 /dev/urandom > big.bin
printf 'plain text\n' > small.txt
curl -fsS -X POST "$base/v1/runs" -H 'content-type: application/json' \
  -d '{"namespace": "curl", "run": "r1", "metadata": {"tool": "curl"}}' > created.json
grep -q '"state":"open"' created.json
curl -fsS -T big.bin "$base/v1/runs/curl/r1/files/data/big.bin" > put1.json
curl -fsS -T small.txt "$base/v1/runs/curl/r1/files/small.txt" > put2.json
if command -v b3sum >/dev/null; then
  grep -q "\"blake3\":\"$(b3sum --no-names big.bin)\"" put1.json
fi
curl -fsS -X POST "$base/v1/runs/curl/r1/seal" > sealed.json
grep -q '"digest":"' sealed.json
curl -fsS -o got-big.bin "$base/v1/runs/curl/r1/files/data/big.bin"
curl -fsS -o got-small.txt "$base/v1/runs/curl/r1/files/small.txt"
[ "$(sum big.bin)" = "$(sum got-big.bin)" ]
[ "$(sum small.txt)" = "$(sum got-small.txt)" ]
# A range: bytes 1000..1999.
curl -fsS -r 1000-1999 -o part.bin "$base/v1/runs/curl/r1/files/data/big.bin"
dd if=big.bin of=want-part.bin bs=1000 skip=1 count=1 status=none
cmp part.bin want-part.bin
# A write to the sealed run is refused with a JSON error.
code=$(curl -sS -o err.json -w '%{http_code}' -T small.txt "$base/v1/runs/curl/r1/files/late.txt")
[ "$code" = 409 ]
grep -q '"code":' err.json
echo "curl round trip ok"
