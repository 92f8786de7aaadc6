#!/usr/bin/env node
/**
 * sandboxd benchmarks (`npm run bench`): each number is measured beside its
 * baseline in the same run, interleaved, after a warm-up.
 *
 *   (a) phase start-to-ready (POST /v1/phases)     vs  docker run --rm --entrypoint true IMAGE
 *   (b) `true` through the API / through the CLI     vs  docker exec <container> true
 *   (c) 200 MiB of stdout streamed through the shim  vs  docker exec <container> … > /dev/null
 *       plus the daemon's peak RSS growth while it streams
 *   (e) pool (BENCH_ONLY=pool): phase ready from the warm pool (POST /v1/phases, a second daemon
 *       with SANDBOXD_POOL_SIZE=1, the pool full before each start)  vs  docker run --rm
 *       --network none --entrypoint true IMAGE, interleaved; target ≤ 50 ms (issue #14)
 *   (d) fail-fast (BENCH_ONLY=failfast, not in the default set): `true`, `false` and a real pytest
 *       suite through this daemon vs a second daemon started with SANDBOXD_BENCH_NO_FAILFAST=1
 *       (no categorisation, no counting, no JUnit report, no resource watch), interleaved
 *
 * The daemon is the real one, `node dist/cli/main.js start`, as a separate
 * process (so its RSS can be read from /proc). Everything the bench creates —
 * phases, containers, the daemon, temp dirs — is removed at the end, on
 * failure, on SIGINT/SIGTERM, and when the watchdog (BENCH_TIMEOUT_S) fires.
 *
 * Settings (environment): BENCH_START_N (10), BENCH_API_N (200), BENCH_CLI_N (30),
 * BENCH_DOCKER_EXEC_N (30), BENCH_EXEC_IDLE_N (20: (b)'s pairs after 100 ms idle, info),
 * BENCH_STREAM_N (5), BENCH_TIMEOUT_S (900),
 * BENCH_OUT (bench/results/latest.json), BENCH_ONLY (comma list of start, exec,
 * stream, failfast, pool; default start,exec,stream), BENCH_POOL_N (20), BENCH_FF_N (200), BENCH_FF_PYTEST_N (20), BENCH_DAEMON_NODE_ARGS (extra node flags for the daemon,
 * e.g. "--cpu-prof --cpu-prof-dir=/tmp/prof"). BENCH_QUICK=1 runs a small smoke version.
 */
