/**
 * The database gateway: a PostgreSQL v3 wire-protocol proxy between a
 * sandboxed agent (whose TCP connection the tunnel hands over as a Duplex)
 * and the real database, enforcing SKILLS.md §3 "DATABASE ACCESS".
 *
 * - The client's StartupMessage is read and thrown away (user, password,
 *   database, `options`, every GUC): the upstream connection is made with the
 *   gateway's own role and session settings chosen per mode. The client is
 *   told AuthenticationOk: the tunnel already authenticated the phase.
 * - Every statement is judged before it is forwarded: simple Query (`Q`) and
 *   Parse (`P`) by classifySql (classifyQuestDb for QuestDB), FunctionCall
 *   (`F`) always refused. Bind/Describe/Execute/Close/Sync/Flush and COPY data
 *   pass through: the server only knows statements the gateway let through.
 * - A refused statement never reaches the server. In its place the gateway
 *   sends a one-token query that cannot parse (`sandboxd_refused_<nonce>_<n>`)
 *   and rewrites the server's syntax error into the refusal (SQLSTATE 42501,
 *   naming the rule and the SKILLS.md clause). The server thus answers in
 *   protocol order, with the ReadyForQuery (and transaction status) a real
 *   error would give, even for pipelined clients; in the extended protocol
 *   the client's messages up to Sync are discarded.
 * - Upstream session: statement_timeout (≤ 30 s), idle-in-transaction
 *   timeout, and default_transaction_read_only=on in paper mode (production).
 *   An allowed paper-mode write (to `paper_*`) outside a transaction block is
 *   bracketed by the gateway's own `SET SESSION CHARACTERISTICS AS
 *   TRANSACTION READ WRITE` / `READ ONLY`, whose answers the client never sees.
 * - Every statement is recorded (awaited) before it is forwarded, every
 *   CommandComplete before the client gets it, every server error likewise:
 *   `DB_QUERY [PostgreSQL|QuestDB]: …`, `DB_RESULT: n rows returned`,
 *   `DB_ERROR: …`. A failing audit sink closes the connection (fail closed).
 * - Watchdog: a query running past statementTimeoutMs + 2 s gets a
 *   CancelRequest upstream; past + 5 s both connections are dropped.
 * - CancelRequest from the client is mapped from the key the gateway gave it
 *   to the upstream backend's key.
 */
import { randomBytes, randomInt } from "node:crypto";
import type net from "node:net";
import type { Duplex } from "node:stream";
import type { Logger } from "pino";
import { escapeControl, timestamp } from "../audit/format.js";
import { systemClock, type Clock } from "../util/clock.js";
import { classifySql, initSqlParser, rememberPrepared, SQL_CLAUSES, VerdictCache, type SqlRules, type SqlVerdict } from "./classify.js";
import { classifyQuestDb } from "./questdb-gate.js";
import { CHECK_SQL, LOWER_SQL, PgSession, elevationSql, isWrite, whyNotElevatable, type SessionEvent } from "./session.js";
import { cancelKeys, connectUpstream, sendCancel, UpstreamError, type GatewayUpstream, type Upstream, type UpstreamKey } from "./upstream.js";
import {
  ByteReader,
  CANCEL_REQUEST,
  GSSENC_REQUEST,
  MAX_MESSAGE,
  PROTOCOL_3,
  SSL_REQUEST,
  T_BIND,
  T_CLOSE,
  T_COMMAND_COMPLETE,
  T_COPY_DATA,
  T_COPY_DONE,
  T_COPY_FAIL,
  T_DATA_ROW,
  T_DESCRIBE,
  T_ERROR,
  T_EXECUTE,
  T_FLUSH,
  T_FUNCTION_CALL,
  T_PARSE,
  T_QUERY,
  T_READY,
  T_SYNC,
  T_TERMINATE,
  cstr,
  errorResponse,
  int32,
  message,
  parseFields,
  readyForQuery,
  rowsFromTag,
  type TxStatus,
} from "./wire.js";

export type { GatewayUpstream } from "./upstream.js";
export { rowsFromTag } from "./wire.js";

export interface SqlApprovalRequest {
  /** the statement text exactly as sent (redacted), the approval's key */
  sql: string;
  via: "simple" | "extended";
  ruleId: string;
  clause: string;
  reason: string;
}

export interface SqlApprovalAnswer {
  id: string;
  /** approved: a human approved this text and the approval is now used (it runs once); pending/denied: refused */
  state: "approved" | "pending" | "denied";
  note?: string | null;
}

/** One audit entry: the journal event and the build_audit.log lines. */
export interface GatewayRecord {
  event: { type: string; [k: string]: unknown };
  lines: string[];
}

export interface GatewayOptions {
  engine: "postgres" | "questdb";
  mode: "backtest" | "paper" | "test";
  /** chosen by the caller per mode (paper: production; test/backtest: the test database) */
  upstream: GatewayUpstream;
  /** audit sink (journal + build log), awaited before the gateway acts */
  record(event: { type: string; [k: string]: unknown }, lines: string[]): Promise<void>;
  /**
   * Optional: records several entries, in order, durable together when it
   * resolves (e.g. PhaseRecorder.recordMany: one journal group commit and one
   * build-log append). Without it the gateway starts one `record` per entry,
   * in order, and awaits them all.
   */
  recordMany?(entries: GatewayRecord[]): Promise<void>;
  /** scrubs secrets from SQL and messages before they are recorded */
  redact?(s: string): string;
  /** the policy's SQL rules (src/db/policy-rules.ts sqlRulesFor); default: the built-in ones */
  rules?: Readonly<SqlRules>;
  /** default and maximum 30000 (SKILLS.md §3: 30 s max query timeout) */
  statementTimeoutMs?: number;
  /** upstream idle_in_transaction_session_timeout, and the gateway's own bound on an idle transaction block; default 60000 */
  idleInTransactionTimeoutMs?: number;
  /** the longest a transaction block may stay open, whatever the client sets; the gateway cuts the connection past it; default 60000 */
  maxTransactionMs?: number;
  /**
   * A statement the policy says needs a human (`ask`): queue an approval
   * request (or find the phase's approved one for this exact text and use it
   * up). Without it, `ask` is refused like `forbid`. The gateway stays out of
   * phases/: the caller keys the request by its phase.
   */
  askApproval?(req: SqlApprovalRequest): Promise<SqlApprovalAnswer>;
  log?: Logger;
  /** time for the watchdog and the session's bounds; default the system clock */
  clock?: Clock;
}

