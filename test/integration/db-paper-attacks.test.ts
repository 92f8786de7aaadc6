/**
 * The paper-mode wall, attacked from inside a real sandbox: a real daemon, a
 * real phase container (paper mode: DATABASE_URL is production, `trading`),
 * psycopg2 in the container talking through the tunnel and the SQL gateway to
 * a real PostgreSQL 15 with the grants docs/DATABASE.md recommends, plus what
 * an ordinary trading application has: a SECURITY DEFINER function that
 * cancels pending orders (as the attacker used), a view over it, and
 * an operator's mistake — a view named paper_… over `orders` with write grants.
 *
 * Each attack asserts that production is unchanged (read as the superuser,
 * from outside) and that the audit trail says why.
 */
import { chown, readFile, writeFile } from "node:fs/promises";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { ExecResult } from "../../src/phases/manager.js";
import type { PhaseView } from "../../src/phases/types.js";
import { GATEWAY_ROLE, startPostgres, type TestPostgres } from "../helpers/postgres.js";
import {
  OWNER,
  ROOT,
  makeProject,
  removeDir,
  requireEngineAndImage,
  startTestDaemon,
  tempDir,
  writeScript,
  type TestDaemon,
  auditEvents,
} from "../helpers/sandbox.js";

let t: TestDaemon;
let db: TestPostgres;
const cleanup: string[] = [];

/** what an ordinary trading application has in production, and an operator's mistake (paper_view) */
const APPLICATION = `
CREATE FUNCTION cancel_pending_orders() RETURNS int LANGUAGE sql SECURITY DEFINER AS
  $$ WITH c AS (UPDATE orders SET status = 'cancelled' WHERE status = 'pending' RETURNING 1) SELECT count(*)::int FROM c $$;
CREATE FUNCTION order_summary() RETURNS int LANGUAGE sql AS $$ SELECT cancel_pending_orders() $$;
CREATE VIEW pending_cancel AS SELECT cancel_pending_orders() AS n;
CREATE VIEW paper_view AS SELECT * FROM orders;
GRANT SELECT, INSERT, UPDATE, DELETE ON paper_view TO ${GATEWAY_ROLE};
GRANT SELECT ON pending_cancel TO ${GATEWAY_ROLE};
CREATE TABLE paper_fills (id serial PRIMARY KEY, qty numeric);
CREATE FUNCTION paper_fills_trigger() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER AS
  $$ BEGIN PERFORM cancel_pending_orders(); RETURN NEW; END $$;
CREATE TRIGGER paper_fills_cancel AFTER INSERT ON paper_fills FOR EACH ROW EXECUTE FUNCTION paper_fills_trigger();
GRANT INSERT, SELECT ON paper_fills TO ${GATEWAY_ROLE};
CREATE TABLE paper_defaults (id int, note text DEFAULT cancel_pending_orders()::text);
CREATE DOMAIN checked_qty AS numeric CHECK (cancel_pending_orders() >= 0);
CREATE TABLE paper_domains (id int, qty checked_qty);
GRANT INSERT, SELECT ON paper_defaults, paper_domains TO ${GATEWAY_ROLE};
GRANT USAGE ON SEQUENCE paper_fills_id_seq TO ${GATEWAY_ROLE};
`;

beforeAll(async () => {
  await requireEngineAndImage();
  db = await startPostgres();
  await db.psql(APPLICATION, "trading");
  // a short query timeout: the gateway bounds a transaction block at twice it (6 s here)
  const base = await readFile(path.join(ROOT, "policies", "default.yaml"), "utf8");
  const short = base.replace(/(statementTimeoutMs:\n(?:.*\n){2}\s+value:) 30s/, "$1 3s");
  expect(short).not.toBe(base);
  const dir = await tempDir("attack-policy");
  cleanup.push(dir);
  await writeFile(path.join(dir, "policy.yaml"), short);
  t = await startTestDaemon({ policy: path.join(dir, "policy.yaml") });
}, 180_000);

afterAll(async () => {
  await t?.close();
  await db?.stop();
  for (const d of cleanup) await removeDir(d);
});

async function pgProject(): Promise<string> {
  const project = await makeProject();
  cleanup.push(project);
  const gw = `${db.gateway.user}:${encodeURIComponent(db.gateway.password)}@127.0.0.1:${db.port}`;
  await writeFile(path.join(project, ".env"), `DATABASE_URL=postgresql://${gw}/trading\nDATABASE_URL_TEST=postgresql://${gw}/trading_test\n`);
  await chown(path.join(project, ".env"), OWNER.uid, OWNER.gid);
  return project;
}

