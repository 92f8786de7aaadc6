/**
 * PgSession (src/db/session.ts): its transitions on their own, and the
 * gateway driving it against a scripted upstream — a fake PostgreSQL peer
 * speaking the v3 protocol whose answers to the gateway's own statements the
 * test chooses, so every failure path of those statements is exercised.
 */
import net from "node:net";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { initSqlParser, classifySql } from "../../src/db/classify.js";
import { handleClient, type GatewayOptions } from "../../src/db/gateway.js";
import { CHECK_SQL, LOWER_SQL, PgSession, elevationSql, whyNotElevatable, type SessionOptions } from "../../src/db/session.js";
import { cstr, int32, message } from "../../src/db/wire.js";

beforeAll(async () => {
  await initSqlParser();
});

function fakeClock(): { clock: SessionOptions["clock"]; advance(ms: number): void } {
  let t = 1_000;
  return { clock: { now: () => new Date(), monotonicMs: () => t }, advance: (ms) => (t += ms) };
}

function session(mode: "paper" | "test" = "paper", over: Partial<SessionOptions> = {}) {
  const c = fakeClock();
  const s = new PgSession({ engine: "postgres", mode, clock: c.clock, maxTransactionMs: 60_000, idleInTransactionMs: 10_000, ...over }, "I");
  return { s, advance: c.advance };
}

/** a session past its login read-back */
function checked() {
  const t = session();
  t.s.expect("check");
  t.s.internalRow(["on", "on"]);
  expect(t.s.ready("I")).toBeUndefined();
  expect(t.s.access).toBe("read-only");
  return t;
}

