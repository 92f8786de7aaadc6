/**
 * The database gateway against a real PostgreSQL 15 (test/helpers/postgres.ts):
 * a tiny TCP server in the test hands each connection to handleClient, as the
 * tunnel server will. Clients are pg.Client (simple protocol for queries
 * without parameters, extended protocol with them) and psql.
 */
import { execFile, spawn } from "node:child_process";
import net from "node:net";
import { promisify } from "node:util";
import pg from "pg";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { handleClient, rowsFromTag, type GatewayOptions } from "../../src/db/gateway.js";
import { startPostgres, type TestPostgres } from "../helpers/postgres.js";

const run = promisify(execFile);

let db: TestPostgres;
const servers: net.Server[] = [];

beforeAll(async () => {
  db = await startPostgres();
}, 120_000);

afterAll(async () => {
  for (const s of servers) s.close();
  await db?.stop();
});

interface Recorded {
  event: { type: string; [k: string]: unknown };
  lines: string[];
}

interface Gateway {
  port: number;
  records: Recorded[];
  lines(): string[];
  connect(extra?: Partial<pg.ClientConfig>): Promise<pg.Client>;
}

async function startGateway(mode: GatewayOptions["mode"], extra: Partial<GatewayOptions> = {}): Promise<Gateway> {
  const records: Recorded[] = [];
  const opts: GatewayOptions = {
    engine: "postgres",
    mode,
    upstream: {
      host: db.host,
      port: db.port,
      user: db.gateway.user,
      password: db.gateway.password,
      database: mode === "paper" ? "trading" : "trading_test",
    },
    record: async (event, lines) => {
      records.push({ event, lines });
    },
    ...extra,
  };
  const server = net.createServer((sock) => void handleClient(sock, opts));
  servers.push(server);
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  const port = (server.address() as net.AddressInfo).port;
  return {
    port,
    records,
    lines: () => records.flatMap((r) => r.lines),
    connect: async (more = {}) => {
      // the client's credentials and database are ignored by the gateway
      const c = new pg.Client({ host: "127.0.0.1", port, user: "agent", password: "whatever", database: "postgres", ...more });
      await c.connect();
      return c;
    },
  };
}

async function superCount(table: string, database: string): Promise<number> {
  return Number((await db.psql(`SELECT count(*) FROM ${table}`, database)).trim());
}

async function refused(c: pg.Client, sql: string, values?: unknown[]): Promise<pg.DatabaseError> {
  const err = await c.query(sql, values).then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(err, `expected a refusal of ${sql}`).toBeInstanceOf(Error);
  return err as pg.DatabaseError;
}

describe("test postgres helper", () => {
  it("serves both databases with the gateway role's grants", async () => {
    expect((await db.psql("SELECT count(*) FROM orders", "trading")).trim()).toBe("3");
    const c = new pg.Client({ host: db.host, port: db.port, user: db.gateway.user, password: db.gateway.password, database: "trading" });
    await c.connect();
    try {
      expect((await c.query("SELECT count(*)::int AS n FROM signals")).rows[0].n).toBe(3);
      await expect(c.query("DELETE FROM orders")).rejects.toThrow(/permission denied/);
    } finally {
      await c.end();
    }
  });
});

