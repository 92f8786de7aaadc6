/**
 * The SQL classifier the PostgreSQL wire-protocol gateway calls for every
 * statement the agent sends (SKILLS.md §3 "DATABASE ACCESS").
 *
 * Statements are judged on PostgreSQL's own parse tree (libpg-query: the
 * server's grammar compiled to WASM), never on the text: what the classifier
 * sees is what the server will execute. The tree is walked generically — every
 * object and array, iteratively — so nesting (subqueries, CTEs, function
 * arguments, VALUES, LATERAL, PREPARE, COPY (query), CREATE SCHEMA elements)
 * cannot hide a write, a denied function or a lock.
 *
 * Decisions, strictest first: forbid > ask > allow. Each statement of a
 * multi-statement string is judged on its own and the strictest statement
 * decides the string. Anything the classifier does not recognise is refused.
 *
 * Decisions made here:
 * - Empty input, or input of only comments: allow with zero statements
 *   (`db.empty`); the server answers EmptyQueryResponse and runs nothing.
 * - A string containing a NUL byte is refused (`db.parse`): the parser and the
 *   server would stop reading at different places depending on framing.
 * - `EXPLAIN` without ANALYZE plans and does not execute, so the inner
 *   statement's writes do not count (denied functions and alpha markers
 *   still do). `EXPLAIN ANALYZE` executes: judged as the inner statement, so
 *   `EXPLAIN ANALYZE SELECT` is allowed and `EXPLAIN ANALYZE DELETE` is a write.
 * - Test and backtest modes talk to the isolated test database, where DML and
 *   non-destructive DDL are fixture work and allowed (`db.sandbox`).
 * - Paper mode: production is read-only; a write is allowed only when every
 *   target relation's name starts with `paper_` after identifier folding:
 *   `PAPER_x` folds to `paper_x` (allowed), `"PAPER_x"` stays as written
 *   (refused). The target comes from the parse tree.
 * - `SELECT … FOR UPDATE/SHARE` and `LOCK` lock rows/tables: treated as writes
 *   to the locked relations. VACUUM/CLUSTER/REINDEX likewise (maintenance
 *   writes), and a foreign key to a table counts as writing that table (it
 *   adds triggers to it).
 * - DROP of anything, destructive ALTER TABLE (every subcommand except the
 *   additive ones in ALTER_ADDITIVE), RENAME and SET SCHEMA need human
 *   confirmation in every mode (`db.schema-safety`, ask). In paper mode a DROP
 *   of a non-paper table is forbidden outright (strictest wins).
 * - TRUNCATE is fixture teardown: allowed in test/backtest; in paper mode only
 *   of paper tables, and `TRUNCATE … CASCADE` there asks (it empties tables
 *   that reference the targets, which may not be paper tables).
 * - `COPY … PROGRAM` and COPY to/from a server file: forbidden in every mode.
 *   `COPY … FROM STDIN` is a write to its table. `COPY … TO STDOUT` is a read:
 *   allowed in test/backtest, ask in paper (bulk export of production data is
 *   the anti-alpha-mining concern; a SELECT with WHERE/LIMIT is the SKILLS
 *   pattern).
 * - DO, CALL and every statement that defines code (functions, procedures,
 *   triggers, rules, operators, casts, aggregates …) are forbidden in every
 *   mode (`db.procedural`): their bodies are opaque to this classifier and
 *   would launder denied functions and writes.
 * - Roles, grants, databases, tablespaces, extensions, foreign servers,
 *   subscriptions, ALTER SYSTEM, LOAD, CHECKPOINT: forbidden (`db.admin`).
 * - `BEGIN/START TRANSACTION READ WRITE`, `SET TRANSACTION READ WRITE` and
 *   `SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE`: forbidden in every
 *   mode (`db.read-only`): they fight the gateway's enforced read-only
 *   default; the gateway decides a transaction's access mode. Two-phase
 *   commit (PREPARE TRANSACTION …) is forbidden (`db.transaction`).
 * - SET/RESET of a protected setting, `RESET ALL` and `DISCARD ALL` (which
 *   runs RESET ALL): forbidden; writing `pg_settings` is the same thing.
 * - NOTIFY is forbidden like `pg_notify()`; LISTEN/UNLISTEN are allowed.
 * - PREPARE is judged as the statement it prepares. EXECUTE of a name is
 *   judged as what the name was prepared as: earlier in the same string, or
 *   `ctx.prepared` (kept by the gateway with `rememberPrepared`); otherwise
 *   forbidden (`db.execute`) — the classifier cannot know what it runs.
 * - Alpha markers ask by default (a human can tell `stddev(latency_ms)`, a
 *   system-performance metric, from parameter tuning); a policy may set
 *   "forbid". A statement reading every table of a configured set (default:
 *   signals and fills) is a marker too.
 * - Writes to system catalogs (pg_catalog, information_schema, unqualified
 *   `pg_*`) are forbidden in every mode.
 */
import { loadModule, parseSync } from "libpg-query";
import { z } from "zod";

export type SqlDecision = "allow" | "ask" | "forbid";
export type SqlMode = "backtest" | "paper" | "test";

export type StatementKind =
  | "select"
  | "insert"
  | "update"
  | "delete"
  | "merge"
  | "truncate"
  | "ddl"
  | "copy"
  | "set"
  | "show"
  | "explain"
  | "transaction"
  | "prepare"
  | "execute"
  | "cursor"
  | "lock"
  | "maintenance"
  | "procedural"
  | "admin"
  | "other";

export interface SqlRules {
  /** Functions never let through, in any mode: exact names, or prefixes written `name*`. Matched on the function's own name, whatever its schema. */
  deniedFunctions: string[];
  /** exceptions to deniedFunctions, by exact name (a policy's `deniedFunctions.allow`) */
  liftedFunctions: string[];
  alphaMarkers: {
    /** statistical functions that mark alpha mining (exact or `prefix*`) */
    functions: string[];
    decision: "ask" | "forbid";
    /** a statement that reads every table of one set is a marker (signals joined with fills computes PnL); compared on the table's name without schema or paper prefix */
    tables?: string[][];
  };
  /** paper mode writes only to tables whose (folded) name starts with this */
  paperPrefix: string;
  /** settings the gateway enforces; SET/RESET of them is refused */
  protectedSettings: string[];
  /**
   * The only settings a session may SET or RESET (an allowlist: a setting not
   * named here is refused, so a new server version's settings start refused).
   * Client formats and name resolution only: nothing that changes what other
   * sessions see, the server's resources, or the gateway's bounds.
   */
  settableSettings: string[];
}

export interface SqlStatementVerdict {
  kind: StatementKind;
  readOnly: boolean;
  /** relations read, schema-qualified as written, in order of appearance */
  tables: string[];
  /** relations (or objects, written `<what>`) the statement writes, schema-qualified as written */
  writes: string[];
  decision: SqlDecision;
  ruleId: string;
  /** the SKILLS.md clause the deciding rule enforces */
  clause: string;
  reason: string;
  /** every function the statement names (own name, lower case as parsed), for the gateway's elevation check */
  functions: string[];
  /** every operator the statement names, for the gateway's elevation check */
  operators: string[];
  /** set on PREPARE: the name it prepares (see rememberPrepared) */
  prepares?: string;
  /** set on DEALLOCATE: the name it frees, or "*" for ALL */
  deallocates?: string;
}

export interface SqlVerdict {
  decision: SqlDecision;
  ruleId: string;
  /** the SKILLS.md clause the deciding rule enforces */
  clause: string;
  reason: string;
  statements: SqlStatementVerdict[];
}

export interface SqlContext {
  mode: SqlMode;
  rules?: Partial<SqlRules>;
  /**
   * What each SQL-level prepared statement of this session was prepared as,
   * kept by the gateway (rememberPrepared) from PREPAREs it let through.
   * Names are as the parser folds them (`PREPARE P` is `p`).
   */
  prepared?: ReadonlyMap<string, SqlVerdict>;
}

