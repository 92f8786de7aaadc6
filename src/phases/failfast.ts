/**
 * SKILLS.md Fail-Fast Protocol, the counting half (pure): consecutive failed
 * attempts per category against the policy's maxAttempts, and across
 * categories against `consecutive` (Core Principles: "3 consecutive
 * self-correction attempts"). escalation.ts does what a limit reached means.
 *
 * What counts:
 *   - a command whose result categorize.ts puts in syntax, import, type,
 *     test or runtime; a database refusal or server error from the gateway;
 *     an iteration refused at a checkpoint (`iteration`, via recordAttempt);
 *     a policy refusal only when the policy's countPolicyRefusals is true.
 *   - `unknown` (a grep that matched nothing, a lint finding that is not a
 *     syntax error) is recorded with its evidence but never counted: it is
 *     not an error SKILLS.md names, and counting it would escalate ordinary
 *     exploration.
 *
 * What resets ("a success of the same kind"): a success that answers every
 * failed attempt on a counter — shows that what failed now works:
 *   - a command's attempt is answered by the same command (the same action,
 *     as recorded) succeeding; when it is pytest, only with a report whose
 *     tests ran and all passed;
 *   - an attempt with failing tests is also answered by any pytest run whose
 *     report has them passing and nothing failing (the full suite after a
 *     fix), a collection error by passing tests of that module;
 *   - the gateway's and the checkpoint's attempts by a success of theirs
 *     (a query that worked, an accepted iteration: succeed()).
 * A success of the same tool that does not answer them — `pytest --version`,
 * a passing subset that leaves the failing test out, `python3 -c pass` after
 * a crash of main.py — resets nothing: it was how an agent could fail for
 * ever without escalating. A success that resets a counter also ends the
 * consecutive streak. Other successes (ls, cat) reset nothing.
 */
import { z } from "zod";
import { FAILURE_CATEGORIES, formatBytes, type FailureCategory, type TestCounts, type Tool } from "./categorize.js";
import type { FailFastPolicy } from "../policy/schema.js";

/** Who produced an attempt: a command's tool, the SQL gateway or the checkpoint. */
export type Source = Tool | "gateway" | "checkpoint" | "policy";

export interface Attempt {
  /** 1-based, over the phase */
  n: number;
  at: string;
  category: FailureCategory;
  source: Source;
  /** what the agent did: the command, the statement, the iteration */
  action: string;
  /** what came of it: "FAIL exit 1", "refused by db.read-only", … */
  result: string;
  evidence: string;
  /** the tests that failed in this attempt ("classname::name" from pytest's report), which a later report can show passing */
  tests?: string[];
}

export interface Counter {
  count: number;
  sources: Set<Source>;
  attempts: Attempt[];
}

/** The resource watch's figures when memory stayed high (src/phases/resources.ts). */
export interface MemoryFigures {
  /** the policy's limits.memoryEscalateBytes and memorySustainMs */
  thresholdBytes: number;
  sustainMs: number;
  /** how long the working set has been at or above the threshold, and how many samples said so */
  overMs: number;
  samples: number;
  /** working set (usage less inactive file cache) at the last sample, and the highest seen while over */
  currentBytes: number;
  peakBytes: number;
  /** everything charged to the container at the last sample, file cache included */
  usageBytes: number;
  /** the container's hard limit (null: none) */
  limitBytes: number | null;
}

/** A limit reached: which scope, which category, how many of how many. */
export interface LimitReached {
  /** category/consecutive: counted failures; memory: the resource watch (SKILLS.md Resource Limits) */
  scope: "category" | "consecutive" | "memory";
  category: FailureCategory;
  count: number;
  limit: number;
  /** the attempts the limit counted, oldest first (none for memory) */
  attempts: Attempt[];
  /** scope memory: what the cgroup said */
  memory?: MemoryFigures;
}

/** "working set 1.2 GiB ≥ 1 GiB for 31 s (peak 1.3 GiB; hard limit 2 GiB)" */
export function memorySummary(m: MemoryFigures): string {
  return `memory (working set) ${formatBytes(m.currentBytes)} at or above ${formatBytes(m.thresholdBytes)} for ${Math.round(m.overMs / 100) / 10} s (peak ${formatBytes(m.peakBytes)}, ${m.samples} samples; hard limit ${m.limitBytes === null ? "none" : formatBytes(m.limitBytes)})`;
}

