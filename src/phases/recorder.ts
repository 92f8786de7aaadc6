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
import { createHash } from "node:crypto";
import type { BuildLog } from "../audit/buildlog.js";
import type { EventRecorder } from "../audit/recorder.js";
import { AuditBudget } from "../audit/budget.js";
import { capUtf8, type AppendOptions, type AuditEvent, type AuditJournal, type AuditRecord } from "../audit/journal.js";
import { actionLine, redactLine, timestamp } from "../audit/format.js";
import { Redactor, type ByteStreamRedactor } from "../audit/redact.js";
import { SandboxdError } from "../errors.js";
import type { AuditPolicy } from "../policy/schema.js";
import type { Clock } from "../util/clock.js";

/** Volume bounds of one phase's records (policy `audit`); without them nothing is capped. */
export interface RecorderLimits {
  audit: () => Readonly<AuditPolicy>;
  clock: Clock;
  /** told once, when the phase spends its budget */
  onSpent?: (why: string) => void;
}

/** Command output: bounded by the exec's own head-and-tail cap (limits.auditOutputCapBytes), not by textCapBytes. */
const OUTPUT_FIELDS: ReadonlySet<string> = new Set(["stdout", "stderr"]);
/** Build-log lines of command output (bounded the same way). */
const OUTPUT_LINE = /^(?:\[[^\]]*\] STD(?:OUT|ERR):|    \| |    ~ )/;
/**
 * Records that close work already under way (its result, its end): still
 * written once the budget is spent — they are bounded by the work in flight —
 * while every record that would start new work is refused.
 */
const CLOSING = /^(?:exec\.(?:result|error|lost)|net\.close|db\.(?:result|error|timeout)|phase\.|audit\.)/;

/** A build_audit.log append that failed (ENOSPC, EIO): an audit failure like the journal's, coded alike. */
function buildLogFailed(file: string, e: unknown): unknown {
  if (e instanceof SandboxdError) return e;
  const code = (e as NodeJS.ErrnoException | null)?.code ?? "EUNKNOWN";
  return new SandboxdError("SBX_ERR_AUDIT_FAILED", `build_audit.log append failed with ${code} on ${file}: ${(e as Error)?.message ?? String(e)}`, {
    cause: e,
    details: { errno: code, path: file, op: "build log append" },
  });
}

/** The records that end a phase. */
const ENDS = /^phase\.(?:complete|failed)$/;

export class PhaseRecorder implements EventRecorder {
  /** build-log lines of recordMany calls waiting for the next grouped append */
  private buildNext: { lines: string[]; done: Promise<void>; resolve(): void; reject(e: unknown): void } | undefined;
  private buildBusy = false;
  private readonly budget: AuditBudget | null;

  constructor(
    readonly phaseId: string,
    private readonly journal: AuditJournal,
    readonly build: BuildLog,
    readonly redactor: Redactor,
    private readonly limits?: RecorderLimits,
  ) {
    this.budget = limits ? new AuditBudget(() => limits.audit().phaseBudget, limits.clock) : null;
  }

  /** why the phase spent its audit budget, or null while it has not */
  get budgetSpent(): string | null {
    return this.budget?.spent?.why ?? null;
  }

  async record(event: AuditEvent, lines: readonly string[]): Promise<AuditRecord> {
    await this.admit([event]);
    const opts = this.appendOptions();
    const journaled = this.journal.append({ ...event, phase: this.phaseId }, opts).catch((e: unknown) => {
      // a phase that ends while the journal is failing gets its end record when the journal recovers
      if (ENDS.test(event.type) && (e as { code?: string }).code === "SBX_ERR_AUDIT_FAILED") {
        this.journal.deferUntilRecovered({ ...event, phase: this.phaseId, deferred: true }, { ...opts, onSize: undefined });
      }
      throw e;
    });
    const [j, b] = await Promise.allSettled([journaled, this.build.append(this.buildLines(lines))]);
    // the journal's failure says the most (it is the source of truth and recovers by itself)
    if (j.status === "rejected") throw j.reason;
    if (b.status === "rejected") throw buildLogFailed(this.build.path, b.reason);
    return j.value;
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
    await this.admit(entries.map((e) => e.event));
    const opts = this.appendOptions();
    const appends = entries.map((e) => this.journal.append({ ...e.event, phase: this.phaseId }, opts));
    const lines = this.buildLines(entries.flatMap((e) => e.lines));
    const [j, b] = await Promise.allSettled([Promise.all(appends), this.appendBuildGrouped(lines)]);
    if (j.status === "rejected") throw j.reason;
    if (b.status === "rejected") throw buildLogFailed(this.build.path, b.reason);
    return j.value;
  }