export const DEFAULT_SQL_RULES: Readonly<SqlRules> = deepFreeze<SqlRules>({
  liftedFunctions: [],
  deniedFunctions: [
    // waits that hold connections and locks (SKILLS.md §3 Connection Management)
    "pg_sleep*",
    // server files, large objects, network, arbitrary SQL in a string
    "lo_*",
    "loread",
    "lowrite",
    "dblink*",
    "pg_read_file",
    "pg_read_binary_file",
    "pg_stat_file",
    "pg_ls_*",
    "pg_file_*",
    "pg_logdir_ls",
    // query_to_xml & co. and ts_stat/ts_rewrite run a query given as text, which the gateway never sees
    "query_to_xml*",
    "cursor_to_xml*",
    "table_to_xml*",
    "schema_to_xml*",
    "database_to_xml*",
    "ts_stat",
    "ts_rewrite",
    // settings, sessions, server state
    "set_config",
    "pg_terminate_backend",
    "pg_cancel_backend",
    "pg_reload_conf",
    "pg_rotate_logfile",
    "pg_promote",
    "pg_switch_wal",
    "pg_create_restore_point",
    "pg_backup_*",
    "pg_start_backup",
    "pg_stop_backup",
    "pg_wal_replay_*",
    "pg_create_physical_replication_slot",
    "pg_create_logical_replication_slot",
    "pg_copy_physical_replication_slot",
    "pg_copy_logical_replication_slot",
    "pg_drop_replication_slot",
    "pg_replication_slot_advance",
    "pg_sync_replication_slots",
    "pg_logical_*",
    "pg_replication_origin_*",
    "pg_stat_reset*",
    "pg_stat_statements_reset",
    "pg_log_backend_memory_contexts",
    "pg_import_system_collations",
    "binary_upgrade_*",
    // locks, sequences, notifications: writes in disguise
    "pg_advisory*",
    "pg_try_advisory*",
    "nextval",
    "setval",
    "pg_notify",
  ],
  alphaMarkers: {
    functions: ["stddev*", "variance", "var_*", "corr", "covar_*", "regr_*"],
    decision: "ask",
    tables: [["signals", "fills"]],
  },
  paperPrefix: "paper_",
  protectedSettings: [
    "default_transaction_read_only",
    "transaction_read_only",
    "statement_timeout",
    "standard_conforming_strings",
    "role",
    "session_authorization",
    // the parser reads the text as UTF-8 with backslashes literal in '' strings; a server told otherwise would read a different statement
    "client_encoding",
    "backslash_quote",
    // disables triggers and foreign keys
    "session_replication_role",
  ],
  settableSettings: [
    // what drivers and ORMs set on connect, and output formats
    "datestyle",
    "intervalstyle",
    "timezone",
    "extra_float_digits",
    "bytea_output",
    "client_min_messages",
    "lc_monetary",
    "lc_numeric",
    "lc_time",
    "xmlbinary",
    "xmloption",
    // name resolution and the session's own transaction defaults
    "search_path",
    "transaction_isolation",
    "transaction_deferrable",
    "default_transaction_isolation",
    "default_transaction_deferrable",
  ],
});

function deepFreeze<T>(value: T): T {
  if (typeof value === "object" && value !== null) {
    for (const v of Object.values(value)) deepFreeze(v);
    Object.freeze(value);
  }
  return value;
}

/** Validates a policy's `sql` rules at the boundary (STYLE.md: config is validated once, whole). */
export const sqlRulesSchema = z
  .object({
    deniedFunctions: z.array(z.string().min(1)),
    liftedFunctions: z.array(z.string().regex(/^[a-z_][a-z0-9_]*$/, "an exact lower-case function name")),
    alphaMarkers: z
      .object({
        functions: z.array(z.string().min(1)),
        decision: z.enum(["ask", "forbid"]),
        tables: z.array(z.array(z.string().min(1)).min(1)).optional(),
      })
      .strict(),
    paperPrefix: z.string().min(1),
    protectedSettings: z.array(z.string().min(1)),
    settableSettings: z.array(z.string().min(1)),
  })
  .strict()
  .partial();

/* ------------------------------- clauses ------------------------------- */

export const SQL_CLAUSES = Object.freeze({
  readOnly: "SKILLS.md §3 Read-Only Default",
  sandbox: "SKILLS.md §3 Sandbox Principle",
  schema: "SKILLS.md §3 Schema Safety",
  alpha: "SKILLS.md §3 Anti-Alpha-Mining Enforcement",
  settings: "SKILLS.md §3 Read-Only Default; §3 Connection Management (30 s query timeout)",
  parse: "SKILLS.md §3 Error Handling (syntax errors: wrong SQL dialect)",
  safety: "SKILLS.md Core Principles: Safety First",
});
const C_READ_ONLY = SQL_CLAUSES.readOnly;
const C_SANDBOX = SQL_CLAUSES.sandbox;
const C_SCHEMA = SQL_CLAUSES.schema;
const C_ALPHA = SQL_CLAUSES.alpha;
const C_SETTINGS = SQL_CLAUSES.settings;
const C_PARSE = SQL_CLAUSES.parse;
const C_SAFETY = SQL_CLAUSES.safety;

/* ------------------------------ the parser ----------------------------- */

let parserReady = false;
let parserLoading: Promise<void> | undefined;

/** Loads the parser's WASM once; later calls return the same promise. */
export function initSqlParser(): Promise<void> {
  parserLoading ??= loadModule().then(() => {
    parserReady = true;
  });
  return parserLoading;
}

/* -------------------------------- rules -------------------------------- */

/** @internal shared with questdb-gate.ts */
export interface Matcher {
  exact: Set<string>;
  prefixes: string[];
}

function compileMatcher(patterns: readonly string[]): Matcher {
  const exact = new Set<string>();
  const prefixes: string[] = [];
  for (const p of patterns) {
    const lower = p.toLowerCase();
    if (lower.endsWith("*")) prefixes.push(lower.slice(0, -1));
    else exact.add(lower);
  }
  return { exact, prefixes };
}

/** @internal the pattern that matches `name`, if any */
export function matchPattern(m: Matcher, name: string): string | undefined {
  const lower = name.toLowerCase();
  if (m.exact.has(lower)) return lower;
  for (const p of m.prefixes) if (lower.startsWith(p)) return `${p}*`;
  return undefined;
}

/** @internal the denied-list pattern that matches `name`, unless the name is lifted */
export function deniedPattern(r: CompiledRules, name: string): string | undefined {
  const pat = matchPattern(r.denied, name);
  return pat !== undefined && !r.lifted.has(name.toLowerCase()) ? pat : undefined;
}

/** @internal */
export interface CompiledRules {
  denied: Matcher;
  lifted: Set<string>;
  alpha: Matcher;
  alphaDecision: "ask" | "forbid";
  alphaTables: string[][];
  paperPrefix: string;
  protectedSettings: Set<string>;
  settableSettings: Set<string>;
}

function compileRules(partial: Partial<SqlRules> | undefined): CompiledRules {
  const r: SqlRules = { ...DEFAULT_SQL_RULES, ...partial };
  return {
    denied: compileMatcher(r.deniedFunctions),
    lifted: new Set(r.liftedFunctions.map((f) => f.toLowerCase())),
    alpha: compileMatcher(r.alphaMarkers.functions),
    alphaDecision: r.alphaMarkers.decision,
    alphaTables: (r.alphaMarkers.tables ?? []).map((set) => set.map((t) => t.toLowerCase())),
    paperPrefix: r.paperPrefix,
    protectedSettings: new Set(r.protectedSettings.map((s) => s.toLowerCase())),
    settableSettings: new Set(r.settableSettings.map((s) => s.toLowerCase())),
  };
}

const DEFAULT_COMPILED = compileRules(undefined);
const compiledCache = new WeakMap<object, CompiledRules>();

