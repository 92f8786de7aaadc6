#!/usr/bin/env bash
# `npm run bench`: every benchmark, each beside its baseline in the same run.
# A missed target does not stop the others; the exit status says if any missed.
set -uo pipefail
cd "$(dirname "$0")/.."
mkdir -p bench/results
status=0

echo "== phases, exec, streaming (bench/run.mjs)" >&2
node --expose-gc bench/run.mjs || status=1

# The gateway bench measures Redis through the tunnel: redis-server and
# redis-benchmark must be there. As root on an apt system this installs them
# (and says so); otherwise it says what to install, and Redis is reported as
# not measured.
bash scripts/ensure-test-tools.sh || echo "bench: redis-server missing; the Redis round trip will not be measured" >&2

# Each ends its stdout with a JSON document (after any table): that document is kept.
# workspace: the change layer on a generated 100k-file tree (needs root, docker and the sandbox image)
for b in policy-eval sql-classify audit-throughput gateway workspace; do
  echo "== $b (bench/$b.mjs)" >&2
  node "bench/$b.mjs" > "bench/results/$b.out" || status=1
  node -e '
    const fs = require("fs");
    const [src, dst] = process.argv.slice(1);
    const text = fs.readFileSync(src, "utf8");
    // the JSON document starts at the first line that begins with "{"
    const at = text.search(/^\{/m);
    if (at > 0) process.stderr.write(text.slice(0, at));
    fs.writeFileSync(dst, JSON.stringify(JSON.parse(text.slice(at)), null, 2) + "\n");
  ' "bench/results/$b.out" "bench/results/$b.json" || status=1
  rm -f "bench/results/$b.out"
done

[ "$status" -eq 0 ] || echo "bench: at least one target was missed (see above)" >&2
exit "$status"