describe("db gateway (PostgreSQL)", () => {
  let paper: Gateway;
  let testGw: Gateway;
  beforeAll(async () => {
    paper = await startGateway("paper");
    testGw = await startGateway("test");
  });

  it("relays reads and records them with row counts", async () => {
    const c = await paper.connect();
    try {
      const r = await c.query("SELECT * FROM orders WHERE status = 'pending' LIMIT 50");
      expect(r.rows).toHaveLength(2);
      expect((await c.query("SELECT current_database() AS d, current_user AS u")).rows[0]).toEqual({ d: "trading", u: "sandboxd_gw" });
      const p = await c.query("SELECT symbol FROM orders WHERE id = $1", [1]);
      expect(p.rows).toEqual([{ symbol: "BTC-USD" }]);
    } finally {
      await c.end();
    }
    const q = paper.records.find((r) => r.event.type === "db.query" && String(r.event.sql).includes("status = 'pending'"));
    expect(q?.event).toMatchObject({ engine: "postgres", mode: "paper", database: "trading", decision: "allow", rule: expect.any(String), clause: expect.any(String) });
    expect(q?.lines[0]).toMatch(/^\[\d{4}-\d\d-\d\dT[\d:.]+Z\] DB_QUERY \[PostgreSQL\]: SELECT \* FROM orders WHERE status = 'pending' LIMIT 50$/);
    const lines = paper.lines();
    expect(lines.some((l) => /\] DB_RESULT: 2 rows returned$/.test(l))).toBe(true);
    expect(paper.records.some((r) => r.event.type === "db.result" && r.event.rows === 2)).toBe(true);
    // the extended-protocol query is recorded too
    expect(lines.some((l) => l.endsWith("DB_QUERY [PostgreSQL]: SELECT symbol FROM orders WHERE id = $1"))).toBe(true);
  });

  it("refuses writes and escapes in paper mode with a clean error; the connection stays usable and the tables unchanged", async () => {
    const c = await paper.connect();
    const attempts = [
      "INSERT INTO orders (symbol, side, qty, price, status) VALUES ('X', 'buy', 1, 1, 'new')",
      "UPDATE orders SET status = 'cancelled'",
      "DELETE FROM orders",
      "DROP TABLE orders",
      "TRUNCATE fills",
      "COPY orders FROM STDIN",
      "COPY orders TO STDOUT",
      "SET default_transaction_read_only = off",
      "SELECT pg_sleep(1)",
      "WITH d AS (DELETE FROM orders RETURNING *) SELECT count(*) FROM d",
      "BEGIN READ WRITE",
      "SELECT 1; DELETE FROM positions",
    ];
    try {
      for (const sql of attempts) {
        const e = await refused(c, sql);
        expect(e.code, sql).toBe("42501");
        expect(e.message, sql).toMatch(/^sandboxd refused this statement: db\.[\w.-]+ \(SKILLS\.md/);
        // the same connection answers the next query
        expect((await c.query("SELECT count(*)::int AS n FROM orders")).rows[0].n).toBe(3);
      }
    } finally {
      await c.end();
    }
    expect(await superCount("orders", "trading")).toBe(3);
    expect(await superCount("fills", "trading")).toBe(2);
    expect(await superCount("positions", "trading")).toBe(2);
    expect(await db.psql("SELECT DISTINCT status FROM orders ORDER BY 1", "trading")).toBe("filled\npending\n");
    // each refusal is recorded with its rule and clause, and a DB_ERROR line
    const refusals = paper.records.filter((r) => r.event.type === "db.query" && r.event.decision !== "allow");
    expect(refusals.map((r) => r.event.sql)).toEqual(expect.arrayContaining(attempts));
    for (const r of refusals) {
      expect(r.event.rule).toMatch(/^db\./);
      expect(r.event.clause).toMatch(/^SKILLS\.md/);
      expect(r.lines[1]).toMatch(/\] DB_ERROR: refused \((forbid|ask)\) by db\./);
    }
  });

  it("ignores the client's startup options: the session stays read-only", async () => {
    const c = await paper.connect({ options: "-c default_transaction_read_only=off -c statement_timeout=0", user: "postgres", database: "trading_test" });
    try {
      expect((await c.query("SHOW default_transaction_read_only")).rows[0]).toEqual({ default_transaction_read_only: "on" });
      expect((await c.query("SHOW transaction_read_only")).rows[0]).toEqual({ transaction_read_only: "on" });
      expect((await c.query("SHOW statement_timeout")).rows[0]).toEqual({ statement_timeout: "30s" });
      expect((await c.query("SELECT current_database() AS d, current_user AS u")).rows[0]).toEqual({ d: "trading", u: "sandboxd_gw" });
      const e = await refused(c, "INSERT INTO orders (symbol, side, qty, price, status) VALUES ('X', 'buy', 1, 1, 'new')");
      expect(e.code).toBe("42501");
    } finally {
      await c.end();
    }
    expect(await superCount("orders", "trading")).toBe(3);
  });

  it("lets paper-mode writes to paper_* through to production, then restores read-only", async () => {
    const before = await superCount("paper_orders", "trading");
    const c = await paper.connect();
    try {
      const r = await c.query("INSERT INTO paper_orders (symbol, side, qty, price, status) VALUES ('ETH-USD', 'buy', 1, 2500, 'new')");
      expect(r.rowCount).toBe(1);
      // extended protocol, twice on a named statement (the second run is Bind/Execute only)
      for (let i = 0; i < 2; i++) {
        const p = await c.query({
          name: "paper_ins",
          text: "INSERT INTO paper_orders (symbol, side, qty, price, status) VALUES ($1, 'sell', $2, 1, 'new') RETURNING id",
          values: ["SOL-USD", i + 1],
        });
        expect(p.rows).toHaveLength(1);
      }
      expect((await c.query("SHOW default_transaction_read_only")).rows[0]).toEqual({ default_transaction_read_only: "on" });
      await refused(c, "UPDATE orders SET status = 'x'");
    } finally {
      await c.end();
    }
    expect(await superCount("paper_orders", "trading")).toBe(before + 3);
    expect(await superCount("paper_orders", "trading_test")).toBe(1);
    expect(paper.lines().some((l) => l.endsWith("DB_RESULT: 1 rows returned"))).toBe(true);
    // the gateway's own SET SESSION CHARACTERISTICS are neither shown nor recorded
    expect(paper.lines().some((l) => l.includes("SESSION CHARACTERISTICS"))).toBe(false);
  });

  it("sends test mode to trading_test, where writes work", async () => {
    const c = await testGw.connect({ database: "trading" });
    try {
      expect((await c.query("SELECT current_database() AS d")).rows[0]).toEqual({ d: "trading_test" });
      await c.query("INSERT INTO orders (symbol, side, qty, price, status) VALUES ('X', 'buy', 1, 1, 'new')");
      await c.query("UPDATE orders SET status = 'cancelled' WHERE symbol = $1", ["X"]);
      await c.query("CREATE TABLE fixture_t (id int)");
      await c.query("INSERT INTO fixture_t SELECT generate_series(1, 5)");
      expect((await c.query("SELECT count(*)::int AS n FROM fixture_t")).rows[0].n).toBe(5);
      // destructive DDL still asks, in every mode
      expect((await refused(c, "DROP TABLE fixture_t")).code).toBe("42501");
    } finally {
      await c.end();
    }
    expect(await superCount("orders", "trading_test")).toBe(4);
    expect(await superCount("orders", "trading")).toBe(3);
    expect(testGw.lines().some((l) => l.endsWith("DB_RESULT: 5 rows returned"))).toBe(true);
  });

  it("refuses a parameterised DELETE in the extended protocol; the next query on the same client works", async () => {
    const c = await paper.connect();
    try {
      const e = await refused(c, "DELETE FROM orders WHERE id = $1", [1]);
      expect(e.code).toBe("42501");
      expect(e.message).toMatch(/sandboxd refused this statement/);
      expect((await c.query("SELECT count(*)::int AS n FROM orders WHERE id <= $1", [3])).rows[0].n).toBe(3);
      // a refused named statement does not exist afterwards; the client recovers
      await refused(c, { name: "del", text: "DELETE FROM orders WHERE id = $1", values: [2] } as unknown as string);
      expect((await c.query("SELECT 1 AS one")).rows[0].one).toBe(1);
    } finally {
      await c.end();
    }
    expect(await superCount("orders", "trading")).toBe(3);
  });

  it("keeps a refusal inside a transaction block in protocol order", async () => {
    const c = await paper.connect();
    try {
      await c.query("BEGIN");
      await refused(c, "DELETE FROM orders");
      // like any error, the refusal aborts the block
      const e = await refused(c, "SELECT 1");
      expect(e.code).toBe("25P02");
      await c.query("ROLLBACK");
      expect((await c.query("SELECT count(*)::int AS n FROM orders")).rows[0].n).toBe(3);
    } finally {
      await c.end();
    }
  });

  it("works with psql (simple protocol)", async () => {
    const env = { ...process.env, PGPASSWORD: "whatever", PGCONNECT_TIMEOUT: "10" };
    const { stdout } = await run("psql", ["-X", "-A", "-t", "-h", "127.0.0.1", "-p", String(paper.port), "-U", "agent", "-d", "x", "-c", "SELECT count(*) FROM orders WHERE status = 'pending'"], { env });
    expect(stdout.trim()).toBe("2");
    const r = await run(
      "psql",
      ["-X", "-A", "-t", "-h", "127.0.0.1", "-p", String(paper.port), "-U", "agent", "-d", "x", "-c", "DELETE FROM orders", "-c", "SELECT count(*) FROM orders"],
      { env },
    );
    expect(r.stderr).toMatch(/ERROR: {2}sandboxd refused this statement/);
    expect(r.stdout.trim()).toBe("3");
    expect(await superCount("orders", "trading")).toBe(3);
  });

  it("forwards a CancelRequest with the upstream backend's key", async () => {
    const c = await paper.connect();
    try {
      const started = Date.now();
      const q = c.query("SELECT count(*) FROM generate_series(1, 1e10)").then(
        () => undefined,
        (e: unknown) => e as pg.DatabaseError,
      );
      await new Promise((r) => setTimeout(r, 500));
      const k = c as unknown as { processID: number; secretKey: number };
      await new Promise<void>((resolve, reject) => {
        const s = net.connect({ host: "127.0.0.1", port: paper.port }, () => {
          const b = Buffer.alloc(16);
          b.writeInt32BE(16, 0);
          b.writeInt32BE(80877102, 4);
          b.writeInt32BE(k.processID, 8);
          b.writeInt32BE(k.secretKey, 12);
          s.end(b);
        });
        s.on("close", () => resolve());
        s.on("error", reject);
      });
      const e = await q;
      expect(e?.code).toBe("57014");
      expect(e?.message).toMatch(/user request/);
      expect(Date.now() - started).toBeLessThan(5_000);
      expect((await c.query("SELECT 1 AS one")).rows[0].one).toBe(1);
    } finally {
      await c.end();
    }
  });

  it("cuts a slow allowed query off at the statement timeout", async () => {
    const quick = await startGateway("paper", { statementTimeoutMs: 1500 });
    const c = await quick.connect();
    try {
      const started = Date.now();
      const e = await refused(c, "SELECT count(*) FROM generate_series(1, 1e9)");
      const took = Date.now() - started;
      expect(e.code).toBe("57014");
      expect(took).toBeGreaterThanOrEqual(1_200);
      expect(took).toBeLessThan(5_000);
      expect((await c.query("SELECT 1 AS one")).rows[0].one).toBe(1);
    } finally {
      await c.end();
    }
    expect(quick.lines().some((l) => /\] DB_ERROR: canceling statement due to statement timeout/.test(l))).toBe(true);
  });

  it("fails closed when the audit sink fails", async () => {
    const broken = await startGateway("paper", {
      record: async () => {
        throw new Error("disk full");
      },
    });
    const c = new pg.Client({ host: "127.0.0.1", port: broken.port, user: "agent", database: "x" });
    c.on("error", () => undefined);
    await c.connect();
    await expect(c.query("SELECT 1")).rejects.toThrow();
    await c.end().catch(() => undefined);
  });

  it("reports an upstream it cannot log in to as a FATAL error", async () => {
    const bad = await startGateway("paper", {
      upstream: { host: db.host, port: db.port, user: db.gateway.user, password: "wrong", database: "trading" },
    });
    const c = new pg.Client({ host: "127.0.0.1", port: bad.port, user: "agent", database: "x" });
    await expect(c.connect()).rejects.toThrow(/sandboxd database gateway: cannot open the PostgreSQL connection/);
  });
});

