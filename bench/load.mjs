#!/usr/bin/env node
/**
 * Load and correctness under concurrency (issue 13): N phases × C concurrent
 * execs for D seconds, then 1 phase × C1 concurrent execs, against a real
 * daemon process, real containers, over the real socket — and, in the same
 * run, bench/run.mjs's exec round trip and 200 MiB stream before, between
 * and after the two load parts, so a change in those shows beside the load.
 *
 * Every exec is a command whose true outcome is known before it runs, so its
 * result is checked against what the command really did:
 *   echo       `echo TOKEN`: exit 0, stdout exactly "TOKEN\n", no stderr
 *   exit       `python3 work.py exit N`: exit N, no output
 *   output     `python3 work.py out K E N TOKEN`: exactly K bytes of stdout and
 *              E of stderr, each a known pattern of TOKEN (compared byte for
 *              byte: K goes up to 300 kB, under the 1 MiB output cap), exit N
 *   sleep      `sleep 0.3` under a 10 s timeout: must not fire (exit 0, ≥ 300 ms)
 *   timeout    `sleep 30` under a 1 s timeout: must fire (timedOut, not exit 0,
 *              ended well before 30 s)
 * A result that differs is "wrong" (kept in the report with what was
 * expected); an API error (no result for a command the caller sent) is
 * counted apart. Both make the exit status 1.
 *
 *   node bench/load.mjs [--phases 10] [--concurrency 20] [--duration 60]
 *                       [--single-concurrency 50] [--single-duration 60]
 *                       [--run-rounds 3]   (0: no bench/run.mjs rounds)
 *
 * Reports per part: execs, throughput (results/s), wrong, API errors,
 * latency p50/p99 (ms, per part and per kind), the load average
 * (/proc/loadavg) before and after; the daemon's RSS (start, peak sampled
 * every 100 ms, after each part with its phases stopped, at the end after
 * 5 s idle); the audit chain verified at the end (`audit verify`). Each
 * bench/run.mjs round (BENCH_ONLY=exec,stream, its own daemon) is
 * summarised beside them. Run as root (projects are owned by uid 1000);
 * honours SANDBOXD_IMAGE. Ends its stdout with a JSON document, also written
 * to bench/results/load.json (BENCH_LOAD_OUT).
 */
