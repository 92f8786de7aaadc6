/**
 * How the rooms below phases/ (net/, db/) record: through this interface,
 * which a phase's recorder (src/phases/recorder.ts) implements. Each call is
 * durable in audit.jsonl and build_audit.log before it resolves, with the
 * phase's secrets scrubbed from every string.
 */
import type { AuditEvent, AuditRecord } from "./journal.js";

export interface EventRecorder {
  record(event: AuditEvent, lines: readonly string[]): Promise<AuditRecord>;
  /** several events in order, durable together (one group commit, one build-log append) */
  recordMany(entries: readonly { event: AuditEvent; lines: readonly string[] }[]): Promise<AuditRecord[]>;
  /** the phase's secrets replaced in untrusted text */
  redact(text: string): string;
}