async function exec(phase: PhaseView, argv: string[]): Promise<ExecResult> {
  return (await t.api.request<{ result: ExecResult }>("POST", `/v1/phases/${phase.id}/exec`, { argv })).result;
}

async function journal(phaseId: string): Promise<Array<Record<string, any>>> {
  return (await auditEvents<Record<string, any>>(t.stateDir)).filter((e) => e.phase === phaseId);
}

const production = async (): Promise<string> => db.psql("SELECT id, status FROM orders ORDER BY id", "trading");

/**
 * Runs each attack on its own psycopg2 connection (autocommit: one simple
 * Query per execute, as the attacker sent them) and reports, per
 * step, "ok <rows>" or "error <sqlstate> <first line>", or "closed" when the
 * gateway closed the connection.
 */
const ATTACKS = String.raw`
import json, os, psycopg2
URL = os.environ["DATABASE_URL"]
INS = "INSERT INTO paper_orders (symbol, side, qty, price, status) VALUES ('ATK', 'buy', 1, 1, 'new')"
attacks = {
  "mixed": [INS + "; SELECT cancel_pending_orders()", "SELECT cancel_pending_orders()"],
  "begin-rollback": [ "BEGIN; " + INS, "ROLLBACK", "SELECT cancel_pending_orders()"],
  "begin-separate": [ "BEGIN", INS, "ROLLBACK", "SELECT cancel_pending_orders()"],
  "div-zero": [INS + "; SELECT 1/0", "SELECT cancel_pending_orders()"],
  "trailing-begin": [INS + "; BEGIN", "SELECT cancel_pending_orders()"],
  "function-in-write": ["INSERT INTO paper_orders (symbol, side, qty, price, status) SELECT 'ATK', 'buy', 1, 1, cancel_pending_orders()::text", "SHOW default_transaction_read_only"],
  "wrapped-function": ["INSERT INTO paper_orders (symbol, side, qty, price, status) SELECT 'ATK', 'buy', 1, 1, order_summary()::text"],
  "view-read-in-write": ["INSERT INTO paper_orders (symbol, side, qty, price, status) SELECT 'ATK', 'buy', 1, 1, n::text FROM pending_cancel"],
  "temp-view": ["CREATE TEMP VIEW paper_v AS SELECT * FROM orders", "UPDATE paper_v SET status = 'cancelled'"],
  "view": ["CREATE VIEW paper_v2 AS SELECT * FROM orders"],
  "matview": ["CREATE MATERIALIZED VIEW paper_mv AS SELECT * FROM orders"],
  "operator-view": ["UPDATE paper_view SET status = 'cancelled' WHERE status = 'pending'", "DELETE FROM paper_view"],
  "trigger": ["INSERT INTO paper_fills (qty) VALUES (1)"],
  "default": ["INSERT INTO paper_defaults (id) VALUES (1)"],
  "domain": ["INSERT INTO paper_domains (id, qty) VALUES (1, 1)"],
  "settings": [
    "SET idle_in_transaction_session_timeout = 0", "SET idle_session_timeout = 0", "SET lock_timeout = 0",
    "SET work_mem = '2GB'", "SET hash_mem_multiplier = 100", "SET max_parallel_workers_per_gather = 64",
    "SET application_name = 'trading-engine'", "SET SESSION application_name TO 'sandboxd-gateway2'",
    "SELECT application_name FROM pg_stat_activity WHERE pid = pg_backend_pid()",
    "SET search_path = public", "SET TIME ZONE 'UTC'",
  ],
  "legit": [INS, "SELECT cancel_pending_orders()", "SHOW default_transaction_read_only", "SELECT count(*) FROM paper_orders WHERE symbol = 'ATK'"],
}
out = {}
for name, steps in attacks.items():
    conn = psycopg2.connect(URL)
    conn.autocommit = True
    cur = conn.cursor()
    res = []
    for sql in steps:
        if conn.closed:
            res.append("closed")
            continue
        try:
            cur.execute(sql)
            rows = cur.fetchall() if cur.description else []
            res.append("ok %s" % json.dumps(rows, default=str))
        except psycopg2.OperationalError as e:
            res.append("closed " + str(e).splitlines()[0] if str(e) else "closed")
        except psycopg2.Error as e:
            res.append("error %s %s" % (e.pgcode, str(e).splitlines()[0]))
    out[name] = res
    try:
        conn.close()
    except Exception:
        pass
print(json.dumps(out))
`;

