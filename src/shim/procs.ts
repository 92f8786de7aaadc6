/**
 * Finding and signalling every process that belongs to one exec.
 *
 * Docker has no exec-kill API, so the shim does it. Each exec is spawned
 * `detached` (setsid), so its leader's pid is also its process group id and its
 * session id. A command may still move children out of its group (setpgid, as
 * shells with job control do) or out of its session (setsid, as daemonising
 * tools do); the ppid links in /proc catch those while their parent is alive,
 * and processes seen at an earlier signal (timeout, daemon request) are
 * remembered. What nothing here can catch is a process that left the session
 * and whose parent exited before the shim ever looked (a double-fork daemon,
 * or `setsid cmd &` from a leader that then exits): it is reparented to PID 1
 * (tini) with no link back, and lives until the phase's container is removed.
 */
import { readdirSync, readFileSync } from "node:fs";
import { errorFields, log } from "./log.js";

export interface ProcStat {
  pid: number;
  ppid: number;
  pgid: number;
  sid: number;
  /** one-letter state from /proc/<pid>/stat; "Z" is a zombie */
  state: string;
  /** start time in clock ticks since boot; with pid, identifies a process across pid reuse */
  start: number;
}

/** Parses /proc/<pid>/stat. The comm field may contain spaces and ')', so split after the last ')'. */
export function parseStat(text: string): ProcStat | null {
  const open = text.indexOf("(");
  const close = text.lastIndexOf(")");
  if (open < 0 || close < open) return null;
  const pid = Number(text.slice(0, open).trim());
  // After "comm) " come fields 3.. of proc(5): state ppid pgrp session … starttime (22).
  const rest = text.slice(close + 2).split(" ");
  const field = (n: number): number => Number(rest[n - 3]);
  const parsed = { pid, ppid: field(4), pgid: field(5), sid: field(6), start: field(22), state: rest[0] ?? "" };
  if (![parsed.pid, parsed.ppid, parsed.pgid, parsed.sid, parsed.start].every(Number.isInteger)) return null;
  return parsed;
}

export function readProcTable(procRoot = "/proc"): ProcStat[] {
  const table: ProcStat[] = [];
  for (const name of readdirSync(procRoot)) {
    if (!/^\d+$/.test(name)) continue;
    let text: string;
    try {
      text = readFileSync(`${procRoot}/${name}/stat`, "utf8");
    } catch {
      continue; // exited between readdir and read
    }
    const stat = parseStat(text);
    if (stat) table.push(stat);
  }
  return table;
}

/**
 * Processes belonging to the exec led by `leader`: members of its process
 * group or session, and every descendant of the leader or of those members.
 * Never includes PID 1, the shim or the shim's parent.
 */
export function findExecProcesses(table: readonly ProcStat[], leader: number): ProcStat[] {
  const children = new Map<number, number[]>();
  const found = new Set<number>();
  for (const p of table) {
    const siblings = children.get(p.ppid);
    if (siblings) siblings.push(p.pid);
    else children.set(p.ppid, [p.pid]);
    if (p.pid === leader || p.pgid === leader || p.sid === leader) found.add(p.pid);
  }
  const queue = [leader, ...found];
  for (let pid = queue.pop(); pid !== undefined; pid = queue.pop()) {
    for (const child of children.get(pid) ?? []) {
      if (!found.has(child)) {
        found.add(child);
        queue.push(child);
      }
    }
  }
  for (const pid of [0, 1, process.pid, process.ppid]) found.delete(pid);
  return table.filter((p) => found.has(p.pid));
}

/** Signals a process group; false when it no longer exists. */
export function signalGroup(pgid: number, signal: NodeJS.Signals): boolean {
  return signalPid(-pgid, signal);
}

/** Signals one process; false when it no longer exists. */
export function signalPid(pid: number, signal: NodeJS.Signals): boolean {
  try {
    process.kill(pid, signal);
    return true;
  } catch (err) {
    // ESRCH: already gone, the normal case. Anything else (EPERM would mean
    // CAP_KILL is missing) is logged rather than thrown: a kill path must not
    // crash the shim and leave the other execs unsupervised.
    if ((err as NodeJS.ErrnoException).code !== "ESRCH") log("warn", "kill failed", { pid, signal, ...errorFields(err) });
    return false;
  }
}

/**
 * Signals the exec led by `leader`: its group, its session and its
 * descendants, plus `known` processes seen earlier (children of a leader that
 * has since exited are no longer linked to it). Returns every process signalled
 * individually, for the caller to pass back as `known` next time.
 */
export function signalExecProcesses(
  leader: number,
  signal: NodeJS.Signals,
  known: readonly ProcStat[] = [],
  procRoot = "/proc",
): ProcStat[] {
  // Collect before signalling: a killed parent's children are reparented to
  // PID 1, which cuts the ppid links the walk follows.
  const table = readProcTable(procRoot);
  const targets = new Map(findExecProcesses(table, leader).map((p) => [p.pid, p]));
  for (const old of known) {
    // Same pid and start time: still the same process, not a reused pid.
    const now = table.find((p) => p.pid === old.pid);
    if (now && now.start === old.start && !targets.has(now.pid)) targets.set(now.pid, now);
  }
  signalGroup(leader, signal);
  return [...targets.values()].filter((p) => signalPid(p.pid, signal));
}