/** @internal the rules of a context, compiled once per rules object */
export function rulesFor(partial: Partial<SqlRules> | undefined): CompiledRules {
  if (partial === undefined) return DEFAULT_COMPILED;
  let c = compiledCache.get(partial);
  if (!c) {
    c = compileRules(partial);
    compiledCache.set(partial, c);
  }
  return c;
}

/* ----------------------------- tree facts ------------------------------ */

type Obj = Record<string, unknown>;

const isObj = (v: unknown): v is Obj => typeof v === "object" && v !== null && !Array.isArray(v);
const str = (v: unknown): string | undefined => (typeof v === "string" ? v : undefined);

function quoteIdent(name: string): string {
  return /^[a-z_][a-z0-9_$]*$/.test(name) ? name : `"${name.replace(/"/g, '""')}"`;
}

/** a write target: a relation (relname set), or an object that is not a table (relname null) */
interface Write {
  display: string;
  relname: string | null;
  schemaname: string | null;
  via: string;
}

interface Finding {
  decision: SqlDecision;
  ruleId: string;
  clause: string;
  reason: string;
}

/** what one walk of a statement's tree found */
interface Facts {
  /** every function name referenced, display form (schema-qualified as written) and own name */
  funcs: Array<{ display: string; name: string }>;
  /** every operator name used (`+`, `@>`, a user-defined `###`) */
  operators: string[];
  reads: Array<{ display: string; relname: string; location: number }>;
  writes: Write[];
  /** structural findings (forbid/ask) made during the walk */
  findings: Finding[];
  schemaRisks: string[];
  executes: string[];
  prepares: string | undefined;
  deallocates: string | undefined;
  /** side effects beyond relation writes (settings, code, notifications, server files) */
  effects: boolean;
  copyOut: boolean;
  truncateCascade: boolean;
}

function rangeVarDisplay(rv: Obj): string {
  return [str(rv.catalogname), str(rv.schemaname), str(rv.relname)]
    .filter((p): p is string => p !== undefined && p !== "")
    .map(quoteIdent)
    .join(".");
}

function nameListDisplay(items: unknown): { display: string; last: string | null; schema: string | null } {
  const parts: string[] = [];
  if (Array.isArray(items)) {
    for (const it of items) {
      const s = isObj(it) && isObj(it.String) ? str(it.String.sval) : undefined;
      if (s !== undefined) parts.push(s);
    }
  }
  return {
    display: parts.map(quoteIdent).join("."),
    last: parts.length ? parts[parts.length - 1]! : null,
    schema: parts.length > 1 ? parts[parts.length - 2]! : null,
  };
}

/** ALTER TABLE subcommands that only add (SKILLS.md §3 Schema Safety names dropping columns and changing types as destructive; everything not listed here asks). */
const ALTER_ADDITIVE = new Set([
  "AT_AddColumn",
  "AT_AddColumnToView",
  "AT_ColumnDefault",
  "AT_SetNotNull",
  "AT_DropNotNull",
  "AT_AddIndex",
  "AT_AddConstraint",
  "AT_ValidateConstraint",
  "AT_AddIndexConstraint",
  "AT_SetStatistics",
  "AT_AddIdentity",
]);

/** DROP object types whose names are relations */
const DROP_RELATION_TYPES = new Set([
  "OBJECT_TABLE",
  "OBJECT_VIEW",
  "OBJECT_MATVIEW",
  "OBJECT_SEQUENCE",
  "OBJECT_INDEX",
  "OBJECT_FOREIGN_TABLE",
]);

/** Statements that define code the classifier cannot see into. */
const PROCEDURAL = new Set([
  "DoStmt",
  "CallStmt",
  "CreateFunctionStmt",
  "AlterFunctionStmt",
  "CreateTrigStmt",
  "CreateEventTrigStmt",
  "AlterEventTrigStmt",
  "RuleStmt",
  "CreatePLangStmt",
  "CreateCastStmt",
  "CreateTransformStmt",
  "DefineStmt",
  "CreateOpClassStmt",
  "CreateOpFamilyStmt",
  "AlterOpFamilyStmt",
  "AlterOperatorStmt",
  "CreateConversionStmt",
  "CreateAmStmt",
]);

/** Server, role and privilege administration: never the agent's job. */
const ADMIN = new Set([
  "GrantStmt",
  "GrantRoleStmt",
  "AlterDefaultPrivilegesStmt",
  "CreateRoleStmt",
  "AlterRoleStmt",
  "AlterRoleSetStmt",
  "DropRoleStmt",
  "CreatedbStmt",
  "AlterDatabaseStmt",
  "AlterDatabaseRefreshCollStmt",
  "AlterDatabaseSetStmt",
  "DropdbStmt",
  "AlterSystemStmt",
  "LoadStmt",
  "CheckPointStmt",
  "CreateExtensionStmt",
  "AlterExtensionStmt",
  "AlterExtensionContentsStmt",
  "CreateFdwStmt",
  "AlterFdwStmt",
  "CreateForeignServerStmt",
  "AlterForeignServerStmt",
  "CreateForeignTableStmt",
  "CreateUserMappingStmt",
  "AlterUserMappingStmt",
  "DropUserMappingStmt",
  "ImportForeignSchemaStmt",
  "CreatePolicyStmt",
  "AlterPolicyStmt",
  "CreateTableSpaceStmt",
  "DropTableSpaceStmt",
  "AlterTableSpaceOptionsStmt",
  "AlterTableMoveAllStmt",
  "AlterOwnerStmt",
  "ReassignOwnedStmt",
  "DropOwnedStmt",
  "SecLabelStmt",
  "CreatePublicationStmt",
  "AlterPublicationStmt",
  "CreateSubscriptionStmt",
  "AlterSubscriptionStmt",
  "DropSubscriptionStmt",
  "AlterCollationStmt",
  "AlterTSDictionaryStmt",
  "AlterTSConfigurationStmt",
]);

/** DDL that creates or changes a schema object that is not a relation (a write to `<what>`). */
const OBJECT_DDL: Record<string, string> = {
  CreateSchemaStmt: "schema",
  CreateEnumStmt: "type",
  CreateRangeStmt: "type",
  AlterEnumStmt: "type",
  AlterTypeStmt: "type",
  CreateDomainStmt: "domain",
  AlterDomainStmt: "domain",
  CreateStatsStmt: "statistics",
  AlterStatsStmt: "statistics",
  CommentStmt: "comment",
  AlterObjectDependsStmt: "dependency",
};

/** top-level statement type → kind; a type not listed here is refused (`db.unknown`) */
const KIND: Record<string, StatementKind> = {
  SelectStmt: "select",
  InsertStmt: "insert",
  UpdateStmt: "update",
  DeleteStmt: "delete",
  MergeStmt: "merge",
  TruncateStmt: "truncate",
  CopyStmt: "copy",
  VariableSetStmt: "set",
  VariableShowStmt: "show",
  ExplainStmt: "explain",
  TransactionStmt: "transaction",
  ConstraintsSetStmt: "transaction",
  PrepareStmt: "prepare",
  DeallocateStmt: "prepare",
  ExecuteStmt: "execute",
  DeclareCursorStmt: "cursor",
  FetchStmt: "cursor",
  ClosePortalStmt: "cursor",
  LockStmt: "lock",
  VacuumStmt: "maintenance",
  ClusterStmt: "maintenance",
  ReindexStmt: "maintenance",
  CreateStmt: "ddl",
  CreateTableAsStmt: "ddl",
  IndexStmt: "ddl",
  ViewStmt: "ddl",
  CreateSeqStmt: "ddl",
  AlterSeqStmt: "ddl",
  AlterTableStmt: "ddl",
  RenameStmt: "ddl",
  AlterObjectSchemaStmt: "ddl",
  DropStmt: "ddl",
  RefreshMatViewStmt: "ddl",
  CompositeTypeStmt: "ddl",
  ListenStmt: "other",
  UnlistenStmt: "other",
  NotifyStmt: "other",
  DiscardStmt: "other",
  ...Object.fromEntries(Object.keys(OBJECT_DDL).map((k) => [k, "ddl" as const])),
  ...Object.fromEntries([...PROCEDURAL].map((k) => [k, "procedural" as const])),
  ...Object.fromEntries([...ADMIN].map((k) => [k, "admin" as const])),
};