describe("db gateway: large messages, COPY, QuestDB path and watchdog", () => {
  it("relays a large statement, a large row and a large COPY TO STDOUT intact", async () => {
    const gw = await startGateway("test");
    const c = await gw.connect();
    try {
      const big = "x".repeat(3_000_000);
      const r = await c.query(`SELECT length('${big}') AS n`);
      expect(r.rows[0].n).toBe(3_000_000);
      const row = await c.query("SELECT repeat('y', 5000000) AS s");
      expect(row.rows[0].s).toHaveLength(5_000_000);
      const many = await c.query("SELECT g, repeat('z', 200) AS pad FROM generate_series(1, 50000) g");
      expect(many.rowCount).toBe(50000);
      expect(many.rows[49999].g).toBe(50000);
    } finally {
      await c.end();
    }
    expect(gw.lines().some((l) => l.endsWith("DB_RESULT: 50000 rows returned"))).toBe(true);
    // psql COPY TO STDOUT (allowed in test mode), streamed through
    const env = { ...process.env, PGPASSWORD: "x" };
    const { stdout } = await run(
      "psql",
      ["-X", "-h", "127.0.0.1", "-p", String(gw.port), "-U", "agent", "-d", "x", "-c", "COPY (SELECT g, repeat('q', 100) FROM generate_series(1, 100000) g) TO STDOUT"],
      { env, maxBuffer: 64 * 1024 * 1024 },
    );
    expect(stdout.split("\n").filter(Boolean)).toHaveLength(100000);
  });

  it("relays COPY FROM STDIN in test mode", async () => {
    const gw = await startGateway("test");
    const before = await superCount("signals", "trading_test");
    const child = spawn(
      "psql",
      ["-X", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p", String(gw.port), "-U", "agent", "-d", "x", "-c", "COPY signals (symbol, value) FROM STDIN"],
      { env: { ...process.env, PGPASSWORD: "x" }, stdio: ["pipe", "pipe", "pipe"] },
    );
    let out = "";
    child.stdout.on("data", (b: Buffer) => (out += b.toString()));
    child.stderr.on("data", (b: Buffer) => (out += b.toString()));
    const rows = Array.from({ length: 2000 }, (_, i) => `SYM-${i}\t${i / 10}`).join("\n");
    child.stdin.end(`${rows}\n\\.\n`);
    const code = await new Promise<number | null>((r) => child.on("close", r));
    expect(code, out).toBe(0);
    expect(out).toMatch(/COPY 2000/);
    expect(await superCount("signals", "trading_test")).toBe(before + 2000);
    expect(gw.lines().some((l) => l.endsWith("DB_RESULT: 2000 rows returned"))).toBe(true);
  });

  it("judges QuestDB-engine statements with the QuestDB gate, records them as QuestDB, and the watchdog cancels a query the server does not time out", async () => {
    // QuestDB has no statement_timeout, so the gateway sets none upstream for engine "questdb": the watchdog is the limit
    const quest = await startGateway("paper", { engine: "questdb", statementTimeoutMs: 1000 });
    const c = await quest.connect();
    try {
      expect((await c.query("SELECT count(*)::int AS n FROM orders")).rows[0].n).toBe(3);
      const e = await refused(c, "INSERT INTO orders (symbol, side, qty, price, status) VALUES ('X', 'buy', 1, 1, 'new')");
      expect(e.code).toBe("42501");
      expect(e.message).toMatch(/db\.paper-prefix/);
      const started = Date.now();
      const slow = await refused(c, "SELECT count(*) FROM generate_series(1, 1000000000000)");
      const took = Date.now() - started;
      expect(slow.code).toBe("57014");
      expect(took).toBeGreaterThanOrEqual(2_800); // 1 s + 2 s grace
      expect(took).toBeLessThan(5_500);
      expect((await c.query("SELECT 1 AS one")).rows[0].one).toBe(1);
    } finally {
      await c.end();
    }
    expect(quest.lines().some((l) => /\] DB_QUERY \[QuestDB\]: SELECT count\(\*\)::int AS n FROM orders$/.test(l))).toBe(true);
    expect(await superCount("orders", "trading")).toBe(3);
  });
});