export const MAX_STATEMENT_TIMEOUT_MS = 30_000;
const WATCHDOG_CANCEL_AFTER_MS = 2_000;
const WATCHDOG_DROP_AFTER_MS = 5_000;
export const DEFAULT_MAX_TRANSACTION_MS = 60_000;
export const DEFAULT_IDLE_IN_TRANSACTION_MS = 60_000;

/** a chunk's output segments up to this many bytes in all are joined into one buffer; larger ones are corked (one writev) */
const JOIN_MAX = 16 * 1024;
/** bytes a source may queue while an earlier chunk waits for its records, before it is paused */
const QUEUE_HIGH_WATER = 256 * 1024;

/** the gateway's own queries after a paper-mode write (session.ts); their answers never reach the client */
const LOWER = message("Q", cstr(LOWER_SQL));
const CHECK = message("Q", cstr(CHECK_SQL));

/**
 * Verdict caches, one per rules object, engine and mode, shared by every
 * connection: pgbench-like workloads and ORMs send the same statement texts
 * again and again. Rules objects are shared per policy content
 * (src/db/policy-rules.ts), and a cache goes with its rules.
 */
const verdictCaches = new WeakMap<object, Map<string, VerdictCache>>();
const DEFAULT_RULES_KEY = {};
const VERDICT_CACHE_ENTRIES = 2048;
function verdictCache(rules: Readonly<SqlRules> | undefined, engine: GatewayOptions["engine"], mode: GatewayOptions["mode"]): VerdictCache {
  const owner = rules ?? DEFAULT_RULES_KEY;
  let byMode = verdictCaches.get(owner);
  if (!byMode) verdictCaches.set(owner, (byMode = new Map()));
  const key = `${engine}:${mode}`;
  let c = byMode.get(key);
  if (!c) byMode.set(key, (c = new VerdictCache(VERDICT_CACHE_ENTRIES)));
  return c;
}

/* ------------------------------- the session ---------------------------- */

/** The audit timestamp, formatted once per millisecond (a busy connection records many per ms). */
let lastStampMs = -1;
let lastStamp = "";
function stamp(): string {
  const now = Date.now();
  if (now !== lastStampMs) {
    lastStampMs = now;
    lastStamp = timestamp(new Date(now));
  }
  return lastStamp;
}

interface Refusal {
  verdict: SqlVerdict;
  approval?: SqlApprovalAnswer | undefined;
}

/** The upstream session's startup parameters: the gateway's choice, per mode (the client's are dropped). */
function upstreamSettings(opts: GatewayOptions, timeoutMs: number): Record<string, string> {
  const settings: Record<string, string> = { application_name: "sandboxd-gateway" };
  if (opts.engine === "postgres") {
    Object.assign(settings, {
      client_encoding: "UTF8",
      standard_conforming_strings: "on",
      default_transaction_read_only: opts.mode === "paper" ? "on" : "off",
      statement_timeout: String(timeoutMs),
      idle_in_transaction_session_timeout: String(opts.idleInTransactionTimeoutMs ?? DEFAULT_IDLE_IN_TRANSACTION_MS),
    });
  }
  return settings;
}

/**
 * Serves one client connection until either side closes. Resolves when the
 * connection is over; never rejects (errors are logged and close the client).
 */
export async function handleClient(client: Duplex, opts: GatewayOptions): Promise<void> {
  const log = opts.log;
  try {
    await serve(client, opts);
  } catch (e) {
    log?.warn({ err: e }, "db gateway: connection ended with an error");
    client.destroy();
  }
}