/** a DefElem's value read as a boolean; undefined when it is not clearly one */
function defElemBool(arg: unknown): boolean | undefined {
  if (!isObj(arg)) return undefined;
  if (isObj(arg.String)) {
    const s = String(arg.String.sval ?? "").toLowerCase();
    if (["true", "on", "yes", "1"].includes(s)) return true;
    if (["false", "off", "no", "0"].includes(s)) return false;
    return undefined;
  }
  if (isObj(arg.Integer)) return (arg.Integer.ival ?? 0) !== 0;
  if (isObj(arg.Boolean)) return arg.Boolean.boolval === true;
  if (isObj(arg.A_Const)) {
    const c = arg.A_Const;
    if (isObj(c.ival)) return (c.ival.ival ?? 0) !== 0;
    if (isObj(c.boolval)) return c.boolval.boolval === true;
    if (isObj(c.sval)) return defElemBool({ String: c.sval });
  }
  return undefined;
}

/** true when a transaction-mode option list asks for READ WRITE */
function asksReadWrite(options: unknown): boolean {
  if (!Array.isArray(options)) return false;
  return options.some(
    (o) => isObj(o) && isObj(o.DefElem) && o.DefElem.defname === "transaction_read_only" && defElemBool(o.DefElem.arg) !== true,
  );
}

type Handler = (node: Obj, w: Walk, effective: boolean) => boolean | void;

class Walk {
  readonly facts: Facts = {
    funcs: [],
    operators: [],
    reads: [],
    writes: [],
    findings: [],
    schemaRisks: [],
    executes: [],
    prepares: undefined,
    deallocates: undefined,
    effects: false,
    copyOut: false,
    truncateCascade: false,
  };
  /** RangeVar objects that are write targets, so they are not also listed as reads */
  readonly targets = new Set<Obj>();

  constructor(readonly rules: CompiledRules) {}

  target(rv: unknown, via: string): void {
    if (!isObj(rv) || typeof rv.relname !== "string") return;
    this.targets.add(rv);
    this.facts.writes.push({ display: rangeVarDisplay(rv), relname: rv.relname, schemaname: str(rv.schemaname) ?? null, via });
  }

  targetObject(what: string, via: string): void {
    this.facts.writes.push({ display: `<${what}>`, relname: null, schemaname: null, via });
  }

  forbid(ruleId: string, clause: string, reason: string): void {
    this.facts.findings.push({ decision: "forbid", ruleId, clause, reason });
    this.facts.effects = true;
  }

  /** every RangeVar under a node (for FOR UPDATE without OF: it locks every relation of the FROM clause) */
  rangeVarsUnder(node: unknown): Obj[] {
    const out: Obj[] = [];
    const stack: unknown[] = [node];
    while (stack.length) {
      const n = stack.pop();
      if (Array.isArray(n)) {
        for (const c of n) stack.push(c);
      } else if (isObj(n)) {
        if (typeof n.relname === "string") out.push(n);
        for (const k in n) {
          const c = n[k];
          if (typeof c === "object" && c !== null) stack.push(c);
        }
      }
    }
    return out;
  }

  run(root: unknown): Facts {
    // iterative, so a deeply nested statement cannot exhaust the JS stack
    const nodes: unknown[] = [root];
    const eff: boolean[] = [true];
    while (nodes.length) {
      const node = nodes.pop();
      const effective = eff.pop()!;
      if (Array.isArray(node)) {
        for (let i = node.length - 1; i >= 0; i--) {
          nodes.push(node[i]);
          eff.push(effective);
        }
        continue;
      }
      if (!isObj(node)) continue;
      if (typeof node.relname === "string" && !this.targets.has(node)) {
        this.facts.reads.push({ display: rangeVarDisplay(node), relname: node.relname, location: typeof node.location === "number" ? node.location : 0 });
      }
      // FuncCall, CallStmt.funccall, CREATE TRIGGER … EXECUTE FUNCTION, CREATE FUNCTION: every function name the statement names
      if (Array.isArray(node.funcname)) {
        const n = nameListDisplay(node.funcname);
        if (n.last !== null) this.facts.funcs.push({ display: n.display, name: n.last });
      }
      // A_Expr (`a + b`, `x = ANY(…)`), and OPERATOR(schema.op): operators run functions too
      if (Array.isArray(node.name) && typeof node.kind === "string" && node.kind.startsWith("AEXPR_")) {
        const n = nameListDisplay(node.name);
        if (n.last !== null) this.facts.operators.push(n.last);
      }
      for (const key in node) {
        const child = node[key];
        if (typeof child !== "object" || child === null) continue;
        let childEff = effective;
        const h = HANDLERS[key];
        if (h && isObj(child)) {
          const r = h(child, this, effective);
          if (typeof r === "boolean") childEff = r;
        }
        nodes.push(child);
        eff.push(childEff);
      }
    }
    return this.facts;
  }
}

const LOCK_STRENGTH: Record<string, string> = {
  LCS_FORKEYSHARE: "FOR KEY SHARE",
  LCS_FORSHARE: "FOR SHARE",
  LCS_FORNOKEYUPDATE: "FOR NO KEY UPDATE",
  LCS_FORUPDATE: "FOR UPDATE",
};

const dmlHandler =
  (via: string): Handler =>
  (n, w, effective) => {
    if (effective) w.target(n.relation, via);
  };

