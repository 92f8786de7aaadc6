/**
 * `GET /v1/events`: what a harness waits on instead of polling — phase state
 * changes, failure categories, fail-fast attempts, escalations (memory ones
 * with their figures), OOM kills, approvals requested and decided,
 * iterations — as NDJSON, one event a line, each
 * with the audit record's `seq`. Derived from audit.jsonl (already durable,
 * ordered and hash-chained): an event exists exactly when its record does,
 * a daemon restart loses none, and `?since=<seq>` resumes after the last
 * one a client saw. The journal is followed from its first byte with the
 * `since` filter, so nothing appended between the read and the follow is lost.
 */
import type { AuditRecord } from "../audit/journal.js";

/** Record types that are events as they are. */
const EVENT_TYPES: ReadonlySet<string> = new Set([
  "phase.start",
  "phase.ready",
  "phase.escalated",
  "phase.paused",
  "phase.resumed",
  "phase.complete",
  "phase.failed",
  "phase.readopt",
  "failfast.attempt",
  "resource.oom",
  "resource.watch",
  "approval.request",
  "approval.approve",
  "approval.deny",
  // the warm pool's own (src/phases/pool.ts), with its size and hit rate
  "pool.fill",
  "pool.fill.failed",
  "pool.stopped",
  "pool.discard",
  "pool.reaped",
]);

/** Fields an event carries (the rest of the record — output, SQL — stays in the audit trail). */
const KEEP = [
  "name", "mode", "reason", "category", "evidence", "failFast", "tests", "exitCode", "timedOut", "argv", "command",
  "n", "scope", "count", "limit", "report", "recommendation", "note", "from", "countersReset", "approval",
  "source", "action", "result", "counted", "decision", "rule", "trigger", "message", "failures", "failedIterations",
  "memory", "kills", "total", "workingSetBytes", "usageBytes", "limitBytes", "runningExecs", "oomKills", "frozen", "watching",
  "event", "path", "isDir",
  "pool", "pooled", "slot", "ms", "error", "consecutive", "failures", "slots", "containers",
] as const;

export function isEvent(r: Pick<AuditRecord, "type"> & Record<string, unknown>): boolean {
  if (EVENT_TYPES.has(r.type)) return true;
  // a command's result is an event when it failed (its category) or pytest ran (its counts)
  if (r.type === "exec.result") return r.category != null || r.tests != null;
  // the change layer's iteration records (src/workspace): iteration.*, checkpoint.*
  // and the live file events from the layer's watcher (workspace.file, workspace.file.dropped)
  return r.type === "workspace.iteration" || r.type.startsWith("workspace.file") || r.type.startsWith("iteration.") || r.type.startsWith("checkpoint.");
}

export function toEvent(r: AuditRecord): Record<string, unknown> {
  const rec = r as unknown as Record<string, unknown>;
  const e: Record<string, unknown> = { seq: r.seq, ts: r.ts, type: r.type, phase: rec.phase ?? null };
  if (r.type === "phase.escalated") e.state = "escalated";
  else if (r.type === "phase.paused") e.state = "paused";
  else if (r.type === "phase.start") e.state = "starting";
  else if (r.type === "phase.resumed" || r.type === "phase.ready") e.state = "running";
  else if (r.type === "phase.complete") e.state = "stopped";
  else if (r.type === "phase.failed") e.state = "failed";
  else if (r.type === "phase.readopt") e.state = typeof rec.state === "string" ? rec.state : "running"; // escalated and paused phases stay so
  else if (r.type === "workspace.iteration") e.iteration = rec.state; // pending, accepted, rejected
  for (const k of KEEP) if (rec[k] !== undefined && rec[k] !== null) e[k] = rec[k];
  return e;
}
