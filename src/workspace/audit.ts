/**
 * The records of the workspace: an iteration judged at a checkpoint, a
 * human's decision on a held iteration, and live file events from the
 * layer watcher. Each comes as the pair PhaseRecorder.record takes: one
 * journal event and its build_audit.log lines in the SKILLS.md format:
 *
 *   [TIMESTAMP] [FILE] [CHECKPOINT] [iteration 3] [ACCEPTED 2 changes: <message>]
 *   [TIMESTAMP] [FILE] [MODIFY] [services/risk_manager.py] [SUCCESS]
 *   [TIMESTAMP] [FILE] [CREATE] [tests/test_risk_manager.py] [SUCCESS]
 *   [TIMESTAMP] Modified services/risk_manager.py: <message>
 *   [TIMESTAMP] Modified tests/test_risk_manager.py: <message>
 *
 * and for a refused one the changes with REJECTED (or PENDING APPROVAL when
 * it waits for a human), then one POLICY line per failure naming the rule,
 * the clause and what to do. SKILLS.md's "Modified [file]: [reason]" is
 * written only for changes that reached the project.
 *
 * Bounded: a record lists at most MAX_RECORDED_CHANGES changes and says how
 * many it left out (an accepted iteration is a few files; a 50,000-file
 * burst is refused, and its record stays small). Text from the sandbox
 * (paths, the checkpoint message) goes through actionLine/escapeControl, so
 * it cannot start a line of its own; the recorder redacts secrets.
 */
import { actionLine, escapeControl } from "../audit/format.js";
import type { ChangeKind, ChangeSet, FileChange } from "./changes.js";
import type { Judgement, RuleFailure } from "./rules.js";

export const MAX_RECORDED_CHANGES = 1000;
/** the checkpoint message as recorded (longer is cut, with a note) */
export const MAX_MESSAGE_CHARS = 2000;

export type IterationOutcome = "accepted" | "rejected" | "pending";

export interface RecordedChange {
  kind: ChangeKind;
  path: string;
  from?: string;
  isDir: boolean;
  sizeBytes: number;
  mode?: number;
  modeOnly?: boolean;
}

/** The journal event of a judged iteration. */
export interface IterationEvent {
  type: "workspace.iteration";
  iteration: number;
  outcome: IterationOutcome;
  /** what made the checkpoint: an explicit call, a validation command, the phase's stop */
  trigger: "explicit" | "validation" | "stop";
  message: string | null;
  changes: RecordedChange[];
  changesOmitted: number;
  failures: RuleFailure[];
  /** the rule and clause of the strictest failure (the journal indexes these); absent when accepted */
  rule?: string;
  clause?: string;
  [k: string]: unknown;
}

/** The journal event of a human's decision on a held iteration. */
export interface IterationDecisionEvent {
  type: "workspace.iteration.decided";
  iteration: number;
  outcome: "accepted" | "rejected";
  approval: string | null;
  note: string | null;
  [k: string]: unknown;
}

export interface RecordPair<E> {
  event: E;
  lines: string[];
}

export interface IterationRecordInput {
  iteration: number;
  trigger: IterationEvent["trigger"];
  message: string | null;
  set: ChangeSet;
  judgement: Judgement;
  ts: string;
}

const ACTION: Record<ChangeKind, string> = { create: "CREATE", modify: "MODIFY", delete: "DELETE", rename: "RENAME" };

function recorded(c: FileChange): RecordedChange {
  const r: RecordedChange = { kind: c.kind, path: c.path, isDir: c.isDir, sizeBytes: c.sizeBytes };
  if (c.from !== undefined) r.from = c.from;
  if (c.mode !== undefined) r.mode = c.mode;
  if (c.modeOnly) r.modeOnly = true;
  return r;
}

function cutMessage(m: string | null): string | null {
  if (m === null) return null;
  return m.length > MAX_MESSAGE_CHARS ? `${m.slice(0, MAX_MESSAGE_CHARS)}… [${m.length - MAX_MESSAGE_CHARS} more characters not kept]` : m;
}

/** The target of a change's line: the path, or `from -> to` for a rename; a directory ends in "/". */
function target(c: FileChange): string {
  const dir = c.isDir ? "/" : "";
  return c.kind === "rename" ? `${c.from ?? "?"}${dir} -> ${c.path}${dir}` : `${c.path}${dir}`;
}

const RESULT: Record<IterationOutcome, string> = { accepted: "SUCCESS", rejected: "REJECTED", pending: "PENDING APPROVAL" };

/** What the checkpoint made of the judgment: accept → accepted, ask → pending, reject → rejected. */
export function outcomeOf(j: Judgement): IterationOutcome {
  return j.decision === "accept" ? "accepted" : j.decision === "ask" ? "pending" : "rejected";
}