const HANDLERS: Record<string, Handler> = {
  InsertStmt: dmlHandler("INSERT"),
  UpdateStmt: dmlHandler("UPDATE"),
  DeleteStmt: dmlHandler("DELETE"),
  MergeStmt: dmlHandler("MERGE"),
  SelectStmt(n, w, effective) {
    if (!effective) return;
    if (isObj(n.intoClause)) w.target(n.intoClause.rel, "SELECT … INTO");
    if (Array.isArray(n.lockingClause) && n.lockingClause.length) {
      for (const lc of n.lockingClause) {
        const c = isObj(lc) && isObj(lc.LockingClause) ? lc.LockingClause : {};
        const via = `SELECT … ${LOCK_STRENGTH[String(c.strength)] ?? "FOR UPDATE"}`;
        const from = w.rangeVarsUnder(n.fromClause);
        let rels = from;
        if (Array.isArray(c.lockedRels) && c.lockedRels.length) {
          // FOR UPDATE OF names FROM items by alias or name: lock the relation they stand for
          const byName = new Map<string, Obj>();
          for (const rv of from) byName.set(isObj(rv.alias) ? String(rv.alias.aliasname) : String(rv.relname), rv);
          const named = w.rangeVarsUnder(c.lockedRels);
          for (const rv of named) w.targets.add(rv); // names, not further reads
          rels = named.map((rv) => (rv.schemaname === undefined ? byName.get(String(rv.relname)) : undefined) ?? rv);
        }
        for (const rv of rels) w.facts.writes.push({ display: rangeVarDisplay(rv), relname: String(rv.relname), schemaname: str(rv.schemaname) ?? null, via });
        if (!rels.length) w.targetObject("locked rows", via);
      }
    }
  },
  CreateTableAsStmt(n, w, effective) {
    if (effective && isObj(n.into)) w.target(n.into.rel, n.objtype === "OBJECT_MATVIEW" ? "CREATE MATERIALIZED VIEW" : "CREATE TABLE AS");
  },
  CreateStmt(n, w) {
    w.target(n.relation, "CREATE TABLE");
    // PARTITION OF / INHERITS changes the parent too
    if (Array.isArray(n.inhRelations)) for (const p of w.rangeVarsUnder(n.inhRelations)) w.target(p, "CREATE TABLE … PARTITION OF/INHERITS (changes the parent)");
  },
  Constraint(n, w) {
    // a foreign key adds referential-integrity triggers to the referenced table
    if (n.contype === "CONSTR_FOREIGN") w.target(n.pktable, "FOREIGN KEY … REFERENCES (adds triggers to the referenced table)");
  },
  IndexStmt: (n, w) => w.target(n.relation, "CREATE INDEX"),
  ViewStmt: (n, w) => w.target(n.view, "CREATE VIEW"),
  CreateSeqStmt: (n, w) => w.target(n.sequence, "CREATE SEQUENCE"),
  AlterSeqStmt: (n, w) => w.target(n.sequence, "ALTER SEQUENCE"),
  RefreshMatViewStmt: (n, w) => w.target(n.relation, "REFRESH MATERIALIZED VIEW"),
  CompositeTypeStmt: (n, w) => w.target(n.typevar, "CREATE TYPE"),
  AlterTableStmt(n, w) {
    w.target(n.relation, "ALTER TABLE");
    if (!Array.isArray(n.cmds)) return;
    for (const c of n.cmds) {
      const cmd = isObj(c) && isObj(c.AlterTableCmd) ? c.AlterTableCmd : undefined;
      const subtype = String(cmd?.subtype ?? "unknown");
      if (!ALTER_ADDITIVE.has(subtype)) {
        const col = cmd?.name ? quoteIdent(String(cmd.name)) : "";
        const what =
          subtype === "AT_AlterColumnType"
            ? `ALTER COLUMN ${col} TYPE`
            : `${subtype.replace(/^AT_/, "").replace(/([a-z])([A-Z])/g, "$1 $2").toUpperCase()} ${col}`;
        w.facts.schemaRisks.push(`ALTER TABLE ${isObj(n.relation) ? rangeVarDisplay(n.relation) : ""} ${what}`);
      }
    }
  },
  RenameStmt(n, w) {
    if (isObj(n.relation)) w.target(n.relation, "RENAME");
    else w.targetObject(String(n.renameType ?? "object").replace(/^OBJECT_/, "").toLowerCase(), "RENAME");
    w.facts.schemaRisks.push(`RENAME … TO ${quoteIdent(String(n.newname ?? ""))} (a breaking migration)`);
  },
  AlterObjectSchemaStmt(n, w) {
    if (isObj(n.relation)) w.target(n.relation, "SET SCHEMA");
    else w.targetObject(String(n.objectType ?? "object").replace(/^OBJECT_/, "").toLowerCase(), "SET SCHEMA");
    w.facts.schemaRisks.push(`ALTER … SET SCHEMA ${quoteIdent(String(n.newschema ?? ""))} (a breaking migration)`);
  },
  DropStmt(n, w) {
    const type = String(n.removeType ?? "OBJECT_UNKNOWN");
    const label = type.replace(/^OBJECT_/, "").replace(/_/g, " ");
    const names: string[] = [];
    if (Array.isArray(n.objects)) {
      for (const o of n.objects) {
        const items = isObj(o) && isObj(o.List) ? o.List.items : undefined;
        const nm = nameListDisplay(items);
        if (DROP_RELATION_TYPES.has(type) && nm.last !== null) {
          w.facts.writes.push({ display: nm.display, relname: nm.last, schemaname: nm.schema, via: `DROP ${label}` });
          names.push(nm.display);
        } else {
          w.targetObject(`${label.toLowerCase()} ${nm.display || "…"}`.trim(), `DROP ${label}`);
          names.push(nm.display || "…");
        }
      }
    }
    w.facts.schemaRisks.push(`DROP ${label} ${names.join(", ")}${n.behavior === "DROP_CASCADE" ? " CASCADE" : ""}`);
  },
  TruncateStmt(n, w) {
    for (const rv of w.rangeVarsUnder(n.relations)) w.target(rv, "TRUNCATE");
    if (n.behavior === "DROP_CASCADE") w.facts.truncateCascade = true;
  },
  CopyStmt(n, w) {
    if (n.is_program === true) {
      w.forbid("db.copy", C_SAFETY, `COPY … PROGRAM runs \`${String(n.filename ?? "")}\` as a shell command on the database server; never allowed — read with SELECT instead`);
      return;
    }
    if (typeof n.filename === "string") {
      w.forbid("db.copy", C_SAFETY, `COPY … ${n.is_from ? "FROM" : "TO"} '${n.filename}' reads or writes a file on the database server; use COPY … ${n.is_from ? "FROM STDIN" : "TO STDOUT"} through the client`);
      return;
    }
    if (n.is_from === true) w.target(n.relation, "COPY … FROM STDIN");
    else w.facts.copyOut = true;
  },
  VacuumStmt(n, w) {
    const via = n.is_vacuumcmd === false ? "ANALYZE" : "VACUUM";
    const rels = w.rangeVarsUnder(n.rels);
    for (const rv of rels) w.target(rv, via);
    if (!rels.length) w.targetObject("every table", via);
  },
  ClusterStmt(n, w) {
    if (isObj(n.relation)) w.target(n.relation, "CLUSTER");
    else w.targetObject("every clustered table", "CLUSTER");
  },
  ReindexStmt(n, w) {
    if (isObj(n.relation)) w.target(n.relation, "REINDEX");
    else w.targetObject(`${String(n.kind ?? "").replace(/^REINDEX_OBJECT_/, "").toLowerCase()} ${String(n.name ?? "")}`.trim(), "REINDEX");
  },
  LockStmt(n, w) {
    for (const rv of w.rangeVarsUnder(n.relations)) w.target(rv, "LOCK TABLE");
  },
  NotifyStmt(n, w) {
    w.forbid("db.notify", C_READ_ONLY, `NOTIFY ${String(n.conditionname ?? "")} signals every session listening, like pg_notify(); the trading system may act on it`);
  },
  DiscardStmt(n, w) {
    if (n.target === "DISCARD_ALL") w.forbid("db.protected-setting", C_SETTINGS, "DISCARD ALL runs RESET ALL and resets the settings the gateway enforces; use DISCARD PLANS, SEQUENCES or TEMP");
  },
  VariableSetStmt(n, w) {
    const name = String(n.name ?? "").toLowerCase();
    if (n.kind === "VAR_RESET_ALL") {
      w.forbid("db.protected-setting", C_SETTINGS, "RESET ALL would reset the settings the gateway enforces (read-only default, statement_timeout …); reset the one setting you changed");
      return;
    }
    if (n.kind === "VAR_SET_MULTI") {
      if (asksReadWrite(n.args)) {
        w.forbid("db.read-only", C_READ_ONLY, `SET ${String(n.name ?? "")} … READ WRITE fights the gateway's enforced read-only default; leave the access mode to the gateway`);
      }
      return;
    }
    const verb = n.kind === "VAR_RESET" ? "RESET" : "SET";
    if (w.rules.protectedSettings.has(name)) {
      w.forbid("db.protected-setting", C_SETTINGS, `${verb} ${name} changes a setting the gateway enforces; it cannot be changed from a session`);
    } else if (!w.rules.settableSettings.has(name)) {
      // an allowlist: timeouts, memory, parallelism, application_name … are the gateway's or the server's to set
      w.forbid(
        "db.protected-setting",
        C_SETTINGS,
        `${verb} ${name}: a session may change only client formats and name resolution (${[...w.rules.settableSettings].join(", ")}); the gateway and the server's configuration decide the rest`,
      );
    }
  },
  TransactionStmt(n, w) {
    const kind = String(n.kind ?? "");
    if (kind === "TRANS_STMT_PREPARE" || kind === "TRANS_STMT_COMMIT_PREPARED" || kind === "TRANS_STMT_ROLLBACK_PREPARED") {
      w.forbid("db.transaction", C_SAFETY, "two-phase commit (PREPARE TRANSACTION / COMMIT PREPARED) leaves transactions and their locks behind the session; use COMMIT or ROLLBACK");
      return;
    }
    if (asksReadWrite(n.options)) {
      w.forbid("db.read-only", C_READ_ONLY, "BEGIN/START TRANSACTION READ WRITE fights the gateway's enforced read-only default; use plain BEGIN and let the gateway decide the access mode");
    }
  },
  ExplainStmt(n) {
    // EXPLAIN without ANALYZE plans and does not run: the inner statement's writes do not happen
    const analyze = Array.isArray(n.options)
      ? n.options.some((o) => isObj(o) && isObj(o.DefElem) && o.DefElem.defname === "analyze" && (o.DefElem.arg === undefined || defElemBool(o.DefElem.arg) !== false))
      : false;
    return analyze;
  },
  ExecuteStmt(n, w) {
    w.facts.executes.push(String(n.name ?? ""));
  },
  PrepareStmt(n, w) {
    w.facts.prepares = String(n.name ?? "");
  },
  DeallocateStmt(n, w) {
    w.facts.deallocates = n.isall === true ? "*" : String(n.name ?? "");
  },
};

