/**
 * A container's memory as its cgroup reports it, read by the daemon (root on
 * the host) for the resource watch (src/phases/resources.ts).
 *
 * The container's cgroup is found from its first process: /proc/<pid>/cgroup
 * names it per hierarchy, /proc/self/mountinfo says where each hierarchy is
 * mounted. A host whose memory controller is in cgroup v1 (this project's
 * hybrid machines: Docker 20.10, cgroupfs driver) has
 * `memory.usage_in_bytes`, `memory.stat` (total_inactive_file),
 * `memory.limit_in_bytes` and the `oom_kill` line of `memory.oom_control`;
 * a pure v2 host has `memory.current`, `memory.stat` (inactive_file),
 * `memory.max` and the `oom_kill` line of `memory.events`. Both count every
 * process of the container, the shim included.
 *
 * "In use" is the working set as `docker stats` and the kubelet count it:
 * usage minus inactive file cache (cache the kernel drops before it would
 * OOM-kill anything), so reading a large file is not a leak.
 */
import { readFileSync } from "node:fs";
import { readFile } from "node:fs/promises";
import path from "node:path";

export interface MemorySample {
  /** usage − inactive file cache, bytes */
  workingSetBytes: number;
  /** everything charged to the container, cache included */
  usageBytes: number;
  /** the container's hard limit; null when it has none */
  limitBytes: number | null;
  /** OOM kills in the container since it started (the kernel's count) */
  oomKills: number;
}

/** What the watch reads; null from `sample` when the cgroup is gone (the container ended). */
export interface MemoryProbe {
  readonly version: 1 | 2;
  /** the cgroup directory on the host */
  readonly dir: string;
  sample(): Promise<MemorySample | null>;
  /** the OOM kill count alone, read synchronously (a few microseconds): exec reads it before and after a command */
  oomKills(): number | null;
}

/** Whether a cgroup v1 controller list ("rw,memory" options, "cpu,cpuacct" names) holds `memory`. */
function hasMemory(list: string): boolean {
  return list.split(",").includes("memory");
}

/**
 * The host directory of the memory cgroup of process `pid`: v1's memory
 * hierarchy when the host has one, else the v2 hierarchy. Pure over the two
 * files' text, for unit tests.
 */
export function memoryCgroupDir(procCgroup: string, mountinfo: string): { version: 1 | 2; dir: string } | null {
  const lines = procCgroup.split("\n").filter(Boolean);
  const v1 = lines.map((l) => l.split(":")).find((f) => f.length >= 3 && hasMemory(f[1]!));
  const v2 = lines.map((l) => l.split(":")).find((f) => f.length >= 3 && f[0] === "0" && f[1] === "");
  const mounts = mountinfo
    .split("\n")
    .filter(Boolean)
    .map((l) => {
      // id parent major:minor root mountpoint options... - fstype source superoptions
      const [pre, post] = l.split(" - ");
      const f = (pre ?? "").split(" ");
      const g = (post ?? "").split(" ");
      return { root: unescape(f[3] ?? "/"), point: unescape(f[4] ?? ""), fstype: g[0] ?? "", superOptions: g[2] ?? "" };
    });
  const join = (m: { root: string; point: string }, cg: string) => {
    // a mount of a sub-tree (a cgroup namespace's view) shows paths relative to its root
    const rel = m.root !== "/" && cg.startsWith(m.root) ? cg.slice(m.root.length) : cg;
    return path.join(m.point, rel);
  };
  if (v1) {
    const m = mounts.find((x) => x.fstype === "cgroup" && hasMemory(x.superOptions));
    if (m) return { version: 1, dir: join(m, v1.slice(2).join(":")) };
  }
  if (v2) {
    const m = mounts.find((x) => x.fstype === "cgroup2");
    if (m) return { version: 2, dir: join(m, v2.slice(2).join(":")) };
  }
  return null;
}

function unescape(s: string): string {
  return s.replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8)));
}

/** `key value` lines (memory.stat, memory.events, memory.oom_control) → the value of `key`, or null. */
export function statValue(text: string, key: string): number | null {
  for (const line of text.split("\n")) {
    const sp = line.indexOf(" ");
    if (sp > 0 && line.slice(0, sp) === key) {
      const n = Number(line.slice(sp + 1));
      return Number.isFinite(n) ? n : null;
    }
  }
  return null;
}

/** v1 reports "no limit" as a huge number (PAGE_COUNTER_MAX pages), v2 as "max". */
function limitOf(text: string): number | null {
  const t = text.trim();
  if (t === "max") return null;
  const n = Number(t);
  return Number.isFinite(n) && n < 2 ** 60 ? n : null;
}

const FILES = {
  1: { usage: "memory.usage_in_bytes", inactive: "total_inactive_file", limit: "memory.limit_in_bytes", oom: "memory.oom_control" },
  2: { usage: "memory.current", inactive: "inactive_file", limit: "memory.max", oom: "memory.events" },
} as const;

class CgroupMemoryProbe implements MemoryProbe {
  constructor(
    readonly version: 1 | 2,
    readonly dir: string,
  ) {}

  async sample(): Promise<MemorySample | null> {
    const f = FILES[this.version];
    try {
      // Read synchronously: four small cgroup files the kernel writes out from memory, a few
      // microseconds each, where readFile is four trips through the thread pool per file (sixteen
      // wake-ups a second, per phase, on the CPUs the commands and the shim run on).
      const [usage, stat, limit, oom] = [f.usage, "memory.stat", f.limit, f.oom].map((name) => readFileSync(path.join(this.dir, name), "utf8"));
      const usageBytes = Number(usage!.trim());
      const inactive = statValue(stat!, f.inactive) ?? 0;
      return {
        usageBytes,
        workingSetBytes: Math.max(0, usageBytes - inactive),
        limitBytes: limitOf(limit!),
        oomKills: statValue(oom!, "oom_kill") ?? 0,
      };
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === "ENOENT") return null;
      throw err;
    }
  }

  oomKills(): number | null {
    try {
      return statValue(readFileSync(path.join(this.dir, FILES[this.version].oom), "utf8"), "oom_kill");
    } catch {
      return null;
    }
  }
}

/** The memory probe of the process `pid` (the container's first process, as the host sees it); null when none can be had. */
export async function memoryProbeOf(pid: number): Promise<MemoryProbe | null> {
  const [procCgroup, mountinfo] = await Promise.all([readFile(`/proc/${pid}/cgroup`, "utf8"), readFile("/proc/self/mountinfo", "utf8")]);
  const found = memoryCgroupDir(procCgroup, mountinfo);
  if (!found) return null;
  const probe = new CgroupMemoryProbe(found.version, found.dir);
  // a directory the daemon cannot read (not root, another cgroup namespace) is no probe
  return (await probe.sample().catch(() => null)) ? probe : null;
}
