#!/usr/bin/env node
/**
 * Load and correctness under concurrency (issue 13): N phases × C concurrent
 * execs for D seconds, then 1 phase × C1 concurrent execs, against a real
 * daemon process, real containers, over the real socket.
 *
 * Every exec runs bench's work.py with arguments that say exactly what it
 * will do — how many bytes to write on stdout and on stderr, which exit code,
 * or to sleep past its timeout — so every result is checked against what the
 * command really did: exit code, stdout and stderr byte counts, the timeout
 * flag. A result that differs is "wrong" (and kept in the report with what
 * was expected); an API error is counted apart.
 *
 *   node bench/load.mjs [--phases 10] [--concurrency 20] [--duration 60]
 *                       [--single-concurrency 50] [--single-duration 60]
 *
 * Reports wrong results, API errors, exec latency p50/p99 (ms) per part and
 * the daemon's RSS (start, max, end). Run as root (projects are owned by uid
 * 1000); honours SANDBOXD_IMAGE. Ends its stdout with a JSON document.
 */
import { spawn } from "node:child_process";
import { chownSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import http from "node:http";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
const CLI = path.join(ROOT, "dist", "cli", "main.js");

function arg(name, dflt) {
  const i = process.argv.indexOf(`--${name}`);
  return i > 0 ? Number(process.argv[i + 1]) : dflt;
}
const PHASES = arg("phases", 10);
const CONC = arg("concurrency", 20);
const DURATION_S = arg("duration", 60);
const SINGLE_CONC = arg("single-concurrency", 50);
const SINGLE_DURATION_S = arg("single-duration", DURATION_S);

if (process.getuid?.() !== 0) {
  console.error("run as root: projects are owned by uid 1000 (sandboxd refuses root-owned projects)");
  process.exit(2);
}

/* ------------------------------- the work ------------------------------- */

const WORK = `import sys, time
out, err, code, sleep_s = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
line = b"x" * 99 + b"\\n"
def emit(stream, n):
    full, rest = divmod(n, 100)
    for _ in range(full):
        stream.write(line)
    stream.write(b"y" * rest)
    stream.flush()
emit(sys.stdout.buffer, out)
emit(sys.stderr.buffer, err)
if sleep_s:
    time.sleep(sleep_s)
sys.exit(code)
`;

/** What one exec will do, and so what its result must say. */
function pickJob(rng) {
  const r = rng();
  if (r < 0.05) return { out: 10, err: 0, code: 0, sleep: 5, timeoutMs: 1000, expect: { timedOut: true } };
  if (r < 0.15) return { out: 200_000 + Math.floor(rng() * 100_000), err: 1000, code: 0, sleep: 0, timeoutMs: 30_000 };
  if (r < 0.35) return { out: Math.floor(rng() * 5000), err: Math.floor(rng() * 500), code: 1 + Math.floor(rng() * 3), sleep: 0, timeoutMs: 30_000 };
  if (r < 0.45) return { out: 0, err: 0, code: 0, sleep: 0.2 + rng() * 0.5, timeoutMs: 30_000 };
  return { out: Math.floor(rng() * 2000), err: 0, code: 0, sleep: 0, timeoutMs: 30_000 };
}

function check(job, res) {
  const problems = [];
  if (job.expect?.timedOut) {
    if (res.timedOut !== true) problems.push(`timedOut ${res.timedOut}, expected true`);
    if (res.exitCode === 0) problems.push("exit 0 for a command killed at its timeout");
    return problems;
  }
  if (res.timedOut) problems.push("timedOut true for a command that ended on its own");
  if (res.exitCode !== job.code) problems.push(`exit ${res.exitCode} (signal ${res.signal}), expected ${job.code}`);
  if (res.stdoutBytes !== job.out) problems.push(`stdout ${res.stdoutBytes} bytes, expected ${job.out}`);
  if (res.stderrBytes !== job.err) problems.push(`stderr ${res.stderrBytes} bytes, expected ${job.err}`);
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

const q = (sorted, p) => (sorted.length ? sorted[Math.min(sorted.length - 1, Math.floor(p * sorted.length))] : NaN);

/* --------------------------------- run ---------------------------------- */

async function part(name, socket, phaseIds, conc, seconds, project, rssPeak) {
  const deadline = Date.now() + seconds * 1000;
  const latencies = [];
  const wrong = [];
  const errors = new Map();
  let total = 0;
  let seed = 1;
  await Promise.all(
    phaseIds.flatMap((id) =>
      Array.from({ length: conc }, async () => {
        const rng = mulberry32(seed++);
        while (Date.now() < deadline) {
          const job = pickJob(rng);
          const t0 = performance.now();
          try {
            const { result } = await request(socket, "POST", `/v1/phases/${id}/exec`, {
              argv: ["python3", "work.py", String(job.out), String(job.err), String(job.code), String(job.sleep)],
              timeoutMs: job.timeoutMs,
            });
            latencies.push(performance.now() - t0);
            total++;
            const problems = check(job, result);
            if (problems.length) wrong.push({ phase: id, job, problems, stderr: result.stderr.slice(0, 200) });
          } catch (e) {
            total++;
            errors.set(e.code ?? e.message, (errors.get(e.code ?? e.message) ?? 0) + 1);
          }
          rssPeak();
        }
      }),
    ),
  );
  latencies.sort((a, b) => a - b);
  return {
    name,
    phases: phaseIds.length,
    concurrency: conc,
    seconds,
    execs: total,
    wrong: wrong.length,
    apiErrors: Object.fromEntries(errors),
    p50ms: Math.round(q(latencies, 0.5)),
    p99ms: Math.round(q(latencies, 0.99)),
    wrongSamples: wrong.slice(0, 10),
  };
}

async function main() {
  const tmp = mkdtempSync(path.join(os.tmpdir(), "sbx-load-"));
  const socket = path.join(tmp, "s.sock");
  const project = path.join(tmp, "project");
  mkdirSync(project);
  writeFileSync(path.join(project, "work.py"), WORK);
  chownSync(project, 1000, 1000);
  chownSync(path.join(project, "work.py"), 1000, 1000);
  const daemon = spawn(process.execPath, [CLI, "--socket", socket, "start", "--state-dir", path.join(tmp, "state")], {
    stdio: ["ignore", "ignore", "pipe"],
    env: { ...process.env, SANDBOXD_LOG_LEVEL: "warn", SANDBOXD_BUILD_LOG: "state" },
  });
  let daemonErr = "";
  daemon.stderr.on("data", (c) => (daemonErr = (daemonErr + c.toString()).slice(-4000)));
  const cleanup = async () => {
    if (daemon.exitCode === null) {
      daemon.kill("SIGTERM");
      await new Promise((r) => daemon.once("exit", r));
    }
    rmSync(tmp, { recursive: true, force: true });
  };
  process.once("SIGINT", () => void cleanup().then(() => process.exit(130)));
  try {
    for (let i = 0; ; i++) {
      try {
        await request(socket, "GET", "/v1/health");
        break;
      } catch {
        if (i > 600 || daemon.exitCode !== null) throw new Error(`daemon did not start: ${daemonErr}`);
        await new Promise((r) => setTimeout(r, 100));
      }
    }
    const rss = { start: rssMb(daemon.pid), max: 0 };
    const peak = () => (rss.max = Math.max(rss.max, rssMb(daemon.pid) || 0));
    const start = async (n) => {
      const ids = [];
      for (let i = 0; i < n; i++) ids.push((await request(socket, "POST", "/v1/phases", { project, phase: `load-${i}`, mode: "backtest" })).phase.id);
      return ids;
    };
    const stop = (ids) => Promise.all(ids.map((id) => request(socket, "DELETE", `/v1/phases/${id}`)));

    const many = await start(PHASES);
    const a = await part(`${PHASES} phases × ${CONC}`, socket, many, CONC, DURATION_S, project, peak);
    await stop(many);
    const one = await start(1);
    const b = await part(`1 phase × ${SINGLE_CONC}`, socket, one, SINGLE_CONC, SINGLE_DURATION_S, project, peak);
    await stop(one);
    rss.end = rssMb(daemon.pid);
    const report = { bench: "load", image: process.env.SANDBOXD_IMAGE ?? "(default)", cpus: os.cpus().length, parts: [a, b], daemonRssMb: rss };
    for (const p of report.parts) {
      console.error(
        `${p.name.padEnd(18)} ${String(p.execs).padStart(6)} execs in ${p.seconds} s   wrong ${p.wrong}   api errors ${JSON.stringify(p.apiErrors)}   p50 ${p.p50ms} ms   p99 ${p.p99ms} ms`,
      );
      for (const w of p.wrongSamples) console.error(`   wrong: ${w.problems.join("; ")} ${w.stderr ? `(stderr: ${JSON.stringify(w.stderr)})` : ""}`);
    }
    console.error(`daemon RSS: start ${rss.start} MB, max ${rss.max} MB, end ${rss.end} MB`);
    console.log(JSON.stringify(report, null, 2));
    const wrongTotal = report.parts.reduce((n, p) => n + p.wrong, 0);
    process.exitCode = wrongTotal === 0 ? 0 : 1;
  } finally {
    await cleanup();
  }
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