/** A raw wire-protocol client: enough to send what pg and psql never do. */
class RawClient {
  private buf = Buffer.alloc(0);
  private wake: (() => void) | undefined;
  constructor(readonly sock: net.Socket) {
    sock.on("data", (b: Buffer) => {
      this.buf = Buffer.concat([this.buf, b]);
      this.wake?.();
    });
    sock.on("close", () => this.wake?.());
  }
  static async open(port: number): Promise<RawClient> {
    const sock = net.connect({ host: "127.0.0.1", port });
    await new Promise<void>((r, j) => sock.once("connect", r).once("error", j));
    return new RawClient(sock);
  }
  private async need(n: number): Promise<void> {
    while (this.buf.length < n) {
      if (this.sock.destroyed) throw new Error("closed");
      await new Promise<void>((r) => (this.wake = r));
    }
  }
  async byte(): Promise<string> {
    await this.need(1);
    const c = String.fromCharCode(this.buf[0]!);
    this.buf = this.buf.subarray(1);
    return c;
  }
  async message(): Promise<{ type: string; body: Buffer }> {
    await this.need(5);
    const total = this.buf.readInt32BE(1) + 1;
    await this.need(total);
    const m = { type: String.fromCharCode(this.buf[0]!), body: this.buf.subarray(5, total) };
    this.buf = this.buf.subarray(total);
    return m;
  }
  /** message types up to and including the next ReadyForQuery; ErrorResponse SQLSTATEs inline as E:<code> */
  async untilReady(): Promise<string[]> {
    const out: string[] = [];
    for (;;) {
      const m = await this.message();
      if (m.type === "E") {
        const i = m.body.indexOf(Buffer.from("C42501"));
        out.push(i >= 0 ? "E:42501" : `E:${/C([0-9A-Z]{5})/.exec(m.body.toString("latin1"))?.[1]}`);
      } else out.push(m.type);
      if (m.type === "Z") return out;
    }
  }
}