// node-type lookups must not reach Object.prototype
Object.setPrototypeOf(HANDLERS, null);
Object.setPrototypeOf(KIND, null);

// the arms of UNION/INTERSECT/EXCEPT are SelectStmts stored without their type wrapper
HANDLERS.larg = HANDLERS.SelectStmt!;
HANDLERS.rarg = HANDLERS.SelectStmt!;

const LABEL_OVERRIDES: Record<string, string> = {
  VariableSetStmt: "SET",
  VariableShowStmt: "SHOW",
  ConstraintsSetStmt: "SET CONSTRAINTS",
  ClosePortalStmt: "CLOSE",
  CreateTrigStmt: "CREATE TRIGGER",
  CreateEventTrigStmt: "CREATE EVENT TRIGGER",
  AlterEventTrigStmt: "ALTER EVENT TRIGGER",
  RuleStmt: "CREATE RULE",
  CreatePLangStmt: "CREATE LANGUAGE",
  DefineStmt: "CREATE AGGREGATE/OPERATOR/TYPE",
  CreateOpClassStmt: "CREATE OPERATOR CLASS",
  CreateOpFamilyStmt: "CREATE OPERATOR FAMILY",
  AlterOpFamilyStmt: "ALTER OPERATOR FAMILY",
  CreateAmStmt: "CREATE ACCESS METHOD",
  GrantStmt: "GRANT/REVOKE",
  GrantRoleStmt: "GRANT/REVOKE role",
  CreatedbStmt: "CREATE DATABASE",
  DropdbStmt: "DROP DATABASE",
  AlterDatabaseSetStmt: "ALTER DATABASE … SET",
  AlterRoleSetStmt: "ALTER ROLE … SET",
  AlterSystemStmt: "ALTER SYSTEM",
  CheckPointStmt: "CHECKPOINT",
  CreateFdwStmt: "CREATE FOREIGN DATA WRAPPER",
  CreateForeignServerStmt: "CREATE SERVER",
  SecLabelStmt: "SECURITY LABEL",
  AlterOwnerStmt: "ALTER … OWNER TO",
};

/** `CreateFunctionStmt` → `CREATE FUNCTION`, for reasons people read */
function sqlLabel(type: string): string {
  return LABEL_OVERRIDES[type] ?? type.replace(/Stmt$/, "").replace(/([a-z])([A-Z])/g, "$1 $2").toUpperCase();
}

for (const t of PROCEDURAL) {
  HANDLERS[t] = (_n, w) =>
    w.forbid(
      "db.procedural",
      C_READ_ONLY,
      `${sqlLabel(t)} runs or defines code whose body the gateway cannot judge (it could hide writes and denied functions); write the SQL out as plain statements, or propose the code as a migration for human review`,
    );
}
for (const t of ADMIN) {
  HANDLERS[t] = (_n, w) =>
    w.forbid("db.admin", C_SAFETY, `${sqlLabel(t)} administers the server, roles or privileges; that is never the agent's job — ask a human`);
}
for (const [t, what] of Object.entries(OBJECT_DDL)) {
  HANDLERS[t] = (n, w) => {
    if (t === "CommentStmt") {
      w.targetObject(`comment on ${String(n.objtype ?? "OBJECT_").replace(/^OBJECT_/, "").toLowerCase()}`, "COMMENT ON");
      return;
    }
    const schema = str(n.schemaname);
    const name = schema !== undefined ? quoteIdent(schema) : Array.isArray(n.typeName) ? nameListDisplay(n.typeName).display : "";
    w.targetObject(`${what}${name ? ` ${name}` : ""}`, sqlLabel(t));
  };
}

/* ----------------------------- the verdicts ---------------------------- */

/** statements that touch only the session, allowed as `db.session` when nothing else applies */
const SESSION_ONLY = new Set(["VariableSetStmt", "ListenStmt", "UnlistenStmt", "DiscardStmt", "DeallocateStmt", "ClosePortalStmt"]);

const SEVERITY: Record<SqlDecision, number> = { allow: 0, ask: 1, forbid: 2 };

/** index of the strictest item; on equal decisions a write beats a read (its rule is the one that let it through), then the first */
function strictestIndex(items: ReadonlyArray<{ decision: SqlDecision; readOnly?: boolean }>): number {
  let best = 0;
  for (let i = 1; i < items.length; i++) {
    const a = items[i]!;
    const b = items[best]!;
    if (SEVERITY[a.decision] > SEVERITY[b.decision] || (SEVERITY[a.decision] === SEVERITY[b.decision] && a.readOnly === false && b.readOnly === true)) best = i;
  }
  return best;
}

function isCatalog(w: Write): boolean {
  if (w.relname === null) return false;
  if (w.schemaname !== null) return ["pg_catalog", "information_schema", "pg_toast"].includes(w.schemaname);
  return w.relname.startsWith("pg_");
}

function list(items: readonly string[]): string {
  return items.map((s) => `\`${s}\``).join(", ");
}