describe("paper mode: production stays read-only for the whole session (attacks from a real sandbox)", () => {
  let out: Record<string, string[]>;
  let records: Array<Record<string, any>>;
  let before: string;
  let paperBefore: number;

  beforeAll(async () => {
    before = await production();
    expect(before).toMatch(/\|pending/);
    paperBefore = Number((await db.psql("SELECT count(*) FROM paper_orders WHERE symbol = 'ATK'", "trading")).trim());
    const project = await pgProject();
    const { phase } = await t.api.request<{ phase: PhaseView }>("POST", "/v1/phases", { project, phase: "attack", mode: "paper" });
    const r = await exec(phase, ["python3", await writeScript(project, ATTACKS)]);
    expect(r.stderr).toBe("");
    out = JSON.parse(r.stdout) as Record<string, string[]>;
    await t.api.request("DELETE", `/v1/phases/${phase.id}`);
    records = await journal(phase.id);
  }, 180_000);

  const refusedBy = (sqlPart: string) => records.find((e) => e.type === "db.query" && String(e.sql).includes(sqlPart) && e.decision !== "allow");

  it("leaves every production row as it was", async () => {
    expect(await production()).toBe(before);
  });

  it("refuses a paper write mixed with anything else as a whole, and the mixed-in SELECT alone fails read-only", () => {
    for (const name of ["mixed", "div-zero", "trailing-begin", "begin-rollback"]) {
      expect(out[name]![0], name).toMatch(/^error 42501 sandboxd refused this statement: db\.paper-elevation/);
      expect(out[name]!.at(-1), name).toMatch(/^error 25006 .*read-only transaction/);
    }
    expect(refusedBy("; SELECT cancel_pending_orders()")).toMatchObject({ decision: "forbid", rule: "db.paper-elevation", reason: expect.stringMatching(/mixes a paper write with another statement \(select\)/) });
    expect(refusedBy("; BEGIN")).toMatchObject({ rule: "db.paper-elevation", reason: expect.stringMatching(/\(transaction\)/) });
  });

  it("never elevates inside a transaction block: BEGIN, then the paper write, is refused; after ROLLBACK the session is still read-only", () => {
    expect(out["begin-separate"]).toEqual([
      "ok []",
      expect.stringMatching(/^error 42501 .*db\.paper-elevation.*outside a transaction block/),
      "ok []",
      expect.stringMatching(/^error 25006 .*read-only transaction/),
    ]);
    expect(records.find((e) => e.type === "db.query" && e.rule === "db.paper-elevation" && /outside a transaction block/.test(e.reason))).toMatchObject({
      decision: "forbid",
      sql: expect.stringMatching(/^INSERT INTO paper_orders/),
    });
  });

  it("runs a write read-only when it calls an application function, directly, wrapped, or through a view it reads", () => {
    expect(out["function-in-write"]).toEqual([expect.stringMatching(/^error 25006 .*read-only transaction/), 'ok [["on"]]']);
    expect(out["wrapped-function"]![0]).toMatch(/^error 25006 /);
    expect(out["view-read-in-write"]![0]).toMatch(/^error 25006 /);
    const why = records.filter((e) => e.type === "db.elevation").map((e) => e.reason as string);
    expect(why.filter((r) => /the statement calls a function defined outside pg_catalog/.test(r))).toHaveLength(2);
    expect(why.filter((r) => /reads a view or foreign table/.test(r))).toHaveLength(1);
  });

  it("refuses views named paper_… at the classifier, and never writes through one the operator made", () => {
    expect(out["temp-view"]![0]).toMatch(/^error 42501 .*db\.paper-prefix.*a view named `paper_…`/);
    expect(out.view![0]).toMatch(/^error 42501 .*db\.paper-prefix/);
    expect(out.matview![0]).toMatch(/^error 42501 .*db\.paper-prefix/);
    for (const sql of ["CREATE TEMP VIEW paper_v", "CREATE VIEW paper_v2", "CREATE MATERIALIZED VIEW paper_mv"]) {
      expect(refusedBy(sql), sql).toMatchObject({ decision: "forbid", rule: "db.paper-prefix", reason: expect.stringMatching(/paper names are for ordinary tables only/) });
    }
    expect(out["operator-view"]).toEqual([expect.stringMatching(/^error 25006 /), expect.stringMatching(/^error 25006 /)]);
    expect(records.filter((e) => e.type === "db.elevation" && /not an ordinary table/.test(e.reason)).length).toBeGreaterThanOrEqual(3); // paper_v (refused view write), paper_view ×2, paper_fills
  });

  it("does not elevate a write to a paper table whose trigger, column default or column domain runs other code", () => {
    expect(out.trigger![0]).toMatch(/^error 25006 /);
    expect(out.default![0]).toMatch(/^error 25006 /);
    expect(out.domain![0]).toMatch(/^error 25006 /);
    expect(records.filter((e) => e.type === "db.elevation" && /column default, check or domain constraint/.test(e.reason))).toHaveLength(2);
  });

  it("refuses every setting outside the allowlist, so application_name still names the gateway", () => {
    const s = out.settings!;
    for (let i = 0; i < 8; i++) expect(s[i], s[i]).toMatch(/^error 42501 .*db\.protected-setting/);
    expect(s[8]).toBe('ok [["sandboxd-gateway"]]');
    expect(s.slice(9)).toEqual(["ok []", "ok []"]);
    expect(refusedBy("SET work_mem")).toMatchObject({ rule: "db.protected-setting", reason: expect.stringMatching(/client formats and name resolution/) });
  });

  it("still runs a paper write alone, and the session is read-only again right after it", async () => {
    expect(out.legit).toEqual(["ok []", expect.stringMatching(/^error 25006 /), 'ok [["on"]]', `ok [[${paperBefore + 1}]]`]);
    expect(Number((await db.psql("SELECT count(*) FROM paper_orders WHERE symbol = 'ATK'", "trading")).trim())).toBe(paperBefore + 1);
    // no gateway statement failed: nothing was closed
    expect(records.filter((e) => e.type === "db.session")).toEqual([]);
  });
});