const frame = (type: string, body: Buffer): Buffer => {
  const h = Buffer.alloc(5);
  h.write(type, 0, "latin1");
  h.writeInt32BE(body.length + 4, 1);
  return Buffer.concat([h, body]);
};
const q = (sql: string): Buffer => frame("Q", Buffer.from(`${sql}\0`));
/** the extended protocol's Parse/Bind/Execute/Sync of an unnamed statement without parameters */
const extended = (sql: string): Buffer =>
  Buffer.concat([
    frame("P", Buffer.concat([Buffer.from(`\0${sql}\0`), Buffer.from([0, 0])])),
    frame("B", Buffer.from([0, 0, 0, 0, 0, 0, 0, 0])), // portal "", statement "", no formats, no parameters, no result formats
    frame("E", Buffer.from([0, 0, 0, 0, 0])), // portal "", no row limit
    frame("S", Buffer.alloc(0)),
  ]);
const startup = (): Buffer => {
  const params = Buffer.from("user\0agent\0database\0x\0\0");
  const head = Buffer.alloc(8);
  head.writeInt32BE(8 + params.length, 0);
  head.writeInt32BE(196608, 4);
  return Buffer.concat([head, params]);
};

describe("db gateway on the wire", () => {
  it("answers SSLRequest with N, ignores startup options, refuses FunctionCall and keeps pipelined answers in order", async () => {
    const gw = await startGateway("paper");
    const c = await RawClient.open(gw.port);
    try {
      const ssl = Buffer.alloc(8);
      ssl.writeInt32BE(8, 0);
      ssl.writeInt32BE(80877103, 4);
      c.sock.write(ssl);
      expect(await c.byte()).toBe("N");
      const params = Buffer.from("user\0postgres\0database\0trading_test\0options\0-c default_transaction_read_only=off\0\0");
      const start = Buffer.alloc(8);
      start.writeInt32BE(8 + params.length, 0);
      start.writeInt32BE(196608, 4);
      c.sock.write(Buffer.concat([start, params]));
      const startup = await c.untilReady();
      expect(startup[0]).toBe("R");
      expect(startup).toContain("K");
      // FunctionCall (pg_sleep's OID would do; any OID is refused)
      const f = Buffer.alloc(12);
      f.writeInt32BE(2626, 0); // function OID
      f.writeInt16BE(0, 4); // no argument formats
      f.writeInt16BE(0, 6); // no arguments
      f.writeInt16BE(0, 8); // result format
      c.sock.write(frame("F", f.subarray(0, 10)));
      expect(await c.untilReady()).toEqual(["E:42501", "Z"]);
      // pipelined: refused, allowed, refused, allowed in one write
      c.sock.write(Buffer.concat([q("DELETE FROM orders"), q("SELECT count(*) FROM orders"), q("UPDATE orders SET qty = 0"), q("SHOW default_transaction_read_only")]));
      expect(await c.untilReady()).toEqual(["E:42501", "Z"]);
      expect(await c.untilReady()).toEqual(["T", "D", "C", "Z"]);
      expect(await c.untilReady()).toEqual(["E:42501", "Z"]);
      const show = await c.untilReady();
      expect(show).toEqual(["T", "D", "C", "Z"]);
      c.sock.write(frame("X", Buffer.alloc(0)));
      await new Promise((r) => c.sock.once("close", r));
    } finally {
      c.sock.destroy();
    }
    expect(await superCount("orders", "trading")).toBe(3);
    expect(gw.records.some((r) => r.event.type === "db.query" && r.event.via === "function-call" && r.event.rule === "db.function-call")).toBe(true);
  });
});

