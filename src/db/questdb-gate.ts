/**
 * The conservative gate for QuestDB (SKILLS.md §3 "QuestDB (Time-Series
 * Market Data)").
 *
 * QuestDB's dialect (`SAMPLE BY`, `LATEST ON`, `ASOF JOIN`, `1h` intervals,
 * bare-table queries) does not parse as PostgreSQL, so the real parser of
 * classify.ts cannot judge it. This gate does not parse: it lexes the text
 * (strings, quoted identifiers and comments become opaque tokens), then
 * judges the token sequence with rules that refuse whatever they cannot be
 * sure of.
 *
 * How it differs from the PostgreSQL path (classifySql):
 *  1. No parse tree. Structure (subqueries, CTEs) is invisible, so a read
 *     statement containing any write keyword as a bare word (INSERT, UPDATE,
 *     DELETE, DROP, ALTER, TRUNCATE, CREATE, COPY, INTO, …) is refused
 *     outright, even where PostgreSQL would have found it harmless.
 *  2. One statement per string. A `;` may only end the text (trailing `;`s
 *     are fine); anything after it is refused, not judged piece by piece.
 *  3. Leading-keyword allow-list. Reads: SELECT, WITH, SHOW, EXPLAIN, `(`.
 *     Writes: INSERT [ATOMIC] [BATCH n] INTO t, UPDATE t, CREATE TABLE t,
 *     ALTER TABLE t, DROP TABLE t, TRUNCATE TABLE t[, …]. Transaction
 *     control: bare BEGIN / COMMIT / ROLLBACK. Everything else — QuestDB's
 *     bare-table queries (`trades LATEST ON …`), SET, COPY, RENAME, BACKUP,
 *     SNAPSHOT, VACUUM, REINDEX, CANCEL QUERY, DROP ALL TABLES, GRANT … — is
 *     refused (write `SELECT * FROM trades LATEST ON …` instead).
 *  4. Lexing is stricter than PostgreSQL's, so the gate and QuestDB cannot
 *     disagree about where a string or comment ends: a backslash inside a
 *     string literal, dollar quoting (`$$`, `$tag$`), backticks, nested
 *     `/*`, unterminated strings/identifiers/comments and NUL bytes are
 *     refused. `''` inside a string and `""` inside an identifier are
 *     understood. `$1` bind parameters are fine.
 *  5. Functions are found by name followed by `(` (comments in between do
 *     not hide them): the same denied list and alpha markers as PostgreSQL,
 *     on the name's last part (`pg_catalog.pg_sleep(` → pg_sleep). Names in
 *     strings or quoted identifiers used as columns are not matched.
 *  6. Targets are the name token after INTO / UPDATE / TABLE, quotes
 *     stripped, compared with the paper prefix exactly as written: QuestDB's
 *     identifier case rules are not guessed, so `PAPER_x` is refused even
 *     unquoted (PostgreSQL folds it to paper_x and allows it). A
 *     dot-qualified target is refused (QuestDB has no schemas).
 *  7. Modes as in PostgreSQL: test/backtest may write the test database
 *     (fixtures); paper writes only `paper_*` tables; DROP TABLE and every
 *     ALTER TABLE other than ADD COLUMN ask (Schema Safety) in every mode.
 *  8. The "tables" read are a best effort (the names after FROM and JOIN);
 *     the signals-with-fills alpha marker uses them.
 */
import {
  SQL_CLAUSES,
  matchPattern,
  rulesFor,
  deniedPattern,
  type SqlContext,
  type SqlDecision,
  type SqlStatementVerdict,
  type SqlVerdict,
  type StatementKind,
} from "./classify.js";

type TokType = "word" | "qident" | "string" | "num" | "param" | "punct";
interface Tok {
  t: TokType;
  /** words upper-cased in `u`; `v` is the text (quotes stripped for qident/string) */
  v: string;
  u: string;
}

class LexError extends Error {}

