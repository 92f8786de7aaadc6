/**
 * The QuestDB gate: its dialect passes, and nothing it cannot be sure of
 * does. Same case format as sql-corpus.test.ts.
 */
import { describe, expect, it } from "vitest";
import { classifyQuestDb, type SqlMode, type SqlVerdict } from "../../src/db/index.js";

type Expect = `${"allow" | "ask" | "forbid"} db.${string}`;
interface Case {
  sql: string;
  all?: Expect;
  tb?: Expect;
  paper?: Expect;
}

const MODES: SqlMode[] = ["test", "backtest", "paper"];
const READ: Expect = "allow db.read-only";
const REFUSED: Expect = "forbid db.read-only";
const LEX: Expect = "forbid db.parse";
const prodWrite = { tb: "allow db.sandbox", paper: "forbid db.paper-prefix" } as const;
const paperWrite = { tb: "allow db.sandbox", paper: "allow db.paper-prefix" } as const;

const corpus: Case[] = [
  // SKILLS.md §3 QuestDB "Allowed queries", in every mode
  { sql: "SELECT COUNT(*) FROM candles WHERE symbol = 'BTC-USD'", all: READ },
  { sql: "SELECT * FROM candles WHERE timestamp > now() - 1h LIMIT 100", all: READ },
  { sql: "SELECT symbol, COUNT(*) FROM candles GROUP BY symbol", all: READ },
  { sql: "SHOW TABLES", all: READ },
  { sql: "SHOW COLUMNS FROM candles", all: READ },

  // QuestDB's dialect reads
  { sql: "SELECT ts, avg(close) FROM candles SAMPLE BY 1m ALIGN TO CALENDAR", all: READ },
  { sql: "SELECT * FROM candles LATEST ON ts PARTITION BY symbol", all: READ },
  { sql: "SELECT * FROM trades ASOF JOIN quotes ON (symbol)", all: READ },
  { sql: "SELECT * FROM trades t LT JOIN quotes q ON (symbol)", all: READ },
  { sql: "WITH x AS (SELECT * FROM candles WHERE symbol = 'ETH-USD') SELECT count() FROM x", all: READ },
  { sql: "EXPLAIN SELECT * FROM candles", all: READ },
  { sql: "SELECT * FROM candles WHERE ts IN '2024-01-01'", all: READ },
  { sql: "SELECT timestamp_floor('1h', ts), count() FROM candles GROUP BY 1", all: READ },
  { sql: "SELECT * FROM candles WHERE symbol = $1", all: READ },
  { sql: "(SELECT * FROM candles LIMIT 1) UNION ALL (SELECT * FROM candles LIMIT 1)", all: READ },

  // strings, quoted names and comments do not confuse it
  { sql: "SELECT * FROM candles WHERE symbol = 'a;b DROP TABLE candles'", all: READ },
  { sql: "SELECT 'it''s; DROP TABLE x' FROM candles", all: READ },
  { sql: 'SELECT "drop", "a;b" FROM candles', all: READ },
  { sql: "SELECT 'stddev(x) pg_sleep(1)' FROM candles", all: READ },
  { sql: "SELECT count(*) FROM candles;", all: READ },
  { sql: "SELECT count(*) FROM candles; ;", all: READ },
  { sql: "SELECT 1 -- DROP TABLE candles", all: READ },
  { sql: "SELECT 1 /* ; DROP TABLE candles */", all: READ },
  { sql: "", all: "allow db.empty" },
  { sql: "-- nothing", all: "allow db.empty" },

  // a second statement is refused, however it is hidden
  { sql: "SELECT 1; DROP TABLE candles", all: REFUSED },
  { sql: "SELECT 1 /* x */; /* y */ DROP TABLE candles", all: REFUSED },
  { sql: "SELECT 1 -- x\n; DELETE FROM candles", all: REFUSED },
  { sql: "SELECT 'a''; DROP TABLE candles; --'; DROP TABLE candles", all: REFUSED },
  { sql: "INSERT INTO paper_x SELECT * FROM candles; DELETE FROM candles", all: REFUSED },

  // lexing it cannot be sure of
  { sql: "SELECT 'a\\'; DROP TABLE candles; --'", all: LEX },
  { sql: "SELECT $$ ; DROP TABLE x; $$", all: LEX },
  { sql: "SELECT $tag$ ; DROP TABLE x; $tag$", all: LEX },
  { sql: "SELECT 'unterminated", all: LEX },
  { sql: 'SELECT "unterminated FROM candles', all: LEX },
  { sql: "SELECT /* nested /* comment */ DROP TABLE x */ 1", all: LEX },
  { sql: "/* unterminated", all: LEX },
  { sql: "SELECT `a` FROM t", all: LEX },
  { sql: "SELECT 1\u0000; DROP TABLE candles", all: LEX },

  // reads must not carry writes; unknown leading keywords are refused
  { sql: "SELECT * FROM candles WHERE x IN (DELETE FROM candles)", all: REFUSED },
  { sql: "WITH x AS (SELECT 1) INSERT INTO paper_x SELECT * FROM x", all: REFUSED },
  { sql: "SELECT * INTO paper_x FROM candles", all: REFUSED },
  { sql: "EXPLAIN UPDATE candles SET close = 0", all: REFUSED },
  { sql: "candles LATEST ON ts PARTITION BY symbol", all: REFUSED },
  { sql: "COPY candles FROM '/tmp/x.csv'", all: REFUSED },
  { sql: "RENAME TABLE candles TO x", all: REFUSED },
  { sql: "DROP ALL TABLES", all: REFUSED },
  { sql: "SET x = 1", all: REFUSED },
  { sql: "BACKUP TABLE candles", all: REFUSED },
  { sql: "CANCEL QUERY 123", all: REFUSED },
  { sql: "CREATE MATERIALIZED VIEW v AS (SELECT * FROM candles)", all: REFUSED },
  { sql: "INSERT INTO main.paper_x VALUES (1)", all: REFUSED },
  { sql: "BEGIN", all: "allow db.transaction" },
  { sql: "COMMIT;", all: "allow db.transaction" },

  // denied functions and alpha markers, by name followed by (
  { sql: "SELECT pg_sleep(10)", all: "forbid db.denied-function" },
  { sql: "SELECT pg_catalog.pg_sleep /* c */ (1) FROM candles", all: "forbid db.denied-function" },
  { sql: 'SELECT "pg_sleep"(1)', all: "forbid db.denied-function" },
  { sql: "INSERT INTO paper_x SELECT pg_sleep(1)", all: "forbid db.denied-function" },
  { sql: "SELECT stddev(close) FROM candles SAMPLE BY 1d", all: "ask db.alpha-marker" },
  { sql: "SELECT corr(close, volume) FROM candles", all: "ask db.alpha-marker" },
  { sql: "SELECT * FROM signals JOIN fills ON (signal_id)", all: "ask db.alpha-marker" },

  // writes: fixtures in test/backtest, paper_ tables only in paper
  { sql: "INSERT INTO paper_candles VALUES ('BTC-USD', 1.0, now())", ...paperWrite },
  { sql: "INSERT INTO candles VALUES ('BTC-USD', 1.0, now())", ...prodWrite },
  { sql: "INSERT INTO 'paper_trades' SELECT * FROM candles", ...paperWrite },
  { sql: 'INSERT INTO "paper_trades" SELECT * FROM candles', ...paperWrite },
  { sql: 'INSERT INTO "PAPER_x" VALUES (1)', ...prodWrite },
  { sql: "INSERT INTO PAPER_x VALUES (1)", ...prodWrite },
  { sql: "INSERT BATCH 1000 INTO paper_x SELECT * FROM candles", ...paperWrite },
  { sql: "INSERT INTO paper_x VALUES ('x');", ...paperWrite },
  { sql: "UPDATE paper_positions SET qty = 1 WHERE symbol = 'BTC-USD'", ...paperWrite },
  { sql: "UPDATE candles SET close = 0", ...prodWrite },
  { sql: "CREATE TABLE paper_x (ts TIMESTAMP, v DOUBLE) TIMESTAMP(ts) PARTITION BY DAY", ...paperWrite },
  { sql: "CREATE TABLE IF NOT EXISTS candles_copy AS (SELECT * FROM candles)", ...prodWrite },
  { sql: "TRUNCATE TABLE paper_x", ...paperWrite },
  { sql: "TRUNCATE TABLE paper_x, candles", ...prodWrite },
  { sql: "ALTER TABLE paper_x ADD COLUMN note STRING", ...paperWrite },
  { sql: "ALTER TABLE fixture_x ADD COLUMN note STRING", ...prodWrite },

  // schema safety
  { sql: "DROP TABLE paper_x", all: "ask db.schema-safety" },
  { sql: "DROP TABLE IF EXISTS candles", tb: "ask db.schema-safety", paper: "forbid db.paper-prefix" },
  { sql: "ALTER TABLE paper_x DROP COLUMN note", all: "ask db.schema-safety" },
  { sql: "ALTER TABLE paper_x ALTER COLUMN v TYPE LONG", all: "ask db.schema-safety" },
  { sql: "ALTER TABLE candles DROP PARTITION LIST '2024-01-01'", tb: "ask db.schema-safety", paper: "forbid db.paper-prefix" },
];