async function serve(client: Duplex, opts: GatewayOptions): Promise<void> {
  const timeoutMs = Math.min(Math.max(1, opts.statementTimeoutMs ?? MAX_STATEMENT_TIMEOUT_MS), MAX_STATEMENT_TIMEOUT_MS);
  const redact = opts.redact ?? ((s: string) => s);
  const engineName = opts.engine === "questdb" ? "QuestDB" : "PostgreSQL";
  const log = opts.log;
  client.on("error", (e) => log?.debug({ err: e }, "db gateway: client socket error"));
  // small protocol messages must not wait for delayed ACKs (Nagle); a tunnel stream has no such method
  (client as Partial<net.Socket>).setNoDelay?.(true);

  /* ---- client startup: SSLRequest / GSSENCRequest / CancelRequest / StartupMessage ---- */
  const creader = new ByteReader(client);
  for (;;) {
    const len = (await creader.read(4)).readInt32BE(0);
    if (len < 8 || len > 10_000) {
      client.destroy();
      return;
    }
    const body = await creader.read(len - 4);
    const code = body.readInt32BE(0);
    if (code === SSL_REQUEST || code === GSSENC_REQUEST) {
      client.write("N");
      continue;
    }
    if (code === CANCEL_REQUEST) {
      if (body.length >= 12) {
        const key = cancelKeys.get(`${body.readInt32BE(4)}:${body.readInt32BE(8)}`);
        if (key) sendCancel(key);
      }
      creader.detach();
      client.end();
      return;
    }
    if (code !== PROTOCOL_3) {
      creader.detach();
      client.end(errorResponse({ S: "FATAL", V: "FATAL", C: "0A000", M: `unsupported frontend protocol ${code >>> 16}.${code & 0xffff}` }));
      return;
    }
    // the client's user, password, database, options and GUCs are ignored on purpose
    break;
  }

  /* ---- upstream ---- */
  let upstream: Upstream;
  try {
    upstream = await connectUpstream(opts.upstream, upstreamSettings(opts, timeoutMs));
  } catch (e) {
    log?.warn({ err: e, upstream: `${opts.upstream.host}:${opts.upstream.port}/${opts.upstream.database}` }, "db gateway: upstream connection failed");
    const msg = e instanceof UpstreamError ? e.message : (e as Error).message;
    creader.detach();
    client.end(
      errorResponse({
        S: "FATAL",
        V: "FATAL",
        C: "08006",
        M: `sandboxd database gateway: cannot open the ${engineName} connection: ${redact(msg)} (SBX_ERR_INTERNAL)`,
      }),
    );
    return;
  }
  const up = upstream.socket;

  const clientKey = { pid: randomInt(1, 2 ** 31 - 1), secret: randomInt(-(2 ** 31), 2 ** 31 - 1) };
  const keyId = `${clientKey.pid}:${clientKey.secret}`;
  const upstreamKey: UpstreamKey = { host: opts.upstream.host, port: opts.upstream.port, pid: upstream.pid, secret: upstream.secret };
  cancelKeys.set(keyId, upstreamKey);

  const authOk = message("R", int32(0));
  const keyData = message("K", int32(clientKey.pid), int32(clientKey.secret));
  client.write(Buffer.concat([authOk, ...upstream.parameterStatus, keyData, readyForQuery(upstream.status)]));
  const clientLeftover = creader.detach();

  /* ---- session state ---- */
  const clock = opts.clock ?? systemClock;
  const session = new PgSession(
    {
      engine: opts.engine,
      mode: opts.mode,
      clock,
      maxTransactionMs: opts.maxTransactionMs ?? DEFAULT_MAX_TRANSACTION_MS,
      idleInTransactionMs: opts.idleInTransactionTimeoutMs ?? DEFAULT_IDLE_IN_TRANSACTION_MS,
    },
    upstream.status,
  );
  const nonce = randomBytes(6).toString("hex");
  const poisonPrefix = `sandboxd_refused_${nonce}_`;
  let poisonSeq = 0;
  const refusals = new Map<number, Refusal>();
  const prepared = session.prepared;
  let closed = false;

  const rules = opts.rules;
  const cache = verdictCache(rules, opts.engine, opts.mode);
  const judgeText = (sql: string): SqlVerdict =>
    opts.engine === "questdb" ? classifyQuestDb(sql, { mode: opts.mode, rules }) : classifySql(sql, { mode: opts.mode, prepared, rules });
  const classify = (sql: string): SqlVerdict => cache.lookup(sql, judgeText);
  if (opts.engine === "postgres") await initSqlParser();

  let watchdog: NodeJS.Timeout | undefined;
  let done!: () => void;
  const finished = new Promise<void>((r) => (done = r));
  const close = (why: string): void => {
    if (closed) return;
    closed = true;
    log?.debug({ why }, "db gateway: closing");
    if (watchdog) clearInterval(watchdog);
    cancelKeys.delete(keyId);
    up.destroy();
    client.destroy();
    done();
  };
  up.on("error", (e) => {
    log?.debug({ err: e }, "db gateway: upstream socket error");
    close("upstream error");
  });
  client.on("error", () => close("client error"));
  up.on("close", () => close("upstream closed"));
  client.on("close", () => close("client closed"));
  up.on("end", () => close("upstream ended"));
  client.on("end", () => close("client ended"));

  watchdog = setInterval(() => {
    // PgSession invariant 5: a transaction block is bounded whatever the client set (an ALTER TABLE on the host waits at most this long)
    const over = session.overdue();
    if (over) {
      log?.warn(over, "db gateway: transaction block past its bound; cutting the connection");
      const what = over.reason === "transaction" ? "transaction block open" : "transaction block idle";
      void Promise.resolve()
        .then(() =>
          opts.record({ type: "db.timeout", engine: opts.engine, mode: opts.mode, database: opts.upstream.database, action: "drop", reason: over.reason, ms: Math.round(over.ms) }, [
            `[${stamp()}] DB_ERROR: ${what} for ${Math.round(over.ms)} ms (bound ${over.reason === "transaction" ? session.opts.maxTransactionMs : session.opts.idleInTransactionMs} ms); connection cut`,
          ]),
        )
        .catch(() => undefined);
      close("transaction bound");
      return;
    }
    if (session.busySince === undefined) return;
    const ran = clock.monotonicMs() - session.busySince;
    if (ran > timeoutMs + WATCHDOG_DROP_AFTER_MS) {
      log?.warn({ ran }, "db gateway: query still running past the timeout; dropping the connection");
      void opts
        .record({ type: "db.timeout", engine: opts.engine, mode: opts.mode, database: opts.upstream.database, action: "drop", ms: ran }, [
          `[${timestamp(new Date())}] DB_ERROR: query still running after ${ran} ms; connection dropped`,
        ])
        .catch(() => undefined);
      close("watchdog");
    } else if (ran > timeoutMs + WATCHDOG_CANCEL_AFTER_MS && !session.cancelSent) {
      session.cancelSent = true;
      log?.warn({ ran }, "db gateway: query running past the timeout; cancelling upstream");
      sendCancel(upstreamKey);
    }
  }, 250);
  watchdog.unref();

  const markBusy = (): void => session.markBusy();

  const auditFailed = (e: unknown): void => {
    log?.error({ err: e }, "db gateway: audit sink failed; closing the connection (fail closed)");
    close("audit failure");
  };

  /* ---- audit: collected per chunk, committed together, before the chunk is forwarded ---- */
  /**
   * Records the entries of one chunk, in order; the promise settles once all
   * are durable. One awaited batch per chunk instead of one per message: the
   * journal's group commit then makes them durable with one write and one
   * fdatasync.
   */
  const commit = (recs: GatewayRecord[]): Promise<unknown> => {
    if (opts.recordMany) return opts.recordMany(recs);
    if (recs.length === 1) return opts.record(recs[0]!.event, recs[0]!.lines);
    // started together, in order: the sink keeps their order, and the journal groups them
    return Promise.all(recs.map((r) => opts.record(r.event, r.lines)));
  };

  const queryRecord = (sql: string, verdict: SqlVerdict, via: string, ts: string, approval?: SqlApprovalAnswer): GatewayRecord => {
    const shown = redact(sql);
    const lines = [`[${ts}] DB_QUERY [${engineName}]: ${escapeControl(shown)}`];
    if (verdict.decision !== "allow") {
      lines.push(`[${ts}] DB_ERROR: refused (${verdict.decision}) by ${verdict.ruleId} — ${verdict.clause}: ${escapeControl(redact(verdict.reason))}`);
    }
    const record: GatewayRecord = {
      event: {
        type: "db.query",
        engine: opts.engine,
        mode: opts.mode,
        database: opts.upstream.database,
        via,
        sql: shown,
        decision: verdict.decision,
        rule: verdict.ruleId,
        clause: verdict.clause,
      },
      lines,
    };
    if (verdict.decision !== "allow") record.event.reason = redact(verdict.reason);
    if (approval) {
      record.event.approval = approval.id;
      record.event.approvalState = approval.state;
      lines[0] += ` [approval ${approval.id} ${approval.state}]`;
    }
    return record;
  };

  /* ---- writing with backpressure ---- */
  /**
   * Each source is read through a pump: chunks are processed one at a time,
   * in order. A chunk whose processing must wait (for its audit records) makes
   * later chunks queue; the source is paused only when that queue grows past
   * QUEUE_HIGH_WATER or its destination is full — not once per chunk.
   */
  interface Pump {
    from: Duplex;
    process(b: Buffer): Promise<void> | void;
    busy: boolean;
    /** the destination is full */
    blocked: boolean;
    paused: boolean;
    queue: Buffer[];
    queued: number;
  }
  const relayFailed = (e: unknown): void => {
    log?.error({ err: e }, "db gateway: relay failed");
    close("relay error");
  };
  const pause = (p: Pump): void => {
    if (!p.paused) {
      p.paused = true;
      p.from.pause();
    }
  };
  const settle = (p: Pump): void => {
    if (!closed && p.paused && !p.blocked && !p.busy && p.queued < QUEUE_HIGH_WATER) {
      p.paused = false;
      p.from.resume();
    }
  };
  const runOne = (p: Pump, b: Buffer): void => {
    let r: Promise<void> | void;
    try {
      r = p.process(b);
    } catch (e) {
      relayFailed(e);
      return;
    }
    if (r) {
      p.busy = true;
      r.then(() => {
        p.busy = false;
        drainQueue(p);
      }, relayFailed);
    }
  };
  const drainQueue = (p: Pump): void => {
    while (!p.busy && !closed && p.queue.length) {
      const b = p.queue.shift()!;
      p.queued -= b.length;
      runOne(p, b);
    }
    settle(p);
  };
  const makePump = (from: Duplex, process: Pump["process"]): Pump => ({ from, process, busy: false, blocked: false, paused: true, queue: [], queued: 0 });
  const start = (p: Pump, first: Buffer | undefined): void => {
    if (first?.length) runOne(p, first);
    p.from.on("data", (b: Buffer) => {
      if (closed) return;
      if (p.busy || p.queue.length) {
        p.queue.push(b);
        p.queued += b.length;
        if (p.queued >= QUEUE_HIGH_WATER) pause(p);
        return;
      }
      runOne(p, b);
    });
    settle(p);
  };

  /** Writes a chunk's output with one write: one segment as is, small ones joined, large ones corked (one writev). */
  const writeOut = (to: Duplex, bufs: Buffer[], source: Pump): void => {
    if (bufs.length === 0 || closed) return;
    let ok: boolean;
    if (bufs.length === 1) ok = to.write(bufs[0]!);
    else {
      let total = 0;
      for (const b of bufs) total += b.length;
      if (total <= JOIN_MAX) ok = to.write(Buffer.concat(bufs, total));
      else {
        to.cork();
        ok = true;
        for (const b of bufs) ok = to.write(b);
        to.uncork();
      }
    }
    if (!ok && !source.blocked) {
      source.blocked = true;
      pause(source);
      to.once("drain", () => {
        source.blocked = false;
        settle(source);
      });
    }
  };

  /** Sends a chunk's output once its records are durable; synchronous when there is nothing to record. */
  const send = (to: Duplex, out: Buffer[], recs: GatewayRecord[], source: Pump, then?: () => void): Promise<void> | void => {
    if (recs.length === 0) {
      writeOut(to, out, source);
      then?.();
      return;
    }
    let committed: Promise<unknown>;
    try {
      committed = commit(recs);
    } catch (e) {
      auditFailed(e);
      return;
    }
    // nothing of the chunk is forwarded unless every record is durable (fail closed)
    return committed.then(
      () => {
        if (closed) return;
        writeOut(to, out, source);
        then?.();
      },
      (e: unknown) => auditFailed(e),
    );
  };

  /** A protocol violation: nothing more of this chunk is recorded or forwarded. */
  const violation = (m: string, why: string): void => {
    if (!closed) client.write(errorResponse({ S: "FATAL", V: "FATAL", C: "08P01", M: m }));
    close(why);
  };

  /**
   * A gateway-owned statement failed, or the session is not in a state the
   * gateway can vouch for (PgSession invariant 4): the connection is closed —
   * the server then rolls back whatever is open and the session's settings die
   * with it — and the reason is recorded.
   */
  const failClosed = (reason: string): void => {
    if (closed) return;
    session.fail(reason);
    log?.error({ reason }, "db gateway: the session cannot be vouched for; closing the connection (fail closed)");
    const rec: GatewayRecord = {
      event: { type: "db.session", engine: opts.engine, mode: opts.mode, database: opts.upstream.database, action: "close", reason: redact(reason) },
      lines: [`[${stamp()}] DB_ERROR: ${escapeControl(redact(reason))}; connection closed (fail closed)`],
    };
    void Promise.resolve()
      .then(() => commit([rec]))
      .catch((e: unknown) => log?.error({ err: e }, "db gateway: could not record the closing"));
    client.write(
      errorResponse({ S: "FATAL", V: "FATAL", C: "08006", M: `sandboxd database gateway: ${reason}; the connection is closed (fail closed, SBX_ERR_SQL_REFUSED)` }),
    );
    close("fail closed");
  };

  const judge = (sql: string): SqlVerdict => {
    try {
      return classify(sql);
    } catch (e) {
      log?.error({ err: e }, "db gateway: classifier failed");
      return { decision: "forbid", ruleId: "db.internal", clause: "SKILLS.md Core Principles: Safety First", reason: "the classifier failed (SBX_ERR_INTERNAL)", statements: [] };
    }
  };

  const poison = (verdict: SqlVerdict, approval?: SqlApprovalAnswer): string => {
    const n = ++poisonSeq;
    refusals.set(n, { verdict, approval });
    return `${poisonPrefix}${n}`;
  };

  /** the paper-mode elevation rule's refusal of an otherwise allowed write */
  const notElevatable = (v: SqlVerdict, reason: string): SqlVerdict => ({
    decision: "forbid",
    ruleId: "db.paper-elevation",
    clause: SQL_CLAUSES.readOnly,
    reason,
    statements: v.statements,
  });

  /* ---- waiting: the client's stream stops at a message until the session allows it ---- */
  type Wait = Promise<void>;
  const untilOpen = (): Wait => session.when(() => session.open);
  const untilCanElevate = (): Wait => session.when(() => session.idle && session.access === "read-only");
  /** answers of askApproval, by statement text, for the one reprocessing of that statement */
  const approvalAnswers = new Map<string, SqlApprovalAnswer>();
  const askFor = (sql: string, via: "simple" | "extended", v: SqlVerdict): Wait =>
    Promise.resolve()
      .then(() => opts.askApproval!({ sql: redact(sql), via, ruleId: v.ruleId, clause: v.clause, reason: redact(v.reason) }))
      .then(
        (a) => void approvalAnswers.set(sql, a),
        (e: unknown) => {
          log?.error({ err: e }, "db gateway: the approval queue failed");
          failClosed("the approval request could not be made");
        },
      );

  interface Decision {
    verdict: SqlVerdict;
    /** run read-write behind the gateway's conditional elevation (paper mode) */
    elevate: boolean;
    approval?: SqlApprovalAnswer;
  }

  /**
   * What to do with a statement: the classifier's verdict, then the
   * paper-mode elevation rule (PgSession invariants 2 and 3), then a human's
   * approval for an `ask`. A Wait when the session must settle first (the
   * statement is judged again after it).
   */
  const decide = (sql: string, via: "simple" | "extended"): Decision | Wait => {
    let verdict = judge(sql);
    let elevate = false;
    if (session.paper && verdict.decision !== "forbid") {
      if (via === "extended" && session.elevatedStatement !== undefined) {
        verdict = notElevatable(verdict, "an elevated extended batch runs read-write and holds only its one paper write; Sync before the next statement");
      } else if (isWrite(verdict)) {
        if (via === "extended" && session.batchMessages !== 0) {
          verdict = notElevatable(verdict, "in paper mode a paper write runs read-write only when its Parse opens an extended batch (right after Sync); Sync first");
        } else {
          if (!(session.idle && session.access === "read-only")) return untilCanElevate();
          const why = whyNotElevatable(verdict, session.txStatus);
          if (why !== undefined) verdict = notElevatable(verdict, why);
          else elevate = true;
        }
      }
    }
    let approval: SqlApprovalAnswer | undefined;
    if (verdict.decision === "ask" && opts.askApproval) {
      approval = approvalAnswers.get(sql);
      if (!approval) return askFor(sql, via, verdict);
      approvalAnswers.delete(sql);
      if (approval.state === "approved") verdict = { ...verdict, decision: "allow", reason: `approved by a human (${approval.id}): ${verdict.reason}` };
    }
    return { verdict, elevate: elevate && verdict.decision === "allow", approval };
  };

  /** PREPARE/DEALLOCATE/DISCARD can give a protocol statement name new content: forget which names are paper writes */
  const touchesPrepared = (v: SqlVerdict): boolean => v.statements.some((s) => s.kind === "prepare" || s.kind === "other");

  const elevateQuery = (v: SqlVerdict): Buffer => message("Q", cstr(elevationSql(v)));

  /* ---- client → upstream ---- */
  /** an incomplete message (or header) carried over, as chunks, and the bytes it needs in all (0: header incomplete) */
  let cParts: Buffer[] = [];
  let cPartsLength = 0;
  let cNeed = 0;
  /** bytes still to come of a message being streamed (forwarded, or discarded when !streamForward) */
  let streamRemaining = 0;
  let streamForward = true;

  /** a Query message: `raw` whole, its body at buf[start, end) */
  const onQuery = (raw: Buffer, buf: Buffer, start: number, end: number, out: Buffer[], recs: GatewayRecord[], ts: string): Wait | undefined => {
    if (session.elevatedStatement !== undefined) {
      failClosed("a simple Query arrived inside an elevated extended batch (before its Sync)");
      return;
    }
    const sql = buf.toString("utf8", start, Math.max(start, end - 1));
    const d = decide(sql, "simple");
    if (d instanceof Promise) return d;
    const { verdict, elevate, approval } = d;
    recs.push(queryRecord(sql, verdict, "simple", ts, approval));
    if (verdict.decision === "allow") {
      if (opts.engine === "postgres") {
        rememberPrepared(prepared, verdict);
        if (session.paperStatements.size && touchesPrepared(verdict)) session.paperStatements.clear();
      }
      if (elevate) {
        // conditional elevation, the statement, lowering and read-back, in one write (PgSession invariant 2)
        session.expect("elevate");
        out.push(elevateQuery(verdict));
        session.expect("elevated");
        markBusy();
        out.push(raw, LOWER);
        session.expect("lower");
        session.expect("check");
        out.push(CHECK);
        return;
      }
      session.expect("client");
      markBusy();
      out.push(raw);
    } else {
      session.expect("client");
      out.push(message("Q", cstr(poison(verdict, approval))));
    }
    return;
  };

  /** false: malformed */
  const onParse = (raw: Buffer, buf: Buffer, start: number, end: number, out: Buffer[], recs: GatewayRecord[], ts: string): boolean | Wait => {
    const nameEnd = buf.indexOf(0, start);
    const queryEnd = nameEnd < 0 || nameEnd >= end ? -1 : buf.indexOf(0, nameEnd + 1);
    if (queryEnd < 0 || queryEnd >= end) return false;
    const name = nameEnd === start ? "" : buf.toString("utf8", start, nameEnd);
    const sql = buf.toString("utf8", nameEnd + 1, queryEnd);
    const d = decide(sql, "extended");
    if (d instanceof Promise) return d;
    const { verdict, elevate, approval } = d;
    recs.push(queryRecord(sql, verdict, "extended", ts, approval));
    if (verdict.decision === "allow") {
      if (session.paper) {
        if (isWrite(verdict) && whyNotElevatable(verdict, "I") === undefined) session.paperStatements.set(name, verdict);
        else if (session.paperStatements.size) session.paperStatements.delete(name);
      }
      if (elevate) {
        session.expect("elevate");
        out.push(elevateQuery(verdict));
        session.elevatedStatement = name;
      }
      if (opts.engine === "postgres") rememberPrepared(prepared, verdict);
      session.batchMessages++;
      out.push(raw);
    } else {
      if (session.paperStatements.size) session.paperStatements.delete(name);
      session.batchMessages++;
      out.push(message("P", cstr(""), cstr(poison(verdict, approval)), Buffer.from([0, 0])));
      session.discardUntilSync = true;
    }
    return true;
  };

  const onFunctionCall = (out: Buffer[], recs: GatewayRecord[], ts: string): void => {
    if (session.elevatedStatement !== undefined) {
      failClosed("a FunctionCall arrived inside an elevated extended batch");
      return;
    }
    const verdict: SqlVerdict = {
      decision: "forbid",
      ruleId: "db.function-call",
      clause: "SKILLS.md §3 Read-Only Default",
      reason: "the FunctionCall protocol message calls a function by OID, which the gateway cannot judge; use SELECT fn(...)",
      statements: [],
    };
    recs.push(queryRecord("<FunctionCall message>", verdict, "function-call", ts));
    session.expect("client");
    out.push(message("Q", cstr(poison(verdict))));
  };

  /** the statement name a Bind binds (B: portal cstring, statement cstring, …); undefined when malformed */
  const bindStatement = (buf: Buffer, off: number, total: number): string | undefined => {
    const p = buf.indexOf(0, off + 5);
    if (p < 0 || p >= off + total) return undefined;
    const s = buf.indexOf(0, p + 1);
    if (s < 0 || s >= off + total) return undefined;
    return buf.toString("utf8", p + 1, s);
  };

  /**
   * Paper mode, a complete Bind: inside an elevated batch only the elevated
   * statement may be bound ("refuse"); opening a batch, a Bind of a statement
   * parsed as an elevatable paper write is elevated ("elevate").
   */
  const onPaperBind = (buf: Buffer, off: number, total: number): "pass" | "refuse" | "elevate" | Wait => {
    const name = bindStatement(buf, off, total);
    if (session.elevatedStatement !== undefined) return name === session.elevatedStatement ? "pass" : "refuse";
    if (session.batchMessages !== 0 || name === undefined || !session.paperStatements.has(name)) return "pass";
    if (!(session.idle && session.access === "read-only")) return untilCanElevate();
    if (session.txStatus !== "I") return "pass"; // inside a block: runs read-only, and fails as the server says
    session.elevatedStatement = name;
    return "elevate";
  };

  /**
   * One chunk from the client: every complete message is judged in place
   * (offsets into the chunk, no copies), its records collected, and what goes
   * upstream — the chunk's bytes, with refused statements swapped for their
   * placeholders and the gateway's own queries inserted — is written once,
   * after the records are durable. When the session must settle first (the
   * read-back after an elevation, an idle session before one, an approval
   * request), what came before the message is sent and the rest of the chunk
   * is processed once it has.
   */
  const processClient = (chunk: Buffer): Promise<void> | void => {
    let buf = chunk;
    if (cParts.length) {
      cParts.push(chunk);
      cPartsLength += chunk.length;
      // a large statement arrives in many chunks: join them once, when it is complete
      if (cNeed > 0 && cPartsLength < cNeed) return;
      buf = Buffer.concat(cParts, cPartsLength);
      cParts = [];
      cPartsLength = 0;
      cNeed = 0;
    }
    const out: Buffer[] = [];
    const recs: GatewayRecord[] = [];
    let ts: string | undefined;
    let off = 0;
    if (streamRemaining > 0) {
      const n = Math.min(streamRemaining, buf.length);
      if (streamForward) out.push(n === buf.length ? buf : buf.subarray(0, n));
      streamRemaining -= n;
      off = n;
    }
    let seg = off; // start of the pass-through segment not yet queued
    const flush = (to: number): void => {
      if (to > seg) out.push(seg === 0 && to === buf.length ? buf : buf.subarray(seg, to));
      seg = to;
    };
    /** stop at the message at `off`: send what came before, process the rest once `w` resolves */
    const holdAt = (w: Wait): Promise<void> => {
      flush(off);
      const rest = buf.subarray(off);
      return Promise.resolve(send(up, out, recs, clientPump))
        .then(() => w)
        .then(() => (closed || session.access === "failed" ? undefined : processClient(rest)));
    };
    let terminate = false;
    scan: while (off < buf.length) {
      if (buf.length - off < 5) break;
      if (!session.open) return holdAt(untilOpen());
      const type = buf[off]!;
      const len = buf.readInt32BE(off + 1);
      if (len < 4 || len > MAX_MESSAGE) {
        violation("invalid message length", "protocol violation");
        return;
      }
      const total = len + 1;
      const complete = buf.length - off >= total;

      if (session.discardUntilSync && type !== T_SYNC) {
        flush(off);
        if (complete) {
          off += total;
        } else {
          streamRemaining = total - (buf.length - off);
          streamForward = false;
          off = buf.length;
        }
        seg = off;
        continue;
      }

      if (type === T_BIND && complete && session.paper) {
        const b = onPaperBind(buf, off, total);
        if (b instanceof Promise) return holdAt(b);
        if (b === "elevate") {
          flush(off);
          session.expect("elevate");
          out.push(elevateQuery(session.paperStatements.get(session.elevatedStatement!)!));
        } else if (b === "refuse") {
          flush(off);
          ts ??= stamp();
          const v = notElevatable({ decision: "forbid", ruleId: "", clause: "", reason: "", statements: [] }, "an elevated extended batch may bind only its own paper write; Sync first");
          recs.push(queryRecord(`<Bind of statement "${bindStatement(buf, off, total) ?? "?"}" in an elevated batch>`, v, "extended", ts));
          out.push(message("P", cstr(""), cstr(poison(v)), Buffer.from([0, 0])));
          session.batchMessages++;
          session.discardUntilSync = true;
          off += total;
          seg = off;
          continue;
        }
      }
      switch (type) {
        case T_QUERY:
        case T_PARSE:
        case T_FUNCTION_CALL: {
          if (!complete) {
            flush(off);
            cParts = [buf.subarray(off)];
            cPartsLength = buf.length - off;
            cNeed = total;
            off = seg = buf.length;
            break scan;
          }
          flush(off);
          const raw = off === 0 && total === buf.length ? buf : buf.subarray(off, off + total);
          ts ??= stamp();
          if (type === T_QUERY) {
            const w = onQuery(raw, buf, off + 5, off + total, out, recs, ts);
            if (w) return holdAt(w);
          } else if (type === T_PARSE) {
            const r = onParse(raw, buf, off + 5, off + total, out, recs, ts);
            if (r instanceof Promise) return holdAt(r);
            if (!r) {
              close("malformed Parse");
              return;
            }
          } else onFunctionCall(out, recs, ts);
          if (closed) return;
          off += total;
          seg = off;
          continue;
        }
        case T_SYNC:
          if (!complete) break scan;
          session.discardUntilSync = false;
          off += total;
          flush(off);
          session.batchMessages = 0;
          if (session.elevatedStatement !== undefined) {
            // the elevated batch ends: lower and read back right behind its Sync (PgSession invariant 2)
            session.endElevatedBatch();
            session.expect("elevated");
            out.push(LOWER, CHECK);
            session.expect("lower");
            session.expect("check");
          } else session.expect("client");
          continue;
        case T_TERMINATE:
          flush(off);
          terminate = true;
          off = seg = buf.length;
          break scan;
        case T_BIND:
        case T_EXECUTE:
        case T_DESCRIBE:
        case T_CLOSE:
        case T_FLUSH:
        case T_COPY_DATA:
        case T_COPY_DONE:
        case T_COPY_FAIL:
          if (type === T_EXECUTE) markBusy();
          if (type !== T_COPY_DATA && type !== T_COPY_DONE && type !== T_COPY_FAIL && type !== T_FLUSH) session.batchMessages++;
          if (complete) {
            off += total;
            continue;
          }
          // stream the rest of a large message through without buffering it
          streamRemaining = total - (buf.length - off);
          streamForward = true;
          off = buf.length;
          break scan;
        default:
          violation(`sandboxd database gateway: unexpected message type '${String.fromCharCode(type)}'`, "protocol violation");
          return;
      }
    }
    flush(off);
    if (off < buf.length) {
      // an incomplete header or Sync: small
      cParts = [Buffer.from(buf.subarray(off))];
      cPartsLength = buf.length - off;
      cNeed = 0;
    }
    return send(up, out, recs, clientPump, terminate ? () => close("client terminated") : undefined);
  };

  /* ---- upstream → client ---- */
  let uPending: Buffer | undefined;
  let uStreamRemaining = 0;
  let uStreamForward = true;

  /** what a ReadyForQuery meant for the session: a failure closes, a paper write left read-only is recorded */
  const onSessionEvent = (e: SessionEvent | undefined, recs: GatewayRecord[], ts: string): boolean => {
    if (!e || e.kind === "elevated") return true;
    if (e.kind === "failed") {
      failClosed(e.reason);
      return false;
    }
    recs.push({
      event: { type: "db.elevation", engine: opts.engine, mode: opts.mode, database: opts.upstream.database, elevated: false, reason: e.reason },
      lines: [`[${ts}] DB_ERROR: paper write run read-only (${escapeControl(e.reason)})`],
    });
    return true;
  };

  /**
   * One chunk from the server: CommandComplete and real errors are recorded
   * (DB_RESULT / DB_ERROR) and pass through in place; refusal placeholders'
   * errors are rewritten; answers to the gateway's own queries are read by
   * the session and dropped. The rest is written to the client once, after
   * the records are durable.
   */
  const processUpstream = (chunk: Buffer): Promise<void> | void => {
    const buf = uPending ? Buffer.concat([uPending, chunk]) : chunk;
    uPending = undefined;
    const out: Buffer[] = [];
    const recs: GatewayRecord[] = [];
    let ts: string | undefined;
    let off = 0;
    if (uStreamRemaining > 0) {
      const n = Math.min(uStreamRemaining, buf.length);
      if (uStreamForward) out.push(n === buf.length ? buf : buf.subarray(0, n));
      uStreamRemaining -= n;
      off = n;
    }
    let seg = off;
    const flush = (to: number): void => {
      if (to > seg) out.push(seg === 0 && to === buf.length ? buf : buf.subarray(seg, to));
      seg = to;
    };
    scan: while (off < buf.length) {
      if (buf.length - off < 5) break;
      const type = buf[off]!;
      const len = buf.readInt32BE(off + 1);
      if (len < 4 || len > MAX_MESSAGE) {
        close("upstream protocol violation");
        return;
      }
      const total = len + 1;
      const complete = buf.length - off >= total;

      const owner = session.owner;
      if (owner === "elevate" || owner === "lower" || owner === "check") {
        // answers to the gateway's own queries never reach the client; the session reads them
        flush(off);
        if (!complete) {
          if (type === T_READY || type === T_ERROR || type === T_DATA_ROW) break scan; // kept in uPending below
          uStreamRemaining = total - (buf.length - off);
          uStreamForward = false;
          off = seg = buf.length;
          break scan;
        }
        if (type === T_ERROR) session.internalError(parseFields(buf.subarray(off + 5, off + total)).get("M") ?? "error");
        else if (type === T_DATA_ROW) session.internalRow(parseDataRow(buf.subarray(off + 5, off + total)));
        else if (type === T_READY) {
          ts ??= stamp();
          if (!onSessionEvent(session.ready(String.fromCharCode(buf[off + 5]!) as TxStatus).event, recs, ts)) return;
        }
        off += total;
        seg = off;
        continue;
      }

      if (type === T_COMMAND_COMPLETE || type === T_ERROR || type === T_READY) {
        if (!complete) break;
        if (type === T_READY) {
          const r = session.ready(String.fromCharCode(buf[off + 5]!) as TxStatus);
          ts ??= stamp();
          if (!onSessionEvent(r.event, recs, ts)) return;
          if (session.idle) refusals.clear();
          off += total;
          continue;
        }
        ts ??= stamp();
        if (type === T_COMMAND_COMPLETE) {
          const tag = buf.toString("utf8", off + 5, Math.max(off + 5, off + total - 1));
          const rows = rowsFromTag(tag);
          recs.push({
            event: { type: "db.result", engine: opts.engine, mode: opts.mode, database: opts.upstream.database, rows, command: tag },
            lines: [`[${ts}] DB_RESULT: ${rows} rows returned`],
          });
          off += total;
          continue; // passes through in place
        }
        // ErrorResponse: a refusal placeholder, or a real error
        const fields = parseFields(buf.subarray(off + 5, off + total));
        const m = fields.get("M") ?? "";
        const at = m.indexOf(poisonPrefix);
        const refusal = at >= 0 ? refusals.get(Number.parseInt(m.slice(at + poisonPrefix.length), 10)) : undefined;
        if (refusal) {
          flush(off);
          out.push(refusalResponse(refusal));
          off += total;
          seg = off;
        } else {
          const code = fields.get("C");
          recs.push({
            event: { type: "db.error", engine: opts.engine, mode: opts.mode, database: opts.upstream.database, sqlstate: code, message: redact(m) },
            lines: [`[${ts}] DB_ERROR: ${escapeControl(redact(m))}${code ? ` (SQLSTATE ${code})` : ""}`],
          });
          off += total; // passes through in place
        }
        continue;
      }

      // everything else passes through; large DataRows are streamed
      if (complete) {
        off += total;
        continue;
      }
      uStreamRemaining = total - (buf.length - off);
      uStreamForward = true;
      off = buf.length;
      break;
    }
    flush(off);
    if (off < buf.length) uPending = Buffer.from(buf.subarray(off));
    return send(client, out, recs, upPump);
  };

  /* ---- pumps: one chunk at a time, in order ---- */
  const upPump = makePump(up, processUpstream);
  const clientPump = makePump(client, processClient);
  if (session.paper) {
    // the login asked for a read-only session; read it back before the client's first statement (PgSession invariant 2)
    session.expect("check");
    up.write(CHECK);
  }
  start(upPump, upstream.leftover);
  start(clientPump, clientLeftover);

  await finished;
  session.close();
}