const WS = /[ \t\n\r\f\v]/;
const WORD_START = /[A-Za-z_\u0080-\uFFFF]/;
const WORD_PART = /[A-Za-z0-9_$\u0080-\uFFFF]/;

function lex(sql: string): Tok[] {
  const toks: Tok[] = [];
  let i = 0;
  const n = sql.length;
  while (i < n) {
    const c = sql[i]!;
    if (WS.test(c)) {
      i++;
    } else if (c === "\u0000") {
      throw new LexError("a NUL byte");
    } else if (c === "-" && sql[i + 1] === "-") {
      while (i < n && sql[i] !== "\n" && sql[i] !== "\r") i++;
    } else if (c === "/" && sql[i + 1] === "*") {
      const end = sql.indexOf("*/", i + 2);
      if (end < 0) throw new LexError("an unterminated /* comment");
      // nested comments: PostgreSQL nests them, other engines do not — the two readings differ, so refuse
      if (sql.slice(i + 2, end).includes("/*")) throw new LexError("a nested /* comment");
      i = end + 2;
    } else if (c === "'") {
      let v = "";
      i++;
      for (;;) {
        if (i >= n) throw new LexError("an unterminated string literal");
        const d = sql[i]!;
        if (d === "'") {
          if (sql[i + 1] === "'") {
            v += "'";
            i += 2;
            continue;
          }
          i++;
          break;
        }
        // with backslash escapes 'a\'' ends elsewhere than without: refuse rather than guess
        if (d === "\\") throw new LexError("a backslash inside a string literal");
        if (d === "\u0000") throw new LexError("a NUL byte");
        v += d;
        i++;
      }
      toks.push({ t: "string", v, u: v });
    } else if (c === '"') {
      let v = "";
      i++;
      for (;;) {
        if (i >= n) throw new LexError("an unterminated quoted identifier");
        const d = sql[i]!;
        if (d === '"') {
          if (sql[i + 1] === '"') {
            v += '"';
            i += 2;
            continue;
          }
          i++;
          break;
        }
        if (d === "\u0000") throw new LexError("a NUL byte");
        v += d;
        i++;
      }
      toks.push({ t: "qident", v, u: v });
    } else if (c === "`") {
      throw new LexError("a backtick");
    } else if (c === "$") {
      let j = i + 1;
      while (j < n && /[0-9]/.test(sql[j]!)) j++;
      if (j === i + 1) throw new LexError("`$` outside a string (dollar quoting is not QuestDB's)");
      toks.push({ t: "param", v: sql.slice(i, j), u: sql.slice(i, j) });
      i = j;
    } else if (WORD_START.test(c)) {
      let j = i + 1;
      while (j < n && WORD_PART.test(sql[j]!)) j++;
      const v = sql.slice(i, j);
      toks.push({ t: "word", v, u: v.toUpperCase() });
      i = j;
    } else if (/[0-9]/.test(c)) {
      let j = i + 1;
      while (j < n && /[0-9A-Za-z_.]/.test(sql[j]!)) j++;
      const v = sql.slice(i, j);
      toks.push({ t: "num", v, u: v });
      i = j;
    } else {
      toks.push({ t: "punct", v: c, u: c });
      i++;
    }
  }
  return toks;
}

/** words that make a statement a write (or worse) wherever they stand */
const WRITE_WORDS = new Set([
  "INSERT",
  "UPDATE",
  "DELETE",
  "MERGE",
  "UPSERT",
  "DROP",
  "ALTER",
  "TRUNCATE",
  "CREATE",
  "COPY",
  "INTO",
  "RENAME",
  "BACKUP",
  "SNAPSHOT",
  "VACUUM",
  "REINDEX",
  "GRANT",
  "REVOKE",
  "CANCEL",
  "LOCK",
  "CHECKPOINT",
  "REFRESH",
  "RESUME",
  "SUSPEND",
  "ATTACH",
  "DETACH",
  "SQUASH",
  "CONVERT",
]);
const READ_LEADERS = new Set(["SELECT", "WITH", "SHOW", "EXPLAIN"]);
const TXN = new Set(["BEGIN", "COMMIT", "ROLLBACK"]);