const attemptSchema = z.object({
  n: z.number().int(),
  at: z.string(),
  category: z.enum(FAILURE_CATEGORIES),
  source: z.string(),
  action: z.string(),
  result: z.string(),
  evidence: z.string(),
  tests: z.array(z.string()).optional(),
});

/** failfast.json as read back after a restart: checked, never trusted as it lies. */
export const failFastSnapshotSchema = z.object({
  counters: z.array(z.object({ category: z.enum(FAILURE_CATEGORIES), count: z.number().int().nonnegative(), sources: z.array(z.string()), attempts: z.array(attemptSchema) })),
  streak: z.array(attemptSchema),
  total: z.number().int().nonnegative(),
  lastTests: z
    .object({ tests: z.number(), passed: z.number(), failures: z.number(), errors: z.number(), skipped: z.number(), failed: z.array(z.string()) })
    .nullable(),
  lastError: z.string(),
  validation: z.array(z.tuple([z.string(), z.boolean()])),
});

/** What FailFastState keeps across a daemon restart (failfast.json in the phase's state folder). */
export interface FailFastSnapshot {
  counters: Array<{ category: FailureCategory; count: number; sources: Source[]; attempts: Attempt[] }>;
  streak: Attempt[];
  total: number;
  lastTests: TestCounts | null;
  lastError: string;
  validation: Array<[string, boolean]>;
}

export class FailFastState {
  readonly counters = new Map<FailureCategory, Counter>();
  /** consecutive counted failures of any category */
  streak: Attempt[] = [];
  /** every counted failed attempt of the phase */
  total = 0;
  /** pytest's counts from the last run whose report was read */
  lastTests: TestCounts | null = null;
  /** the last failure's full output (scrubbed), for the escalation report */
  lastError = "";
  /** validation tools (pytest, mypy, pylint, black, flake8, isort) and whether their last run passed */
  readonly validation = new Map<string, boolean>();

  /** A failure: counted (or not) and checked against the limits. */
  fail(
    policy: FailFastPolicy,
    a: Omit<Attempt, "n">,
  ): { counted: boolean; attempt: Attempt; count: number; limit: number | null; reached: LimitReached | null } {
    const limit = limitOf(policy, a.category);
    if (limit === null) return { counted: false, attempt: { ...a, n: this.total }, count: 0, limit: null, reached: null };
    this.total += 1;
    const attempt: Attempt = { ...a, n: this.total };
    let c = this.counters.get(a.category);
    if (!c) this.counters.set(a.category, (c = { count: 0, sources: new Set(), attempts: [] }));
    c.count += 1;
    c.sources.add(a.source);
    c.attempts.push(attempt);
    this.streak.push(attempt);
    let reached: LimitReached | null = null;
    if (c.count >= limit) reached = { scope: "category", category: a.category, count: c.count, limit, attempts: [...c.attempts] };
    else if (this.streak.length >= policy.consecutive) {
      reached = { scope: "consecutive", category: a.category, count: this.streak.length, limit: policy.consecutive, attempts: [...this.streak] };
    }
    return { counted: true, attempt, count: c.count, limit, reached };
  }

  /** A success of the gateway or the checkpoint (`source`): resets the counters it fed; returns the categories reset. */
  succeed(source: Source): FailureCategory[] {
    const reset: FailureCategory[] = [];
    for (const [cat, c] of this.counters) {
      if (c.sources.has(source)) {
        this.counters.delete(cat);
        reset.push(cat);
      }
    }
    if (reset.length > 0) this.streak = [];
    return reset;
  }