describe("paper mode: a transaction block is bounded whatever the client does", () => {
  it("cuts a session holding a transaction open on orders past 2 × the query timeout, so an exclusive lock on the host waits no longer", async () => {
    const project = await pgProject();
    const { phase } = await t.api.request<{ phase: PhaseView }>("POST", "/v1/phases", { project, phase: "holder", mode: "paper" });
    const script = await writeScript(
      project,
      [
        "import json, os, time, psycopg2",
        "conn = psycopg2.connect(os.environ['DATABASE_URL'])", // not autocommit: psycopg2 opens a block
        "cur = conn.cursor()",
        "t0 = time.monotonic()",
        "out = {}",
        "try:",
        "    cur.execute('SELECT * FROM orders LIMIT 1')",
        "    while time.monotonic() - t0 < 20:",
        "        time.sleep(1)",
        "        cur.execute('SELECT 1')", // never idle for long
        "    out['result'] = 'held 20 s'",
        "except psycopg2.Error as e:",
        "    out['result'] = 'cut: %s' % str(e).splitlines()[0]",
        "out['secs'] = time.monotonic() - t0",
        "print(json.dumps(out))",
      ].join("\n"),
    );
    const running = exec(phase, ["python3", script]);
    await new Promise((r) => setTimeout(r, 2_500));
    const t0 = Date.now();
    await db.psql("SET lock_timeout = '15s'; BEGIN; LOCK TABLE orders IN ACCESS EXCLUSIVE MODE; COMMIT;", "trading");
    const waited = Date.now() - t0;
    const r = await running;
    expect(r.stderr).toBe("");
    const out = JSON.parse(r.stdout) as { result: string; secs: number };
    expect(out.result).toMatch(/^cut: /);
    expect(out.secs).toBeGreaterThan(5.5);
    expect(out.secs).toBeLessThan(9);
    expect(waited).toBeLessThan(8_000);
    await t.api.request("DELETE", `/v1/phases/${phase.id}`);
    const rec = (await journal(phase.id)).find((e) => e.type === "db.timeout");
    expect(rec).toMatchObject({ action: "drop", reason: "transaction", database: "trading" });
    expect(await readFile(phase.buildLog, "utf8")).toMatch(/DB_ERROR: transaction block open for \d+ ms \(bound 6000 ms\); connection cut/);
  }, 90_000);
});