function expected(c: Case, mode: SqlMode): Expect | undefined {
  return (mode !== "paper" ? c.tb : c.paper) ?? c.all;
}

const got = (v: SqlVerdict) => `${v.decision} ${v.ruleId}`;

describe("QuestDB gate", () => {
  it("has at least 30 cases, each with a verdict for every mode", () => {
    expect(corpus.length).toBeGreaterThanOrEqual(30);
    for (const c of corpus) for (const m of MODES) expect(expected(c, m), `${m}: ${c.sql}`).toBeDefined();
  });

  for (const mode of MODES) {
    describe(`mode ${mode}`, () => {
      it.each(corpus.map((c) => [JSON.stringify(c.sql), c] as const))("%s", (_name, c) => {
        const v = classifyQuestDb(c.sql, { mode });
        expect(got(v), v.reason).toBe(expected(c, mode));
        expect(v.clause).toMatch(/^SKILLS\.md /);
      });
    });
  }

  it("reports the target and the tables read", () => {
    const v = classifyQuestDb("INSERT INTO 'paper_trades' SELECT * FROM candles ASOF JOIN quotes ON (symbol)", { mode: "paper" });
    expect(v.statements).toEqual([
      expect.objectContaining({ kind: "insert", readOnly: false, writes: ["paper_trades"], tables: ["candles", "quotes"] }),
    ]);
    const r = classifyQuestDb("SELECT * FROM candles LATEST ON ts PARTITION BY symbol", { mode: "paper" });
    expect(r.statements[0]).toMatchObject({ kind: "select", readOnly: true, tables: ["candles"], writes: [] });
  });

  it("says why a lexing refusal happened", () => {
    expect(classifyQuestDb("SELECT 'a\\'b'", { mode: "test" }).reason).toContain("backslash inside a string literal");
    expect(classifyQuestDb("SELECT 1; SELECT 2", { mode: "test" }).reason).toContain("one statement at a time");
  });

  it("uses the policy's rules", () => {
    const v = classifyQuestDb("SELECT stddev(close) FROM candles", {
      mode: "test",
      rules: { alphaMarkers: { functions: ["stddev*"], decision: "forbid" } },
    });
    expect(got(v)).toBe("forbid db.alpha-marker");
    expect(got(classifyQuestDb("INSERT INTO sim_x VALUES (1)", { mode: "paper", rules: { paperPrefix: "sim_" } }))).toBe("allow db.paper-prefix");
  });
});