  /**
   * A command that succeeded: resets each counter whose every attempt it
   * answers (see the head of this file). `tests` is the run's pytest report,
   * when one was read. Returns the categories reset.
   */
  succeedExec(s: { source: Source; action: string; tests: { counts: TestCounts; passed: ReadonlySet<string> } | null }): FailureCategory[] {
    const green = s.tests !== null && s.tests.counts.passed > 0 && s.tests.counts.failures === 0 && s.tests.counts.errors === 0;
    // pytest's exit 0 is a pass only with its report saying so
    const sameActionPasses = s.source !== "pytest" || green;
    const answers = (a: Attempt): boolean => {
      if (a.action === s.action && a.source === s.source && sameActionPasses) return true;
      if (!green || !a.tests?.length) return false;
      return a.tests.every((id) => testPassed(id, s.tests!.passed));
    };
    const reset: FailureCategory[] = [];
    for (const [cat, c] of this.counters) {
      if (c.attempts.length > 0 && c.attempts.every(answers)) {
        this.counters.delete(cat);
        reset.push(cat);
      }
    }
    if (reset.length > 0) this.streak = [];
    return reset;
  }

  /** After a person resumed an escalated phase: every count starts again. */
  reset(): void {
    this.counters.clear();
    this.streak = [];
  }

  snapshot(): Record<string, number> {
    return Object.fromEntries([...this.counters].map(([k, c]) => [k, c.count]));
  }

  toJSON(): FailFastSnapshot {
    return {
      counters: [...this.counters].map(([category, c]) => ({ category, count: c.count, sources: [...c.sources], attempts: c.attempts })),
      streak: this.streak,
      total: this.total,
      lastTests: this.lastTests,
      lastError: this.lastError,
      validation: [...this.validation],
    };
  }

  static fromJSON(s: FailFastSnapshot): FailFastState {
    const f = new FailFastState();
    for (const c of s.counters) f.counters.set(c.category, { count: c.count, sources: new Set(c.sources), attempts: c.attempts });
    f.streak = s.streak;
    f.total = s.total;
    f.lastTests = s.lastTests;
    f.lastError = s.lastError;
    for (const [k, v] of s.validation) f.validation.set(k, v);
    return f;
  }
}

/**
 * Whether a test that failed passed in a later report. A collection error is
 * reported as `::<module>` (the module did not import): it passed when tests
 * of that module did.
 */
function testPassed(id: string, passed: ReadonlySet<string>): boolean {
  if (passed.has(id)) return true;
  if (!id.startsWith("::")) return false;
  const mod = id.slice(2);
  for (const p of passed) if (p.startsWith(`${mod}::`) || p.startsWith(`${mod}.`)) return true;
  return false;
}

/** The policy's limit for a category, or null when it is not counted. */
export function limitOf(policy: FailFastPolicy, category: FailureCategory): number | null {
  if (category === "unknown") return null;
  if (category === "policy" && !policy.countPolicyRefusals) return null;
  return policy.maxAttempts[category];
}

const TITLES: Record<FailureCategory, string> = {
  syntax: "Syntax",
  import: "Import",
  type: "Type",
  test: "Test",
  runtime: "Runtime",
  database: "Database",
  iteration: "Iteration",
  policy: "Policy",
  unknown: "Unknown",
};

export function categoryTitle(c: FailureCategory): string {
  return TITLES[c];
}

/** The daemon's reading of the evidence: what a person should look at first. */
export function recommend(reached: LimitReached, tests: TestCounts | null): string {
  if (reached.scope === "memory" && reached.memory) {
    return `The phase's memory stayed at or above ${formatBytes(reached.memory.thresholdBytes)} (SKILLS.md Resource Limits: >1GB sustained). Inspect the frozen processes (docker top, /proc/<pid>/status) for a leak or an unbounded load — a whole data set read at once, a cache that only grows — before resuming; resumed as it is, it escalates again.`;
  }
  const last = reached.attempts.at(-1);
  const ev = last?.evidence ?? "";
  const same = reached.attempts.every((a) => a.evidence === ev);
  const repeat = same && reached.attempts.length > 1 ? ` The same error came back ${reached.attempts.length} times unchanged: the corrections did not reach its cause.` : "";
  switch (reached.category) {
    case "test": {
      const names = tests?.failed.length ? ` Failing: ${tests.failed.slice(0, 5).join(", ")}.` : "";
      return `Tests keep failing (${ev}).${names} Check whether the test or the specification is wrong before more fixes to the implementation.${repeat}`;
    }
    case "import":
      return `A module cannot be imported (${ev}). If it is a third-party package, it must be in requirements.txt and installed through the package proxy; if it is the project's own, check the package layout and PYTHONPATH.${repeat}`;
    case "syntax":
      return `The code does not parse (${ev}). Look at the named line; an edit may have been applied partially.${repeat}`;
    case "type":
      return `mypy reports type errors (${ev}). Review the signatures involved rather than adding ignores.${repeat}`;
    case "runtime":
      return `The program fails at run time (${ev}). Check the inputs and the environment it runs with (services, data, memory).${repeat}`;
    case "database":
      return `The database refused or failed (${ev}). Check the service and the statement against the phase's mode; SKILLS.md escalates database issues at once.${repeat}`;
    case "iteration":
      return `Iterations keep being refused at the checkpoint (${ev}). The changes break SKILLS.md §1 file rules; make smaller, atomic changes.${repeat}`;
    case "policy":
      return `Commands keep being refused by the policy (${ev}). The agent is trying something the policy forbids; decide whether to approve it or redirect the agent.${repeat}`;
    default:
      return `${ev}${repeat}`;
  }
}

