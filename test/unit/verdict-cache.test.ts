/**
 * The gateway's verdict cache (src/db/classify.ts VerdictCache): the same
 * verdict for the same text, one verdict for SELECTs that differ only in
 * numeric literals, nothing cached that depends on the session, and the
 * statement shape's refusals to guess.
 */
import { beforeAll, describe, expect, it } from "vitest";
import { cacheableVerdict, classifySql, initSqlParser, rememberPrepared, statementShape, VerdictCache, type SqlVerdict } from "../../src/db/classify.js";

beforeAll(async () => {
  await initSqlParser();
});

function counting(mode: "paper" | "test" = "paper", prepared?: Map<string, SqlVerdict>) {
  let calls = 0;
  const judge = (sql: string): SqlVerdict => {
    calls++;
    return classifySql(sql, { mode, prepared });
  };
  return { judge, calls: () => calls };
}

describe("VerdictCache", () => {
  it("returns the same verdict for the same text without judging it again", () => {
    const cache = new VerdictCache();
    const j = counting();
    for (const sql of ["DELETE FROM orders", "SELECT * FROM orders WHERE status = 'new'", "SET statement_timeout = 0"]) {
      const first = cache.lookup(sql, j.judge);
      const again = cache.lookup(sql, j.judge);
      expect(again).toBe(first);
      expect(again).toEqual(classifySql(sql, { mode: "paper" }));
      expect(Object.isFrozen(again)).toBe(true);
    }
    expect(j.calls()).toBe(3);
    expect(cache.hits).toBe(3);
  });

  it("shares one verdict between allowed SELECTs that differ only in numbers, and judges the rest", () => {
    const cache = new VerdictCache();
    const j = counting();
    const a = cache.lookup("SELECT abalance FROM pgbench_accounts WHERE aid = 1;", j.judge);
    const b = cache.lookup("SELECT abalance FROM pgbench_accounts WHERE aid = 987654;", j.judge);
    expect(b).toBe(a);
    expect(j.calls()).toBe(1);
    // a refusal is never shared by shape
    const s1 = cache.lookup("SELECT pg_sleep(1)", j.judge);
    const s2 = cache.lookup("SELECT pg_sleep(2)", j.judge);
    expect(s1.decision).toBe("forbid");
    expect(s2.decision).toBe("forbid");
    expect(j.calls()).toBe(3);
    // writes are not SELECTs: judged per text
    cache.lookup("UPDATE paper_orders SET qty = 1", j.judge);
    cache.lookup("UPDATE paper_orders SET qty = 2", j.judge);
    expect(j.calls()).toBe(5);
    // digits inside identifiers and strings are part of the shape
    expect(cache.lookup("SELECT * FROM t1", j.judge)).not.toBe(cache.lookup("SELECT * FROM t2", j.judge));
  });

  it("does not cache what depends on the session's prepared statements", () => {
    const prepared = new Map<string, SqlVerdict>();
    const cache = new VerdictCache();
    const j = counting("paper", prepared);
    expect(cache.lookup("EXECUTE p", j.judge).decision).toBe("forbid"); // nothing prepared yet
    const prep = cache.lookup("PREPARE p AS SELECT 1", j.judge);
    expect(prep.decision).toBe("allow");
    rememberPrepared(prepared, prep); // a cached PREPARE still feeds the session's map
    expect(prepared.has("p")).toBe(true);
    expect(cache.lookup("EXECUTE p", j.judge).decision).toBe("allow");
    expect(cache.lookup("EXPLAIN EXECUTE p", j.judge).decision).toBe("allow");
    prepared.clear();
    expect(cache.lookup("EXECUTE p", j.judge).decision).toBe("forbid");
    expect(cacheableVerdict("explain execute p", classifySql("EXPLAIN EXECUTE p", { mode: "paper" }))).toBe(false);
  });

  it("evicts the least recently used entry", () => {
    const cache = new VerdictCache(2);
    const j = counting();
    cache.lookup("DELETE FROM a", j.judge);
    cache.lookup("DELETE FROM b", j.judge);
    cache.lookup("DELETE FROM a", j.judge); // a is now the most recent
    cache.lookup("DELETE FROM c", j.judge); // evicts b
    expect(j.calls()).toBe(3);
    cache.lookup("DELETE FROM a", j.judge);
    expect(j.calls()).toBe(3);
    cache.lookup("DELETE FROM b", j.judge);
    expect(j.calls()).toBe(4);
    expect(cache.size).toBe(2);
  });

  it("judges long statements every time", () => {
    const cache = new VerdictCache(16, 32);
    const j = counting();
    const long = `SELECT ${"1, ".repeat(20)}1`;
    cache.lookup(long, j.judge);
    cache.lookup(long, j.judge);
    expect(j.calls()).toBe(2);
  });
});

describe("statementShape", () => {
  it("blanks standalone numbers only", () => {
    expect(statementShape("SELECT a FROM t WHERE id = 12 AND x > 1.5")).toBe("SELECT a FROM t WHERE id = \u0000 AND x > \u0000.\u0000");
    expect(statementShape("SELECT t1.c2 FROM t1 WHERE v = $1")).toBe("SELECT t1.c2 FROM t1 WHERE v = $1");
    expect(statementShape("SELECT 'a 1', \"col 2\" FROM t")).toBe("SELECT 'a 1', \"col 2\" FROM t");
    expect(statementShape("SELECT 'it''s 3', 4")).toBe("SELECT 'it''s 3', \u0000");
    // kept as written: exponents, hex, underscores, trailing letters
    expect(statementShape("SELECT 1e5, 0x1F, 1_000, 5abc")).toBe("SELECT 1e5, 0x1F, 1_000, 5abc");
    // structure that differs is a different shape
    expect(statementShape("SELECT a ? 1")).not.toBe(statementShape("SELECT a 1 ?"));
  });

  it("gives no shape for what it does not lex exactly like PostgreSQL", () => {
    for (const sql of ["SELECT 1 -- 2", "SELECT /* 1 */ 2", "SELECT E'\\x31'", "SELECT $$1$$", "SELECT $a$1$a$", "SELECT 'open", 'SELECT "open', "SELECT 1\u0000"]) {
      expect(statementShape(sql), sql).toBeUndefined();
    }
  });
});
