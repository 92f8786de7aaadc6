/**
 * The state of one upstream PostgreSQL session as the gateway drives it: what
 * the server last said (ReadyForQuery's transaction status), what is in flight
 * and who owns each answer (the client, or one of the gateway's own
 * statements), the extended-protocol batch being forwarded, and the watchdog's
 * view of the running query.
 *
 * Invariants (checked in test/unit/db-session.test.ts):
 * - `pending` holds one entry per ReadyForQuery the server owes, in the order
 *   the messages that cause them (Query, Sync) were written upstream; an
 *   answer belongs to `pending[0]`. Answers to gateway-owned entries never
 *   reach the client.
 * - `txStatus` is the status of the last ReadyForQuery received; it is the
 *   session's state only when nothing is pending (`idle`).
 */
import type { Clock } from "../util/clock.js";
import type { SqlVerdict } from "./classify.js";
import type { TxStatus } from "./wire.js";

/** who owns a pending ReadyForQuery */
export type Owner = "client" | "elevate" | "lower";

export interface SessionOptions {
  engine: "postgres" | "questdb";
  mode: "backtest" | "paper" | "test";
  clock: Clock;
}

export class PgSession {
  /** status of the last ReadyForQuery (the session's state once nothing is pending) */
  txStatus: TxStatus;
  private readonly pending: Owner[] = [];
  /** what each SQL-level prepared statement was prepared as (classify.ts rememberPrepared) */
  readonly prepared = new Map<string, SqlVerdict>();
  /** extended-protocol statement names whose (allowed) statement writes, for paper-mode elevation */
  readonly writeStatements = new Set<string>();
  /** messages of the current extended batch forwarded so far (reset at Sync) */
  batchMessages = 0;
  batchElevated = false;
  /** a refused Parse: the client's messages up to Sync are dropped, as the server would */
  discardUntilSync = false;
  /** monotonic ms when the running query was sent, for the watchdog */
  busySince: number | undefined;
  cancelSent = false;

  constructor(
    readonly opts: SessionOptions,
    initialStatus: TxStatus,
  ) {
    this.txStatus = initialStatus;
  }

  /** the owner of the next answer */
  get owner(): Owner | undefined {
    return this.pending[0];
  }

  get idle(): boolean {
    return this.pending.length === 0;
  }

  /** a message that will be answered by a ReadyForQuery was written upstream */
  expect(owner: Owner): void {
    this.pending.push(owner);
  }

  /** the running client query (first one: now) */
  markBusy(): void {
    if (this.busySince === undefined) {
      this.busySince = this.opts.clock.monotonicMs();
      this.cancelSent = false;
    }
  }

  /** A ReadyForQuery arrived: returns whose answer it ended. */
  ready(status: TxStatus): Owner | undefined {
    const owner = this.pending.shift();
    this.txStatus = status;
    if (owner === "client") {
      if (this.pending.length === 0) this.busySince = undefined;
      else {
        // pipelined: the next statement starts now
        this.busySince = this.opts.clock.monotonicMs();
        this.cancelSent = false;
      }
    }
    return owner;
  }

  /** paper mode on PostgreSQL: writes need the gateway's elevation */
  get paper(): boolean {
    return this.opts.engine === "postgres" && this.opts.mode === "paper";
  }

  needsElevation(v: SqlVerdict): boolean {
    return this.paper && this.txStatus === "I" && isWrite(v);
  }
}

export function isWrite(v: SqlVerdict): boolean {
  return v.statements.some((s) => !s.readOnly);
}