interface Finding {
  decision: SqlDecision;
  ruleId: string;
  clause: string;
  reason: string;
}

const SEVERITY: Record<SqlDecision, number> = { allow: 0, ask: 1, forbid: 2 };

function verdictOf(kind: StatementKind, readOnly: boolean, tables: string[], writes: string[], findings: Finding[]): SqlVerdict {
  let win = findings[0]!;
  for (const f of findings) if (SEVERITY[f.decision] > SEVERITY[win.decision]) win = f;
  const stmt: SqlStatementVerdict = {
    kind,
    readOnly,
    tables: [...new Set(tables)],
    writes: [...new Set(writes)],
    // QuestDB is never elevated (docs/DATABASE.md "QuestDB"): the gate does not list calls
    functions: [],
    operators: [],
    decision: win.decision,
    ruleId: win.ruleId,
    clause: win.clause,
    reason: win.reason,
  };
  return { decision: win.decision, ruleId: win.ruleId, clause: win.clause, reason: win.reason, statements: [stmt] };
}

function refuse(ruleId: string, clause: string, reason: string): SqlVerdict {
  return { decision: "forbid", ruleId, clause, reason, statements: [] };
}

const isName = (t: Tok | undefined): t is Tok => t !== undefined && (t.t === "word" || t.t === "qident" || t.t === "string");

/**
 * Classifies one QuestDB statement for the given mode. Synchronous, and needs
 * no parser; see the module comment for how it differs from classifySql.
 */