describe("SQL approvals from a real sandbox", () => {
  it("DROP TABLE queues an approval naming itself; once a human approves, the same statement runs once; a denial stays", async () => {
    const project = await pgProject();
    const { phase } = await t.api.request<{ phase: PhaseView }>("POST", "/v1/phases", { project, phase: "migrate", mode: "test" });
    const script = await writeScript(
      project,
      [
        "import json, os, sys, psycopg2",
        "conn = psycopg2.connect(os.environ['DATABASE_URL_TEST'])",
        "conn.autocommit = True",
        "cur = conn.cursor()",
        "if sys.argv[1] == 'create':",
        "    cur.execute('CREATE TABLE scratch_t (a int)')",
        "try:",
        "    cur.execute('DROP TABLE scratch_t')",
        "    print(json.dumps({'result': 'dropped'}))",
        "except psycopg2.Error as e:",
        "    print(json.dumps({'result': 'refused', 'message': e.pgerror, 'hint': e.diag.message_hint}))",
      ].join("\n"),
    );
    const first = JSON.parse((await exec(phase, ["python3", script, "create"])).stdout) as { result: string; message: string; hint: string };
    expect(first.result).toBe("refused");
    const id = /approval (ap_[0-9a-f]+) is pending/.exec(first.message)?.[1];
    expect(id, first.message).toBeDefined();
    expect(first.hint).toContain(`sandboxd approvals approve ${id}`);
    expect((await db.psql("SELECT to_regclass('scratch_t') IS NOT NULL", "trading_test")).trim()).toBe("t");
    const { approvals } = await t.api.request<{ approvals: Array<Record<string, unknown>> }>("GET", `/v1/approvals?phase=${phase.id}`);
    expect(approvals).toEqual([expect.objectContaining({ id, sql: "DROP TABLE scratch_t", argv: null, command: null, ruleId: "db.schema-safety", state: "pending" })]);

    await t.api.request("POST", `/v1/approvals/${id}/approve`, { note: "fixture cleanup" });
    expect(JSON.parse((await exec(phase, ["python3", script, "again"])).stdout)).toEqual({ result: "dropped" });
    expect((await db.psql("SELECT to_regclass('scratch_t') IS NULL", "trading_test")).trim()).toBe("t");
    // once: the next identical statement asks again
    const third = JSON.parse((await exec(phase, ["python3", script, "create"])).stdout) as { result: string; message: string };
    expect(third.result).toBe("refused");
    expect(third.message).not.toContain(id!);
    // a denial reaches the agent, with the person's note, and stays
    const id3 = /approval (ap_[0-9a-f]+) is pending/.exec(third.message)?.[1];
    await t.api.request("POST", `/v1/approvals/${id3}/deny`, { note: "migrations go through review" });
    for (let i = 0; i < 2; i++) {
      const denied = JSON.parse((await exec(phase, ["python3", script, "again"])).stdout) as { result: string; message: string; hint: string };
      expect(denied.result).toBe("refused");
      expect(denied.message).toContain(`approval ${id3} was denied: migrations go through review`);
      expect(denied.hint).toMatch(/do not send it again/);
    }
    expect((await t.api.request<{ approvals: unknown[] }>("GET", `/v1/approvals?phase=${phase.id}`)).approvals).toEqual([]);

    await t.api.request("DELETE", `/v1/phases/${phase.id}`);
    const recs = await journal(phase.id);
    expect(recs.find((e) => e.type === "approval.request" && e.approval === id)).toMatchObject({ sql: "DROP TABLE scratch_t", rule: "db.schema-safety" });
    expect(recs.filter((e) => e.type === "db.query" && e.sql === "DROP TABLE scratch_t").map((e) => [e.decision, e.approval, e.approvalState])).toEqual([
      ["ask", id, "pending"],
      ["allow", id, "approved"],
      ["ask", id3, "pending"],
      ["ask", id3, "denied"],
      ["ask", id3, "denied"],
    ]);
  }, 120_000);
});

/**
 * Raw extended protocol from the sandbox: a Parse of a paper write under a
 * statement name the server already holds fails there ("already exists"),
 * so the name still runs the old statement; a later Bind of that name must
 * not be elevated as the paper write.
 */
