/**
 * The state of one upstream PostgreSQL session as the gateway drives it: what
 * the server last said (ReadyForQuery's transaction status), what is in flight
 * and who owns each answer (the client, or one of the gateway's own
 * statements), the session's access mode as the gateway last set and read it
 * back, the extended-protocol batch being forwarded, and the clocks of the
 * watchdog and of the transaction bounds.
 *
 * Invariants (test/unit/db-session.test.ts, against a scripted upstream;
 * test/integration/db-paper-attacks.test.ts, from a real sandbox):
 *
 * 1. `pending` holds one owner per ReadyForQuery the server owes, in the order
 *    the messages causing them (Query, Sync) were written upstream; an answer
 *    belongs to `pending[0]`. Answers to gateway-owned statements (elevate,
 *    lower, check) never reach the client.
 * 2. Paper mode: outside one gateway-owned elevated statement the upstream
 *    session is read-only AND checked. `access` follows ACCESS_TRANSITIONS:
 *    checking → read-only (the read-back said `default_transaction_read_only`
 *    and `transaction_read_only` are both on, outside a transaction block)
 *    → elevated (one statement, judged elevatable, sent right behind the
 *    gateway's conditional elevation) → checking (lower and read back are
 *    written right behind it). While `access` is not `read-only` the gateway
 *    forwards nothing of the client's except the elevated statement's own
 *    batch: the client's next messages wait for the read-back.
 * 3. Elevation happens only when nothing is pending and the last
 *    ReadyForQuery said idle (`I`): the elevated statement runs as its own
 *    implicit transaction, and must end idle again.
 * 4. Any failure of a gateway-owned statement (an ErrorResponse, a missing or
 *    wrong read-back, a ReadyForQuery not idle) moves `access` to `failed`:
 *    the gateway closes the connection (fail closed) and records why. There
 *    is no way out of `failed`.
 * 5. A transaction block (status `T`/`E`) lasts at most `maxTransactionMs`,
 *    and sits idle at most `idleInTransactionMs`, whatever the client set:
 *    `overdue()` says when the gateway must cut the connection.
 */
import type { Clock } from "../util/clock.js";
import type { SqlVerdict } from "./classify.js";
import type { TxStatus } from "./wire.js";

/** who owns a pending ReadyForQuery */
export type Owner = "client" | "elevated" | "elevate" | "lower" | "check";

/**
 * The session's default access mode, as far as the gateway knows.
 * `read-write` is test/backtest (the isolated test database; never changes).
 */
export type Access = "checking" | "read-only" | "elevated" | "read-write" | "failed";

export const ACCESS_TRANSITIONS: Readonly<Record<Access, readonly Access[]>> = Object.freeze({
  checking: ["read-only", "failed"],
  "read-only": ["elevated", "failed"],
  elevated: ["checking", "failed"],
  "read-write": ["failed"],
  failed: [],
});

export interface SessionOptions {
  engine: "postgres" | "questdb";
  mode: "backtest" | "paper" | "test";
  clock: Clock;
  /** a transaction block open longer than this is cut */
  maxTransactionMs: number;
  /** a transaction block idle (nothing pending) longer than this is cut */
  idleInTransactionMs: number;
}

/** statement kinds the gateway runs read-write in paper mode: plain DML on tables it checks, nothing that defines or runs other code */
export const ELEVATABLE_KINDS: ReadonlySet<string> = new Set(["insert", "update", "delete", "merge", "truncate"]);

/** what the session reports to the gateway after an answer of its own statements */
export type SessionEvent = { kind: "failed"; reason: string } | { kind: "not-elevated"; reason: string } | { kind: "elevated" };

/** the gateway's own statements (their answers are swallowed) */
export const LOWER_SQL = "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY";
export const CHECK_SQL = "SELECT pg_catalog.current_setting('default_transaction_read_only'), pg_catalog.current_setting('transaction_read_only')";
/** the value the conditional elevation returns when it elevated */
export const ELEVATED = "off";