import { execFileSync, fork, spawn } from "node:child_process";
import { closeSync, existsSync, mkdirSync, openSync, readFileSync, writeFileSync } from "node:fs";
import { chown, mkdir, mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { performance } from "node:perf_hooks";
import { fileURLToPath } from "node:url";
import {
  Cleanup,
  containerCpuSeconds,
  procCpuSeconds,
  procStatusBytes,
  resetPeakRss,
  round,
  roundStats,
  rssSampler,
  selfCpuSeconds,
  summarize,
  systemBusySeconds,
  timed,
  timedOk,
  withTimeout,
} from "./lib.mjs";

const ROOT = fileURLToPath(new URL("..", import.meta.url));
const CLI = path.join(ROOT, "dist", "cli", "main.js");
/** the `sandboxd` command as package.json's bin names it (npm link puts it on the PATH) */
const CLI_BIN = path.join(ROOT, JSON.parse(readFileSync(path.join(ROOT, "package.json"), "utf8")).bin.sandboxd);
const IMAGE = process.env.SANDBOXD_IMAGE || "sandboxd-sandbox:latest";
const OWNER = { uid: 1000, gid: 1000 };

const quick = process.env.BENCH_QUICK === "1";
const envInt = (name, dflt, quickVal) => {
  const v = process.env[name];
  if (v !== undefined && v !== "") {
    const n = Number(v);
    if (!Number.isInteger(n) || n < 1) throw new Error(`${name} must be a positive integer, got ${v}`);
    return n;
  }
  return quick ? quickVal : dflt;
};
const CFG = {
  startN: envInt("BENCH_START_N", 10, 3),
  startWarmup: 2,
  apiN: envInt("BENCH_API_N", 200, 40),
  apiWarmup: 20,
  cliN: envInt("BENCH_CLI_N", 30, 5),
  // (b)'s info rows after a pause: an agent's commands mostly come after one (it thinks between them)
  idleN: envInt("BENCH_EXEC_IDLE_N", 20, 4),
  idleMs: 100,
  dockerExecN: envInt("BENCH_DOCKER_EXEC_N", 30, 5),
  execWarmup: 3,
  streamN: envInt("BENCH_STREAM_N", 5, 2),
  ffN: envInt("BENCH_FF_N", 200, 30),
  ffPytestN: envInt("BENCH_FF_PYTEST_N", 20, 4),
  poolN: envInt("BENCH_POOL_N", 20, 4),
  streamWarmup: 1,
  timeoutS: envInt("BENCH_TIMEOUT_S", 900, 600),
  out: process.env.BENCH_OUT || path.join(ROOT, "bench", "results", "latest.json"),
  only: (process.env.BENCH_ONLY || "start,exec,stream").split(",").map((x) => x.trim()),
  rssIntervalMs: 20,
  settleMs: 200,
};

const STREAM_BYTES = 3200 * 65536; // 200 MiB
// Plain ASCII, so NDJSON carries it without escapes (zero bytes would be 6-byte "\u0000"s).
// A script in the project, not `python3 -c`: the policy asks before inline code (rule shell.python-inline).
const STREAM_SCRIPT = "emit_200mib.py";
const STREAM_SCRIPT_TEXT = "import sys\nb = b'x' * 65536\nfor _ in range(3200):\n    sys.stdout.buffer.write(b)\n";
const STREAM_ARGV = ["python3", STREAM_SCRIPT]; // run in /workspace by both the shim and docker exec

const TARGETS = {
  phaseStartRatio: 1.3, // phase start p50 ≤ 1.3 × bare docker run p50
  execApiRatio: 0.1, // API exec p50 ≤ 1/10 of the Engine API's exec in-process (create, start, inspect) p50
  streamMBps: 200, // ≥ 200 MB/s (10^6 bytes)
  streamRatio: 1.5, // the exported client's stream p50 (and the CLI process's) ≥ 1.5 × docker exec p50 (issue #14)
  execCliRatio: 0.7, // `sandboxd exec ID -- true` p50 ≤ 0.7 × `docker exec` p50, whole processes (issue #14)
  streamRssGrowthMB: 50, // < 50 MB (10^6 bytes) peak RSS growth of the daemon
  failFastExecRatio: 1.05, // exec p50 with categorisation ≤ 1.05 × without (issue 8)
  failFastPytestMs: 50, // pytest's report read adds ≤ 50 ms (p50 difference) to a real suite
  poolReadyMs: 50, // phase ready ≤ 50 ms after POST /v1/phases, from the warm pool (issue #14)
};

const MB = 1e6;
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const say = (msg) => process.stderr.write(`bench: ${msg}\n`);
const gc = () => globalThis.gc?.();

const cleanup = new Cleanup();
const results = { benchmarks: {} };

/* -------------------------------- set-up -------------------------------- */

function preflight() {
  if (process.getuid?.() !== 0) {
    throw new Error("run the bench as root: it makes a project owned by uid 1000 (sandboxd refuses root-owned projects)");
  }
  if (!existsSync(CLI)) throw new Error(`${CLI} is missing; run \`npm run build\` (npm run bench does it)`);
  try {
    execFileSync("docker", ["image", "inspect", "--format", "{{.Id}}", IMAGE], { stdio: ["ignore", "pipe", "pipe"] });
  } catch (e) {
    throw new Error(`Docker engine unreachable or image ${IMAGE} missing (${String(e.stderr ?? e.message).trim()}); run \`npm run bench\`, which sets both up`);
  }
}

function machine() {
  const sh = (cmd, args) => {
    try {
      return execFileSync(cmd, args, { encoding: "utf8", stdio: ["ignore", "pipe", "ignore"] }).trim();
    } catch {
      return null;
    }
  };
  const cpuModel = /model name\s*:\s*(.*)/.exec(readFileSync("/proc/cpuinfo", "utf8"))?.[1] ?? os.cpus()[0]?.model ?? "unknown";
  const [dockerClient, dockerServer] = (sh("docker", ["version", "--format", "{{.Client.Version}} {{.Server.Version}}"]) ?? " ").split(" ");
  return {
    cpus: os.cpus().length,
    cpuModel,
    memGiB: round(os.totalmem() / 2 ** 30, 1),
    kernel: `${os.type()} ${os.release()} ${os.arch()}`,
    loadavgAtStart: os.loadavg().map((x) => round(x, 2)),
    node: process.version,
    dockerClient,
    dockerServer,
    image: IMAGE,
    imageId: sh("docker", ["image", "inspect", "--format", "{{.Id}}", IMAGE]),
    imageNode: sh("docker", ["run", "--rm", "--entrypoint", "node", IMAGE, "--version"]),
    gitCommit: sh("git", ["-C", ROOT, "rev-parse", "--short", "HEAD"]),
    // uncommitted changes under src/ were built into dist/ and measured too
    srcDirty: (sh("git", ["-C", ROOT, "status", "--porcelain", "--", "src"]) ?? "") !== "",
  };
}

async function makeProject(dir) {
  await mkdir(dir);
  for (const [name, text] of [
    ["README.md", "sandboxd bench project\n"],
    [STREAM_SCRIPT, STREAM_SCRIPT_TEXT],
  ]) {
    await writeFile(path.join(dir, name), text);
    await chown(path.join(dir, name), OWNER.uid, OWNER.gid);
  }
  await chown(dir, OWNER.uid, OWNER.gid);
}

/** `sandboxd start` as its own process; resolves when the socket answers. */
async function startDaemon(tmp, extraEnv = {}, name = "") {
  const stateDir = path.join(tmp, `state${name}`);
  const socket = path.join(tmp, `sandboxd${name}.sock`);
  const logFile = path.join(tmp, `daemon${name}.log`);
  const logFd = openSync(logFile, "a");
  // e.g. BENCH_DAEMON_NODE_ARGS="--cpu-prof --cpu-prof-dir=/tmp/prof" to profile the daemon
  const nodeArgs = (process.env.BENCH_DAEMON_NODE_ARGS || "").split(/\s+/).filter(Boolean);
  const child = spawn(process.execPath, [...nodeArgs, CLI, "--socket", socket, "start", "--state-dir", stateDir], {
    stdio: ["ignore", logFd, logFd],
    env: {
      ...process.env,
      SANDBOXD_LOG_LEVEL: process.env.SANDBOXD_LOG_LEVEL || "info",
      SANDBOXD_IMAGE: IMAGE,
      // the bench's own signing key and witness, never the machine's /etc/sandboxd ones
      SANDBOXD_AUDIT_KEY: path.join(tmp, `audit-signing${name}.key`),
      // `true` and `head` are not on the SKILLS.md whitelist; the operator allows them for the bench.
      SANDBOXD_EXTRA_ALLOW: "true,head,false",
      ...extraEnv,
    },
  });
  closeSync(logFd);
  const exited = new Promise((resolve) => child.once("exit", (code, signal) => resolve({ code, signal })));
  cleanup.push("stop the daemon (SIGTERM)", async () => {
    if (child.exitCode !== null || child.signalCode !== null) return;
    child.kill("SIGTERM");
    const r = await Promise.race([exited, sleep(45_000).then(() => null)]);
    if (r === null) {
      say("daemon did not stop within 45 s of SIGTERM; SIGKILL");
      child.kill("SIGKILL");
      await exited;
    }
  });
  const { ApiClient } = await import(path.join(ROOT, "dist", "cli", "client.js"));
  const api = new ApiClient(socket);
  const deadline = Date.now() + 60_000;
  for (;;) {
    if (child.exitCode !== null) throw new Error(`daemon exited with ${child.exitCode}:\n${tail(logFile)}`);
    try {
      await api.request("GET", "/v1/health");
      break;
    } catch {
      if (Date.now() > deadline) throw new Error(`daemon did not answer within 60 s:\n${tail(logFile)}`);
      await sleep(100);
    }
  }
  const instance = (await readFile(path.join(stateDir, "instance"), "utf8")).trim();
  return { child, pid: child.pid, api, socket, stateDir, logFile, instance };
}

function tail(file, lines = 30) {
  try {
    return readFileSync(file, "utf8").trimEnd().split("\n").slice(-lines).join("\n");
  } catch {
    return "(no daemon log)";
  }
}

/** Removes containers carrying a label (the daemon's instance, or the bench's own baselines). */
async function removeLabelled(label) {
  const r = await timed("docker", ["ps", "-aq", "--filter", `label=${label}`], { timeoutMs: 30_000 });
  const ids = r.stdout.split(/\s+/).filter(Boolean);
  if (ids.length) {
    say(`removing ${ids.length} leftover container(s) labelled ${label}`);
    await timed("docker", ["rm", "-f", ...ids], { timeoutMs: 60_000 });
  }
}

/* ------------------------------- phases ------------------------------- */

/** A real pytest suite: 3 files, 60 passing tests (fixtures, parametrize, a class). */
async function addPytestSuite(dir) {
  const files = {
    "tests/__init__.py": "",
    "tests/test_math.py": "import math\nimport pytest\n\n\n@pytest.mark.parametrize('n', range(30))\ndef test_sqrt(n):\n    assert math.isclose(math.sqrt(n) ** 2, n)\n",
    "tests/test_text.py": "import pytest\n\n\n@pytest.fixture\ndef words():\n    return ['alpha', 'beta', 'gamma']\n\n\n@pytest.mark.parametrize('i', range(20))\ndef test_join(words, i):\n    assert ' '.join(words * i).count('beta') == i\n",
    "tests/test_cls.py": "class TestDict:\n" + Array.from({ length: 10 }, (_, i) => `    def test_${i}(self):\n        assert {${i}: 'x'}[${i}] == 'x'\n`).join(""),
  };
  await mkdir(path.join(dir, "tests"), { recursive: true });
  await chown(path.join(dir, "tests"), OWNER.uid, OWNER.gid);
  for (const [name, text] of Object.entries(files)) {
    await writeFile(path.join(dir, name), text);
    await chown(path.join(dir, name), OWNER.uid, OWNER.gid);
  }
}

function phaseOps(d, project) {
  const live = new Set();
  cleanup.push("stop the bench's phases", async () => {
    for (const id of [...live]) {
      await withTimeout(d.api.request("DELETE", `/v1/phases/${id}`), 30_000, `DELETE ${id}`).catch((e) => say(`stopping ${id}: ${e.message}`));
      live.delete(id);
    }
  });
  return {
    async start(name) {
      const { phase } = await withTimeout(d.api.request("POST", "/v1/phases", { project, phase: name, mode: "backtest" }), 60_000, "POST /v1/phases");
      live.add(phase.id);
      if (phase.state !== "running") throw new Error(`phase ${phase.id} answered in state ${phase.state}`);
      return phase;
    },
    async stop(id) {
      await withTimeout(d.api.request("DELETE", `/v1/phases/${id}`), 60_000, `DELETE ${id}`);
      live.delete(id);
    },
  };
}

/* ---------------------------- (a) phase start --------------------------- */

async function benchPhaseStart(d, phases, benchLabel) {
  const N = CFG.startN;
  const W = CFG.startWarmup;
  const phase = [];
  const bare = [];
  const bareNoNet = [];
  const stop = [];
  say(`(a) phase start vs docker run: ${W} warm-up + ${N} measured, interleaved`);
  for (let i = 0; i < W + N; i++) {
    const order = i % 2 === 0 ? ["phase", "bare", "bareNoNet"] : ["bareNoNet", "bare", "phase"];
    for (const which of order) {
      await sleep(CFG.settleMs);
      gc();
      if (which === "bare") {
        const r = await timedOk("docker", ["run", "--rm", "--label", benchLabel, "--entrypoint", "true", IMAGE], { timeoutMs: 60_000 });
        if (i >= W) bare.push(r.ms);
      } else if (which === "bareNoNet") {
        // info only: the phase container has no network, the bare baseline gets the default bridge
        const r = await timedOk("docker", ["run", "--rm", "--network", "none", "--label", benchLabel, "--entrypoint", "true", IMAGE], { timeoutMs: 60_000 });
        if (i >= W) bareNoNet.push(r.ms);
      } else {
        const t0 = performance.now();
        const p = await phases.start(`bench-start-${i}`);
        const ms = performance.now() - t0;
        const t1 = performance.now();
        await phases.stop(p.id);
        if (i >= W) {
          phase.push(ms);
          stop.push(performance.now() - t1);
        }
      }
    }
  }
  const s = { phase: summarize(phase), bare: summarize(bare), bareNoNet: summarize(bareNoNet), stop: summarize(stop) };
  const ratio = s.phase.p50 / s.bare.p50;
  return {
    description: "POST /v1/phases until its 201 (the shim is connected) vs `docker run --rm --entrypoint true IMAGE` (whole CLI process)",
    unit: "ms",
    phaseStart: roundStats(s.phase),
    dockerRunBare: roundStats(s.bare),
    dockerRunBareNoNetworkInfo: roundStats(s.bareNoNet),
    ratioP50NoNetworkInfo: round(s.phase.p50 / s.bareNoNet.p50, 3),
    phaseStopInfo: roundStats(s.stop),
    ratioP50: round(ratio, 3),
    ratioMean: round(s.phase.mean / s.bare.mean, 3),
    ratioP95: round(s.phase.p95 / s.bare.p95, 3),
    target: `p50 ratio ≤ ${TARGETS.phaseStartRatio}`,
    pass: ratio <= TARGETS.phaseStartRatio,
    samples: {
      phaseStart: phase.map((x) => round(x)),
      dockerRunBare: bare.map((x) => round(x)),
      dockerRunBareNoNetwork: bareNoNet.map((x) => round(x)),
      phaseStop: stop.map((x) => round(x)) },
  };
}

/* ------------------------------- (e) pool ------------------------------- */

/** Until the daemon's pool has a slot ready and none being made (a fill must not run beside a sample). */
async function poolSettled(d) {
  const deadline = Date.now() + 120_000;
  for (;;) {
    const { pool } = await d.api.request("GET", "/v1/phases");
    if (pool.state !== "running") throw new Error(`the warm pool is ${pool.state}: ${pool.lastError ?? ""}`);
    if (pool.ready >= 1 && pool.filling === 0) return pool;
    if (Date.now() > deadline) throw new Error(`the warm pool did not fill in 120 s: ${JSON.stringify(pool)}`);
    await sleep(50);
  }
}

async function benchPool(d, phases, benchLabel) {
  const N = CFG.poolN;
  const W = CFG.startWarmup;
  const ready = [];
  const bareNoNet = [];
  say(`(e) phase ready from the warm pool vs docker run --network none: ${W} warm-up + ${N} measured, interleaved`);
  for (let i = 0; i < W + N; i++) {
    const order = i % 2 === 0 ? ["pool", "bareNoNet"] : ["bareNoNet", "pool"];
    for (const which of order) {
      // the pool refilled (its fill is a container start) before either sample
      await poolSettled(d);
      await sleep(CFG.settleMs);
      gc();
      if (which === "bareNoNet") {
        const r = await timedOk("docker", ["run", "--rm", "--network", "none", "--label", benchLabel, "--entrypoint", "true", IMAGE], { timeoutMs: 60_000 });
        if (i >= W) bareNoNet.push(r.ms);
      } else {
        const t0 = performance.now();
        const p = await phases.start(`bench-pool-${i}`);
        const ms = performance.now() - t0;
        if (!p.pooled) throw new Error(`phase ${p.id} did not come from the pool`);
        await phases.stop(p.id);
        if (i >= W) ready.push(ms);
      }
    }
  }
  const { pool } = await d.api.request("GET", "/v1/phases");
  const s = { ready: summarize(ready), bareNoNet: summarize(bareNoNet) };
  return {
    description: "POST /v1/phases until its 201 with a warm pool (SANDBOXD_POOL_SIZE=1, full before each start: every start a claim) vs `docker run --rm --network none --entrypoint true IMAGE` (whole CLI process)",
    unit: "ms",
    poolReady: roundStats(s.ready),
    dockerRunNoNetwork: roundStats(s.bareNoNet),
    ratioP50: round(s.ready.p50 / s.bareNoNet.p50, 3),
    ratioMean: round(s.ready.mean / s.bareNoNet.mean, 3),
    pool,
    target: `p50 ≤ ${TARGETS.poolReadyMs} ms`,
    pass: s.ready.p50 <= TARGETS.poolReadyMs,
    samples: { poolReady: ready.map((x) => round(x)), dockerRunNoNetwork: bareNoNet.map((x) => round(x)) },
  };
}

/* ------------------------------- (b) exec ------------------------------- */

async function benchExec(d, phase) {
  const url = `/v1/phases/${phase.id}/exec`;
  const shimLeg = []; // result.durationMs: the daemon's own clock from sending `exec` to the shim until its `exit`
  const apiOnce = async (keep) => {
    const t0 = performance.now();
    const { result } = await withTimeout(d.api.request("POST", url, { argv: ["true"] }), 30_000, "API exec true");
    const ms = performance.now() - t0;
    if (result.exitCode !== 0) throw new Error(`API exec true exited ${result.exitCode}: ${result.stderr}`);
    if (keep) shimLeg.push(result.durationMs);
    return ms;
  };
  // as a harness runs it: the `sandboxd` command (package.json bin), a process per command
  // bin/sandboxd runs this plain form natively (native/exec); with SANDBOXD_CLI_NODE=1 on Node, as it did before (info)
  const cliOnce = async () => (await timedOk(CLI_BIN, ["--socket", d.socket, "exec", phase.id, "--", "true"], { timeoutMs: 30_000 })).ms;
  const onNode = { ...process.env, SANDBOXD_CLI_NODE: "1" };
  const cliNodeOnce = async () => (await timedOk(CLI_BIN, ["--socket", d.socket, "exec", phase.id, "--", "true"], { timeoutMs: 30_000, env: onNode })).ms;
  const dockerOnce = async () => (await timedOk("docker", ["exec", phase.containerId, "true"], { timeoutMs: 30_000 })).ms;
  // the API's baseline (issue 14): the Docker Engine API's exec from a harness's own process (dockerode:
  // create, start, inspect), timed in that process: bench/engine-exec.mjs says why it is not this one
  const engineProc = fork(path.join(ROOT, "bench", "engine-exec.mjs"), [phase.containerId], { stdio: ["ignore", "inherit", "inherit", "ipc"] });
  const fromEngine = () => new Promise((resolve) => engineProc.once("message", resolve));
  await withTimeout(fromEngine(), 30_000, "engine-exec.mjs start");
  const engineOnce = async () => {
    const answer = fromEngine();
    engineProc.send("run");
    const m = await withTimeout(answer, 30_000, "Engine API exec true");
    if (m.error) throw new Error(m.error);
    return m.ms;
  };
  cleanup.push("stop bench/engine-exec.mjs", async () => {
    if (engineProc.exitCode === null) engineProc.kill("SIGKILL");
  });
  for (let i = 0; i < CFG.execWarmup; i++) await engineOnce();
  for (let i = 0; i < CFG.execWarmup; i++) {
    await cliOnce();
    await cliNodeOnce();
    await dockerOnce();
  }
  const api = [];
  const cli = [];
  const cliNode = [];
  const dock = [];
  const engine = [];
  const rounds = Math.max(CFG.cliN, CFG.dockerExecN, 1);
  for (let k = 0; k < rounds; k++) {
    const order = k % 2 === 0 ? ["docker", "cli", "cliNode", "api"] : ["api", "cliNode", "cli", "docker"];
    for (const which of order) {
      gc();
      if (which === "docker" && k < CFG.dockerExecN) {
        dock.push(await dockerOnce());
        engine.push(await engineOnce());
      }
      if (which === "cli" && k < CFG.cliN) cli.push(await cliOnce());
      if (which === "cliNode" && k < CFG.cliN) cliNode.push(await cliNodeOnce());
      if (which === "api") {
        const count = Math.floor(((k + 1) * CFG.apiN) / rounds) - Math.floor((k * CFG.apiN) / rounds);
        for (let j = 0; j < count; j++) api.push(await apiOnce(true));
      }
    }
  }
  // The same `true` after CFG.idleMs of idleness each, the API and the Engine API alternating (info:
  // the target rows above are back to back): what a harness sees after its agent thought.
  const apiIdle = [];
  const engineIdle = [];
  for (let k = 0; k < CFG.idleN; k++) {
    for (const which of k % 2 === 0 ? ["api", "engine"] : ["engine", "api"]) {
      await sleep(CFG.idleMs);
      if (which === "api") apiIdle.push(await apiOnce(false));
      else engineIdle.push(await engineOnce());
    }
  }
  engineProc.send("exit");
  const s = { api: summarize(api), cli: summarize(cli), cliNode: summarize(cliNode), docker: summarize(dock), engine: summarize(engine) };
  const idle = { api: summarize(apiIdle), engine: summarize(engineIdle) };
  const ratio = s.api.p50 / s.engine.p50;
  return {
    description:
      "`true` in a running phase: ApiClient POST /v1/phases/:id/exec vs the Docker Engine API's exec from the same process (dockerode: create, start attached and read to its end, inspect); `sandboxd exec ID -- true` (whole CLI process: bin/sandboxd, the plain form run natively) vs `docker exec <container> true` (whole CLI process); the CLI with SANDBOXD_CLI_NODE=1 (on Node, info)",
    unit: "ms",
    api: roundStats(s.api, 3),
    apiShimLegInfo: roundStats(summarize(shimLeg), 1),
    cli: roundStats(s.cli),
    cliNodeInfo: roundStats(s.cliNode),
    dockerExec: roundStats(s.docker),
    engineApiExec: roundStats(s.engine),
    apiRatioP50: round(ratio, 4),
    apiRatioMean: round(s.api.mean / s.engine.mean, 4),
    apiToDockerExecCliP50Info: round(s.api.p50 / s.docker.p50, 4),
    apiAfterIdleInfo: roundStats(idle.api, 2),
    engineApiExecAfterIdleInfo: roundStats(idle.engine, 2),
    idleMsInfo: CFG.idleMs,
    apiAfterIdleRatioP50Info: round(idle.api.p50 / idle.engine.p50, 4),
    cliRatioP50: round(s.cli.p50 / s.docker.p50, 3),
    cliRatioMean: round(s.cli.mean / s.docker.mean, 3),
    target: `API p50 ≤ ${TARGETS.execApiRatio} × the Engine API exec's p50 (in-process)`,
    pass: ratio <= TARGETS.execApiRatio,
    cliTarget: `CLI p50 ≤ ${TARGETS.execCliRatio} × docker exec p50 (whole processes)`,
    cliPass: s.cli.p50 / s.docker.p50 <= TARGETS.execCliRatio,
    samples: { api: api.map((x) => round(x, 3)), engineApiExec: engine.map((x) => round(x, 2)), apiAfterIdle: apiIdle.map((x) => round(x, 2)), engineApiExecAfterIdle: engineIdle.map((x) => round(x, 2)), cli: cli.map((x) => round(x)), cliNode: cliNode.map((x) => round(x)), dockerExec: dock.map((x) => round(x)) },
  };
}

/* ----------------------------- (c) streaming ---------------------------- */

function dockerdPid() {
  for (const f of ["/var/run/docker.pid", "/run/docker.pid"]) {
    try {
      const pid = Number(readFileSync(f, "utf8").trim());
      if (pid > 0 && existsSync(`/proc/${pid}`)) return pid;
    } catch {
      /* next */
    }
  }
  try {
    return Number(execFileSync("pidof", ["dockerd"], { encoding: "utf8" }).trim().split(/\s+/)[0]) || null;
  } catch {
    return null;
  }
}

/**
 * CPU seconds used during a run by the daemon, this process (the consumer),
 * the phase container (python3 + shim, or python3 alone under docker exec)
 * and dockerd, and by the whole machine: a cheap profile of where a stream's
 * time goes, and of how much of the 2 cores other work took meanwhile.
 */
function cpuMeter(daemonPid, containerId, dockerd) {
  const snap = () => ({
    daemon: procCpuSeconds(daemonPid),
    consumer: selfCpuSeconds(),
    container: containerCpuSeconds(containerId),
    dockerd: dockerd ? procCpuSeconds(dockerd) : NaN,
    machine: systemBusySeconds(),
  });
  const before = snap();
  return () => {
    const after = snap();
    const used = Object.fromEntries(Object.keys(before).map((k) => [k, after[k] - before[k]]));
    // what else the machine did meanwhile (other users' work, containerd, kernel threads)
    const ours = used.daemon + used.consumer + used.container + (Number.isFinite(used.dockerd) ? used.dockerd : 0);
    used.otherOnMachine = Math.max(0, used.machine - ours);
    return used;
  };
}

/** One streaming exec through the API: `frames` (the byte format the CLI and the clients use) or `ndjson`. */
async function streamViaApi(d, phase, dockerd, format = "frames") {
  await sleep(CFG.settleMs);
  gc();
  const cpu = cpuMeter(d.pid, phase.containerId, dockerd);
  const hwmReset = resetPeakRss(d.pid);
  const rssBefore = procStatusBytes(d.pid, "VmRSS");
  const sampler = rssSampler(d.pid, CFG.rssIntervalMs);
  let rawBytes = 0;
  let tailChunks = [];
  let tailBytes = 0;
  // frames: read as a client does (FrameReader), stdout bytes counted, the last event kept
  const { FrameReader, StreamFrame } = await import(path.join(ROOT, "dist", "frames.js"));
  const frames = format === "frames" ? new FrameReader() : null;
  const framed = format !== "ndjson";
  let frameStdout = 0;
  let lastEvent = null;
  const TAIL_KEEP = 4 << 20; // the exit line carries up to 1 MiB of captured stdout
  let sampled;
  const t0 = performance.now();
  if (format === "client" || format === "client-text") {
    // the exported client, as a harness uses it (`import { Sandboxd } from "sandboxd"`): output to a handler
    // as the bytes written (onStdoutBytes), or decoded as text (onStdout; ASCII here, so its length is its bytes)
    const { Sandboxd } = await import(path.join(ROOT, "dist", "client", "index.js"));
    const handlers = format === "client" ? { onStdoutBytes: (b) => void (frameStdout += b.length) } : { onStdout: (t) => void (frameStdout += t.length) };
    try {
      const result = await withTimeout(
        new Sandboxd({ socket: d.socket }).exec(phase.id, { argv: STREAM_ARGV, timeoutMs: 60_000 }, handlers),
        90_000,
        "streaming exec (the exported client)",
      );
      lastEvent = Buffer.from(JSON.stringify({ type: "exit", result }));
    } finally {
      sampled = sampler.stop();
    }
  } else if (format === "frames-raw") {
    // the CLI's own reader (client/frame-stream.ts): the socket read directly, pooled reads, output in pieces
    const { streamFrames } = await import(path.join(ROOT, "dist", "client", "frame-stream.js"));
    try {
      await withTimeout(
        streamFrames(d.socket, `/v1/phases/${phase.id}/exec?stream=frames`, { argv: STREAM_ARGV, timeoutMs: 60_000 }, (kind, payload) => {
          rawBytes += payload.length + 5;
          if (kind === StreamFrame.Stdout) frameStdout += payload.length;
          else if (kind === StreamFrame.Event) lastEvent = Buffer.from(payload);
        }),
        90_000,
        "streaming exec (CLI reader)",
      );
    } finally {
      sampled = sampler.stop();
    }
  } else try {
    const res = await withTimeout(
      d.api.stream("POST", `/v1/phases/${phase.id}/exec?stream=${format === "frames" ? "frames" : "1"}`, { argv: STREAM_ARGV, timeoutMs: 60_000 }),
      30_000,
      "streaming exec (response headers)",
    );
    await withTimeout(
      new Promise((resolve, reject) => {
        res.on("data", (c) => {
          rawBytes += c.length;
          if (frames) {
            for (const f of frames.push(c)) {
              if (f.kind === StreamFrame.Stdout) frameStdout += f.payload.length;
              else if (f.kind === StreamFrame.Event) lastEvent = f.payload;
            }
            return;
          }
          tailChunks.push(c);
          tailBytes += c.length;
          while (tailBytes - tailChunks[0].length >= TAIL_KEEP) tailBytes -= tailChunks.shift().length;
        });
        res.on("end", resolve);
        res.on("error", reject);
        res.on("aborted", () => reject(new Error("stream aborted")));
      }),
      90_000,
      "streaming exec (body)",
    );
  } finally {
    sampled = sampler.stop();
  }
  const ms = performance.now() - t0;
  const cpuS = cpu();
  const hwm = hwmReset ? procStatusBytes(d.pid, "VmHWM") : NaN;
  let last;
  if (framed) {
    last = JSON.parse(lastEvent?.toString("utf8") ?? "null");
    if (frameStdout !== STREAM_BYTES) throw new Error(`frames stream: ${frameStdout} stdout bytes arrived (want ${STREAM_BYTES})`);
  } else {
    const lines = Buffer.concat(tailChunks).toString("utf8").trimEnd().split("\n");
    last = JSON.parse(lines[lines.length - 1]);
  }
  if (last?.type !== "exit") throw new Error(`stream ended with ${JSON.stringify(last).slice(0, 500)}`);
  if (last.result.exitCode !== 0 || last.result.stdoutBytes !== STREAM_BYTES) {
    throw new Error(`stream: exit ${last.result.exitCode}, ${last.result.stdoutBytes} stdout bytes (want 0, ${STREAM_BYTES})`);
  }
  const peak = Math.max(sampled.peak, Number.isFinite(hwm) ? hwm : 0);
  return {
    ms,
    MBps: STREAM_BYTES / MB / (ms / 1000),
    wireBytes: rawBytes,
    rssBeforeMB: rssBefore / MB,
    rssPeakSampledMB: sampled.peak / MB,
    rssPeakHwmMB: hwm / MB,
    rssGrowthMB: (peak - rssBefore) / MB,
    rssSamples: sampled.samples,
    rssMaxGapMs: sampled.maxGapMs,
    cpuS,
  };
}

async function streamViaDocker(d, phase, dockerd, devNull, count) {
  await sleep(CFG.settleMs);
  gc();
  const cpu = cpuMeter(d.pid, phase.containerId, dockerd);
  const r = await timedOk("docker", ["exec", "-w", "/workspace", phase.containerId, ...STREAM_ARGV], { stdout: count ? "count" : devNull, timeoutMs: 120_000 });
  if (count && r.stdoutBytes !== STREAM_BYTES) throw new Error(`docker exec streamed ${r.stdoutBytes} bytes, want ${STREAM_BYTES}`);
  return { ms: r.ms, MBps: STREAM_BYTES / MB / (r.ms / 1000), cpuS: cpu() };
}

/** `sandboxd exec ID -- python3 emit_200mib.py > /dev/null`: the whole CLI process, as docker exec is measured. */
async function streamViaCli(d, phase, dockerd, devNull) {
  await sleep(CFG.settleMs);
  gc();
  const cpu = cpuMeter(d.pid, phase.containerId, dockerd);
  const r = await timedOk(CLI_BIN, ["--socket", d.socket, "exec", phase.id, "--timeout", "60", "--", ...STREAM_ARGV], { stdout: devNull, timeoutMs: 120_000 });
  return { ms: r.ms, MBps: STREAM_BYTES / MB / (r.ms / 1000), cpuS: cpu() };
}

async function benchStream(d, phase) {
  say(`(c) 200 MiB stdout: ${CFG.streamWarmup} warm-up + ${CFG.streamN} measured each, interleaved`);
  const devNull = openSync("/dev/null", "w");
  const dockerd = dockerdPid();
  try {
    const rssIdleMB = procStatusBytes(d.pid, "VmRSS") / MB;
    for (let i = 0; i < CFG.streamWarmup; i++) {
      await streamViaApi(d, phase, dockerd, "frames");
      await streamViaApi(d, phase, dockerd, "ndjson");
      await streamViaApi(d, phase, dockerd, "frames-raw");
      await streamViaApi(d, phase, dockerd, "client");
      await streamViaApi(d, phase, dockerd, "client-text");
      await streamViaCli(d, phase, dockerd, devNull);
      await streamViaDocker(d, phase, dockerd, devNull, true); // also checks the byte count
    }
    const api = [];
    const ndjson = [];
    const raw = [];
    const client = [];
    const clientText = [];
    const cli = [];
    const dock = [];
    for (let i = 0; i < CFG.streamN; i++) {
      const order = i % 2 === 0 ? ["client", "api", "docker", "raw", "cli", "text", "ndjson"] : ["ndjson", "text", "cli", "raw", "docker", "api", "client"];
      for (const which of order) {
        if (which === "api") api.push(await streamViaApi(d, phase, dockerd, "frames"));
        else if (which === "ndjson") ndjson.push(await streamViaApi(d, phase, dockerd, "ndjson"));
        else if (which === "raw") raw.push(await streamViaApi(d, phase, dockerd, "frames-raw"));
        else if (which === "client") client.push(await streamViaApi(d, phase, dockerd, "client"));
        else if (which === "text") clientText.push(await streamViaApi(d, phase, dockerd, "client-text"));
        else if (which === "cli") cli.push(await streamViaCli(d, phase, dockerd, devNull));
        else dock.push(await streamViaDocker(d, phase, dockerd, devNull, false));
      }
    }
    // the target's row: the exported client (since 2026-12-05 it reads the socket directly, as the CLI does)
    const clientMBps = summarize(client.map((r) => r.MBps));
    const apiMBps = summarize(api.map((r) => r.MBps));
    const dockMBps = summarize(dock.map((r) => r.MBps));
    const growth = summarize([...client, ...clientText, ...api, ...ndjson, ...raw].map((r) => r.rssGrowthMB));
    const ratio = clientMBps.p50 / dockMBps.p50;
    const passMBps = clientMBps.p50 >= TARGETS.streamMBps;
    const passRatio = ratio >= TARGETS.streamRatio;
    // what a user runs instead of `docker exec … > /dev/null`, called the same way
    const cliRatio = summarize(cli.map((r) => r.MBps)).p50 / dockMBps.p50;
    const passRss = growth.max < TARGETS.streamRssGrowthMB;
    return {
      description:
        "200 MiB (209,715,200 B) of ASCII stdout from a python3 script in the phase: streaming exec through the exported client (Sandboxd.exec with an onStdoutBytes handler, bytes counted; ?stream=frames read off the socket; info: with onStdout, as text) vs `docker exec <container> <same argv>` > /dev/null; and through the CLI (`sandboxd exec … > /dev/null`, whole process) vs the same; info: ?stream=frames over node:http read with FrameReader (apiMBps), as NDJSON (?stream=1), and the frame reader alone in-process (client/frame-stream.ts, bytes counted); MB = 10^6 B",
      payloadBytes: STREAM_BYTES,
      argv: STREAM_ARGV,
      script: STREAM_SCRIPT_TEXT,
      clientMBps: roundStats(clientMBps, 1),
      clientTextMBpsInfo: roundStats(summarize(clientText.map((r) => r.MBps)), 1),
      apiMBps: roundStats(apiMBps, 1),
      dockerExecMBps: roundStats(dockMBps, 1),
      ratioP50: round(ratio, 3),
      cliRatioP50: round(cliRatio, 3),
      ndjsonMBpsInfo: roundStats(summarize(ndjson.map((r) => r.MBps)), 1),
      rawReaderMBpsInfo: roundStats(summarize(raw.map((r) => r.MBps)), 1),
      cliMBpsInfo: roundStats(summarize(cli.map((r) => r.MBps)), 1),
      apiSeconds: roundStats(summarize(api.map((r) => r.ms / 1000)), 3),
      dockerExecSeconds: roundStats(summarize(dock.map((r) => r.ms / 1000)), 3),
      daemonRssIdleMB: round(rssIdleMB, 1),
      daemonRssGrowthMB: roundStats(growth, 1),
      wireBytesPerRun: { frames: api[0]?.wireBytes, ndjson: ndjson[0]?.wireBytes },
      cpuSecondsPerRunMean: {
        client: meanCpu(client.map((r) => r.cpuS)),
        api: meanCpu(api.map((r) => r.cpuS)),
        ndjson: meanCpu(ndjson.map((r) => r.cpuS)),
        rawReader: meanCpu(raw.map((r) => r.cpuS)),
        cli: meanCpu(cli.map((r) => r.cpuS)),
        dockerExec: meanCpu(dock.map((r) => r.cpuS)),
      },
      targets: {
        throughput: { target: `the exported client p50 ≥ ${TARGETS.streamMBps} MB/s`, pass: passMBps },
        ratio: { target: `the exported client p50 ≥ ${TARGETS.streamRatio} × docker exec p50`, pass: passRatio },
        cliRatio: { target: `the CLI process p50 ≥ ${TARGETS.streamRatio} × docker exec p50 (both > /dev/null)`, pass: cliRatio >= TARGETS.streamRatio },
        rss: { target: `daemon peak RSS growth < ${TARGETS.streamRssGrowthMB} MB in every run`, pass: passRss },
      },
      pass: passMBps && passRatio && passRss,
      samples: {
        client: client.map((r) => ({ ms: round(r.ms), MBps: round(r.MBps, 1), rssGrowthMB: round(r.rssGrowthMB, 2), cpuS: meanCpu([r.cpuS]) })),
        api: api.map((r) => Object.fromEntries(Object.entries(r).map(([k, v]) => [k, k === "cpuS" ? meanCpu([v]) : round(v, 2)]))),
        ndjson: ndjson.map((r) => Object.fromEntries(Object.entries(r).map(([k, v]) => [k, k === "cpuS" ? meanCpu([v]) : round(v, 2)]))),
        cli: cli.map((r) => ({ ms: round(r.ms), MBps: round(r.MBps, 1), cpuS: meanCpu([r.cpuS]) })),
        dockerExec: dock.map((r) => ({ ms: round(r.ms), MBps: round(r.MBps, 1), cpuS: meanCpu([r.cpuS]) })),
      },
    };
  } finally {
    closeSync(devNull);
  }
}

function meanCpu(list) {
  if (!list.length) return {};
  return Object.fromEntries(Object.keys(list[0]).map((k) => [k, round(list.reduce((a, c) => a + c[k], 0) / list.length, 3)]));
}

/* ----------------------------- (d) fail-fast ---------------------------- */

async function benchFailFast(on, off, phaseOn, phaseOff) {
  const once = async (d, phase, argv, expectCode) => {
    const t0 = performance.now();
    const { result } = await withTimeout(d.api.request("POST", `/v1/phases/${phase.id}/exec`, { argv }), 60_000, `exec ${argv.join(" ")}`);
    const ms = performance.now() - t0;
    if (result.exitCode !== expectCode) throw new Error(`${argv.join(" ")} exited ${result.exitCode} (expected ${expectCode}): ${result.stderr}`);
    return { ms, result };
  };
  const pair = async (argv, code, n, warm) => {
    for (let i = 0; i < warm; i++) {
      await once(on, phaseOn, argv, code);
      await once(off, phaseOff, argv, code);
    }
    const a = [];
    const b = [];
    let last = null;
    for (let k = 0; k < n; k++) {
      gc();
      // alternate who goes first, so drift on the shared machine falls on both
      if (k % 2 === 0) {
        const x = await once(on, phaseOn, argv, code);
        a.push(x.ms);
        last = x.result;
        b.push((await once(off, phaseOff, argv, code)).ms);
      } else {
        b.push((await once(off, phaseOff, argv, code)).ms);
        const x = await once(on, phaseOn, argv, code);
        a.push(x.ms);
        last = x.result;
      }
    }
    return { on: summarize(a), off: summarize(b), last };
  };
  say(`(d) fail-fast: ${CFG.ffN} × true and false, ${CFG.ffPytestN} × pytest (60 tests), with vs without categorisation, interleaved`);
  const t = await pair(["true"], 0, CFG.ffN, 20);
  const f = await pair(["false"], 1, CFG.ffN, 20);
  const p = await pair(["pytest", "-q", "tests"], 0, CFG.ffPytestN, 2);
  if (!p.last?.tests || p.last.tests.passed !== 60) throw new Error(`pytest's report was not read: ${JSON.stringify(p.last?.tests)}`);
  if (f.last?.failure?.category !== "unknown") throw new Error(`false was not categorised: ${JSON.stringify(f.last?.failure)}`);
  const ratio = (x) => x.on.p50 / x.off.p50;
  return {
    description:
      "exec round trip (ApiClient POST /v1/phases/:id/exec) on this daemon vs a second daemon with SANDBOXD_BENCH_NO_FAILFAST=1, interleaved: `true` (success path: OOM count read, counters), `false` (failure path: categorised `unknown`, ERROR_CATEGORY line), `pytest -q tests` on a 60-test suite (JUnit report asked for and read back, counts, failfast.json)",
    unit: "ms",
    trueWith: roundStats(t.on, 3),
    trueWithout: roundStats(t.off, 3),
    falseWith: roundStats(f.on, 3),
    falseWithout: roundStats(f.off, 3),
    pytestWith: roundStats(p.on, 1),
    pytestWithout: roundStats(p.off, 1),
    trueRatioP50: round(ratio(t), 4),
    falseRatioP50: round(ratio(f), 4),
    pytestAddedMsP50: round(p.on.p50 - p.off.p50, 1),
    pytestAddedMsMean: round(p.on.mean - p.off.mean, 1),
    pytestCounts: p.last.tests,
    targets: {
      exec: { target: `p50 with ≤ ${TARGETS.failFastExecRatio} × without (true and false)`, pass: ratio(t) <= TARGETS.failFastExecRatio && ratio(f) <= TARGETS.failFastExecRatio },
      pytest: { target: `pytest p50 with − without ≤ ${TARGETS.failFastPytestMs} ms`, pass: p.on.p50 - p.off.p50 <= TARGETS.failFastPytestMs },
    },
  };
}

/* -------------------------------- report -------------------------------- */

function fmt(x, d = 1) {
  return Number.isFinite(x) ? x.toFixed(d) : "—";
}

function printTable(r) {
  const rows = [["benchmark", "p50", "p95", "mean", "n", "unit"]];
  const add = (name, s, unit, d = 1) => rows.push([name, fmt(s.p50, d), fmt(s.p95, d), fmt(s.mean, d), String(s.n), unit]);
  const a = r.benchmarks.phaseStart;
  if (a) {
    add("(a) phase start-to-ready (API)", a.phaseStart, "ms");
    add("(a) baseline docker run --rm true", a.dockerRunBare, "ms");
    add("(a)   same, --network none (info)", a.dockerRunBareNoNetworkInfo, "ms");
    add("(a) phase stop (info, not a target)", a.phaseStopInfo, "ms");
  }
  const b = r.benchmarks.exec;
  if (b) {
    add("(b) exec true via API", b.api, "ms", 2);
    add("(b)   of which daemon→shim→exit (info)", b.apiShimLegInfo, "ms");
    if (b.engineApiExec) add("(b) baseline Engine API exec true, in-process", b.engineApiExec, "ms");
    if (b.apiAfterIdleInfo) add(`(b)   API exec after ${b.idleMsInfo} ms idle (info)`, b.apiAfterIdleInfo, "ms");
    if (b.engineApiExecAfterIdleInfo) add(`(b)   Engine API exec after ${b.idleMsInfo} ms idle (info)`, b.engineApiExecAfterIdleInfo, "ms");
    add("(b) exec true via CLI (process)", b.cli, "ms");
    if (b.cliNodeInfo) add("(b)   the CLI on Node, SANDBOXD_CLI_NODE=1 (info)", b.cliNodeInfo, "ms");
    add("(b) baseline docker exec true", b.dockerExec, "ms");
  }
  const c = r.benchmarks.stream;
  if (c) {
    if (c.clientMBps) add("(c) 200 MiB stdout via the exported client (bytes)", c.clientMBps, "MB/s");
    if (c.clientTextMBpsInfo) add("(c)   the same as text, onStdout (info)", c.clientTextMBpsInfo, "MB/s");
    add("(c)   the frames over node:http (info)", c.apiMBps, "MB/s");
    add("(c)   same as NDJSON, ?stream=1 (info)", c.ndjsonMBpsInfo, "MB/s");
    if (c.rawReaderMBpsInfo) add("(c)   same, the CLI's reader in-process (info)", c.rawReaderMBpsInfo, "MB/s");
    add("(c)   via the CLI > /dev/null, process (info)", c.cliMBpsInfo, "MB/s");
    add("(c) baseline docker exec > /dev/null", c.dockerExecMBps, "MB/s");
    add("(c) daemon peak RSS growth", c.daemonRssGrowthMB, "MB");
  }
  const e = r.benchmarks.pool;
  if (e) {
    add("(e) phase ready from the warm pool (API)", e.poolReady, "ms");
    add("(e) baseline docker run --network none true", e.dockerRunNoNetwork, "ms");
  }
  const ff = r.benchmarks.failFast;
  if (ff) {
    add("(d) exec true, fail-fast on", ff.trueWith, "ms", 2);
    add("(d) exec true, fail-fast off", ff.trueWithout, "ms", 2);
    add("(d) exec false, fail-fast on", ff.falseWith, "ms", 2);
    add("(d) exec false, fail-fast off", ff.falseWithout, "ms", 2);
    add("(d) pytest (60 tests), on", ff.pytestWith, "ms");
    add("(d) pytest (60 tests), off", ff.pytestWithout, "ms");
  }
  const widths = rows[0].map((_, i) => Math.max(...rows.map((row) => row[i].length)));
  const line = (row) => row.map((c, i) => (i === 0 ? c.padEnd(widths[i]) : c.padStart(widths[i]))).join("  ");
  const out = [line(rows[0]), widths.map((w) => "-".repeat(w)).join("  "), ...rows.slice(1).map(line)];

  out.push("", "targets:");
  const verdict = (p) => (p ? "PASS" : "MISS");
  if (a) out.push(`  (a) phase start / docker run, p50 ratio ${fmt(a.ratioP50, 2)} (mean ${fmt(a.ratioMean, 2)})  target ≤ ${TARGETS.phaseStartRatio}  ${verdict(a.pass)}`);
  if (b) out.push(`  (b) API exec / Engine API exec, p50 ratio ${fmt(b.apiRatioP50, 3)} (mean ${fmt(b.apiRatioMean, 3)}; to the docker exec CLI ${fmt(b.apiToDockerExecCliP50Info, 3)}; after ${b.idleMsInfo ?? "?"} ms idle ${fmt(b.apiAfterIdleRatioP50Info, 3)}, info)  target ≤ ${TARGETS.execApiRatio}  ${verdict(b.pass)}`);
  if (b) out.push(`  (b) CLI exec / docker exec, p50 ratio ${fmt(b.cliRatioP50, 3)} (mean ${fmt(b.cliRatioMean, 3)})  target ≤ ${TARGETS.execCliRatio}  ${verdict(b.cliPass)}`);
  if (c) {
    out.push(`  (c) the client's stream p50 ${fmt((c.clientMBps ?? c.apiMBps).p50)} MB/s (docker exec ${fmt(c.dockerExecMBps.p50)} MB/s)  target ≥ ${TARGETS.streamMBps}  ${verdict(c.targets.throughput.pass)}`);
    out.push(`  (c) the client's stream / docker exec, p50 ratio ${fmt(c.ratioP50, 2)}  target ≥ ${TARGETS.streamRatio}  ${verdict(c.targets.ratio.pass)}`);
    if (c.targets.cliRatio) out.push(`  (c) the CLI process / docker exec (both > /dev/null), p50 ratio ${fmt(c.cliRatioP50, 2)}  target ≥ ${TARGETS.streamRatio}  ${verdict(c.targets.cliRatio.pass)}`);
    out.push(`  (c) daemon RSS growth max ${fmt(c.daemonRssGrowthMB.max)} MB  target < ${TARGETS.streamRssGrowthMB}  ${verdict(c.targets.rss.pass)}`);
  }
  if (e) out.push(`  (e) phase ready from the pool p50 ${fmt(e.poolReady.p50)} ms (${fmt(e.ratioP50, 2)} × docker run --network none)  target ≤ ${TARGETS.poolReadyMs} ms  ${verdict(e.pass)}`);
  if (ff) {
    out.push(`  (d) exec with / without categorisation, p50 ratio true ${fmt(ff.trueRatioP50, 3)}, false ${fmt(ff.falseRatioP50, 3)}  target ≤ ${TARGETS.failFastExecRatio}  ${verdict(ff.targets.exec.pass)}`);
    out.push(`  (d) pytest report read adds ${fmt(ff.pytestAddedMsP50)} ms (p50; mean ${fmt(ff.pytestAddedMsMean)} ms)  target ≤ ${TARGETS.failFastPytestMs} ms  ${verdict(ff.targets.pytest.pass)}`);
  }
  const busy = Object.entries(r.benchmarks)
    .map(([k, v]) => v.machineDuringRun && `${k} ${Math.round(v.machineDuringRun.cpuBusyFraction * 100)}%`)
    .filter(Boolean);
  if (busy.length) out.push("", `machine CPU busy during each benchmark (all processes, ${r.machine.cpus} cores): ${busy.join(", ")}`);
  if (r.benchmarks.stream?.cpuSecondsPerRunMean?.api) {
    const c = r.benchmarks.stream.cpuSecondsPerRunMean.api;
    out.push(
      `(c) CPU-s per 200 MiB API stream: daemon ${fmt(c.daemon, 2)}, consumer ${fmt(c.consumer, 2)}, container (python3+shim) ${fmt(c.container, 2)}, other work on the machine ${fmt(c.otherOnMachine, 2)}`,
    );
  }
  process.stdout.write(out.join("\n") + "\n");
}

/* --------------------------------- main --------------------------------- */

async function main() {
  const started = new Date();
  preflight();
  results.date = started.toISOString();
  results.command = "npm run bench";
  results.config = { ...CFG, quick, out: path.relative(ROOT, CFG.out) };
  results.targets = TARGETS;
  results.machine = machine();
  say(`machine: ${results.machine.cpus} CPUs (${results.machine.cpuModel}), node ${results.machine.node}, docker ${results.machine.dockerServer}`);

  const tmp = await mkdtemp(path.join(os.tmpdir(), "sbx-bench-"));
  cleanup.push("remove temp dir", () => rm(tmp, { recursive: true, force: true }));
  const benchLabel = `sandboxd-bench=${path.basename(tmp)}`;
  cleanup.push("remove baseline containers", () => removeLabelled(benchLabel));
  const project = path.join(tmp, "project");
  await makeProject(project);

  let d;
  let instance = null;
  cleanup.push("remove the daemon's leftover containers", async () => {
    if (instance) await removeLabelled(`sandboxd.instance=${instance}`);
  });
  cleanup.push("print the daemon log on failure", () => {
    if (results.error && d) process.stderr.write(`--- daemon log (tail) ---\n${tail(d.logFile)}\n---\n`);
  });
  // the cold start is row (a): this daemon has no pool; row (e) has a daemon of its own with one
  d = await startDaemon(tmp, { SANDBOXD_POOL_SIZE: "0" });
  instance = d.instance;
  say(`daemon pid ${d.pid}, socket ${d.socket}`);
  const phases = phaseOps(d, project);

  // How busy the whole machine was during each benchmark (ours and everyone else's work).
  const section = async (fn) => {
    const busy0 = systemBusySeconds();
    const t0 = performance.now();
    const load0 = os.loadavg()[0];
    const r = await fn();
    const wallS = (performance.now() - t0) / 1000;
    r.machineDuringRun = {
      wallS: round(wallS, 1),
      cpuBusyFraction: round((systemBusySeconds() - busy0) / (wallS * os.cpus().length), 2),
      loadavg1Before: round(load0, 2),
      loadavg1After: round(os.loadavg()[0], 2),
    };
    return r;
  };
  if (CFG.only.includes("start")) results.benchmarks.phaseStart = await section(() => benchPhaseStart(d, phases, benchLabel));

  if (CFG.only.includes("exec") || CFG.only.includes("stream")) {
    const phase = await phases.start("bench-exec");
    if (CFG.only.includes("exec")) results.benchmarks.exec = await section(() => benchExec(d, phase));
    if (CFG.only.includes("stream")) results.benchmarks.stream = await section(() => benchStream(d, phase));
    await phases.stop(phase.id);
  }

  if (CFG.only.includes("pool")) {
    const projectPool = path.join(tmp, "project-pool");
    await makeProject(projectPool);
    const pd = await startDaemon(tmp, { SANDBOXD_POOL_SIZE: "1" }, "-pool");
    cleanup.push("remove the pool daemon's leftover containers", () => removeLabelled(`sandboxd.instance=${pd.instance}`));
    results.benchmarks.pool = await section(() => benchPool(pd, phaseOps(pd, projectPool), benchLabel));
    // its own stop removes the pool's unclaimed container: none may be left for the cleanup to find
    pd.child.kill("SIGTERM");
    await new Promise((r) => (pd.child.exitCode !== null ? r() : pd.child.once("exit", r)));
    const left = (await timed("docker", ["ps", "-aq", "--filter", `label=sandboxd.instance=${pd.instance}`], { timeoutMs: 30_000 })).stdout.trim();
    results.benchmarks.pool.containersLeftAfterStop = left ? left.split(/\s+/).length : 0;
  }

  if (CFG.only.includes("failfast")) {
    // a second daemon, fail-fast off, on a copy of the project; both phases run the same commands in turn
    const projectOff = path.join(tmp, "project-off");
    await makeProject(projectOff);
    await addPytestSuite(project);
    await addPytestSuite(projectOff);
    const off = await startDaemon(tmp, { SANDBOXD_BENCH_NO_FAILFAST: "1", SANDBOXD_POOL_SIZE: "0" }, "-off");
    cleanup.push("remove the second daemon's leftover containers", () => removeLabelled(`sandboxd.instance=${off.instance}`));
    const phasesOff = phaseOps(off, projectOff);
    const phaseOn = await phases.start("bench-ff-on");
    const phaseOff = await phasesOff.start("bench-ff-off");
    results.benchmarks.failFast = await section(() => benchFailFast(d, off, phaseOn, phaseOff));
    await phases.stop(phaseOn.id);
    await phasesOff.stop(phaseOff.id);
  }

  results.machine.loadavgAtEnd = os.loadavg().map((x) => round(x, 2));
  results.durationS = round((Date.now() - started.getTime()) / 1000, 1);
}

function writeResults() {
  mkdirSync(path.dirname(CFG.out), { recursive: true });
  writeFileSync(CFG.out, JSON.stringify(results, null, 2) + "\n");
  say(`results written to ${path.relative(process.cwd(), CFG.out) || CFG.out}`);
}

let finishing = false;
async function finish(code, why) {
  if (finishing) return;
  finishing = true;
  if (why) {
    results.error = why;
    say(why);
  }
  await cleanup.run();
  if (Object.keys(results.benchmarks).length) {
    printTable(results);
    writeResults();
  }
  process.exit(code);
}

const watchdog = setTimeout(() => finish(1, `watchdog: the bench ran longer than ${CFG.timeoutS} s; stopped`), CFG.timeoutS * 1000);
process.once("SIGINT", () => finish(130, "interrupted (SIGINT)"));
process.once("SIGTERM", () => finish(143, "terminated (SIGTERM)"));

main().then(
  () => {
    clearTimeout(watchdog);
    // Missed targets are results, not failures: the exit code says whether the bench ran.
    return finish(0);
  },
  (err) => {
    clearTimeout(watchdog);
    return finish(1, `failed: ${err.stack ?? err.message}`);
  },
);
