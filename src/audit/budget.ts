/**
 * How much one phase may add to the audit trail (policy `audit.phaseBudget`):
 * a byte budget over the phase's life and a record rate (token bucket:
 * `burstRecords` at once, refilled at `recordsPerSecond`). Once either is
 * passed the budget is spent for good: the phase's recorder refuses every
 * record that would start new work (SBX_ERR_AUDIT_BUDGET) and only counts
 * it, so a runaway loop cannot fill the daemon's disk. Pure: time comes
 * from the injected clock.
 */
import type { Clock } from "../util/clock.js";

export interface BudgetLimits {
  bytes: number;
  recordsPerSecond: number;
  burstRecords: number;
}

export interface BudgetSpent {
  /** why the budget was spent, e.g. "more than 268435456 bytes" */
  why: string;
  bytes: number;
  records: number;
}

export class AuditBudget {
  bytes = 0;
  records = 0;
  private tokens: number;
  private at: number;
  private spentWhy: string | null = null;
  /** records refused after the budget was spent, by type */
  readonly refused = new Map<string, number>();

  constructor(
    private readonly limits: () => BudgetLimits,
    private readonly clock: Clock,
  ) {
    this.tokens = limits().burstRecords;
    this.at = clock.monotonicMs();
  }

  get spent(): BudgetSpent | null {
    return this.spentWhy === null ? null : { why: this.spentWhy, bytes: this.bytes, records: this.records };
  }

  /**
   * Takes `n` records from the rate bucket. Returns the reason when this
   * spends the budget (the first time only), else null.
   */
  take(n: number): string | null {
    const l = this.limits();
    const now = this.clock.monotonicMs();
    this.tokens = Math.min(l.burstRecords, this.tokens + ((now - this.at) / 1000) * l.recordsPerSecond);
    this.at = now;
    this.tokens -= n;
    this.records += n;
    if (this.tokens < 0 && this.spentWhy === null) {
      this.spentWhy = `more than ${l.recordsPerSecond} records/s sustained (${l.burstRecords} at once)`;
      return this.spentWhy;
    }
    return null;
  }

  /** Adds bytes written. Returns the reason when this spends the budget (the first time only), else null. */
  add(bytes: number): string | null {
    this.bytes += bytes;
    const l = this.limits();
    if (this.bytes > l.bytes && this.spentWhy === null) {
      this.spentWhy = `more than ${l.bytes} bytes of audit records`;
      return this.spentWhy;
    }
    return null;
  }

  refuse(type: string, n = 1): void {
    this.refused.set(type, (this.refused.get(type) ?? 0) + n);
  }

  /** refused counts as a plain object, emptied */
  drainRefused(): Record<string, number> | null {
    if (this.refused.size === 0) return null;
    const out = Object.fromEntries(this.refused);
    this.refused.clear();
    return out;
  }
}