export class PgSession {
  /** status of the last ReadyForQuery (the session's state once nothing is pending) */
  txStatus: TxStatus;
  access: Access;
  private readonly pending: Owner[] = [];
  /** what each SQL-level prepared statement was prepared as (classify.ts rememberPrepared) */
  readonly prepared = new Map<string, SqlVerdict>();
  /** extended-protocol statement names parsed as elevatable paper writes, and their verdicts */
  readonly paperStatements = new Map<string, SqlVerdict>();
  /** messages of the current extended batch forwarded so far (reset at Sync) */
  batchMessages = 0;
  /** the statement name an elevated extended batch may bind; undefined: the batch is not elevated */
  elevatedStatement: string | undefined;
  /** a refused message: the client's messages up to Sync are dropped, as the server would */
  discardUntilSync = false;
  /** monotonic ms when the running query was sent, for the watchdog */
  busySince: number | undefined;
  cancelSent = false;
  /** monotonic ms when the current transaction block began / went idle */
  private txSince: number | undefined;
  private idleSince: number | undefined;
  /** what the answer of the gateway statement at pending[0] said so far */
  private answer: { error?: string; values?: Array<string | null> } = {};
  private waiters: Array<{ until: () => boolean; resolve: () => void }> = [];

  constructor(
    readonly opts: SessionOptions,
    initialStatus: TxStatus,
  ) {
    this.txStatus = initialStatus;
    this.access = this.paper ? "checking" : "read-write";
  }

  /** paper mode on PostgreSQL: the session is read-only and writes need the gateway's elevation */
  get paper(): boolean {
    return this.opts.engine === "postgres" && this.opts.mode === "paper";
  }

  /** the owner of the next answer */
  get owner(): Owner | undefined {
    return this.pending[0];
  }

  get idle(): boolean {
    return this.pending.length === 0;
  }

  /** the client's messages may be forwarded (invariant 2) */
  get open(): boolean {
    return this.access === "read-only" || this.access === "read-write" || (this.access === "elevated" && this.elevatedStatement !== undefined);
  }

  /** nothing in flight, the last status idle, the access mode verified: an elevation may start */
  get canElevate(): boolean {
    return this.paper && this.idle && this.txStatus === "I" && this.access === "read-only";
  }

  private move(to: Access): void {
    if (!ACCESS_TRANSITIONS[this.access].includes(to)) throw new Error(`db session: access ${this.access} → ${to} is not a transition`);
    this.access = to;
    this.wake();
  }

  /** a message that will be answered by a ReadyForQuery was written upstream */
  expect(owner: Owner): void {
    if (owner === "elevate") this.move("elevated");
    if (owner === "check" && this.access === "elevated") this.move("checking");
    this.pending.push(owner);
    if (owner === "client" || owner === "elevated") this.idleSince = undefined;
  }

  /** the batch of an elevated Parse/Bind ended (Sync written): the next owner is the lowering */
  endElevatedBatch(): void {
    this.elevatedStatement = undefined;
  }

  /** the running client query (first one: now) */
  markBusy(): void {
    if (this.busySince === undefined) {
      this.busySince = this.opts.clock.monotonicMs();
      this.cancelSent = false;
    }
  }

  /** An ErrorResponse for a gateway-owned statement (body fields parsed by the caller). */
  internalError(message: string): void {
    this.answer.error ??= message;
  }

  /** A DataRow for a gateway-owned statement. */
  internalRow(values: Array<string | null>): void {
    this.answer.values ??= values;
  }

  /** Fails the session (invariant 4). */
  fail(reason: string): SessionEvent {
    if (this.access !== "failed") this.move("failed");
    return { kind: "failed", reason };
  }