export function classifyQuestDb(sql: string, ctx: SqlContext): SqlVerdict {
  const rules = rulesFor(ctx.rules);
  let toks: Tok[];
  try {
    toks = lex(sql);
  } catch (e) {
    if (!(e instanceof LexError)) throw e;
    return refuse("db.parse", SQL_CLAUSES.parse, `the QuestDB gate refuses ${e.message}: it cannot be sure where QuestDB would end it`);
  }

  // one statement: `;` only at the end
  const semi = toks.findIndex((t) => t.t === "punct" && t.v === ";");
  if (semi >= 0) {
    if (toks.slice(semi).some((t) => !(t.t === "punct" && t.v === ";"))) {
      return refuse("db.read-only", SQL_CLAUSES.readOnly, "the QuestDB gate takes one statement at a time; send the statements separately");
    }
    toks = toks.slice(0, semi);
  }
  if (!toks.length) {
    return { decision: "allow", ruleId: "db.empty", clause: SQL_CLAUSES.readOnly, reason: "no statement (empty or only comments); nothing runs", statements: [] };
  }

  const findings: Finding[] = [];
  // function calls: a name followed by `(`
  const deniedSeen = new Set<string>();
  const alphaSeen = new Set<string>();
  for (let i = 0; i + 1 < toks.length; i++) {
    const t = toks[i]!;
    if ((t.t === "word" || t.t === "qident") && toks[i + 1]!.v === "(" && toks[i + 1]!.t === "punct") {
      const denied = deniedPattern(rules, t.v);
      if (denied !== undefined && !deniedSeen.has(t.v)) {
        deniedSeen.add(t.v);
        findings.push({
          decision: "forbid",
          ruleId: "db.denied-function",
          clause: SQL_CLAUSES.readOnly,
          reason: `\`${t.v}()\` has side effects outside a read (denied list: ${denied}); remove the call`,
        });
      }
      if (matchPattern(rules.alpha, t.v) !== undefined) alphaSeen.add(t.v.toLowerCase());
    }
  }
  const alphaWord = rules.alphaDecision === "forbid" ? "refused by policy" : "ask for approval if this is a system-performance or data-quality check";
  if (alphaSeen.size) {
    findings.push({
      decision: rules.alphaDecision,
      ruleId: "db.alpha-marker",
      clause: SQL_CLAUSES.alpha,
      reason: `${[...alphaSeen].map((f) => `\`${f}()\``).join(", ")} is statistical analysis (STDDEV, CORR, … for parameter tuning is forbidden); ${alphaWord}`,
    });
  }

  // tables read: the name after FROM / JOIN (best effort)
  const tables: string[] = [];
  for (let i = 0; i + 1 < toks.length; i++) {
    const t = toks[i]!;
    const next = toks[i + 1];
    if (t.t === "word" && (t.u === "FROM" || t.u === "JOIN") && isName(next) && toks[i + 2]?.v !== "(") tables.push(next.v);
  }
  const strip = (n: string) => (n.startsWith(rules.paperPrefix) ? n.slice(rules.paperPrefix.length) : n).toLowerCase();
  const read = new Set(tables.map(strip));
  for (const set of rules.alphaTables) {
    if (set.every((n) => read.has(n))) {
      findings.push({
        decision: rules.alphaDecision,
        ruleId: "db.alpha-marker",
        clause: SQL_CLAUSES.alpha,
        reason: `reads ${set.map((n) => `\`${n}\``).join(", ")} together (joining signals and fills computes hypothetical PnL); ${alphaWord}`,
      });
    }
  }

  const first = toks[0]!;
  const lead = first.t === "word" ? first.u : first.v;

  const writeWordIn = (from: number): Tok | undefined => toks.slice(from).find((t) => t.t === "word" && WRITE_WORDS.has(t.u));

  // reads
  if (READ_LEADERS.has(lead) || lead === "(") {
    const w = writeWordIn(1);
    if (w) {
      findings.push({
        decision: "forbid",
        ruleId: "db.read-only",
        clause: SQL_CLAUSES.readOnly,
        reason: `\`${w.v}\` inside a ${lead === "(" ? "parenthesised" : lead} statement: the QuestDB gate cannot see structure, so a read must not contain write keywords; send the write as its own INSERT/UPDATE statement`,
      });
    }
    if (!findings.length) findings.push({ decision: "allow", ruleId: "db.read-only", clause: SQL_CLAUSES.readOnly, reason: "read-only statement" });
    const kind: StatementKind = lead === "SHOW" ? "show" : lead === "EXPLAIN" ? "explain" : "select";
    return verdictOf(kind, !w && !deniedSeen.size, tables, [], findings);
  }

  // transaction control, bare
  if (TXN.has(lead) && (toks.length === 1 || (toks.length === 2 && (toks[1]!.u === "TRANSACTION" || toks[1]!.u === "WORK")))) {
    if (!findings.length) findings.push({ decision: "allow", ruleId: "db.transaction", clause: SQL_CLAUSES.readOnly, reason: "transaction control" });
    return verdictOf("transaction", true, [], [], findings);
  }

  // writes: find the target(s) and the statement's shape
  let i = 1;
  const at = (k: number) => toks[k];
  const word = (k: number, u: string) => at(k)?.t === "word" && at(k)!.u === u;
  const targets: string[] = [];
  let kind: StatementKind = "other";
  let schemaRisk: string | undefined;
  let shapeError: string | undefined;
  /** reads a single, unqualified name at i */
  const takeName = (): boolean => {
    const t = at(i);
    if (!isName(t) || (t.t === "word" && WRITE_WORDS.has(t.u))) return false;
    if (at(i + 1)?.v === ".") {
      shapeError = `a qualified target \`${t.v}.…\` (QuestDB has no schemas)`;
      return false;
    }
    targets.push(t.v);
    i++;
    return true;
  };

  switch (lead) {
    case "INSERT":
      kind = "insert";
      if (word(i, "ATOMIC")) i++;
      if (word(i, "BATCH") && at(i + 1)?.t === "num") i += 2;
      if (!word(i, "INTO")) break;
      i++;
      takeName();
      break;
    case "UPDATE":
      kind = "update";
      takeName();
      break;
    case "CREATE":
      kind = "ddl";
      if (!word(i, "TABLE")) break;
      i++;
      if (word(i, "IF") && word(i + 1, "NOT") && word(i + 2, "EXISTS")) i += 3;
      takeName();
      break;
    case "DROP":
      kind = "ddl";
      if (!word(i, "TABLE")) break;
      i++;
      if (word(i, "IF") && word(i + 1, "EXISTS")) i += 2;
      if (takeName() && i === toks.length) schemaRisk = `DROP TABLE ${targets[0]}`;
      else targets.length = 0;
      break;
    case "TRUNCATE":
      kind = "truncate";
      if (!word(i, "TABLE")) break;
      i++;
      if (word(i, "IF") && word(i + 1, "EXISTS")) i += 2;
      while (takeName() && at(i)?.v === ",") i++;
      if (i !== toks.length) targets.length = 0;
      break;
    case "ALTER": {
      kind = "ddl";
      if (!word(i, "TABLE")) break;
      i++;
      if (!takeName()) break;
      const additive = word(i, "ADD") && word(i + 1, "COLUMN") && !writeWordIn(i + 2);
      if (!additive) {
        schemaRisk = `ALTER TABLE ${targets[0]} ${toks
          .slice(i, i + 3)
          .map((t) => t.v)
          .join(" ")}`;
      }
      // the rest of an ALTER is judged by schemaRisk, not by the write-word scan
      i = toks.length;
      break;
    }
    default:
      break;
  }

  if (!targets.length) {
    return refuse(
      "db.read-only",
      SQL_CLAUSES.readOnly,
      shapeError
        ? `the QuestDB gate refuses ${shapeError}`
        : `\`${toks
            .slice(0, 3)
            .map((t) => t.v)
            .join(" ")}…\` is not on the QuestDB allow-list (reads: SELECT, WITH, SHOW, EXPLAIN; writes: INSERT INTO, UPDATE, CREATE/ALTER/DROP/TRUNCATE TABLE); for a bare-table query write SELECT * FROM …`,
    );
  }
  const extra = writeWordIn(i);
  if (extra) {
    findings.push({
      decision: "forbid",
      ruleId: "db.read-only",
      clause: SQL_CLAUSES.readOnly,
      reason: `a second write keyword \`${extra.v}\` in one ${lead} statement: the QuestDB gate cannot see structure; send one write per statement`,
    });
  }

  if (ctx.mode === "paper") {
    const outside = targets.filter((t) => !t.startsWith(rules.paperPrefix));
    if (outside.length) {
      findings.push({
        decision: "forbid",
        ruleId: "db.paper-prefix",
        clause: SQL_CLAUSES.sandbox,
        reason: `${lead} on ${outside.map((t) => `\`${t}\``).join(", ")}: in paper mode production is read-only; write only to tables named \`${rules.paperPrefix}…\` (in lower case, as written: the gate does not fold QuestDB names)`,
      });
    } else {
      findings.push({ decision: "allow", ruleId: "db.paper-prefix", clause: SQL_CLAUSES.sandbox, reason: `writes only paper trading tables (${targets.join(", ")})` });
    }
  } else {
    findings.push({
      decision: "allow",
      ruleId: "db.sandbox",
      clause: SQL_CLAUSES.sandbox,
      reason: `${ctx.mode} mode: writes to the isolated test database (${targets.join(", ")}) are fixture setup/teardown`,
    });
  }
  if (schemaRisk) {
    findings.push({
      decision: "ask",
      ruleId: "db.schema-safety",
      clause: SQL_CLAUSES.schema,
      reason: `${schemaRisk} needs human confirmation; propose it as a migration and wait for approval`,
    });
  }
  return verdictOf(kind, false, tables, targets, findings);
}