describe("db gateway: a chunk's messages are judged, recorded and forwarded together", () => {
  it("answers a pipelined chunk of allowed and refused statements (simple and extended, with a paper write) in order, records them in order, and changes only paper_orders", async () => {
    const gw = await startGateway("paper");
    const paperBefore = await superCount("paper_orders", "trading");
    const statements = [
      "SELECT count(*) FROM orders WHERE id = 1",
      "DELETE FROM orders WHERE id = 1",
      "INSERT INTO paper_orders (symbol, side, qty, price, status) VALUES ('PIPE-USD', 'buy', 1, 1, 'new')",
      "SELECT count(*) FROM orders WHERE id = 2",
      "UPDATE orders SET qty = 0",
      "SELECT 42",
    ];
    const c = await RawClient.open(gw.port);
    try {
      c.sock.write(startup());
      await c.untilReady();
      // one write: simple queries, then two extended batches (one refused), then a simple query
      c.sock.write(
        Buffer.concat([q(statements[0]!), q(statements[1]!), q(statements[2]!), extended(statements[3]!), extended(statements[4]!), q(statements[5]!)]),
      );
      expect(await c.untilReady()).toEqual(["T", "D", "C", "Z"]);
      expect(await c.untilReady()).toEqual(["E:42501", "Z"]);
      expect(await c.untilReady()).toEqual(["C", "Z"]);
      expect(await c.untilReady()).toEqual(["1", "2", "D", "C", "Z"]); // no Describe: no RowDescription
      expect(await c.untilReady()).toEqual(["E:42501", "Z"]);
      expect(await c.untilReady()).toEqual(["T", "D", "C", "Z"]);
      c.sock.write(frame("X", Buffer.alloc(0)));
      await new Promise((r) => c.sock.once("close", r));
    } finally {
      c.sock.destroy();
    }
    expect(await superCount("orders", "trading")).toBe(3);
    expect(Number((await db.psql("SELECT qty FROM orders WHERE id = 1", "trading")).trim())).not.toBe(0);
    expect(await superCount("paper_orders", "trading")).toBe(paperBefore + 1);
    // every statement recorded, in the order sent, each before its result
    const queries = gw.records.filter((r) => r.event.type === "db.query");
    expect(queries.map((r) => r.event.sql)).toEqual(statements);
    expect(queries.map((r) => r.event.decision)).toEqual(["allow", "forbid", "allow", "allow", "forbid", "allow"]);
    const kinds = gw.records.map((r) => (r.event.type === "db.result" ? `result:${r.event.command}` : r.event.type));
    // DB_QUERY of a statement always comes before its DB_RESULT
    for (const [i, sql] of statements.entries()) {
      const at = gw.records.findIndex((r) => r.event.sql === sql);
      expect(at, sql).toBeGreaterThanOrEqual(0);
      if (i === 2) expect(kinds.indexOf("result:INSERT 0 1")).toBeGreaterThan(at);
    }
    expect(kinds.filter((k) => k.startsWith("result:"))).toEqual(["result:SELECT 1", "result:INSERT 0 1", "result:SELECT 1", "result:SELECT 1"]);
    expect(gw.lines().some((l) => l.includes("SESSION CHARACTERISTICS"))).toBe(false);
  });

  it("batches a chunk's records into one recordMany call when the sink offers one", async () => {
    const batches: number[] = [];
    const gw = await startGateway("test", {
      recordMany: async (entries) => {
        batches.push(entries.length);
      },
    });
    const c = await RawClient.open(gw.port);
    try {
      c.sock.write(startup());
      await c.untilReady();
      c.sock.write(Buffer.concat([q("SELECT 1"), q("SELECT 2"), q("SELECT 3")]));
      for (let i = 0; i < 3; i++) expect(await c.untilReady()).toEqual(["T", "D", "C", "Z"]);
    } finally {
      c.sock.destroy();
    }
    // the three statements were recorded together; `record` was not used
    expect(batches[0]).toBe(3);
    expect(gw.records).toHaveLength(0);
  });

  it("forwards nothing of a chunk whose records fail, and closes the connection", async () => {
    await db.psql("CREATE TABLE batch_t (v text); GRANT SELECT, INSERT ON batch_t TO sandboxd_gw", "trading_test");
    let calls = 0;
    const kept: string[] = [];
    const gw = await startGateway("test", {
      record: async (event) => {
        calls++;
        if (event.type === "db.query" && String(event.sql).includes("'second'")) throw new Error("disk full");
        kept.push(String(event.sql ?? event.type));
      },
    });
    const c = await RawClient.open(gw.port);
    try {
      c.sock.write(startup());
      await c.untilReady();
      // an earlier chunk goes through
      c.sock.write(q("INSERT INTO batch_t VALUES ('first')"));
      expect(await c.untilReady()).toEqual(["C", "Z"]);
      // the sink fails on the middle record of this chunk
      c.sock.write(Buffer.concat([q("INSERT INTO batch_t VALUES ('a')"), q("INSERT INTO batch_t VALUES ('second')"), q("INSERT INTO batch_t VALUES ('c')")]));
      await new Promise((r) => (c.sock.destroyed ? r(undefined) : c.sock.once("close", r)));
    } finally {
      c.sock.destroy();
    }
    expect(calls).toBeGreaterThanOrEqual(3);
    expect((await db.psql("SELECT string_agg(v, ',' ORDER BY v) FROM batch_t", "trading_test")).trim()).toBe("first");
  });
});