  /** A ReadyForQuery arrived: the owner it ends, and what it means for the access mode. */
  ready(status: TxStatus): { owner: Owner | undefined; event?: SessionEvent } {
    const owner = this.pending.shift();
    const now = this.opts.clock.monotonicMs();
    this.txStatus = status;
    if (status === "I") this.txSince = undefined;
    else this.txSince ??= now;
    this.idleSince = this.pending.length === 0 && status !== "I" ? now : undefined;
    if (owner === "client" || owner === "elevated") {
      if (this.pending.length === 0) this.busySince = undefined;
      else {
        // pipelined: the next statement starts now
        this.busySince = now;
        this.cancelSent = false;
      }
    }
    const answer = this.answer;
    this.answer = {};
    let event: SessionEvent | undefined;
    switch (owner) {
      case undefined:
      case "client":
        break;
      case "elevated":
        // invariant 3: the elevated statement was its own implicit transaction
        if (status !== "I") event = this.fail(`the elevated statement ended inside a transaction block (status ${status})`);
        break;
      case "elevate":
        if (answer.error !== undefined) event = this.fail(`the gateway's elevation failed: ${answer.error}`);
        else if (status !== "I") event = this.fail(`the gateway's elevation ran inside a transaction block (status ${status})`);
        else if (answer.values?.[0] === ELEVATED) event = { kind: "elevated" };
        else event = { kind: "not-elevated", reason: answer.values?.[0] ?? "the elevation returned no row" };
        break;
      case "lower":
        if (answer.error !== undefined) event = this.fail(`the gateway's return to read-only failed: ${answer.error}`);
        else if (status !== "I") event = this.fail(`the gateway's return to read-only ran inside a transaction block (status ${status})`);
        break;
      case "check": {
        const v = answer.values;
        if (answer.error !== undefined) event = this.fail(`the read-back of the access mode failed: ${answer.error}`);
        else if (status !== "I") event = this.fail(`the read-back of the access mode ran inside a transaction block (status ${status})`);
        else if (!v || v[0] !== "on" || v[1] !== "on") {
          event = this.fail(`the read-back found the session read-write (default_transaction_read_only=${v?.[0] ?? "?"}, transaction_read_only=${v?.[1] ?? "?"})`);
        } else if (this.access === "checking") this.move("read-only");
        break;
      }
    }
    this.wake();
    return { owner, event };
  }

  /** Invariant 5: the bound a transaction block has passed, if any. */
  overdue(): { reason: "transaction" | "idle-in-transaction"; ms: number } | undefined {
    const now = this.opts.clock.monotonicMs();
    if (this.txSince !== undefined && now - this.txSince > this.opts.maxTransactionMs) return { reason: "transaction", ms: now - this.txSince };
    if (this.idleSince !== undefined && now - this.idleSince > this.opts.idleInTransactionMs) return { reason: "idle-in-transaction", ms: now - this.idleSince };
    return undefined;
  }

  /** Resolves once `until()` holds (checked after every transition), or the session is closed. */
  when(until: () => boolean): Promise<void> {
    if (until() || this.access === "failed") return Promise.resolve();
    return new Promise((resolve) => this.waiters.push({ until, resolve }));
  }

  /** the connection is over: nothing waits any more */
  close(): void {
    const w = this.waiters;
    this.waiters = [];
    for (const x of w) x.resolve();
  }

  private wake(): void {
    if (!this.waiters.length) return;
    const failed = this.access === "failed";
    const keep: typeof this.waiters = [];
    for (const w of this.waiters) {
      if (failed || w.until()) w.resolve();
      else keep.push(w);
    }
    this.waiters = keep;
  }
}

export function isWrite(v: SqlVerdict): boolean {
  return v.statements.some((s) => !s.readOnly);
}

/**
 * Why an allowed paper-mode write is not run read-write (undefined: it may
 * be, if the session can elevate). Only a string consisting solely of
 * INSERT/UPDATE/DELETE/MERGE/TRUNCATE of paper tables is elevated; anything
 * mixed with it, any DDL, COPY or EXECUTE, and anything inside a transaction
 * block is refused whole.
 */
