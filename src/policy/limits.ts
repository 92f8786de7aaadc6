/**
 * Resource and time limits a phase runs under, with the SKILLS.md clause each
 * one enforces. The policy engine (policies/*.yaml) will supply these values;
 * until then these are the defaults it must reproduce.
 */
import type { PhaseMode } from "../domain.js";

export interface PhaseLimits {
  /** SKILLS.md "Resource Limits" — Memory: >1GB sustained escalates; the hard ceiling sits above it. */
  memoryBytes: number;
  /**
   * SKILLS.md "Resource Limits" — Memory: ">1GB sustained → escalate". The
   * container's working set (usage less inactive file cache) at or above this
   * for memorySustainMs escalates the phase (src/phases/resources.ts).
   */
  memoryEscalateBytes: number;
  /** how long the working set must stay at or above memoryEscalateBytes ("sustained") */
  memorySustainMs: number;
  /** SKILLS.md "Resource Limits" — CPU: a single Python process, no parallel execution. */
  cpus: number;
  /** fork-bomb guard; not in SKILLS.md, required by "Safety First". */
  pidsLimit: number;
  /**
   * RLIMIT_FSIZE: a wide safety cap (the layer's budget), so `pip install numpy`
   * works. SKILLS.md "Resource Limits" — Disk: no files larger than 10MB — is
   * judged on the project's files at each checkpoint (src/workspace).
   */
  fileSizeBytes: number;
  /** size of the container's only writable scratch space (/tmp) */
  tmpfsBytes: number;
  /** SKILLS.md §2 "Execution Timeouts" — default 60 s for any single command. */
  defaultTimeoutMs: number;
  /** SKILLS.md §2 — 60 s, except long-running paper-mode feeds, up to 5 minutes. */
  maxTimeoutMs: number;
  /** grace between SIGTERM and SIGKILL at a timeout ("Terminate process … attempt cleanup") */
  killGraceMs: number;
  /** output kept per stream per command (API result); streaming is not capped */
  outputCapBytes: number;
  /** output kept per stream per command in build_audit.log */
  auditOutputCapBytes: number;
}

const MiB = 1024 * 1024;

/** The resource watch's keys, for policy files that predate them. */
export const MEMORY_WATCH_DEFAULTS = {
  memoryEscalateBytes: 1024 * MiB,
  memorySustainMs: 30_000,
} as const;

export function defaultLimits(mode: PhaseMode): PhaseLimits {
  return {
    memoryBytes: 2048 * MiB,
    ...MEMORY_WATCH_DEFAULTS,
    cpus: 1,
    pidsLimit: 256,
    fileSizeBytes: 2048 * MiB,
    tmpfsBytes: 512 * MiB,
    defaultTimeoutMs: 60_000,
    maxTimeoutMs: mode === "paper" ? 300_000 : 60_000,
    killGraceMs: 2_000,
    outputCapBytes: 1 * MiB,
    auditOutputCapBytes: 64 * 1024,
  };
}