describe("db gateway: upstream over the server's unix socket", () => {
  it("connects through <dir>/.s.PGSQL.<port> when the upstream host is a directory, and still judges and records", async () => {
    const gw = await startGateway("paper", {
      upstream: { host: db.socketDir, port: db.port, user: db.gateway.user, password: "", database: "trading" },
    });
    const c = await gw.connect();
    try {
      expect((await c.query("SELECT count(*)::int AS n FROM orders")).rows[0].n).toBe(3);
      expect((await c.query("SELECT current_user AS u, inet_server_addr() AS a")).rows[0]).toEqual({ u: "sandboxd_gw", a: null });
      expect((await refused(c, "DELETE FROM orders")).code).toBe("42501");
    } finally {
      await c.end();
    }
    expect(await superCount("orders", "trading")).toBe(3);
    expect(gw.lines().some((l) => l.endsWith("DB_QUERY [PostgreSQL]: DELETE FROM orders"))).toBe(true);
  });
});

describe("rowsFromTag", () => {
  it("reads the row count of CommandComplete tags", () => {
    expect(rowsFromTag("SELECT 3")).toBe(3);
    expect(rowsFromTag("INSERT 0 7")).toBe(7);
    expect(rowsFromTag("UPDATE 2")).toBe(2);
    expect(rowsFromTag("COPY 5")).toBe(5);
    expect(rowsFromTag("CREATE TABLE")).toBe(0);
  });
});

