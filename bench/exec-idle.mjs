/**
 * Where an exec's time goes after the machine was idle (issue 14: the CLI's
 * `exec true` takes 18–20 ms in the daemon after a pause, 6 ms back to back).
 *
 *   1. A cgroup migration (a write of a pid to cgroup.procs) alone, after
 *      gaps of 0–100 ms: the first after a pause waits for an RCU grace
 *      period (the kernel's cgroup_threadgroup_rwsem), the one right after
 *      it does not. Every command's start moves the forker into the
 *      command's cgroup (src/shim/cgroups.ts); `docker exec` (runc) moves
 *      its process into the container's cgroups the same way.
 *   2. With BENCH_SOCKET and BENCH_PHASE (a running daemon and phase):
 *      `true` through the API after the same gaps, beside `docker exec
 *      <container> true` (whole CLI process), interleaved.
 *
 *   node bench/exec-idle.mjs
 *   BENCH_SOCKET=/run/sandboxd.sock BENCH_PHASE=ph_… node bench/exec-idle.mjs
 *
 * Needs root (part 1 makes two cgroups under /sys/fs/cgroup/unified or, on
 * a cgroup v2 host, /sys/fs/cgroup, and removes them). Ends its stdout with a
 * JSON document.
 */
import { spawn, spawnSync } from "node:child_process";
import { existsSync, mkdirSync, rmdirSync, writeFileSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { performance } from "node:perf_hooks";
import { roundStats, summarize } from "./lib.mjs";

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
const GAPS = [0, 5, 20, 50, 100];
const N = Number(process.env.BENCH_IDLE_N ?? 15);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function cgroupMoves() {
  const base = existsSync("/sys/fs/cgroup/unified/cgroup.procs") ? "/sys/fs/cgroup/unified" : "/sys/fs/cgroup";
  const dirs = [`${base}/sbx-bench-idle-a-${process.pid}`, `${base}/sbx-bench-idle-b-${process.pid}`];
  for (const d of dirs) mkdirSync(d);
  const home = `${base}/cgroup.procs`;
  const child = spawn("sleep", ["600"], { stdio: "ignore" });
  const move = (d) => {
    const t = performance.now();
    writeFileSync(`${d}/cgroup.procs`, String(child.pid));
    return performance.now() - t;
  };
  const out = {};
  try {
    for (const gap of GAPS) {
      const first = [];
      const second = [];
      for (let i = 0; i < N; i++) {
        await sleep(gap);
        first.push(move(dirs[0]));
        second.push(move(dirs[1]));
      }
      out[gap] = { first: roundStats(summarize(first), 3), second: roundStats(summarize(second), 3) };
      console.error(`cgroup move after ${gap} ms idle: first p50 ${out[gap].first.p50} ms, the next right after it p50 ${out[gap].second.p50} ms`);
    }
  } finally {
    writeFileSync(home, String(child.pid));
    child.kill("SIGKILL");
    await new Promise((r) => child.once("exit", r));
    for (const d of dirs) rmdirSync(d);
  }
  return out;
}

async function execAfterGaps(socket, phase) {
  const { ApiClient } = await import(path.join(ROOT, "dist", "cli", "client.js"));
  const api = new ApiClient(socket);
  const view = (await api.request("GET", `/v1/phases/${phase}`)).phase;
  const viaApi = async () => {
    const t = performance.now();
    const r = await api.request("POST", `/v1/phases/${phase}/exec`, { argv: ["true"] });
    if (r.result?.exitCode !== 0) throw new Error(`exec true: ${JSON.stringify(r).slice(0, 300)}`);
    return performance.now() - t;
  };
  const viaDocker = () => {
    const t = performance.now();
    const r = spawnSync("docker", ["exec", view.containerId, "true"], { stdio: "ignore" });
    if (r.status !== 0) throw new Error(`docker exec: exit ${r.status}`);
    return performance.now() - t;
  };
  for (let i = 0; i < 3; i++) {
    await viaApi();
    viaDocker();
  }
  const out = {};
  for (const gap of GAPS) {
    const a = [];
    const d = [];
    for (let i = 0; i < N; i++) {
      await sleep(gap);
      if (i % 2 === 0) {
        a.push(await viaApi());
        await sleep(gap);
        d.push(viaDocker());
      } else {
        d.push(viaDocker());
        await sleep(gap);
        a.push(await viaApi());
      }
    }
    out[gap] = { api: roundStats(summarize(a), 2), dockerExecCli: roundStats(summarize(d), 2) };
    console.error(`after ${gap} ms idle: exec true via the API p50 ${out[gap].api.p50} ms; docker exec (CLI) p50 ${out[gap].dockerExecCli.p50} ms`);
  }
  return out;
}

const result = { benchmark: "exec-idle", at: new Date().toISOString(), n: N, gapsMs: GAPS, cgroupMoveMs: await cgroupMoves() };
if (process.env.BENCH_SOCKET && process.env.BENCH_PHASE) result.execAfterGapMs = await execAfterGaps(process.env.BENCH_SOCKET, process.env.BENCH_PHASE);
console.log(JSON.stringify(result, null, 2));
