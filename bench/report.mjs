#!/usr/bin/env node
/**
 * Renders bench/results/latest.json (or the file given) as the Markdown tables
 * BENCHMARKS.md carries, so the document is pasted from a real run, not retyped.
 *
 *   node bench/report.mjs [results.json]
 */
import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";

const file = process.argv[2] ?? fileURLToPath(new URL("./results/latest.json", import.meta.url));
const r = JSON.parse(readFileSync(file, "utf8"));
const b = r.benchmarks;
const f = (x, d = 1) => (typeof x === "number" && Number.isFinite(x) ? x.toFixed(d) : "—");
const verdict = (p) => (p ? "**pass**" : "**MISS**");
const out = [];

out.push(`Run of ${r.date} (${r.durationS ?? "?"} s), commit ${r.machine.gitCommit}${r.machine.srcDirty ? " (plus uncommitted src/ changes)" : ""}: ${r.machine.cpus} cores (${r.machine.cpuModel}), ${r.machine.memGiB} GiB, ${r.machine.kernel}; Node ${r.machine.node} (daemon, CLI, bench), Node ${r.machine.imageNode} (shim, in the image); Docker ${r.machine.dockerServer}; load average ${r.machine.loadavgAtStart?.[0]} at start, ${r.machine.loadavgAtEnd?.[0]} at end.`);
out.push("");
out.push("| benchmark | p50 | p95 | mean | min | max | n |");
out.push("| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
const row = (name, s, d = 1) => out.push(`| ${name} | ${f(s.p50, d)} | ${f(s.p95, d)} | ${f(s.mean, d)} | ${f(s.min, d)} | ${f(s.max, d)} | ${s.n} |`);
if (b.phaseStart) {
  row("(a) phase start-to-ready, `POST /v1/phases` (ms)", b.phaseStart.phaseStart);
  row("(a) baseline: `docker run --rm --entrypoint true` (ms)", b.phaseStart.dockerRunBare);
  row("(a) info: same with `--network none` (ms)", b.phaseStart.dockerRunBareNoNetworkInfo);
  row("(a) info: phase stop, `DELETE` (ms)", b.phaseStart.phaseStopInfo);
}
if (b.exec) {
  row("(b) `true` via the API (ms)", b.exec.api, 2);
  row("(b) info: of which daemon → shim → exit (ms)", b.exec.apiShimLegInfo);
  row("(b) info: of which the shim's spawn → exit (ms)", b.exec.shimSpawnToExitInfo);
  if (b.exec.engineApiExec) row("(b) baseline: the Engine API exec of `true`, in-process (dockerode) (ms)", b.exec.engineApiExec);
  row("(b) `sandboxd exec ID -- true`, the CLI as a whole process (ms)", b.exec.cli);
  if (b.exec.cliNodeInfo) row("(b) info: the same on Node, `SANDBOXD_CLI_NODE=1` (ms)", b.exec.cliNodeInfo);
  row("(b) baseline: `docker exec <c> true`, whole process (ms)", b.exec.dockerExec);
}
if (b.stream) {
  if (b.stream.clientMBps) row("(c) 200 MiB stdout via the exported client, `Sandboxd.exec` with `onStdoutBytes` (MB/s)", b.stream.clientMBps);
  if (b.stream.clientTextMBpsInfo) row("(c) info: the same with `onStdout`, as text (MB/s)", b.stream.clientTextMBpsInfo);
  row(`(c) ${b.stream.clientMBps ? "info: " : ""}200 MiB stdout, \`?stream=frames\` over node:http (MB/s)`, b.stream.apiMBps);
  if (b.stream.ndjsonMBpsInfo) row("(c) info: the same as NDJSON, `?stream=1` (MB/s)", b.stream.ndjsonMBpsInfo);
  if (b.stream.cliMBpsInfo) row("(c) info: `sandboxd exec … > /dev/null`, the CLI as a whole process (MB/s)", b.stream.cliMBpsInfo);
  row("(c) baseline: `docker exec <c> …` > /dev/null (MB/s)", b.stream.dockerExecMBps);
  row("(c) daemon peak RSS growth per stream (MB)", b.stream.daemonRssGrowthMB);
}
out.push("");
out.push("| target | measured | verdict |");
out.push("| --- | --- | --- |");
if (b.phaseStart) out.push(`| (a) phase start ≤ 1.3 × bare docker run (p50s) | ${f(b.phaseStart.ratioP50, 2)} × (mean ${f(b.phaseStart.ratioMean, 2)} ×) | ${verdict(b.phaseStart.pass)} |`);
if (b.exec) out.push(`| (b) API exec ≤ 1/10 of the Engine API exec, in-process (p50s) | ${f(b.exec.apiRatioP50, 3)} × (mean ${f(b.exec.apiRatioMean, 3)} ×) | ${verdict(b.exec.pass)} |`);
if (b.exec?.cliTarget) out.push(`| (b) CLI exec ≤ 0.7 × docker exec, whole processes (p50s) | ${f(b.exec.cliRatioP50, 3)} × (mean ${f(b.exec.cliRatioMean, 3)} ×) | ${verdict(b.exec.cliPass)} |`);
if (b.stream) {
  out.push(`| (c) stream ≥ 200 MB/s (p50) | ${f((b.stream.clientMBps ?? b.stream.apiMBps).p50)} MB/s (docker exec: ${f(b.stream.dockerExecMBps.p50)}) | ${verdict(b.stream.targets.throughput.pass)} |`);
  if (b.stream.targets.ratio) out.push(`| (c) stream ≥ 1.5 × docker exec (p50s) | ${f(b.stream.ratioP50, 2)} × | ${verdict(b.stream.targets.ratio.pass)} |`);
  if (b.stream.targets.cliRatio) out.push(`| (c) the CLI process ≥ 1.5 × docker exec, both > /dev/null (p50s) | ${f(b.stream.cliRatioP50, 2)} × | ${verdict(b.stream.targets.cliRatio.pass)} |`);
  out.push(`| (c) daemon RSS growth < 50 MB (every run) | max ${f(b.stream.daemonRssGrowthMB.max)} MB (idle RSS ${f(b.stream.daemonRssIdleMB)} MB) | ${verdict(b.stream.targets.rss.pass)} |`);
}
out.push("");
const busy = Object.entries(b)
  .filter(([, v]) => v.machineDuringRun)
  .map(([k, v]) => `${k} ${Math.round(v.machineDuringRun.cpuBusyFraction * 100)} % (load ${v.machineDuringRun.loadavg1Before} → ${v.machineDuringRun.loadavg1After})`);
if (busy.length) out.push(`Machine CPU busy (all processes, both cores) during each benchmark: ${busy.join("; ")}.`);
const c = b.stream?.cpuSecondsPerRunMean;
if (c?.api) {
  out.push("");
  out.push("| CPU seconds per 200 MiB run (mean) | daemon | consumer (bench) | container | dockerd | rest of the machine |");
  out.push("| --- | ---: | ---: | ---: | ---: | ---: |");
  out.push(`| streaming API (frames) | ${f(c.api.daemon, 2)} | ${f(c.api.consumer, 2)} | ${f(c.api.container, 2)} (python3 + shim) | ${f(c.api.dockerd, 2)} | ${f(c.api.otherOnMachine, 2)} |`);
  if (c.ndjson?.daemon !== undefined) out.push(`| streaming API (NDJSON) | ${f(c.ndjson.daemon, 2)} | ${f(c.ndjson.consumer, 2)} | ${f(c.ndjson.container, 2)} (python3 + shim) | ${f(c.ndjson.dockerd, 2)} | ${f(c.ndjson.otherOnMachine, 2)} |`);
  if (c.cli?.daemon !== undefined) out.push(`| CLI > /dev/null | ${f(c.cli.daemon, 2)} | — (a child process) | ${f(c.cli.container, 2)} (python3 + shim) | ${f(c.cli.dockerd, 2)} | ${f(c.cli.otherOnMachine, 2)} (CLI included) |`);
  out.push(`| docker exec | ${f(c.dockerExec.daemon, 2)} | ${f(c.dockerExec.consumer, 2)} | ${f(c.dockerExec.container, 2)} (python3) | ${f(c.dockerExec.dockerd, 2)} | ${f(c.dockerExec.otherOnMachine, 2)} |`);
}
process.stdout.write(out.join("\n") + "\n");