describe("db gateway: paper-mode elevation in the extended protocol (raw wire, real PostgreSQL)", () => {
  const parse = (name: string, sql: string): Buffer => frame("P", Buffer.concat([Buffer.from(`${name}\0${sql}\0`), Buffer.from([0, 0])]));
  const bind = (stmt: string): Buffer => frame("B", Buffer.concat([Buffer.from(`\0${stmt}\0`), Buffer.from([0, 0, 0, 0, 0, 0])]));
  const execute = (): Buffer => frame("E", Buffer.from([0, 0, 0, 0, 0]));
  const sync = (): Buffer => frame("S", Buffer.alloc(0));
  const INSERT = "INSERT INTO paper_orders (symbol, side, qty, price, status) VALUES ('EXT-USD', 'buy', 1, 1, 'new')";
  let gw: Gateway;
  let before: string;

  beforeAll(async () => {
    await db.psql(
      `CREATE OR REPLACE FUNCTION cancel_pending_orders() RETURNS int LANGUAGE sql SECURITY DEFINER AS
         $$ WITH c AS (UPDATE orders SET status = 'cancelled' WHERE status = 'pending' RETURNING 1) SELECT count(*)::int FROM c $$`,
      "trading",
    );
    gw = await startGateway("paper");
    before = await db.psql("SELECT id, status FROM orders ORDER BY id", "trading");
  });

  const open = async (): Promise<RawClient> => {
    const c = await RawClient.open(gw.port);
    c.sock.write(startup());
    await c.untilReady();
    return c;
  };

  it("refuses any other statement in an elevated batch, so the batch rolls back whole", async () => {
    const paperBefore = await superCount("paper_orders", "trading");
    const c = await open();
    try {
      c.sock.write(Buffer.concat([parse("", INSERT), bind(""), execute(), parse("", "SELECT cancel_pending_orders()"), bind(""), execute(), sync()]));
      expect(await c.untilReady()).toEqual(["1", "2", "C", "E:42501", "Z"]);
      // a named read parsed earlier cannot be bound into an elevated batch either
      c.sock.write(Buffer.concat([parse("s_cancel", "SELECT cancel_pending_orders()"), sync()]));
      expect(await c.untilReady()).toEqual(["1", "Z"]);
      c.sock.write(Buffer.concat([parse("", INSERT), bind(""), execute(), bind("s_cancel"), execute(), sync()]));
      expect(await c.untilReady()).toEqual(["1", "2", "C", "E:42501", "Z"]);
      c.sock.write(q("SHOW default_transaction_read_only"));
      expect(await c.untilReady()).toEqual(["T", "D", "C", "Z"]);
    } finally {
      c.sock.destroy();
    }
    expect(await db.psql("SELECT id, status FROM orders ORDER BY id", "trading")).toBe(before);
    expect(await superCount("paper_orders", "trading")).toBe(paperBefore);
    expect(gw.records.filter((r) => r.event.rule === "db.paper-elevation").map((r) => r.event.sql)).toEqual([
      "SELECT cancel_pending_orders()",
      '<Bind of statement "s_cancel" in an elevated batch>',
    ]);
  });

  it("closes the connection when a simple Query arrives inside an elevated batch", async () => {
    const c = await open();
    try {
      c.sock.write(Buffer.concat([parse("", INSERT), bind(""), execute(), q("SELECT cancel_pending_orders()")]));
      await new Promise((r) => c.sock.once("close", r));
    } finally {
      c.sock.destroy();
    }
    expect(await db.psql("SELECT id, status FROM orders ORDER BY id", "trading")).toBe(before);
    expect(gw.records.some((r) => r.event.type === "db.session" && /simple Query arrived inside an elevated extended batch/.test(String(r.event.reason)))).toBe(true);
  });

  it("cuts an extended batch held open without Sync (an implicit transaction holding a lock on orders) at the bound", async () => {
    const bounded = await startGateway("paper", { maxTransactionMs: 1_500 });
    const c = await RawClient.open(bounded.port);
    const t0 = Date.now();
    try {
      c.sock.write(startup());
      await c.untilReady();
      c.sock.write(Buffer.concat([parse("", "SELECT id FROM orders LIMIT 1"), bind(""), execute(), frame("H", Buffer.alloc(0))]));
      const locks = async () => Number((await db.psql("SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation WHERE c.relname = 'orders' AND l.pid <> pg_backend_pid()", "trading")).trim());
      await new Promise((r) => setTimeout(r, 300));
      expect(await locks()).toBeGreaterThan(0); // the batch's implicit transaction holds AccessShareLock on orders
      await new Promise((r) => c.sock.once("close", r));
      expect(Date.now() - t0).toBeLessThan(4_000);
      for (let i = 0; i < 20 && (await locks()) > 0; i++) await new Promise((r) => setTimeout(r, 100));
      expect(await locks()).toBe(0);
    } finally {
      c.sock.destroy();
    }
    expect(bounded.records.find((r) => r.event.type === "db.timeout")?.event).toMatchObject({ action: "drop", reason: "transaction" });
  });

  it("does not elevate a name a SQL PREPARE gave new content after it was parsed as a paper write", async () => {
    const c = await open();
    try {
      c.sock.write(Buffer.concat([parse("w", INSERT), sync()]));
      expect(await c.untilReady()).toEqual(["1", "Z"]);
      c.sock.write(q("DEALLOCATE w"));
      expect(await c.untilReady()).toEqual(["C", "Z"]);
      c.sock.write(q("PREPARE w AS SELECT cancel_pending_orders()"));
      expect(await c.untilReady()).toEqual(["C", "Z"]);
      c.sock.write(Buffer.concat([bind("w"), execute(), sync()]));
      expect(await c.untilReady()).toEqual(["2", "E:25006", "Z"]);
    } finally {
      c.sock.destroy();
    }
    expect(await db.psql("SELECT id, status FROM orders ORDER BY id", "trading")).toBe(before);
  });
});