function judgeStatement(stmt: Obj, ctx: SqlContext, rules: CompiledRules, prepared: ReadonlyMap<string, SqlVerdict>): SqlStatementVerdict {
  const type = Object.keys(stmt)[0] ?? "";
  const kind: StatementKind = KIND[type] ?? "other";
  const facts = new Walk(rules).run(stmt);
  const findings: Finding[] = [];

  if (!(type in KIND)) {
    findings.push({
      decision: "forbid",
      ruleId: "db.unknown",
      clause: C_SAFETY,
      reason: `${sqlLabel(type)} is not a statement the gateway knows; refused by default`,
    });
  }

  // side-effecting functions, in every mode and at any depth
  const seenDenied = new Set<string>();
  for (const f of facts.funcs) {
    const pat = deniedPattern(rules, f.name);
    if (pat !== undefined && !seenDenied.has(f.display)) {
      seenDenied.add(f.display);
      findings.push({
        decision: "forbid",
        ruleId: "db.denied-function",
        clause: C_READ_ONLY,
        reason: `\`${f.display}()\` has side effects outside a read (denied list: ${pat}); remove the call`,
      });
    }
  }
  if (seenDenied.size) facts.effects = true;

  findings.push(...facts.findings);

  // EXECUTE runs what the name was prepared as
  let executedWrites: string[] = [];
  let executedTables: string[] = [];
  let executedReadOnly = true;
  for (const name of facts.executes) {
    const p = prepared.get(name);
    if (!p) {
      executedReadOnly = false;
      findings.push({
        decision: "forbid",
        ruleId: "db.execute",
        clause: C_READ_ONLY,
        reason: `EXECUTE ${quoteIdent(name)}: the gateway has no record of what \`${name}\` was prepared as; PREPARE it through the gateway in this session, or send the statement itself`,
      });
    } else {
      findings.push({ decision: p.decision, ruleId: p.ruleId, clause: p.clause, reason: `EXECUTE ${quoteIdent(name)} runs the prepared statement: ${p.reason}` });
      for (const s of p.statements) {
        executedWrites = executedWrites.concat(s.writes);
        executedTables = executedTables.concat(s.tables);
        if (!s.readOnly) executedReadOnly = false;
      }
    }
  }

  // writes: system catalogs never; test/backtest databases freely; paper only to paper_ tables
  const writes = facts.writes;
  const catalog = writes.filter(isCatalog);
  if (catalog.length) {
    const settings = catalog.some((w) => w.relname === "pg_settings");
    findings.push({
      decision: "forbid",
      ruleId: settings ? "db.protected-setting" : "db.admin",
      clause: settings ? C_SETTINGS : C_SAFETY,
      reason: settings
        ? "writing pg_settings is set_config() by another name; the settings the gateway enforces cannot be changed from a session"
        : `${catalog[0]!.via} writes the system catalog ${list(catalog.map((w) => w.display))}; never allowed`,
    });
  }
  if (writes.length) {
    if (ctx.mode === "paper") {
      const outside = writes.filter((w) => w.relname === null || !w.relname.startsWith(rules.paperPrefix));
      if (outside.length) {
        const first = outside[0]!;
        const quotedCase = outside.some((w) => w.relname !== null && w.relname.toLowerCase().startsWith(rules.paperPrefix));
        findings.push({
          decision: "forbid",
          ruleId: "db.paper-prefix",
          clause: C_SANDBOX,
          reason:
            `${first.via} on ${list(outside.map((w) => w.display))}: in paper mode production is read-only; write only to tables named \`${rules.paperPrefix}…\`` +
            (quotedCase ? ` (a quoted name is not folded: "PAPER_x" is not ${rules.paperPrefix}x)` : ""),
        });
      } else if (writes.some((w) => w.via === "CREATE VIEW" || w.via === "CREATE MATERIALIZED VIEW")) {
        // a write through a view reaches the tables it reads: a paper_ name must stand for a table of its own
        findings.push({
          decision: "forbid",
          ruleId: "db.paper-prefix",
          clause: C_SANDBOX,
          reason: `a view named \`${rules.paperPrefix}…\` would let writes "to a paper table" reach the tables it reads; paper names are for ordinary tables only`,
        });
      } else {
        findings.push({
          decision: "allow",
          ruleId: "db.paper-prefix",
          clause: C_SANDBOX,
          reason: `writes only paper trading tables (${list(writes.map((w) => w.display))})`,
        });
      }
      if (facts.truncateCascade) {
        findings.push({
          decision: "ask",
          ruleId: "db.paper-prefix",
          clause: C_SANDBOX,
          reason: "TRUNCATE … CASCADE also empties every table with a foreign key to these, which need not be paper tables; truncate without CASCADE, or ask for approval",
        });
      }
    } else {
      findings.push({
        decision: "allow",
        ruleId: "db.sandbox",
        clause: C_SANDBOX,
        reason: `${ctx.mode} mode: writes to the isolated test database (${list(writes.map((w) => w.display))}) are fixture setup/teardown`,
      });
    }
  }

  for (const risk of facts.schemaRisks) {
    findings.push({
      decision: "ask",
      ruleId: "db.schema-safety",
      clause: C_SCHEMA,
      reason: `${risk.replace(/\s+/g, " ").trim()} needs human confirmation; propose it as a migration and wait for approval`,
    });
  }

  if (facts.copyOut) {
    findings.push(
      ctx.mode === "paper"
        ? {
            decision: "ask",
            ruleId: "db.copy",
            clause: C_ALPHA,
            reason: "COPY … TO STDOUT exports production data in bulk; use a SELECT with WHERE and LIMIT, or ask for approval",
          }
        : { decision: "allow", ruleId: "db.copy", clause: C_SANDBOX, reason: `${ctx.mode} mode: COPY … TO STDOUT reads the isolated test database` },
    );
  }

  // alpha-mining markers: statistical functions, and reading signals with fills
  const alphaHits = new Set<string>();
  for (const f of facts.funcs) if (matchPattern(rules.alpha, f.name) !== undefined) alphaHits.add(f.display);
  const forbidAlpha = rules.alphaDecision === "forbid";
  const decisionWord = forbidAlpha ? "refused by policy" : "ask for approval if this is a system-performance or data-quality check";
  if (alphaHits.size) {
    findings.push({
      decision: rules.alphaDecision,
      ruleId: "db.alpha-marker",
      clause: C_ALPHA,
      reason: `${list([...alphaHits].map((d) => `${d}()`))} is statistical analysis (STDDEV, CORR, … for parameter tuning is forbidden); ${decisionWord}`,
    });
  }
  if (rules.alphaTables.length) {
    const names = new Set<string>();
    const strip = (n: string) => (n.startsWith(rules.paperPrefix) ? n.slice(rules.paperPrefix.length) : n).toLowerCase();
    for (const r of facts.reads) names.add(strip(r.relname));
    for (const t of rules.alphaTables) {
      if (t.every((n) => names.has(n))) {
        findings.push({
          decision: rules.alphaDecision,
          ruleId: "db.alpha-marker",
          clause: C_ALPHA,
          reason: `reads ${list(t)} together (joining signals and fills computes hypothetical PnL); ${decisionWord}`,
        });
      }
    }
  }

  const readOnly = writes.length === 0 && !facts.effects && executedReadOnly;
  if (!findings.length) {
    if (kind === "transaction") findings.push({ decision: "allow", ruleId: "db.transaction", clause: C_READ_ONLY, reason: "transaction control" });
    else if (SESSION_ONLY.has(type))
      findings.push({ decision: "allow", ruleId: "db.session", clause: C_READ_ONLY, reason: `${sqlLabel(type)} changes nothing in the database` });
    else findings.push({ decision: "allow", ruleId: "db.read-only", clause: C_READ_ONLY, reason: "read-only statement" });
  }

  const win = findings[strictestIndex(findings)]!;
  const tables = [...facts.reads]
    .sort((a, b) => a.location - b.location)
    .map((r) => r.display)
    .concat(executedTables);
  const verdict: SqlStatementVerdict = {
    kind,
    readOnly,
    tables: [...new Set(tables)],
    writes: [...new Set(writes.map((w) => w.display).concat(executedWrites))],
    functions: [...new Set(facts.funcs.map((f) => f.name.toLowerCase()))],
    operators: [...new Set(facts.operators)],
    decision: win.decision,
    ruleId: win.ruleId,
    clause: win.clause,
    reason: win.reason,
  };
  if (facts.prepares !== undefined && type === "PrepareStmt") verdict.prepares = facts.prepares;
  if (facts.deallocates !== undefined && type === "DeallocateStmt") verdict.deallocates = facts.deallocates;
  return verdict;
}

/**
 * Classifies one SQL string (possibly several statements) for the given mode.
 * Synchronous; call `initSqlParser()` once before.
 */
export function classifySql(sql: string, ctx: SqlContext): SqlVerdict {
  if (!parserReady) throw new Error("classifySql: the SQL parser is not loaded; await initSqlParser() once at startup");
  const rules = rulesFor(ctx.rules);

  if (sql.includes("\u0000")) {
    return refuseParse("the statement contains a NUL byte; PostgreSQL stops reading there, so what runs is not what was sent");
  }
  // PostgreSQL's whitespace, not JS's (which also strips U+00A0 and friends)
  if (/^[ \t\n\r\f\v]*$/.test(sql)) return empty();

  let tree: unknown;
  try {
    tree = parseSync(sql);
  } catch (e) {
    return refuseParse(`PostgreSQL cannot parse it: ${e instanceof Error ? e.message : String(e)}`);
  }
  const stmts = isObj(tree) && Array.isArray(tree.stmts) ? tree.stmts : [];
  if (!stmts.length) return empty();

  const prepared = new Map(ctx.prepared ?? []);
  const judged: SqlStatementVerdict[] = [];
  for (const raw of stmts) {
    const stmt = isObj(raw) && isObj(raw.stmt) ? raw.stmt : {};
    const v = judgeStatement(stmt, ctx, rules, prepared);
    judged.push(v);
    // a PREPARE earlier in the same string names what a later EXECUTE runs
    if (v.prepares !== undefined) prepared.set(v.prepares, asVerdict(v));
    if (v.deallocates === "*") prepared.clear();
    else if (v.deallocates !== undefined) prepared.delete(v.deallocates);
  }
  const i = strictestIndex(judged);
  const win = judged[i]!;
  return {
    decision: win.decision,
    ruleId: win.ruleId,
    clause: win.clause,
    reason: judged.length > 1 ? `statement ${i + 1} of ${judged.length} (${win.kind}): ${win.reason}` : win.reason,
    statements: judged,
  };
}