import { execFileSync, spawn } from "node:child_process";
import { randomBytes } from "node:crypto";
import { chownSync, closeSync, mkdirSync, mkdtempSync, openSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import http from "node:http";
import os from "node:os";
import path from "node:path";
import { performance } from "node:perf_hooks";
import { fileURLToPath } from "node:url";
import { quantile, round } from "./lib.mjs";

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
const CLI = path.join(ROOT, "dist", "cli", "main.js");
const OUT = process.env.BENCH_LOAD_OUT || path.join(ROOT, "bench", "results", "load.json");

function arg(name, dflt) {
  const i = process.argv.indexOf(`--${name}`);
  return i > 0 ? Number(process.argv[i + 1]) : dflt;
}
const PHASES = arg("phases", 10);
const CONC = arg("concurrency", 20);
const DURATION_S = arg("duration", 60);
const SINGLE_CONC = arg("single-concurrency", 50);
const SINGLE_DURATION_S = arg("single-duration", DURATION_S);
const RUN_ROUNDS = arg("run-rounds", 3);

if (process.getuid?.() !== 0) {
  console.error("run as root: projects are owned by uid 1000 (sandboxd refuses root-owned projects)");
  process.exit(2);
}

const say = (msg) => process.stderr.write(`load: ${msg}\n`);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const loadavg = () => readFileSync("/proc/loadavg", "utf8").trim();

/* ------------------------------- the work ------------------------------- */

// `python3 work.py exit N` | `python3 work.py out K E N TOKEN`
const WORK = `import sys
def pattern(token, n):
    unit = (token + "\\n").encode()
    return (unit * (n // len(unit) + 1))[:n]
if sys.argv[1] == "exit":
    sys.exit(int(sys.argv[2]))
out, err, code, token = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
sys.stdout.buffer.write(pattern("o-" + token, out))
sys.stdout.flush()
sys.stderr.buffer.write(pattern("e-" + token, err))
sys.stderr.flush()
sys.exit(code)
`;

/** The bytes work.py writes for `n` bytes of `token` (same as pattern() above). */
function pattern(token, n) {
  const unit = `${token}\n`;
  return unit.repeat(Math.floor(n / unit.length) + 1).slice(0, n);
}

const TIMEOUT_FIRES_MS = 1000;

/** What one exec will do, and so exactly what its result must say. */
function pickJob(rng) {
  const token = randomBytes(6).toString("hex");
  const int = (lo, hi) => lo + Math.floor(rng() * (hi - lo + 1));
  const r = rng();
  if (r < 0.25) return { kind: "echo", argv: ["echo", token], timeoutMs: 30_000, code: 0, stdout: `${token}\n`, stderr: "" };
  if (r < 0.4) {
    const code = int(1, 125);
    return { kind: "exit", argv: ["python3", "work.py", "exit", String(code)], timeoutMs: 30_000, code, stdout: "", stderr: "" };
  }
  if (r < 0.75) {
    // mostly small, one in five 200–300 kB (several socket reads, flow control)
    const out = rng() < 0.2 ? int(200_000, 300_000) : int(0, 5000);
    const err = rng() < 0.5 ? 0 : int(1, 2000);
    const code = rng() < 0.7 ? 0 : int(1, 3);
    return {
      kind: "output",
      argv: ["python3", "work.py", "out", String(out), String(err), String(code), token],
      timeoutMs: 30_000,
      code,
      stdout: pattern(`o-${token}`, out),
      stderr: pattern(`e-${token}`, err),
    };
  }
  if (r < 0.92) return { kind: "sleep", argv: ["sleep", "0.3"], timeoutMs: 10_000, code: 0, stdout: "", stderr: "", minMs: 300 };
  return { kind: "timeout", argv: ["sleep", "30"], timeoutMs: TIMEOUT_FIRES_MS, timedOut: true };
}

function check(job, res) {
  const problems = [];
  if (job.timedOut) {
    if (res.timedOut !== true) problems.push(`timedOut ${res.timedOut}, expected true`);
    if (res.exitCode === 0) problems.push("exit 0 for a command killed at its timeout");
    if (!(res.durationMs >= TIMEOUT_FIRES_MS)) problems.push(`ended after ${res.durationMs} ms, before its ${TIMEOUT_FIRES_MS} ms timeout`);
    if (!(res.durationMs < 25_000)) problems.push(`ended after ${res.durationMs} ms: not killed at its timeout`);
    return problems;
  }
  if (res.timedOut !== false) problems.push(`timedOut ${res.timedOut} for a command that ended on its own`);
  if (res.exitCode !== job.code) problems.push(`exit ${res.exitCode} (signal ${res.signal}), expected ${job.code}`);
  const outBytes = Buffer.byteLength(job.stdout);
  const errBytes = Buffer.byteLength(job.stderr);
  if (res.stdoutBytes !== outBytes) problems.push(`stdoutBytes ${res.stdoutBytes}, expected ${outBytes}`);
  if (res.stderrBytes !== errBytes) problems.push(`stderrBytes ${res.stderrBytes}, expected ${errBytes}`);
  if (res.stdoutTruncated || res.stdout !== job.stdout) problems.push(`stdout differs: ${JSON.stringify(res.stdout.slice(0, 80))}, expected ${JSON.stringify(job.stdout.slice(0, 80))}`);
  if (res.stderrTruncated || res.stderr !== job.stderr) problems.push(`stderr differs: ${JSON.stringify(res.stderr.slice(0, 120))}, expected ${JSON.stringify(job.stderr.slice(0, 80))}`);
  if (job.minMs && !(res.durationMs >= job.minMs)) problems.push(`ended after ${res.durationMs} ms, before its ${job.minMs} ms sleep`);
  return problems;
}

/* ------------------------------- plumbing ------------------------------- */

function request(socket, method, url, body) {
  return new Promise((resolve, reject) => {
    const data = body === undefined ? undefined : Buffer.from(JSON.stringify(body));
    const req = http.request(
      { socketPath: socket, method, path: url, headers: data ? { "content-type": "application/json", "content-length": data.length } : {} },
      (res) => {
        const chunks = [];
        res.on("data", (c) => chunks.push(c));
        res.on("end", () => {
          const text = Buffer.concat(chunks).toString("utf8");
          let json;
          try {
            json = JSON.parse(text);
          } catch {
            return reject(new Error(`${res.statusCode}: ${text.slice(0, 200)}`));
          }
          if (res.statusCode >= 400) return reject(Object.assign(new Error(json.error?.message ?? text), { code: json.error?.code }));
          resolve(json);
        });
        res.on("error", reject);
      },
    );
    req.on("error", reject);
    req.end(data);
  });
}

function mulberry32(seed) {
  return () => {
    seed |= 0;
    seed = (seed + 0x6d2b79f5) | 0;
    let t = Math.imul(seed ^ (seed >>> 15), 1 | seed);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function rssMb(pid) {
  try {
    const m = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, "utf8"));
    return m ? Math.round(Number(m[1]) / 1024) : NaN;
  } catch {
    return NaN;
  }
}

const ms = (sorted, q) => round(quantile(sorted, q), 1);

/* --------------------------------- load --------------------------------- */

async function part(name, socket, phaseIds, conc, seconds) {
  const load0 = loadavg();
  const t0 = performance.now();
  const deadline = Date.now() + seconds * 1000;
  const latencies = [];
  const byKind = {};
  const wrong = [];
  const errors = new Map();
  const errorSamples = [];
  let total = 0;
  let seed = 1;
  // A timeout is a `runtime` failure for SKILLS.md's fail-fast count (limit 2):
  // two in a row would escalate (and freeze) the phase. So at most one
  // timeout job runs per phase at a time, and the worker that ran it runs an
  // `echo` next — a success of the same tool ("other"), which resets the count
  // — before another may start. Every other job's failure is `unknown` (not
  // counted): a plain exit code with no traceback.
  const timeoutBusy = new Set();
  const runOne = async (id, job) => {
    const s0 = performance.now();
    total++;
    try {
      const { result } = await request(socket, "POST", `/v1/phases/${id}/exec`, { argv: job.argv, timeoutMs: job.timeoutMs });
      const took = performance.now() - s0;
      latencies.push(took);
      (byKind[job.kind] ??= []).push(took);
      const problems = check(job, result);
      if (problems.length) {
        wrong.push({ phase: id, kind: job.kind, argv: job.argv.join(" ").slice(0, 80), problems, result: { ...result, stdout: result.stdout.slice(0, 200), stderr: result.stderr.slice(0, 300) } });
      }
    } catch (e) {
      const key = e.code ?? e.message;
      errors.set(key, (errors.get(key) ?? 0) + 1);
      if (errorSamples.length < 20) errorSamples.push({ phase: id, kind: job.kind, argv: job.argv.join(" ").slice(0, 80), error: `${key}: ${e.message}`.slice(0, 300), afterMs: Math.round(performance.now() - s0) });
      await sleep(100); // no busy loop against a phase that refuses everything
    }
  };
  await Promise.all(
    phaseIds.flatMap((id) =>
      Array.from({ length: conc }, async () => {
        const rng = mulberry32(seed++);
        while (Date.now() < deadline) {
          let job = pickJob(rng);
          if (job.kind === "timeout" && timeoutBusy.has(id)) job = pickJob(() => 0.9); // a sleep that must not fire instead
          if (job.kind !== "timeout") {
            await runOne(id, job);
            continue;
          }
          timeoutBusy.add(id);
          try {
            await runOne(id, job);
            await runOne(id, pickJob(() => 0)); // echo: resets the runtime count
          } finally {
            timeoutBusy.delete(id);
          }
        }
      }),
    ),
  );
  const wallS = (performance.now() - t0) / 1000;
  latencies.sort((a, b) => a - b);
  const kinds = Object.fromEntries(
    Object.entries(byKind).map(([k, v]) => {
      v.sort((a, b) => a - b);
      return [k, { n: v.length, p50ms: ms(v, 0.5), p99ms: ms(v, 0.99) }];
    }),
  );
  return {
    name,
    phases: phaseIds.length,
    concurrency: conc,
    seconds,
    wallS: round(wallS, 1),
    execs: total,
    results: latencies.length,
    throughputPerS: round(latencies.length / wallS, 1),
    wrong: wrong.length,
    apiErrors: Object.fromEntries(errors),
    p50ms: ms(latencies, 0.5),
    p99ms: ms(latencies, 0.99),
    maxMs: round(latencies.at(-1), 1),
    kinds,
    loadavgBefore: load0,
    loadavgAfter: loadavg(),
    wrongSamples: wrong.slice(0, 20),
    errorSamples,
  };
}

/* ------------------------- bench/run.mjs rounds ------------------------- */

/** One bench/run.mjs exec + stream round (its own daemon, its own phase), summarised. */
async function runRound(i) {
  const out = path.join(ROOT, "bench", "results", `load-run-${i}.json`);
  const load0 = loadavg();
  say(`bench/run.mjs round ${i} (BENCH_ONLY=exec,stream), load ${load0}`);
  const child = spawn(process.execPath, ["--expose-gc", path.join(ROOT, "bench", "run.mjs")], {
    stdio: ["ignore", "ignore", "pipe"],
    env: { ...process.env, BENCH_ONLY: "exec,stream", BENCH_OUT: out },
  });
  let err = "";
  child.stderr.on("data", (c) => (err = (err + c.toString()).slice(-4000)));
  const code = await new Promise((r) => child.once("exit", (c) => r(c)));
  if (code !== 0) return { round: i, error: `bench/run.mjs exited ${code}: ${err.slice(-1000)}` };
  const r = JSON.parse(readFileSync(out, "utf8"));
  const b = r.benchmarks.exec;
  const c = r.benchmarks.stream;
  return {
    round: i,
    loadavgBefore: load0,
    loadavgAfter: loadavg(),
    execApiP50ms: b?.api.p50,
    execApiP95ms: b?.api.p95,
    dockerExecP50ms: b?.dockerExec.p50,
    execRatioP50: b?.apiRatioP50,
    cliP50ms: b?.cli.p50,
    streamMBpsP50: c?.apiMBps.p50,
    streamMBpsMin: c?.apiMBps.min,
    streamMBpsMax: c?.apiMBps.max,
    dockerStreamMBpsP50: c?.dockerExecMBps.p50,
    streamRssGrowthMaxMB: c?.daemonRssGrowthMB.max,
    streamOtherCpuS: c?.cpuSecondsPerRunMean?.api?.otherOnMachine,
    file: path.relative(ROOT, out),
  };
}

/* --------------------------------- main --------------------------------- */

async function main() {
  const report = {
    bench: "load",
    date: new Date().toISOString(),
    command: `node bench/load.mjs ${process.argv.slice(2).join(" ")}`.trim(),
    commit: (() => {
      try {
        return execFileSync("git", ["-C", ROOT, "rev-parse", "--short", "HEAD"], { encoding: "utf8" }).trim();
      } catch {
        return null;
      }
    })(),
    image: process.env.SANDBOXD_IMAGE ?? "(default)",
    cpus: os.cpus().length,
    loadavgAtStart: loadavg(),
    parts: [],
    runRounds: [],
  };
  const rounds = [];
  const roundNext = async () => {
    if (rounds.length < RUN_ROUNDS) rounds.push(await runRound(rounds.length + 1));
  };

  await roundNext();

  const tmp = mkdtempSync(path.join(os.tmpdir(), "sbx-load-"));
  const socket = path.join(tmp, "s.sock");
  const project = path.join(tmp, "project");
  const stateDir = path.join(tmp, "state");
  mkdirSync(project);
  writeFileSync(path.join(project, "work.py"), WORK);
  chownSync(project, 1000, 1000);
  chownSync(path.join(project, "work.py"), 1000, 1000);
  const logFile = path.join(tmp, "daemon.log");
  const logFd = openSync(logFile, "a");
  const daemon = spawn(process.execPath, [CLI, "--socket", socket, "start", "--state-dir", stateDir], {
    stdio: ["ignore", logFd, logFd],
    // `echo` and `sleep` are not on the SKILLS.md whitelist; the operator allows them for the bench
    env: { ...process.env, SANDBOXD_LOG_LEVEL: "warn", SANDBOXD_BUILD_LOG: "state", SANDBOXD_EXTRA_ALLOW: "echo,sleep" },
  });
  closeSync(logFd);
  const live = new Set();
  const cleanup = async () => {
    for (const id of live) await request(socket, "DELETE", `/v1/phases/${id}`).catch(() => undefined);
    if (daemon.exitCode === null && daemon.signalCode === null) {
      daemon.kill("SIGTERM");
      await new Promise((r) => daemon.once("exit", r));
    }
    rmSync(tmp, { recursive: true, force: true });
  };
  process.once("SIGINT", () => void cleanup().then(() => process.exit(130)));
  const tail = () => readFileSync(logFile, "utf8").split("\n").slice(-40).join("\n");
  let sampler;
  try {
    for (let i = 0; ; i++) {
      try {
        await request(socket, "GET", "/v1/health");
        break;
      } catch {
        if (i > 600 || daemon.exitCode !== null) throw new Error(`daemon did not start:\n${tail()}`);
        await sleep(100);
      }
    }
    const rss = { startMb: rssMb(daemon.pid), peakMb: 0, afterPartMb: [] };
    sampler = setInterval(() => (rss.peakMb = Math.max(rss.peakMb, rssMb(daemon.pid) || 0)), 100);
    const start = async (n) => {
      const ids = [];
      for (let i = 0; i < n; i++) {
        const id = (await request(socket, "POST", "/v1/phases", { project, phase: `load-${i}`, mode: "backtest" })).phase.id;
        live.add(id);
        ids.push(id);
      }
      return ids;
    };
    const stop = async (ids) => {
      await Promise.all(ids.map((id) => request(socket, "DELETE", `/v1/phases/${id}`)));
      for (const id of ids) live.delete(id);
    };
    const loadPart = async (name, n, conc, seconds) => {
      say(`${name} for ${seconds} s, load ${loadavg()}`);
      const ids = await start(n);
      const p = await part(name, socket, ids, conc, seconds);
      await stop(ids);
      rss.afterPartMb.push(rssMb(daemon.pid));
      report.parts.push(p);
    };

    await loadPart(`${PHASES} phases × ${CONC}`, PHASES, CONC, DURATION_S);
    await roundNext();
    await loadPart(`1 phase × ${SINGLE_CONC}`, 1, SINGLE_CONC, SINGLE_DURATION_S);
    await sleep(5000);
    rss.endMb = rssMb(daemon.pid);
    clearInterval(sampler);
    report.daemonRssMb = rss;
    try {
      const v = execFileSync(process.execPath, [CLI, "audit", "verify", "--state-dir", stateDir, "--json"], { encoding: "utf8" });
      report.auditVerify = JSON.parse(v);
    } catch (e) {
      report.auditVerify = { ok: false, error: String(e.stdout || e.message).slice(0, 1000) };
    }
  } finally {
    clearInterval(sampler);
    await cleanup();
  }
  await roundNext();
  while (rounds.length < RUN_ROUNDS) await roundNext();
  report.runRounds = rounds;
  report.loadavgAtEnd = loadavg();

  for (const p of report.parts) {
    console.error(
      `${p.name.padEnd(18)} ${String(p.results).padStart(6)} results in ${p.wallS} s (${p.throughputPerS}/s)   wrong ${p.wrong}   api errors ${JSON.stringify(p.apiErrors)}   p50 ${p.p50ms} ms   p99 ${p.p99ms} ms   load ${p.loadavgBefore} → ${p.loadavgAfter}`,
    );
    for (const [k, v] of Object.entries(p.kinds)) console.error(`   ${k.padEnd(8)} n ${String(v.n).padStart(5)}   p50 ${v.p50ms} ms   p99 ${v.p99ms} ms`);
    for (const w of p.wrongSamples) console.error(`   wrong (${w.kind}: ${w.argv}): ${w.problems.join("; ")}`);
    for (const w of p.errorSamples) console.error(`   api error (${w.kind}: ${w.argv}) after ${w.afterMs} ms: ${w.error}`);
  }
  const r = report.daemonRssMb;
  console.error(`daemon RSS: start ${r.startMb} MB, peak ${r.peakMb} MB, after each part ${r.afterPartMb.join(" / ")} MB, end (5 s idle) ${r.endMb} MB`);
  console.error(`audit verify: ${JSON.stringify(report.auditVerify).slice(0, 300)}`);
  for (const x of report.runRounds) {
    if (x.error) console.error(`run.mjs round ${x.round}: ${x.error}`);
    else
      console.error(
        `run.mjs round ${x.round}: exec true API p50 ${x.execApiP50ms} ms (docker exec ${x.dockerExecP50ms} ms, ratio ${x.execRatioP50}); 200 MiB stream p50 ${x.streamMBpsP50} MB/s (${x.streamMBpsMin}–${x.streamMBpsMax}; docker exec ${x.dockerStreamMBpsP50}), RSS growth max ${x.streamRssGrowthMaxMB} MB; load ${x.loadavgBefore} → ${x.loadavgAfter}`,
      );
  }
  mkdirSync(path.dirname(OUT), { recursive: true });
  writeFileSync(OUT, JSON.stringify(report, null, 2) + "\n");
  console.log(JSON.stringify(report, null, 2));
  const bad = report.parts.reduce((n, p) => n + p.wrong + Object.values(p.apiErrors).reduce((a, b) => a + b, 0), 0);
  process.exitCode = bad === 0 && report.auditVerify?.ok !== false ? 0 : 1;
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