/** The client's answer to a refused statement (in place of the placeholder's syntax error). */
function refusalResponse(refusal: Refusal): Buffer {
  const v = refusal.verdict;
  const a = refusal.approval;
  let m = `sandboxd refused this statement: ${v.ruleId} (${v.clause}): ${v.reason}`;
  let hint = v.decision === "ask" ? "this needs human approval; ask the operator, or run a read-only query" : "run a read-only query, or one the phase's mode allows";
  if (a?.state === "pending") {
    m += ` — approval ${a.id} is pending`;
    hint = `a human can run \`sandboxd approvals approve ${a.id}\`; then send the same statement again from this phase (it runs once)`;
  } else if (a?.state === "denied") {
    m += ` — approval ${a.id} was denied${a.note ? `: ${a.note}` : ""}`;
    hint = "a person denied this statement; do not send it again";
  }
  return errorResponse({
    S: "ERROR",
    V: "ERROR",
    C: "42501",
    M: m,
    D: `decision: ${v.decision}; error code SBX_ERR_SQL_REFUSED${a ? `; approval ${a.id}` : ""}`,
    H: hint,
  });
}

/** DataRow body → column values (null for SQL NULL) */
function parseDataRow(body: Buffer): Array<string | null> {
  const n = body.readInt16BE(0);
  const out: Array<string | null> = [];
  let i = 2;
  for (let c = 0; c < n && i + 4 <= body.length; c++) {
    const len = body.readInt32BE(i);
    i += 4;
    if (len < 0) out.push(null);
    else {
      out.push(body.toString("utf8", i, i + len));
      i += len;
    }
  }
  return out;
}