function asVerdict(s: SqlStatementVerdict): SqlVerdict {
  return { decision: s.decision, ruleId: s.ruleId, clause: s.clause, reason: s.reason, statements: [s] };
}

function refuseParse(reason: string): SqlVerdict {
  return { decision: "forbid", ruleId: "db.parse", clause: C_PARSE, reason: `${reason}; refused because it cannot be judged`, statements: [] };
}

function empty(): SqlVerdict {
  return { decision: "allow", ruleId: "db.empty", clause: C_READ_ONLY, reason: "no statement (empty or only comments); nothing runs", statements: [] };
}

/**
 * Keeps the gateway's record of SQL-level prepared statements: call it with
 * the verdict of a string the server ran. An allowed PREPARE is remembered
 * (so a later EXECUTE is judged as what it prepared); DEALLOCATE forgets.
 */
export function rememberPrepared(map: Map<string, SqlVerdict>, verdict: SqlVerdict): void {
  for (const s of verdict.statements) {
    if (s.prepares !== undefined && s.decision === "allow") map.set(s.prepares, asVerdict(s));
    if (s.deallocates === "*") map.clear();
    else if (s.deallocates !== undefined) map.delete(s.deallocates);
  }
}

/**
 * A bounded LRU of verdicts for the gateway: drivers send the same few
 * statements over and over, and a parse costs tens of microseconds. A verdict
 * is a pure function of the text, the mode, the engine and the rules, so one
 * cache serves one (engine, mode, rules) combination — the caller keeps one
 * per combination. Two levels:
 *
 * - by exact text, for every verdict that depends on the text alone (not an
 *   EXECUTE, which is judged as what the session prepared: `cacheableVerdict`);
 * - by shape (`statementShape`: the text with its standalone numeric literals
 *   blanked), for allowed plain SELECTs only. A SELECT's verdict never depends
 *   on a number's value (the classifier reads numeric constants only in
 *   transaction and EXPLAIN options), so `… WHERE aid = 1` and `… WHERE aid =
 *   2` share one verdict; simple-protocol clients inline their parameters.
 *
 * Stored verdicts are frozen: every connection of the combination shares them.
 */
export class VerdictCache {
  private readonly exact = new Map<string, SqlVerdict>();
  private readonly shapes = new Map<string, SqlVerdict>();
  hits = 0;
  misses = 0;

  constructor(
    readonly maxEntries = 2048,
    /** longer statements are judged every time (bounds the memory a cache holds) */
    readonly maxKeyLength = 4096,
  ) {}

  get size(): number {
    return this.exact.size + this.shapes.size;
  }

  /** The cached verdict for `sql`, else `judge(sql)` (stored when cacheable). */
  lookup(sql: string, judge: (sql: string) => SqlVerdict): SqlVerdict {
    if (sql.length > this.maxKeyLength) return judge(sql);
    const hit = touch(this.exact, sql);
    if (hit !== undefined) {
      this.hits++;
      return hit;
    }
    const shape = statementShape(sql);
    if (shape !== undefined) {
      const shared = touch(this.shapes, shape);
      if (shared !== undefined) {
        this.hits++;
        return shared;
      }
    }
    this.misses++;
    const verdict = judge(sql);
    if (cacheableVerdict(sql, verdict)) {
      const plainSelect = verdict.decision === "allow" && verdict.statements.length > 0 && verdict.statements.every((st) => st.kind === "select");
      if (shape !== undefined && plainSelect) put(this.shapes, shape, freezeVerdict(verdict), this.maxEntries);
      else put(this.exact, sql, freezeVerdict(verdict), this.maxEntries);
    }
    return verdict;
  }

  clear(): void {
    this.exact.clear();
    this.shapes.clear();
  }
}

function touch(map: Map<string, SqlVerdict>, key: string): SqlVerdict | undefined {
  const v = map.get(key);
  if (v !== undefined) {
    // most recently used last
    map.delete(key);
    map.set(key, v);
  }
  return v;
}

function put(map: Map<string, SqlVerdict>, key: string, v: SqlVerdict, max: number): void {
  if (map.size >= max) map.delete(map.keys().next().value as string);
  map.set(key, v);
}

/**
 * Whether a verdict depends on the text alone. Not when the text can run an
 * EXECUTE (judged as what the session prepared under that name — also inside
 * EXPLAIN or CREATE TABLE AS): a keyword cannot be escaped or split, so text
 * without the letters `execute` in any case has none.
 */
export function cacheableVerdict(sql: string, v: SqlVerdict): boolean {
  return !/execute/i.test(sql) && v.statements.every((s) => s.kind !== "execute");
}

function freezeVerdict(v: SqlVerdict): SqlVerdict {
  if (Object.isFrozen(v)) return v;
  for (const s of v.statements) {
    Object.freeze(s.tables);
    Object.freeze(s.writes);
    Object.freeze(s);
  }
  Object.freeze(v.statements);
  return Object.freeze(v);
}

const isDigit = (c: number): boolean => c >= 0x30 && c <= 0x39;
/** letters, digits, `_`, `$` and every non-ASCII character continue an identifier or keyword in PostgreSQL's lexer */
const isWordChar = (c: number): boolean => (c >= 0x61 && c <= 0x7a) || (c >= 0x41 && c <= 0x5a) || isDigit(c) || c === 0x5f || c === 0x24 || c >= 0x80;

/**
 * The text with every standalone run of digits (a numeric literal or a part
 * of one: not inside a word, string, quoted identifier or `$n`, and not
 * followed by a letter, `_` or `$`) replaced by a NUL, which no judged
 * statement contains. Two texts with the same shape differ only in the values
 * of such numbers. Undefined — no shape, judge the text itself — for anything
 * this small scanner does not lex exactly like PostgreSQL: comments,
 * backslashes (escape strings), dollar quotes, NULs, unterminated quotes.
 */
export function statementShape(sql: string): string | undefined {
  let out = "";
  let last = 0;
  const n = sql.length;
  let i = 0;
  while (i < n) {
    const c = sql.charCodeAt(i);
    if (c === 0x27 || c === 0x22) {
      // 'string' or "identifier"; a doubled quote stays inside (no backslash escapes: refused below)
      i++;
      for (;;) {
        if (i >= n) return undefined;
        const d = sql.charCodeAt(i);
        if (d === 0x5c || d === 0) return undefined;
        i++;
        if (d === c) {
          if (i < n && sql.charCodeAt(i) === c) i++;
          else break;
        }
      }
      continue;
    }
    if (c === 0x5c || c === 0) return undefined;
    if (c === 0x24) {
      // $n parameter (kept); anything else is a dollar quote
      if (i + 1 >= n || !isDigit(sql.charCodeAt(i + 1))) return undefined;
      i++;
      while (i < n && isDigit(sql.charCodeAt(i))) i++;
      continue;
    }
    if ((c === 0x2d && sql.charCodeAt(i + 1) === 0x2d) || (c === 0x2f && sql.charCodeAt(i + 1) === 0x2a)) return undefined;
    if (isDigit(c)) {
      const from = i;
      while (i < n && isDigit(sql.charCodeAt(i))) i++;
      if (i < n && isWordChar(sql.charCodeAt(i))) {
        // 1e5, 0x1F, 1_000, 123abc: kept as written
        while (i < n && isWordChar(sql.charCodeAt(i))) i++;
        continue;
      }
      out += `${sql.slice(last, from)}\u0000`;
      last = i;
      continue;
    }
    if (isWordChar(c)) {
      while (i < n && isWordChar(sql.charCodeAt(i))) i++;
      continue;
    }
    i++;
  }
  return last === 0 ? sql : out + sql.slice(last);
}
