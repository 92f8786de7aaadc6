/**
 * Helpers for bench/run.mjs: statistics, timed child processes, /proc memory
 * readings, and a cleanup stack that runs whatever happens (failure, signal,
 * watchdog).
 */
import { spawn } from "node:child_process";
import { readFileSync, writeFileSync } from "node:fs";
import { performance } from "node:perf_hooks";

/* ------------------------------ statistics ------------------------------ */

/** Quantile with linear interpolation between closest ranks (R type 7, numpy's default). */
export function quantile(sorted, q) {
  if (sorted.length === 0) return NaN;
  const pos = (sorted.length - 1) * q;
  const lo = Math.floor(pos);
  const hi = Math.ceil(pos);
  return sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo);
}

export function summarize(samples) {
  const sorted = [...samples].sort((a, b) => a - b);
  const n = sorted.length;
  const mean = n ? sorted.reduce((a, b) => a + b, 0) / n : NaN;
  return {
    n,
    p50: quantile(sorted, 0.5),
    p95: quantile(sorted, 0.95),
    mean,
    min: sorted[0] ?? NaN,
    max: sorted[n - 1] ?? NaN,
  };
}

export const round = (x, digits = 2) => (Number.isFinite(x) ? Number(x.toFixed(digits)) : x);

export function roundStats(s, digits = 2) {
  return Object.fromEntries(Object.entries(s).map(([k, v]) => [k, k === "n" ? v : round(v, digits)]));
}

/* ---------------------------- child processes --------------------------- */

/** Child processes of timed() still running, so cleanup can end them. */
const running = new Set();

/** SIGKILLs every child process timed() started that is still running, and waits for them. */
export async function killRunningChildren(timeoutMs = 10_000) {
  const waits = [...running].map(
    (child) =>
      new Promise((resolve) => {
        if (child.exitCode !== null || child.signalCode !== null) return resolve();
        child.once("close", resolve);
        child.kill("SIGKILL");
      }),
  );
  if (waits.length) await Promise.race([Promise.all(waits), new Promise((r) => setTimeout(r, timeoutMs))]);
}

/**
 * Runs a process and resolves with its wall time (spawn to close of all its
 * stdio), exit code and captured output. Killed with SIGKILL after timeoutMs.
 * stdout: "pipe" (captured, up to captureLimit bytes), "ignore", "count"
 * (counted, not kept) or a file descriptor.
 */
export function timed(cmd, args, { stdout = "pipe", timeoutMs = 60_000, env, captureLimit = 1 << 20 } = {}) {
  return new Promise((resolve, reject) => {
    const t0 = performance.now();
    const child = spawn(cmd, args, {
      stdio: ["ignore", stdout === "count" ? "pipe" : stdout, "pipe"],
      env: env ?? process.env,
    });
    running.add(child);
    let out = "";
    let outBytes = 0;
    let err = "";
    child.stdout?.on("data", (c) => {
      outBytes += c.length;
      if (stdout === "pipe" && out.length < captureLimit) out += c.toString();
    });
    child.stderr.on("data", (c) => {
      if (err.length < captureLimit) err += c.toString();
    });
    const timer = setTimeout(() => {
      child.kill("SIGKILL");
      reject(new Error(`${cmd} ${args.join(" ").slice(0, 200)}: killed after ${timeoutMs} ms`));
    }, timeoutMs);
    child.on("error", (e) => {
      clearTimeout(timer);
      running.delete(child);
      reject(e);
    });
    child.on("close", (code, signal) => {
      clearTimeout(timer);
      running.delete(child);
      resolve({ ms: performance.now() - t0, code, signal, stdout: out, stdoutBytes: outBytes, stderr: err });
    });
  });
}

/** Like timed(), but rejects unless the process exits 0. */
export async function timedOk(cmd, args, opts) {
  const r = await timed(cmd, args, opts);
  if (r.code !== 0) {
    throw new Error(`${cmd} ${args.join(" ").slice(0, 200)} exited ${r.code ?? r.signal}: ${r.stderr.trim().slice(0, 2000)}`);
  }
  return r;
}

/** Rejects when the promise takes longer than ms (the work itself is not cancelled). */
export function withTimeout(promise, ms, what) {
  let timer;
  return Promise.race([
    promise,
    new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error(`${what}: no answer within ${ms} ms`)), ms);
    }),
  ]).finally(() => clearTimeout(timer));
}

/* --------------------------------- /proc -------------------------------- */

/** A field of /proc/<pid>/status in bytes (VmRSS, VmHWM …). */
export function procStatusBytes(pid, field) {
  const text = readFileSync(`/proc/${pid}/status`, "utf8");
  const m = new RegExp(`^${field}:\\s+(\\d+) kB`, "m").exec(text);
  if (!m) throw new Error(`no ${field} in /proc/${pid}/status`);
  return Number(m[1]) * 1024;
}