export interface ReportInput {
  phase: { id: string; name: string; mode: string; project: string };
  reached: LimitReached;
  filesModified: readonly string[] | null;
  /** changed in the layer but not judged yet (no checkpoint since) */
  filesPending?: readonly string[];
  lastError: string;
  tests: TestCounts | null;
  at: string;
}

/** SKILLS.md "Human Escalation Log", filled in. Every line is the daemon's; the caller scrubs. */
export function escalationReport(r: ReportInput): string[] {
  const { reached } = r;
  const why =
    reached.scope === "memory" && reached.memory
      ? `${memorySummary(reached.memory)} (SKILLS.md Resource Limits)`
      : reached.scope === "category"
        ? `${reached.count} ${reached.category} failures in a row (limit ${reached.limit})`
        : `${reached.count} consecutive failed attempts (limit ${reached.limit}, SKILLS.md Fail-Fast Protocol)`;
  const head =
    reached.scope === "memory"
      ? `[ESCALATION] Phase ${r.phase.name} (${r.phase.id}) held too much memory for too long`
      : `[ESCALATION] Phase ${r.phase.name} (${r.phase.id}) failed after ${reached.count} attempts`;
  const m = reached.memory;
  const lastError = (r.lastError.trim() || "(no output)").split("\n").map((l) => `  ${l}`);
  return [
    head,
    "---",
    `Phase: ${r.phase.name} (${r.phase.id}) - mode ${r.phase.mode}, project ${r.phase.project}`,
    `Error Category: ${categoryTitle(reached.category)}${reached.scope === "memory" ? " (memory: SKILLS.md Resource Limits)" : ""}`,
    `Escalated: ${r.at} — ${why}`,
    `Files Modified: ${r.filesModified === null ? "unknown (the phase has no change layer)" : r.filesModified.length ? `${r.filesModified.join(", ")} (accepted iterations)` : "none accepted"}`,
    ...(r.filesPending?.length ? [`Files Changed Since The Last Checkpoint (not judged, not in the project): ${r.filesPending.join(", ")}`] : []),
    ...(m
      ? [
          `Memory: working set ${formatBytes(m.currentBytes)} (peak ${formatBytes(m.peakBytes)}; usage with file cache ${formatBytes(m.usageBytes)}), threshold ${formatBytes(m.thresholdBytes)} for ${m.sustainMs / 1000} s (limits.memoryEscalateBytes, memorySustainMs), over it for ${Math.round(m.overMs / 100) / 10} s in ${m.samples} samples; hard limit ${m.limitBytes === null ? "none" : formatBytes(m.limitBytes)}`,
        ]
      : []),
    ...(r.tests ? [`Tests (last pytest run): ${r.tests.passed} passed, ${r.tests.failures} failed, ${r.tests.errors} errors, ${r.tests.skipped} skipped of ${r.tests.tests}`] : []),
    "Last Error:",
    ...lastError,
    "Self-Correction Attempts:",
    ...(reached.attempts.length === 0 ? ["  none counted (the resource watch escalated, not a failed attempt)"] : []),
    ...reached.attempts.map((a, i) => `  ${i + 1}. [${a.at}] ${a.action} → ${a.result} [${categoryTitle(a.category)}: ${a.evidence}]`),
    `Recommendation: ${recommend(reached, r.tests)}`,
    "---",
  ];
}