describe("PgSession transitions", () => {
  it("paper mode starts unchecked and opens only after a read-back of on/on outside a block", () => {
    const { s } = session();
    expect(s.access).toBe("checking");
    expect(s.open).toBe(false);
    s.expect("check");
    s.internalRow(["on", "on"]);
    s.ready("I");
    expect(s.access).toBe("read-only");
    expect(s.open).toBe(true);
    expect(s.canElevate).toBe(true);
  });

  it("test mode is read-write from the start and never elevates", () => {
    const { s } = session("test");
    expect(s.access).toBe("read-write");
    expect(s.open).toBe(true);
    expect(s.canElevate).toBe(false);
  });

  it.each([
    ["read-back says read-write", ["off", "on"], undefined, "I", /read-write/],
    ["read-back in a transaction block", ["on", "on"], undefined, "T", /transaction block/],
    ["read-back errors", undefined, "current transaction is aborted", "E", /read-back .* failed/],
    ["read-back returns no row", undefined, undefined, "I", /read-write/],
  ] as const)("a failed read-back fails the session: %s", (_what, row, error, status, why) => {
    const { s } = session();
    s.expect("check");
    if (row) s.internalRow([...row]);
    if (error) s.internalError(error);
    const e = s.ready(status);
    expect(e).toMatchObject({ kind: "failed", reason: expect.stringMatching(why) });
    expect(s.access).toBe("failed");
    expect(s.open).toBe(false);
    expect(() => s.expect("elevate")).toThrow(/not a transition/);
  });

  it("walks elevate → elevated statement → lower → check and back to read-only", () => {
    const { s } = checked();
    s.expect("elevate");
    expect(s.access).toBe("elevated");
    s.expect("elevated");
    s.expect("lower");
    s.expect("check");
    expect(s.access).toBe("checking");
    expect(s.open).toBe(false);
    s.internalRow(["off"]);
    expect([s.ready("I"), s.lastOwner]).toEqual([{ kind: "elevated" }, "elevate"]);
    expect([s.ready("I"), s.lastOwner]).toEqual([undefined, "elevated"]);
    expect([s.ready("I"), s.lastOwner]).toEqual([undefined, "lower"]);
    s.internalRow(["on", "on"]);
    expect([s.ready("I"), s.lastOwner]).toEqual([undefined, "check"]);
    expect(s.access).toBe("read-only");
    expect(s.idle).toBe(true);
  });

  it("an elevation the server declined is reported with its reason, and the read-back still decides", () => {
    const { s } = checked();
    s.expect("elevate");
    s.expect("elevated");
    s.expect("lower");
    s.expect("check");
    s.internalRow(["not elevated: a target is not an ordinary table"]);
    expect(s.ready("I")).toEqual({ kind: "not-elevated", reason: "not elevated: a target is not an ordinary table" });
    s.ready("I");
    s.ready("I");
    s.internalRow(["on", "on"]);
    s.ready("I");
    expect(s.access).toBe("read-only");
  });

  it.each([
    ["the elevation errors", "elevate", "syntax error", "I", /elevation failed/],
    ["the elevation runs in a block", "elevate", undefined, "T", /elevation ran inside a transaction block/],
    ["the elevated statement leaves a block open", "elevated", undefined, "T", /ended inside a transaction block/],
    ["the lowering errors", "lower", "current transaction is aborted", "E", /return to read-only failed/],
    ["the lowering runs in a block", "lower", undefined, "T", /return to read-only ran inside/],
  ] as const)("every gateway statement's failure fails the session: %s", (_what, failing, error, status, why) => {
    const { s } = checked();
    s.expect("elevate");
    s.expect("elevated");
    s.expect("lower");
    s.expect("check");
    const order = ["elevate", "elevated", "lower"] as const;
    for (const o of order) {
      if (o === failing) {
        if (error) s.internalError(error);
        const e = s.ready(status);
        expect(e).toMatchObject({ kind: "failed", reason: expect.stringMatching(why) });
        expect(s.access).toBe("failed");
        return;
      }
      if (o === "elevate") s.internalRow(["off"]);
      s.ready("I");
    }
    throw new Error("not reached");
  });

  it("cannot elevate with anything in flight or inside a transaction block", () => {
    const { s } = checked();
    s.expect("client");
    expect(s.canElevate).toBe(false);
    s.ready("T");
    expect(s.idle).toBe(true);
    expect(s.canElevate).toBe(false);
  });

  it("bounds a transaction block (open, and idle) whatever the client set", () => {
    const { s, advance } = checked();
    s.expect("client");
    s.ready("T"); // BEGIN
    advance(9_000);
    expect(s.overdue()).toBeUndefined();
    s.expect("client");
    advance(2_000); // busy: not idle
    expect(s.overdue()).toBeUndefined();
    s.ready("T");
    advance(10_001);
    expect(s.overdue()).toMatchObject({ reason: "idle-in-transaction" });
    // activity every few seconds does not keep a block open past maxTransactionMs
    for (let i = 0; i < 10; i++) {
      s.expect("client");
      advance(5_000);
      s.ready("T");
    }
    expect(s.overdue()).toMatchObject({ reason: "transaction" });
    s.expect("client");
    s.ready("I"); // COMMIT
    expect(s.overdue()).toBeUndefined();
  });

  it("does not cut a long transaction block in test mode (fixtures), only an idle one", () => {
    const { s, advance } = session("test");
    s.expect("client");
    s.ready("T");
    for (let i = 0; i < 30; i++) {
      s.expect("client");
      advance(5_000);
      s.ready("T");
    }
    expect(s.overdue()).toBeUndefined();
    advance(10_001);
    expect(s.overdue()).toMatchObject({ reason: "idle-in-transaction" });
  });

  it("bounds an extended batch left open without Sync (an implicit transaction the server's idle timeout never sees)", () => {
    const { s, advance } = checked();
    s.batchMessages = 3; // Parse, Bind, Execute, then only Flushes
    expect(s.overdue()).toBeUndefined(); // first seen now
    advance(59_000);
    expect(s.overdue()).toBeUndefined();
    advance(2_000);
    expect(s.overdue()).toMatchObject({ reason: "transaction" });
    s.endBatch();
    expect(s.overdue()).toBeUndefined();
    // a new batch is timed from when it is first seen
    s.batchMessages = 1;
    expect(s.overdue()).toBeUndefined();
    advance(30_000);
    expect(s.overdue()).toBeUndefined();
  });

  it("when() resolves on the transition, and on close", async () => {
    const { s } = session();
    let opened = false;
    const w = s.when(() => s.open).then(() => (opened = true));
    s.expect("check");
    await Promise.resolve();
    expect(opened).toBe(false);
    s.internalRow(["on", "on"]);
    s.ready("I");
    await w;
    expect(opened).toBe(true);
    const never = s.when(() => false);
    s.close();
    await never;
  });
});