/** Resets the process's peak RSS (VmHWM) to its current RSS; false when the kernel refuses. */
export function resetPeakRss(pid) {
  try {
    writeFileSync(`/proc/${pid}/clear_refs`, "5");
    return true;
  } catch {
    return false;
  }
}

/**
 * Samples VmRSS of pid every intervalMs until stop(); reports the peak, the
 * number of samples and the largest gap between two samples (a busy event
 * loop in this process would show as a gap).
 */
export function rssSampler(pid, intervalMs = 20) {
  let peak = procStatusBytes(pid, "VmRSS");
  let samples = 1;
  let last = performance.now();
  let maxGap = 0;
  const timer = setInterval(() => {
    const now = performance.now();
    maxGap = Math.max(maxGap, now - last);
    last = now;
    try {
      peak = Math.max(peak, procStatusBytes(pid, "VmRSS"));
      samples++;
    } catch {
      /* the process is gone; the caller will notice */
    }
  }, intervalMs);
  return {
    stop() {
      clearInterval(timer);
      try {
        peak = Math.max(peak, procStatusBytes(pid, "VmRSS"));
        samples++;
      } catch {
        /* gone */
      }
      return { peak, samples, maxGapMs: maxGap };
    },
  };
}

/* -------------------------------- cleanup ------------------------------- */

/** LIFO stack of cleanup steps; each runs once, failures are reported and skipped. */
export class Cleanup {
  #steps = [];
  #running = null;

  push(name, fn) {
    const step = { name, fn, done: false };
    this.#steps.push(step);
    return () => {
      step.done = true; // released: the work already happened normally
    };
  }

  run() {
    this.#running ??= (async () => {
      // First the bench's own child processes (docker run/exec, CLI), so none outlives the steps below.
      await killRunningChildren();
      while (this.#steps.length) {
        const step = this.#steps.pop();
        if (step.done) continue;
        step.done = true;
        try {
          await step.fn();
        } catch (e) {
          process.stderr.write(`bench: cleanup "${step.name}" failed: ${e.message}\n`);
        }
      }
    })();
    return this.#running;
  }
}

/* ------------------------------ CPU time ------------------------------- */

const CLK_TCK = 100; // USER_HZ, 100 on every Linux architecture Node runs on

/** CPU seconds (user + system) a process has used so far; NaN when it is gone. */
export function procCpuSeconds(pid) {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    // fields after "(comm) ": state is field 3, utime 14, stime 15
    const f = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    return (Number(f[11]) + Number(f[12])) / CLK_TCK;
  } catch {
    return NaN;
  }
}

/** CPU seconds used by every process of a container (its cgroup), v1 or v2; NaN when not found. */
export function containerCpuSeconds(containerId) {
  const candidates = [
    [`/sys/fs/cgroup/cpuacct/docker/${containerId}/cpuacct.usage`, (t) => Number(t) / 1e9],
    [`/sys/fs/cgroup/cpu,cpuacct/docker/${containerId}/cpuacct.usage`, (t) => Number(t) / 1e9],
    [`/sys/fs/cgroup/system.slice/docker-${containerId}.scope/cpu.stat`, (t) => Number(/usage_usec (\d+)/.exec(t)?.[1]) / 1e6],
    [`/sys/fs/cgroup/docker/${containerId}/cpu.stat`, (t) => Number(/usage_usec (\d+)/.exec(t)?.[1]) / 1e6],
  ];
  for (const [file, parse] of candidates) {
    try {
      return parse(readFileSync(file, "utf8"));
    } catch {
      /* next */
    }
  }
  return NaN;
}

/** This process's own CPU seconds. */
export function selfCpuSeconds() {
  const u = process.cpuUsage();
  return (u.user + u.system) / 1e6;
}

/** CPU seconds the whole machine has spent busy (all cores, from /proc/stat); NaN if unreadable. */
export function systemBusySeconds() {
  try {
    const f = readFileSync("/proc/stat", "utf8").split("\n")[0].trim().split(/\s+/).slice(1).map(Number);
    // user nice system idle iowait irq softirq steal …: busy = all but idle and iowait
    const [user, nice, system, , , irq, softirq, steal] = f;
    return (user + nice + system + irq + softirq + (steal || 0)) / CLK_TCK;
  } catch {
    return NaN;
  }
}

/** Voluntary and involuntary context switches of a process so far (/proc/<pid>/status); NaN when it is gone. */
export function procContextSwitches(pid) {
  try {
    const text = readFileSync(`/proc/${pid}/status`, "utf8");
    return {
      voluntary: Number(/^voluntary_ctxt_switches:\s+(\d+)/m.exec(text)?.[1]),
      involuntary: Number(/^nonvoluntary_ctxt_switches:\s+(\d+)/m.exec(text)?.[1]),
    };
  } catch {
    return { voluntary: NaN, involuntary: NaN };
  }
}