const TAKEN_NAME = String.raw`
import json, os, socket, struct, urllib.parse
u = urllib.parse.urlparse(os.environ["DATABASE_URL"])
s = socket.create_connection((u.hostname, u.port or 5432), timeout=20)
f = s.makefile("rb")
def cstr(x): return x.encode() + b"\0"
def msg(t, body): return t + struct.pack("!I", len(body) + 4) + body
def parse(name, sql): return msg(b"P", cstr(name) + cstr(sql) + struct.pack("!H", 0))
def bind(stmt): return msg(b"B", cstr("") + cstr(stmt) + struct.pack("!HHH", 0, 0, 0))
EXECUTE = msg(b"E", cstr("") + struct.pack("!I", 0))
SYNC = msg(b"S", b"")
def until_ready():
    out = []
    while True:
        t = f.read(1)
        if not t:
            out.append("closed")
            return out
        body = f.read(struct.unpack("!I", f.read(4))[0] - 4)
        if t == b"E":
            fields = {p[:1]: p[1:].decode() for p in body.split(b"\0") if p}
            out.append("E %s %s" % (fields.get(b"C"), fields.get(b"M", "")[:80]))
        elif t == b"D":
            out.append("D")
        elif t == b"Z":
            out.append("Z" + body.decode())
            return out
        elif t in (b"1", b"2", b"3", b"C"):
            out.append(t.decode())
startup = struct.pack("!I", 196608) + cstr("user") + cstr(u.username or "x") + cstr("database") + cstr(u.path[1:]) + b"\0"
s.sendall(struct.pack("!I", len(startup) + 4) + startup)
res = {"startup": until_ready()}
INS = "INSERT INTO paper_orders (symbol, side, qty, price, status) VALUES ('TKN', 'buy', 1, 1, 'new')"
steps = [
    ("prepare-cancel", [parse("s1", "SELECT cancel_pending_orders()"), SYNC]),
    ("reparse-as-paper-write", [parse("s1", INS), SYNC]),
    ("bind-the-name", [bind("s1"), EXECUTE, SYNC]),
    # the same within one batch: refused by the gateway (a paper write must open its batch)
    ("same-batch", [parse("s2", "SELECT cancel_pending_orders()"), msg(b"H", b""), parse("s2", INS), SYNC]),
    ("bind-s2", [bind("s2"), EXECUTE, SYNC]),
    # after Close the name is free: a paper write parsed under it is elevated again
    ("close", [msg(b"C", b"S" + cstr("s1")), SYNC]),
    ("paper", [parse("s1", INS), SYNC]),
    ("bind-paper", [bind("s1"), EXECUTE, SYNC]),
]
for name, parts in steps:
    s.sendall(b"".join(parts))
    res[name] = until_ready()
print(json.dumps(res))
`;

describe("paper mode: a statement name the server already holds is not elevated as the paper write that failed to replace it", () => {
  it("Parse s1 = SELECT cancel_pending_orders(); Parse s1 = paper INSERT (fails: exists); Bind s1 runs read-only; production unchanged", async () => {
    const before = await production();
    expect(before).toMatch(/\|pending/);
    const project = await pgProject();
    const { phase } = await t.api.request<{ phase: PhaseView }>("POST", "/v1/phases", { project, phase: "taken-name", mode: "paper" });
    const r = await exec(phase, ["python3", await writeScript(project, TAKEN_NAME)]);
    expect(r.stderr).toBe("");
    const out = JSON.parse(r.stdout) as Record<string, string[]>;
    await t.api.request("DELETE", `/v1/phases/${phase.id}`);
    expect(out["prepare-cancel"]).toEqual(["1", "ZI"]);
    expect(out["reparse-as-paper-write"]).toEqual([expect.stringMatching(/^E 42P05 /), "ZI"]);
    // the old statement runs, read-only: the server refuses its write
    expect(out["bind-the-name"]).toEqual(["2", expect.stringMatching(/^E 25006 /), "ZI"]);
    // within one batch the gateway refuses the paper write itself (it does not open the batch)
    expect(out["same-batch"]).toEqual(["1", expect.stringMatching(/^E 42501 sandboxd refused this statement: db\.paper-elevation/), "ZI"]);
    expect(out["bind-s2"]).toEqual(["2", expect.stringMatching(/^E 25006 /), "ZI"]);
    // a legitimate paper write under a freed name still runs
    expect(out.close).toEqual(["3", "ZI"]);
    expect(out.paper).toEqual(["1", "ZI"]);
    expect(out["bind-paper"]).toEqual(["2", "C", "ZI"]);
    expect(await production()).toBe(before);
    expect(Number((await db.psql("SELECT count(*) FROM paper_orders WHERE symbol = 'TKN'", "trading")).trim())).toBe(1);
    const records = await journal(phase.id);
    // the Parses of the paper write are on record (one refused inside a batch); nothing was closed
    const inserts = records.filter((e) => e.type === "db.query" && String(e.sql).startsWith("INSERT INTO paper_orders"));
    expect(inserts.map((e) => e.decision)).toEqual(["allow", "forbid", "allow"]);
    expect(records.filter((e) => e.type === "db.query" && e.sql === "SELECT cancel_pending_orders()")).toHaveLength(2);
    expect(records.filter((e) => e.type === "db.session")).toEqual([]);
  }, 120_000);
});
