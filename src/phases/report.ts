/**
 * SKILLS.md build loop step 7, "Report Success or Failure": what a phase
 * leaves when it ends — `[PHASE_COMPLETE]` or `[PHASE_FAILED]` with files
 * modified, tests passed (pytest's real counts from its last run), the
 * validation status, attempts, escalations and approvals. Written to both
 * logs at the end (lifecycle.ts finish) and kept as report.json in the
 * phase's state folder for `GET /v1/phases/:id/report`.
 */
import type { Approval } from "../approvals/queue.js";
import type { TestCounts } from "./categorize.js";
import type { LivePhase } from "./context.js";
import { categoryTitle } from "./failfast.js";
import { filesModified } from "./workspace.js";
import type { Escalation, PhaseRecord } from "./types.js";

export interface PhaseReport {
  phase: string;
  name: string;
  state: string;
  outcome: "complete" | "failed" | "in progress";
  reason: string | null;
  /** the project paths the phase's accepted iterations changed (src/workspace); null: the phase has no change layer */
  filesModified: string[] | null;
  tests: TestCounts | null;
  /** PASS: the last run of every validation tool that ran passed; FAIL names the ones that did not; NOT RUN: none ran */
  validation: { status: "PASS" | "FAIL" | "NOT RUN"; failing: string[]; ran: string[] };
  attempts: { total: number; open: Record<string, number>; last: { category: string; evidence: string; action: string; result: string } | null };
  escalations: Escalation[];
  approvals: { requested: number; approved: number; denied: number; pending: number; expired: number };
}

export function buildReport(record: PhaseRecord, live: LivePhase | undefined, approvals: readonly Approval[]): PhaseReport {
  const ff = live?.failFast;
  const ran = ff ? [...ff.validation.keys()] : [];
  const failing = ff ? ran.filter((t) => ff.validation.get(t) === false) : [];
  const last = ff?.streak.at(-1) ?? null;
  const count = (s: Approval["state"]) => approvals.filter((a) => a.state === s).length;
  return {
    phase: record.id,
    name: record.name,
    state: record.state,
    outcome: record.state === "stopped" ? "complete" : record.state === "failed" ? "failed" : "in progress",
    reason: record.endReason,
    filesModified: live ? filesModified(live) : null,
    tests: ff?.lastTests ?? null,
    validation: { status: ran.length === 0 ? "NOT RUN" : failing.length ? "FAIL" : "PASS", failing, ran },
    attempts: {
      total: ff?.total ?? 0,
      open: ff?.snapshot() ?? {},
      last: last ? { category: last.category, evidence: last.evidence, action: last.action, result: last.result } : null,
    },
    escalations: record.escalations ?? [],
    approvals: {
      requested: approvals.length,
      approved: approvals.filter((a) => a.state === "approved" || a.state === "used").length,
      denied: count("denied"),
      pending: count("pending"),
      expired: count("expired"),
    },
  };
}

/** The report in SKILLS.md's words, one line each (the caller adds nothing but the log's own prefixes). */
export function reportLines(r: PhaseReport, ts: string): string[] {
  const tests = r.tests
    ? `${r.tests.passed}/${r.tests.tests} (${r.tests.failures} failed, ${r.tests.errors} errors, ${r.tests.skipped} skipped; last pytest run)`
    : "no pytest report";
  const files = r.filesModified === null ? "unknown (the phase had no change layer)" : r.filesModified.length ? r.filesModified.join(", ") : "none";
  const validation = r.validation.status === "FAIL" ? `FAIL (${r.validation.failing.join(", ")})` : r.validation.status;
  const esc = r.escalations.length
    ? `${r.escalations.length} (${r.escalations.map((e) => `#${e.n} ${e.category}: ${e.resolved?.how ?? "open"}`).join("; ")})`
    : "0";
  const appr = `${r.approvals.requested} requested, ${r.approvals.approved} approved, ${r.approvals.denied} denied, ${r.approvals.pending + r.approvals.expired} undecided`;
  const head = `[${ts}] [PHASE_${r.outcome === "complete" ? "COMPLETE" : "FAILED"}] Phase ${r.name} (${r.phase}): ${r.reason ?? ""}`;
  const common = [`- Files modified: ${files}`, `- Tests passed: ${tests}`, `- Validation: ${validation}`];
  const attempts = `- Attempts: ${r.attempts.total} failed attempt(s)${Object.keys(r.attempts.open).length ? `; open: ${Object.entries(r.attempts.open).map(([k, v]) => `${k} ${v}`).join(", ")}` : ""}`;
  if (r.outcome === "complete") return [head, ...common, attempts, `- Escalations: ${esc}`, `- Approvals: ${appr}`];
  return [
    head,
    `- Error: ${r.attempts.last ? categoryTitle(r.attempts.last.category as never) : "none recorded"}`,
    attempts,
    `- Last error: ${r.attempts.last ? `${r.attempts.last.action} → ${r.attempts.last.result}: ${r.attempts.last.evidence}` : "none recorded"}`,
    ...common,
    `- Escalations: ${esc}`,
    `- Approvals: ${appr}`,
    "- Awaiting human intervention",
  ];
}
