#!/usr/bin/env bash
# `npm run bench`: every benchmark, each beside its baseline in the same run.
# A missed target does not stop the others; the exit status says if any missed.
set -uo pipefail
cd "$(dirname "$0")/.."
mkdir -p bench/results
status=0

echo "== phases, exec, streaming (bench/run.mjs)" >&2
node --expose-gc bench/run.mjs || status=1

for b in policy-eval sql-classify audit-throughput; do
  echo "== $b (bench/$b.mjs)" >&2
  node "bench/$b.mjs" > "bench/results/$b.json" || status=1
done

[ "$status" -eq 0 ] || echo "bench: at least one target was missed (see above)" >&2
exit "$status"