describe("the elevation rule", () => {
  const paper = (sql: string) => classifySql(sql, { mode: "paper" });

  it("elevates only strings of nothing but paper DML, outside a block", () => {
    expect(whyNotElevatable(paper("INSERT INTO paper_orders (symbol) VALUES ('x')"), "I")).toBeUndefined();
    expect(whyNotElevatable(paper("INSERT INTO paper_orders (symbol) VALUES ('x'); UPDATE paper_orders SET qty = 1"), "I")).toBeUndefined();
    expect(whyNotElevatable(paper("INSERT INTO paper_orders (symbol) VALUES ('x')"), "T")).toMatch(/outside a transaction block/);
    expect(whyNotElevatable(paper("INSERT INTO paper_orders (symbol) VALUES ('x'); SELECT cancel_pending_orders()"), "I")).toMatch(/mixes a paper write with another statement \(select\)/);
    expect(whyNotElevatable(paper("BEGIN; INSERT INTO paper_orders (symbol) VALUES ('x')"), "I")).toMatch(/mixes .*transaction/);
    expect(whyNotElevatable(paper("INSERT INTO paper_orders (symbol) VALUES ('x'); BEGIN"), "I")).toMatch(/mixes .*transaction/);
    expect(whyNotElevatable(paper("INSERT INTO paper_orders (symbol) VALUES ('x'); SELECT 1/0"), "I")).toMatch(/mixes/);
    expect(whyNotElevatable(paper("CREATE TABLE paper_x (a int)"), "I")).toMatch(/DDL is not run read-write/);
    expect(whyNotElevatable(paper("COPY paper_orders FROM STDIN"), "I")).toMatch(/COPY is not run read-write/);
  });

  it("checks targets, reads, functions and operators server-side, with the names quoted", () => {
    const sql = elevationSql(paper("INSERT INTO paper_orders (symbol) SELECT lower(s) || 'it''s' FROM \"We'ird\" WHERE a @> b"));
    expect(sql).toContain("pg_catalog.unnest(ARRAY['paper_orders']::pg_catalog.text[])");
    expect(sql).toContain(`ARRAY['"We''ird"']`);
    expect(sql).toContain("ARRAY['lower']");
    expect(sql).toMatch(/oprname = ANY \(ARRAY\['\|\|', '@>'\]|oprname = ANY \(ARRAY\['@>', '\|\|'\]/);
    expect(sql).toContain("c.relkind <> 'r' OR c.relhasrules");
    expect(sql).toContain("set_config('default_transaction_read_only', 'off', false)");
  });
});

/* ------------------------- a scripted upstream peer ------------------------ */

const dataRow = (...cols: string[]): Buffer => {
  const parts = cols.flatMap((c) => {
    const b = Buffer.from(c, "utf8");
    return [int32(b.length), b];
  });
  const n = Buffer.alloc(2);
  n.writeInt16BE(cols.length);
  return message("D", n, ...parts);
};
const complete = (tag: string): Buffer => message("C", cstr(tag));
const ready = (s: "I" | "T" | "E"): Buffer => message("Z", Buffer.from(s, "latin1"));
const error = (m: string): Buffer => message("E", Buffer.from("SERROR\0", "latin1"), Buffer.from("C25P02\0", "latin1"), Buffer.concat([Buffer.from("M"), cstr(m)]), Buffer.from([0]));

type Script = (sql: string, n: number) => Buffer[] | Promise<Buffer[]>;

/** A fake PostgreSQL: trusts the login, answers every Query with `script`, and logs what it received. */
async function fakeUpstream(script: Script): Promise<{ port: number; received: string[]; close(): void }> {
  const received: string[] = [];
  const server = net.createServer((sock) => {
    let buf = Buffer.alloc(0);
    let started = false;
    let chain = Promise.resolve();
    sock.on("error", () => undefined);
    sock.on("data", (d: Buffer) => {
      buf = Buffer.concat([buf, d]);
      for (;;) {
        if (!started) {
          if (buf.length < 4 || buf.length < buf.readInt32BE(0)) return;
          buf = buf.subarray(buf.readInt32BE(0));
          started = true;
          sock.write(Buffer.concat([message("R", int32(0)), message("K", int32(7), int32(8)), ready("I")]));
          continue;
        }
        if (buf.length < 5 || buf.length < 1 + buf.readInt32BE(1)) return;
        const type = String.fromCharCode(buf[0]!);
        const body = buf.subarray(5, 1 + buf.readInt32BE(1));
        buf = buf.subarray(1 + buf.readInt32BE(1));
        if (type !== "Q") continue;
        const sql = body.toString("utf8", 0, body.length - 1);
        const n = received.push(sql) - 1;
        chain = chain.then(async () => {
          if (!sock.destroyed) sock.write(Buffer.concat(await script(sql, n)));
        });
      }
    });
  });
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  return { port: (server.address() as net.AddressInfo).port, received, close: () => server.close() };
}

/** answers as a sane server would: read-back on/on, elevation granted */
const sane: Script = (sql) => {
  if (sql === CHECK_SQL) return [dataRow("on", "on"), complete("SELECT 1"), ready("I")];
  if (sql === LOWER_SQL) return [complete("SET"), ready("I")];
  if (sql.startsWith("SELECT CASE")) return [dataRow("off"), complete("SELECT 1"), ready("I")];
  if (/^insert/i.test(sql)) return [complete("INSERT 0 1"), ready("I")];
  if (/^begin/i.test(sql)) return [complete("BEGIN"), ready("T")];
  // the gateway's refusal placeholder: a syntax error, as PostgreSQL answers it
  if (sql.startsWith("sandboxd_refused_")) return [error(`syntax error at or near "${sql}"`), ready("I")];
  return [complete("SELECT 0"), ready("I")];
};

interface Conn {
  sock: net.Socket;
  /** messages up to the next ReadyForQuery; "closed" if the connection ends first */
  untilReady(): Promise<Array<{ type: string; text: string }> | "closed">;
}

const cleanups: Array<() => void> = [];
afterEach(() => {
  for (const c of cleanups.splice(0)) c();
});
afterAll(() => undefined);

async function gatewayOn(script: Script, extra: Partial<GatewayOptions> = {}) {
  const up = await fakeUpstream(script);
  const records: Array<{ event: Record<string, unknown>; lines: string[] }> = [];
  const clock = fakeClock();
  const opts: GatewayOptions = {
    engine: "postgres",
    mode: "paper",
    upstream: { host: "127.0.0.1", port: up.port, user: "gw", password: "pw", database: "trading" },
    record: async (event, lines) => void records.push({ event, lines }),
    clock: clock.clock,
    ...extra,
  };
  const server = net.createServer((s) => void handleClient(s, opts));
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  cleanups.push(() => {
    server.close();
    up.close();
  });
  const connect = async (): Promise<Conn> => {
    const sock = net.connect((server.address() as net.AddressInfo).port, "127.0.0.1");
    let buf = Buffer.alloc(0);
    let ended = false;
    let wake: (() => void) | undefined;
    sock.on("data", (d: Buffer) => {
      buf = Buffer.concat([buf, d]);
      wake?.();
    });
    sock.on("close", () => {
      ended = true;
      wake?.();
    });
    sock.on("error", () => undefined);
    const startup = Buffer.concat([int32(196608), cstr("user"), cstr("agent"), Buffer.from([0])]);
    sock.write(Buffer.concat([int32(startup.length + 4), startup]));
    const conn: Conn = {
      sock,
      async untilReady() {
        const got: Array<{ type: string; text: string }> = [];
        for (;;) {
          while (buf.length >= 5 && buf.length >= 1 + buf.readInt32BE(1)) {
            const type = String.fromCharCode(buf[0]!);
            const text = buf.toString("utf8", 5, 1 + buf.readInt32BE(1));
            buf = buf.subarray(1 + buf.readInt32BE(1));
            got.push({ type, text });
            if (type === "Z") return got;
          }
          if (ended) return "closed";
          await new Promise<void>((r) => (wake = r));
          wake = undefined;
        }
      },
    };
    expect(await conn.untilReady()).not.toBe("closed");
    cleanups.push(() => sock.destroy());
    return conn;
  };
  return { up, records, connect, advance: clock.advance };
}

const q = (sql: string): Buffer => message("Q", cstr(sql));

describe("the gateway driving PgSession against a scripted upstream", () => {
  it("reads the login's read-only state back before the client's first statement", async () => {
    let release!: () => void;
    const held = new Promise<void>((r) => (release = r));
    const g = await gatewayOn(async (sql, n) => {
      if (sql === CHECK_SQL) await held;
      return sane(sql, n);
    });
    const c = await g.connect();
    c.sock.write(q("SELECT 1"));
    await new Promise((r) => setTimeout(r, 150));
    expect(g.up.received).toEqual([CHECK_SQL]); // the SELECT waits for the read-back
    release();
    expect(await c.untilReady()).not.toBe("closed");
    expect(g.up.received).toEqual([CHECK_SQL, "SELECT 1"]);
  });

  it("closes the connection when the login's read-back says read-write, and records why", async () => {
    const g = await gatewayOn((sql, n) => (sql === CHECK_SQL ? [dataRow("off", "off"), complete("SELECT 1"), ready("I")] : sane(sql, n)));
    const c = await g.connect();
    c.sock.write(q("SELECT 1"));
    expect(await c.untilReady()).toBe("closed");
    expect(g.up.received).toEqual([CHECK_SQL]);
    const rec = g.records.find((r) => r.event.type === "db.session");
    expect(rec?.event).toMatchObject({ action: "close", reason: expect.stringMatching(/read-back found the session read-write/) });
    expect(rec?.lines[0]).toMatch(/DB_ERROR: .*read-write.*; connection closed \(fail closed\)$/);
  });

  it("brackets a paper write with the conditional elevation, the lowering and the read-back, and holds the next statement until the read-back", async () => {
    let release!: () => void;
    const held = new Promise<void>((r) => (release = r));
    const g = await gatewayOn(async (sql, n) => {
      if (sql === CHECK_SQL && n > 0) await held;
      return sane(sql, n);
    });
    const c = await g.connect();
    await new Promise((r) => setTimeout(r, 50));
    // pipelined: the write and a read in one chunk
    c.sock.write(Buffer.concat([q("INSERT INTO paper_orders (symbol) VALUES ('x')"), q("SELECT 2")]));
    await new Promise((r) => setTimeout(r, 150));
    expect(g.up.received.slice(1)).toEqual([expect.stringMatching(/^SELECT CASE/), "INSERT INTO paper_orders (symbol) VALUES ('x')", LOWER_SQL, CHECK_SQL]);
    release();
    const first = await c.untilReady();
    expect(first).not.toBe("closed");
    // the client sees only its own statement's answer
    expect((first as Array<{ type: string }>).map((m) => m.type)).toEqual(["C", "Z"]);
    expect(await c.untilReady()).not.toBe("closed");
    expect(g.up.received.at(-1)).toBe("SELECT 2");
  });

  it.each([
    ["the lowering fails", (sql: string) => (sql === LOWER_SQL ? [error("current transaction is aborted"), ready("E")] : undefined), /return to read-only failed/],
    ["the read-back after the write says read-write", (sql: string, n: number) => (sql === CHECK_SQL && n > 0 ? [dataRow("off", "off"), complete("SELECT 1"), ready("I")] : undefined), /read-write/],
    ["the elevated statement leaves a block open", (sql: string) => (/^insert/i.test(sql) ? [complete("INSERT 0 1"), ready("T")] : undefined), /ended inside a transaction block/],
    ["the elevation itself errors", (sql: string) => (sql.startsWith("SELECT CASE") ? [error("boom"), ready("I")] : undefined), /elevation failed: boom/],
  ])("fails closed when %s: nothing more is forwarded, and the record says why", async (_what, override, why) => {
    const g = await gatewayOn((sql, n) => override(sql, n) ?? sane(sql, n));
    const c = await g.connect();
    await new Promise((r) => setTimeout(r, 50));
    c.sock.write(Buffer.concat([q("INSERT INTO paper_orders (symbol) VALUES ('x')"), q("SELECT cancel_pending_orders()")]));
    let r = await c.untilReady();
    while (r !== "closed") r = await c.untilReady();
    expect(g.up.received).not.toContain("SELECT cancel_pending_orders()");
    await new Promise((res) => setTimeout(res, 20));
    expect(g.records.find((x) => x.event.type === "db.session")?.event.reason).toMatch(why);
  });

  it("records a paper write the server declined to elevate, and carries on read-only", async () => {
    const g = await gatewayOn((sql, n) =>
      sql.startsWith("SELECT CASE")
        ? [dataRow("not elevated: a target is not an ordinary table without rules and triggers"), complete("SELECT 1"), ready("I")]
        : /^insert/i.test(sql)
          ? [error("cannot execute INSERT in a read-only transaction"), ready("I")]
          : sane(sql, n),
    );
    const c = await g.connect();
    c.sock.write(q("INSERT INTO paper_v (symbol) VALUES ('x')"));
    const r = await c.untilReady();
    expect(r).not.toBe("closed");
    expect((r as Array<{ type: string; text: string }>).find((m) => m.type === "E")?.text).toMatch(/read-only transaction/);
    expect(g.records.find((x) => x.event.type === "db.elevation")?.event).toMatchObject({ elevated: false, reason: expect.stringMatching(/not an ordinary table/) });
    c.sock.write(q("SELECT 3"));
    expect(await c.untilReady()).not.toBe("closed");
  });

  it("refuses a string mixing a paper write with anything else without sending it", async () => {
    const g = await gatewayOn(sane);
    const c = await g.connect();
    c.sock.write(q("INSERT INTO paper_orders (symbol) VALUES ('x'); SELECT cancel_pending_orders()"));
    const r = await c.untilReady();
    expect((r as Array<{ type: string; text: string }>).find((m) => m.type === "E")?.text).toMatch(/db\.paper-elevation/);
    expect(g.up.received.some((s) => s.includes("cancel_pending_orders"))).toBe(false);
    expect(g.records.find((x) => x.event.type === "db.query")?.event).toMatchObject({ decision: "forbid", rule: "db.paper-elevation" });
  });

  it("cuts a transaction block held open past maxTransactionMs, and records it", async () => {
    const g = await gatewayOn(sane, { maxTransactionMs: 5_000 });
    const c = await g.connect();
    c.sock.write(q("BEGIN"));
    expect(await c.untilReady()).not.toBe("closed");
    g.advance(5_001);
    expect(await c.untilReady()).toBe("closed");
    expect(g.records.find((x) => x.event.type === "db.timeout")?.event).toMatchObject({ action: "drop", reason: "transaction" });
  });

  it("asks for approval of an `ask` statement, names the approval in the refusal, and runs it once approved", async () => {
    const asked: unknown[] = [];
    let state: "pending" | "approved" = "pending";
    const g = await gatewayOn(sane, {
      mode: "test",
      askApproval: async (req) => {
        asked.push(req);
        const s = state;
        state = "pending";
        return { id: "ap_1", state: s };
      },
    });
    const c = await g.connect();
    c.sock.write(q("DROP TABLE fills"));
    const r = (await c.untilReady()) as Array<{ type: string; text: string }>;
    const err = r.find((m) => m.type === "E")!.text;
    expect(err).toMatch(/approval ap_1 is pending/);
    expect(err).toContain("sandboxd approvals approve ap_1");
    expect(g.up.received).not.toContain("DROP TABLE fills");
    expect(asked).toEqual([expect.objectContaining({ sql: "DROP TABLE fills", via: "simple", ruleId: "db.schema-safety" })]);
    state = "approved";
    c.sock.write(q("DROP TABLE fills"));
    expect(await c.untilReady()).not.toBe("closed");
    expect(g.up.received.filter((s) => s === "DROP TABLE fills")).toHaveLength(1);
    expect(g.records.filter((x) => x.event.type === "db.query").map((x) => [x.event.decision, x.event.approval, x.event.approvalState])).toEqual([
      ["ask", "ap_1", "pending"],
      ["allow", "ap_1", "approved"],
    ]);
  });
});