export function iterationRecord(input: IterationRecordInput): RecordPair<IterationEvent> {
  const { ts, judgement } = input;
  const outcome = outcomeOf(judgement);
  const message = cutMessage(input.message);
  const kept = input.set.changes.slice(0, MAX_RECORDED_CHANGES);
  const omitted = input.set.changes.length - kept.length;
  const strictest = judgement.failures.find((f) => f.decision === "reject") ?? judgement.failures[0] ?? null;

  const n = input.set.changes.length;
  const summary = `${outcome.toUpperCase()} ${n} change${n === 1 ? "" : "s"}${message !== null ? `: ${message}` : ""}`;
  const lines = [actionLine(ts, "FILE", "CHECKPOINT", `iteration ${input.iteration}`, summary)];
  for (const c of kept) lines.push(actionLine(ts, "FILE", ACTION[c.kind], target(c), RESULT[outcome]));
  if (omitted > 0) lines.push(actionLine(ts, "FILE", "CHECKPOINT", `iteration ${input.iteration}`, `${omitted} more changes not listed (${RESULT[outcome]})`));
  if (outcome === "accepted") {
    const reason = message === null || message.trim() === "" ? "(no checkpoint message)" : message;
    for (const c of kept) if (!c.isDir) lines.push(`[${ts}] Modified ${escapeControl(c.kind === "rename" ? `${c.from ?? "?"} -> ${c.path}` : c.path)}: ${escapeControl(reason)}`);
  }
  for (const f of judgement.failures) {
    lines.push(actionLine(ts, "FILE", "POLICY", f.path ?? `iteration ${input.iteration}`, `${f.decision.toUpperCase()} ${f.rule} (${f.clause}): ${f.message}`));
  }
  return {
    event: {
      type: "workspace.iteration",
      iteration: input.iteration,
      outcome,
      trigger: input.trigger,
      message,
      changes: kept.map(recorded),
      changesOmitted: omitted,
      failures: judgement.failures.map((f) => ({ ...f })),
      ...(strictest ? { rule: strictest.rule, clause: strictest.clause } : {}),
    },
    lines,
  };
}

/** A human accepted or rejected a held iteration (`sandboxd approvals approve|deny`). */
export function iterationDecisionRecord(input: {
  iteration: number;
  outcome: "accepted" | "rejected";
  approval: string | null;
  note: string | null;
  set: ChangeSet;
  message: string | null;
  ts: string;
}): RecordPair<IterationDecisionEvent> {
  const { ts } = input;
  const note = input.note ? `: ${input.note}` : "";
  const lines = [
    actionLine(ts, "FILE", "APPROVAL", `iteration ${input.iteration}`, `${input.outcome === "accepted" ? "ACCEPTED" : "REJECTED"} by a human${input.approval ? ` (${input.approval})` : ""}${note}`),
  ];
  if (input.outcome === "accepted") {
    const kept = input.set.changes.slice(0, MAX_RECORDED_CHANGES);
    const reason = input.message === null || input.message.trim() === "" ? "(no checkpoint message)" : cutMessage(input.message)!;
    for (const c of kept) lines.push(actionLine(ts, "FILE", ACTION[c.kind], target(c), "SUCCESS"));
    for (const c of kept) if (!c.isDir) lines.push(`[${ts}] Modified ${escapeControl(c.kind === "rename" ? `${c.from ?? "?"} -> ${c.path}` : c.path)}: ${escapeControl(reason)}`);
  }
  return {
    event: { type: "workspace.iteration.decided", iteration: input.iteration, outcome: input.outcome, approval: input.approval, note: input.note },
    lines,
  };
}

/* ------------------------------ live file events ------------------------------ */

export type FileEventKind = "create" | "modify" | "delete";

export interface FileEvent {
  type: "workspace.file";
  event: FileEventKind;
  path: string;
  isDir: boolean;
  [k: string]: unknown;
}

export interface FileEventsDroppedEvent {
  type: "workspace.file.dropped";
  /** events not recorded one by one in the last window (the rate cap) */
  count: number;
  windowMs: number;
  [k: string]: unknown;
}

export function fileEventRecord(e: { event: FileEventKind; path: string; isDir?: boolean; ts: string }): RecordPair<FileEvent> {
  const isDir = e.isDir ?? false;
  return {
    event: { type: "workspace.file", event: e.event, path: e.path, isDir },
    lines: [actionLine(e.ts, "FILE", "WATCH", isDir ? `${e.path}/` : e.path, e.event.toUpperCase())],
  };
}

export function fileEventsDroppedRecord(e: { count: number; windowMs: number; ts: string }): RecordPair<FileEventsDroppedEvent> {
  return {
    event: { type: "workspace.file.dropped", count: e.count, windowMs: e.windowMs },
    lines: [actionLine(e.ts, "FILE", "WATCH", "(layer)", `${e.count} more file events in ${e.windowMs} ms not listed one by one (rate cap); the checkpoint's change set lists every change`)],
  };
}