  private appendOptions(): AppendOptions {
    if (!this.limits) return { redactor: this.redactor };
    return { redactor: this.redactor, capBytes: this.limits.audit().textCapBytes, uncapped: OUTPUT_FIELDS, onSize: (n) => this.spend(n) };
  }

  /** Scrubbed (structure kept), and each line of untrusted text capped with its byte count and SHA-256. */
  private buildLines(lines: readonly string[]): string[] {
    const cap = this.limits?.audit().textCapBytes;
    let bytes = 0;
    const out = lines.map((l) => {
      let line = redactLine(l, this.redactor);
      if (cap !== undefined && !OUTPUT_LINE.test(line)) {
        const cut = capUtf8(line, cap);
        if (cut) line = `${cut.head}… [${cut.bytes - Buffer.byteLength(cut.head)} more bytes not kept; ${cut.bytes} bytes, sha256 ${createHash("sha256").update(line, "utf8").digest("hex")}]`;
      }
      bytes += Buffer.byteLength(line) + 1;
      return line;
    });
    if (cap !== undefined) this.spend(bytes);
    return out;
  }

  /**
   * Refuses (SBX_ERR_AUDIT_BUDGET) records that would start new work once the
   * phase has spent its budget, counting them for the summary; before the
   * phase's end record, writes that summary.
   */
  private async admit(events: readonly AuditEvent[]): Promise<void> {
    const budget = this.budget;
    if (!budget) return;
    const opening = events.filter((e) => !CLOSING.test(e.type));
    if (!budget.spent) {
      const why = budget.take(events.length);
      if (why) await this.spent(why);
    }
    const spent = budget.spent;
    if (spent && opening.length > 0) {
      for (const e of opening) budget.refuse(e.type);
      throw new SandboxdError("SBX_ERR_AUDIT_BUDGET", `phase ${this.phaseId} has spent its audit budget (${spent.why}); it takes no new work`);
    }
    if (spent && events.some((e) => e.type === "phase.complete" || e.type === "phase.failed")) {
      const refused = budget.drainRefused();
      if (refused) await this.write({ type: "audit.budget_summary", why: spent.why, refused }, `refused after the budget was spent: ${JSON.stringify(refused)}`);
    }
  }

  private spend(bytes: number): void {
    const why = this.budget?.add(bytes);
    // eslint-disable-next-line no-restricted-syntax -- a failure to write the budget record is the journal failing, which fails closed and is reported by the journal itself
    if (why) void this.spent(why).catch(() => undefined);
  }

  /** The phase passed its budget: say so once, in both logs (not itself counted), and tell the daemon. */
  private async spent(why: string): Promise<void> {
    this.limits?.onSpent?.(why);
    const b = this.limits!.audit().phaseBudget;
    await this.write(
      { type: "audit.budget_spent", why, bytes: this.budget!.bytes, records: this.budget!.records, limit: { ...b } },
      `${why}; the phase takes no new work (SBX_ERR_AUDIT_BUDGET)`,
    );
  }

  private async write(event: AuditEvent, result: string): Promise<void> {
    const ts = timestamp(this.limits!.clock.now());
    await Promise.all([
      this.journal.append({ ...event, phase: this.phaseId }, { redactor: this.redactor }),
      this.build.append([actionLine(ts, "AUDIT", "BUDGET", this.phaseId, result)]),
    ]);
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

  /** The redactor for one output stream of one command: bytes in, scrubbed bytes out (passed through when the phase has no secrets). */
  outputStream(): ByteStreamRedactor {
    return this.redactor.byteStream();
  }
}
