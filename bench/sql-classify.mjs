#!/usr/bin/env node
/**
 * SQL classifier cost (src/db/classify.ts), beside its baseline: bare
 * `parseSync` of the same statement, which every classification pays.
 *
 *   classifySql(sql, { mode })   vs   parseSync(sql)
 *
 * Over a mix of 30 statements (reads, hidden writes, denied functions,
 * alpha markers, DDL, multi-statement strings, one parse error), measured
 * interleaved per statement (the order of the two alternates every round)
 * after a warm-up, in one process. Reports p50/p95 µs per statement for
 * each, and the classifier's own share (the difference of the medians).
 *
 * Standalone: `npx tsc -p tsconfig.json && node bench/sql-classify.mjs`
 * (prints JSON). `run()` returns the same results for a caller.
 * Settings (environment): BENCH_SQL_ROUNDS (300), BENCH_SQL_WARMUP (50),
 * BENCH_SQL_MODE (paper), BENCH_DIST (dist/ of this repo).
 */
import path from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";
import { loadModule, parseSync } from "libpg-query";

const ROOT = fileURLToPath(new URL("..", import.meta.url));

export const STATEMENTS = [
  "SELECT * FROM orders WHERE status = 'pending' LIMIT 50",
  "SELECT * FROM fills WHERE timestamp > NOW() - INTERVAL '1 hour'",
  "SELECT COUNT(*) FROM signals WHERE processed = false",
  "SELECT * FROM positions WHERE closed_at IS NULL",
  "SELECT symbol, COUNT(*) FROM candles GROUP BY symbol",
  "SELECT order_id, count(*) FROM fills GROUP BY order_id HAVING count(*) > 1",
  "SELECT percentile_cont(0.95) WITHIN GROUP (ORDER BY latency_ms) FROM order_events",
  "SELECT o.id FROM orders o LEFT JOIN fills f ON f.order_id = o.id WHERE f.id IS NULL LIMIT 50",
  "WITH recent AS (SELECT * FROM orders WHERE created_at > now() - interval '1 day') SELECT status, count(*) FROM recent GROUP BY status",
  "SELECT * FROM orders o, LATERAL (SELECT * FROM fills f WHERE f.order_id = o.id LIMIT 1) f1 LIMIT 10",
  "EXPLAIN ANALYZE SELECT * FROM orders LIMIT 10",
  "EXPLAIN ANALYZE DELETE FROM orders",
  "WITH d AS (DELETE FROM orders RETURNING *) SELECT count(*) FROM d",
  "SELECT * INTO orders_copy FROM orders",
  "SELECT * FROM orders FOR UPDATE",
  "SELECT * FROM orders WHERE id IN (SELECT 1 WHERE set_config('statement_timeout', '0', true) IS NOT NULL)",
  "SELECT coalesce(NULL, (SELECT pg_catalog.pg_sleep(1))::text)",
  'SELECT "pg_sleep"(1)',
  "SELECT * FROM orders WHERE qty > (SELECT stddev_samp(qty) FROM fills)",
  "SELECT s.id, sum(f.qty * f.price) FROM signals s JOIN fills f ON f.signal_id = s.id GROUP BY s.id",
  "INSERT INTO paper_orders SELECT * FROM orders WHERE status = 'pending'",
  "UPDATE paper_positions p SET qty = o.qty FROM orders o WHERE o.id = p.order_id",
  'INSERT INTO "PAPER_orders" VALUES (1)',
  "MERGE INTO paper_positions p USING fills f ON f.order_id = p.order_id WHEN MATCHED THEN UPDATE SET qty = f.qty",
  "SELECT 1; DELETE FROM orders",
  "PREPARE q AS DELETE FROM orders; EXECUTE q",
  "ALTER TABLE orders ALTER COLUMN qty TYPE bigint",
  "CREATE TABLE paper_fills (order_id int REFERENCES orders(id), qty numeric NOT NULL, ts timestamptz DEFAULT now())",
  "SET default_transaction_read_only = off",
  "SELEC * FROM orders",
];

/** Quantile with linear interpolation between closest ranks (R type 7). */
function quantile(sorted, q) {
  if (sorted.length === 0) return NaN;
  const pos = (sorted.length - 1) * q;
  const lo = Math.floor(pos);
  const hi = Math.ceil(pos);
  return sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo);
}

function stats(samples) {
  const s = [...samples].sort((a, b) => a - b);
  const r = (x) => Number(x.toFixed(1));
  return { n: s.length, p50: r(quantile(s, 0.5)), p95: r(quantile(s, 0.95)), min: r(s[0] ?? NaN), max: r(s[s.length - 1] ?? NaN) };
}

function envInt(name, dflt) {
  const v = process.env[name];
  if (v === undefined || v === "") return dflt;
  const n = Number(v);
  if (!Number.isInteger(n) || n < 1) throw new Error(`${name} must be a positive integer, got ${v}`);
  return n;
}

const nowUs = () => Number(process.hrtime.bigint()) / 1000;

function parseOnly(sql) {
  try {
    parseSync(sql);
  } catch {
    // a parse error costs what it costs; the classifier pays it too
  }
}

export async function run({
  rounds = envInt("BENCH_SQL_ROUNDS", 300),
  warmup = envInt("BENCH_SQL_WARMUP", 50),
  mode = process.env.BENCH_SQL_MODE || "paper",
  dist = process.env.BENCH_DIST || path.join(ROOT, "dist"),
} = {}) {
  const { initSqlParser, classifySql } = await import(pathToFileURL(path.join(dist, "db", "index.js")).href);
  await loadModule();
  await initSqlParser();
  const ctx = { mode };

  const decisions = {};
  for (const sql of STATEMENTS) {
    const v = classifySql(sql, ctx);
    decisions[v.decision] = (decisions[v.decision] ?? 0) + 1;
  }

  for (let r = 0; r < warmup; r++) {
    for (const sql of STATEMENTS) {
      parseOnly(sql);
      classifySql(sql, ctx);
    }
  }

  const parse = [];
  const classify = [];
  const perStatement = STATEMENTS.map(() => ({ parse: [], classify: [] }));
  for (let r = 0; r < rounds; r++) {
    const classifyFirst = r % 2 === 1;
    STATEMENTS.forEach((sql, i) => {
      const timeParse = () => {
        const t0 = nowUs();
        parseOnly(sql);
        const dt = nowUs() - t0;
        parse.push(dt);
        perStatement[i].parse.push(dt);
      };
      const timeClassify = () => {
        const t0 = nowUs();
        classifySql(sql, ctx);
        const dt = nowUs() - t0;
        classify.push(dt);
        perStatement[i].classify.push(dt);
      };
      if (classifyFirst) {
        timeClassify();
        timeParse();
      } else {
        timeParse();
        timeClassify();
      }
    });
  }

  const p = stats(parse);
  const c = stats(classify);
  return {
    what: "µs per statement: classifySql vs bare parseSync (baseline), interleaved",
    node: process.version,
    mode,
    statements: STATEMENTS.length,
    rounds,
    warmup,
    decisions,
    parseSync: p,
    classifySql: c,
    classifierOverheadP50Us: Number((c.p50 - p.p50).toFixed(1)),
    perStatement: STATEMENTS.map((sql, i) => ({
      sql: sql.length > 60 ? `${sql.slice(0, 60)}…` : sql,
      parseP50: stats(perStatement[i].parse).p50,
      classifyP50: stats(perStatement[i].classify).p50,
    })),
  };
}

if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  run().then(
    (r) => console.log(JSON.stringify(r, null, 2)),
    (e) => {
      console.error(e);
      process.exit(1);
    },
  );
}
