/**
 * One place where a phase's events are recorded, so every call site does it
 * the same way: the hash-chained journal (the source of truth) and the human
 * build_audit.log, both durable before `record` resolves — callers await it
 * before acting on the decision it records. The two appends (each with its
 * own fdatasync) run concurrently: after a crash between them, one file can
 * hold a record the other lacks, never a decision that was acted on without
 * both. Every string value passes the phase's secret redactor on the way in
 * — never a record type, a key, an id field (journal OWN_WORDS) or the
 * daemon's prefix of a build-log line (format.ts redactLine).
 */
import type { BuildLog } from "../audit/buildlog.js";
import type { AuditEvent, AuditJournal, AuditRecord } from "../audit/journal.js";
import { redactLine } from "../audit/format.js";
import { Redactor, StreamRedactor } from "../audit/redact.js";
import { StringDecoder } from "node:string_decoder";

export class PhaseRecorder {
  /** build-log lines of recordMany calls waiting for the next grouped append */
  private buildNext: { lines: string[]; done: Promise<void>; resolve(): void; reject(e: unknown): void } | undefined;
  private buildBusy = false;

  constructor(
    readonly phaseId: string,
    private readonly journal: AuditJournal,
    readonly build: BuildLog,
    readonly redactor: Redactor,
  ) {}

  async record(event: AuditEvent, lines: readonly string[]): Promise<AuditRecord> {
    const [rec] = await Promise.all([
      this.journal.append({ ...event, phase: this.phaseId }, { redactor: this.redactor }),
      this.build.append(lines.map((l) => redactLine(l, this.redactor))),
    ]);
    return rec;
  }

  /**
   * Several events at once, in order, durable together: the journal appends
   * are issued in the same tick (its group commit writes and fdatasyncs them
   * as one batch) and the build-log lines go in one append (one fdatasync).
   * Callers with a burst of records to make before one action (the database
   * gateway: every statement of an incoming chunk) await this once instead
   * of paying a sync per record.
   */
  async recordMany(entries: readonly { event: AuditEvent; lines: readonly string[] }[]): Promise<AuditRecord[]> {
    if (entries.length === 0) return [];
    const appends = entries.map((e) => this.journal.append({ ...e.event, phase: this.phaseId }, { redactor: this.redactor }));
    const lines: string[] = [];
    for (const e of entries) for (const l of e.lines) lines.push(redactLine(l, this.redactor));
    const [records] = await Promise.all([Promise.all(appends), this.appendBuildGrouped(lines)]);
    return records;
  }

  /**
   * Group commit for build_audit.log, like the journal's: lines of
   * recordMany calls made while an append is in flight go out together in
   * the next one (one write, one fdatasync), so concurrent connections share
   * syncs instead of queueing one each. Each caller's promise resolves once
   * its own lines are durable.
   */
  private appendBuildGrouped(lines: string[]): Promise<void> {
    let next = this.buildNext;
    if (!next) {
      let resolve!: () => void;
      let reject!: (e: unknown) => void;
      const done = new Promise<void>((res, rej) => {
        resolve = res;
        reject = rej;
      });
      next = this.buildNext = { lines: [], done, resolve, reject };
      // a microtask: recordMany calls of the same tick share the first append
      if (!this.buildBusy) queueMicrotask(() => this.flushBuild());
    }
    for (const l of lines) next.lines.push(l);
    return next.done;
  }

  private flushBuild(): void {
    const group = this.buildNext;
    if (!group || this.buildBusy) return;
    this.buildNext = undefined;
    this.buildBusy = true;
    this.build
      .append(group.lines)
      .then(group.resolve, group.reject)
      .finally(() => {
        this.buildBusy = false;
        this.flushBuild();
      });
  }

  redact(text: string): string {
    return this.redactor.redact(text);
  }

  /** Decoder + redactor for one output stream of one command. */
  outputStream(): OutputText {
    return new OutputText(this.redactor.size > 0 ? this.redactor.stream() : null);
  }
}

/**
 * Bytes of one output stream → UTF-8 text with secrets scrubbed, correct
 * across chunk boundaries (a character or a secret split between chunks).
 */
export class OutputText {
  private readonly decoder = new StringDecoder("utf8");
  constructor(private readonly redactor: StreamRedactor | null) {}

  push(chunk: Buffer): string {
    const text = this.decoder.write(chunk);
    return this.redactor ? this.redactor.push(text) : text;
  }

  end(): string {
    const rest = this.decoder.end();
    return this.redactor ? this.redactor.push(rest) + this.redactor.end() : rest;
  }
}