export function whyNotElevatable(v: SqlVerdict, txStatus: TxStatus): string | undefined {
  const other = v.statements.find((s) => !ELEVATABLE_KINDS.has(s.kind) || s.readOnly);
  if (other) {
    return v.statements.length > 1
      ? `the string mixes a paper write with another statement (${other.kind}); in paper mode a write runs read-write only in a string of nothing but INSERT/UPDATE/DELETE/MERGE/TRUNCATE of paper tables — send the other statements separately`
      : `${other.kind.toUpperCase()} is not run read-write in paper mode: production is read-only, and only INSERT/UPDATE/DELETE/MERGE/TRUNCATE of paper tables are`;
  }
  if (v.statements.some((s) => s.writes.some((w) => w.startsWith("<")))) return "the statement writes something that is not a table";
  if (txStatus !== "I") {
    return "in paper mode a write to a paper table runs read-write only outside a transaction block, as its own implicit transaction; COMMIT or ROLLBACK first, then send it alone";
  }
  return undefined;
}

function literal(s: string): string {
  return `'${s.replace(/'/g, "''")}'`;
}

function textArray(items: Iterable<string>): string {
  const list = [...new Set(items)];
  return list.length ? `ARRAY[${list.map(literal).join(", ")}]::pg_catalog.text[]` : "ARRAY[]::pg_catalog.text[]";
}

/**
 * The gateway's conditional elevation for an elevatable verdict: one query
 * that turns the session's default read-write only if every target is an
 * ordinary table (relkind `r`) without rules or user triggers, every relation
 * read is a table or materialized view (not a view or foreign table, which
 * run code), and no function or operator the statement names exists outside
 * pg_catalog (an application function may be SECURITY DEFINER and write
 * anywhere). Otherwise the default stays read-only — the client's statement,
 * written right behind it, fails with the server's read-only error — and the
 * query returns why. Names resolve exactly as in the statement (same
 * session, same search_path), right before it runs.
 */
export function elevationSql(v: SqlVerdict): string {
  const targets = v.statements.flatMap((s) => s.writes);
  const reads = v.statements.flatMap((s) => s.tables);
  const functions = v.statements.flatMap((s) => s.functions);
  const operators = v.statements.flatMap((s) => s.operators);
  return [
    "SELECT CASE",
    `WHEN EXISTS (SELECT FROM pg_catalog.unnest(${textArray(targets)}) AS t(n) LEFT JOIN pg_catalog.pg_class c ON c.oid = pg_catalog.to_regclass(t.n)`,
    "  WHERE c.oid IS NULL OR c.relkind <> 'r' OR c.relhasrules",
    "  OR EXISTS (SELECT FROM pg_catalog.pg_trigger g WHERE g.tgrelid = c.oid AND NOT g.tgisinternal))",
    "THEN 'not elevated: a target is not an ordinary table without rules and triggers (a view, or a table whose rules or triggers run other code)'",
    `WHEN EXISTS (SELECT FROM pg_catalog.unnest(${textArray(reads)}) AS r(n) JOIN pg_catalog.pg_class c ON c.oid = pg_catalog.to_regclass(r.n) WHERE c.relkind NOT IN ('r', 'p', 'm'))`,
    "THEN 'not elevated: the statement reads a view or foreign table (its query would run read-write)'",
    `WHEN EXISTS (SELECT FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace s ON s.oid = p.pronamespace WHERE p.proname = ANY (${textArray(functions)}) AND s.nspname <> 'pg_catalog')`,
    "THEN 'not elevated: the statement calls a function defined outside pg_catalog (it could write anywhere)'",
    `WHEN EXISTS (SELECT FROM pg_catalog.pg_operator o JOIN pg_catalog.pg_namespace s ON s.oid = o.oprnamespace WHERE o.oprname = ANY (${textArray(operators)}) AND s.nspname <> 'pg_catalog')`,
    "THEN 'not elevated: the statement uses an operator defined outside pg_catalog'",
    `ELSE pg_catalog.set_config('default_transaction_read_only', '${ELEVATED}', false) END`,
  ].join("\n");
}
