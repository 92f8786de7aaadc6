/**
 * The Redis commands a sandbox may send, per mode: an allowlist. Anything
 * not in this table is refused (`redis.unlisted`); a few commands are named
 * on the never-list only so their refusal can say why (`redis.denied`).
 *
 * Classes:
 * - `read`: every mode (paper reads production; test/backtest the test instance).
 * - `write`: data writes; test and backtest only (the test instance), each
 *   one recorded with its keys. Refused in paper mode (`redis.read-only`).
 * - `session`: connection plumbing (PING, MULTI/EXEC, SUBSCRIBE …); every mode.
 *
 * What a trading client needs is here: strings, hashes, lists, sets, sorted
 * sets, streams (XADD/XREAD/XREADGROUP/XACK …), keys and TTLs, the SCAN
 * family, pub/sub (subscribing everywhere, PUBLISH on the test instance
 * only), transactions (MULTI/EXEC/WATCH), PING/ECHO/INFO. Server
 * administration, scripting, replication, persistence, ACL, other
 * databases, and anything that would undo the daemon's login is not.
 *
 * Pure data and pure functions: unit-tested table-driven
 * (test/unit/redis-filter.test.ts).
 */
import type { PhaseMode } from "../domain.js";

export const DENIED_CLAUSE = "SKILLS.md Safety First: no destructive actions";
export const READ_ONLY_CLAUSE = "SKILLS.md §3 Read-Only Default: production is read-only";
export const NETWORK_CLAUSE_REDIS = "SKILLS.md Credential Handling: never hardcode or expose credentials";

export type CommandClass = "read" | "write" | "session";

/**
 * Where a command's keys are, for the audit record of a write:
 * "first" argv[1]; "two" argv[1..2]; "all" argv[1..]; "pairs" argv[1], argv[3] …;
 * "allButLast" argv[1..n-2] (blocking pops: the last is the timeout);
 * "second" argv[2]; "numkeys@i": argv[i] is a count of keys that follow;
 * "dest+numkeys@i": argv[1] and the keys counted at argv[i]; "streams" after STREAMS (half).
 */
type KeySpec = "first" | "two" | "all" | "pairs" | "allButLast" | "second" | "fromSecond" | "streams" | `numkeys@${number}` | `dest+numkeys@${number}` | "none";

interface Spec {
  cls: CommandClass;
  keys?: KeySpec;
}

const R = (keys: KeySpec = "first"): Spec => ({ cls: "read", keys });
const W = (keys: KeySpec = "first"): Spec => ({ cls: "write", keys });
const S: Spec = { cls: "session", keys: "none" };

/** Commands judged by name alone (subcommands and arguments: see SUBCOMMANDS and judgeCommand). */
export const COMMANDS: ReadonlyMap<string, Spec> = new Map<string, Spec>(
  Object.entries({
    // strings
    GET: R(), MGET: R("all"), GETRANGE: R(), SUBSTR: R(), STRLEN: R(), GETBIT: R(), BITCOUNT: R(), BITPOS: R(),
    BITFIELD_RO: R(), LCS: R("two"),
    SET: W(), SETNX: W(), SETEX: W(), PSETEX: W(), GETSET: W(), GETDEL: W(), GETEX: W(), APPEND: W(), INCR: W(),
    INCRBY: W(), INCRBYFLOAT: W(), DECR: W(), DECRBY: W(), MSET: W("pairs"), MSETNX: W("pairs"), SETRANGE: W(),
    SETBIT: W(), BITOP: W("fromSecond"), BITFIELD: W(),
    // keys
    EXISTS: R("all"), TYPE: R(), TTL: R(), PTTL: R(), EXPIRETIME: R(), PEXPIRETIME: R(), KEYS: R("none"),
    SCAN: R("none"), RANDOMKEY: R("none"), DBSIZE: R("none"),
    DEL: W("all"), UNLINK: W("all"), EXPIRE: W(), EXPIREAT: W(), PEXPIRE: W(), PEXPIREAT: W(), PERSIST: W(),
    RENAME: W("two"), RENAMENX: W("two"), COPY: W("two"), SORT: W(), SORT_RO: R(),
    // hashes
    HGET: R(), HMGET: R(), HGETALL: R(), HKEYS: R(), HVALS: R(), HLEN: R(), HEXISTS: R(), HSTRLEN: R(), HSCAN: R(),
    HRANDFIELD: R(), HTTL: R(), HPTTL: R(), HEXPIRETIME: R(), HPEXPIRETIME: R(),
    HSET: W(), HSETNX: W(), HMSET: W(), HDEL: W(), HINCRBY: W(), HINCRBYFLOAT: W(), HEXPIRE: W(), HPEXPIRE: W(),
    HEXPIREAT: W(), HPEXPIREAT: W(), HPERSIST: W(), HGETDEL: W(), HGETEX: W(), HSETEX: W(),
    // lists
    LRANGE: R(), LLEN: R(), LINDEX: R(), LPOS: R(),
    LPUSH: W(), RPUSH: W(), LPUSHX: W(), RPUSHX: W(), LPOP: W(), RPOP: W(), LSET: W(), LREM: W(), LTRIM: W(),
    LINSERT: W(), LMOVE: W("two"), BLMOVE: W("two"), RPOPLPUSH: W("two"), BRPOPLPUSH: W("two"),
    BLPOP: W("allButLast"), BRPOP: W("allButLast"), LMPOP: W("numkeys@1"), BLMPOP: W("numkeys@2"),
    // sets
    SMEMBERS: R(), SISMEMBER: R(), SMISMEMBER: R(), SCARD: R(), SRANDMEMBER: R(), SINTER: R("all"), SUNION: R("all"),
    SDIFF: R("all"), SINTERCARD: R("numkeys@1"), SSCAN: R(),
    SADD: W(), SREM: W(), SPOP: W(), SMOVE: W("two"), SINTERSTORE: W("all"), SUNIONSTORE: W("all"), SDIFFSTORE: W("all"),
    // sorted sets
    ZRANGE: R(), ZRANGEBYSCORE: R(), ZREVRANGEBYSCORE: R(), ZRANGEBYLEX: R(), ZREVRANGEBYLEX: R(), ZREVRANGE: R(),
    ZRANK: R(), ZREVRANK: R(), ZSCORE: R(), ZMSCORE: R(), ZCARD: R(), ZCOUNT: R(), ZLEXCOUNT: R(), ZSCAN: R(),
    ZRANDMEMBER: R(), ZUNION: R("numkeys@1"), ZINTER: R("numkeys@1"), ZDIFF: R("numkeys@1"), ZINTERCARD: R("numkeys@1"),
    ZADD: W(), ZINCRBY: W(), ZREM: W(), ZREMRANGEBYSCORE: W(), ZREMRANGEBYRANK: W(), ZREMRANGEBYLEX: W(),
    ZPOPMIN: W(), ZPOPMAX: W(), BZPOPMIN: W("allButLast"), BZPOPMAX: W("allButLast"), ZMPOP: W("numkeys@1"),
    BZMPOP: W("numkeys@2"), ZUNIONSTORE: W("dest+numkeys@2"), ZINTERSTORE: W("dest+numkeys@2"),
    ZDIFFSTORE: W("dest+numkeys@2"), ZRANGESTORE: W("two"),
    // streams (XREADGROUP moves entries into a group's pending list: a write)
    XRANGE: R(), XREVRANGE: R(), XLEN: R(), XREAD: R("streams"), XPENDING: R(),
    XADD: W(), XDEL: W(), XTRIM: W(), XACK: W(), XCLAIM: W(), XAUTOCLAIM: W(), XREADGROUP: W("streams"), XSETID: W(),
    // HyperLogLog and geo
    PFCOUNT: R("all"), PFADD: W(), PFMERGE: W("all"),
    GEOPOS: R(), GEODIST: R(), GEOHASH: R(), GEOSEARCH: R(), GEORADIUS_RO: R(), GEORADIUSBYMEMBER_RO: R(),
    GEOADD: W(), GEOSEARCHSTORE: W("two"), GEORADIUS: W(), GEORADIUSBYMEMBER: W(),
    // pub/sub: listening everywhere, publishing on the test instance only
    SUBSCRIBE: S, UNSUBSCRIBE: S, PSUBSCRIBE: S, PUNSUBSCRIBE: S, SSUBSCRIBE: S, SUNSUBSCRIBE: S,
    PUBLISH: { cls: "write", keys: "first" }, SPUBLISH: { cls: "write", keys: "first" },
    // transactions
    MULTI: S, EXEC: S, DISCARD: S, WATCH: R("all"), UNWATCH: S,
    // connection and server information
    PING: S, ECHO: S, QUIT: S, TIME: S, HELLO: S, SELECT: S, INFO: S,
  }),
);

/** Commands with subcommands: only the listed ones pass, with the class given. */
export const SUBCOMMANDS: ReadonlyMap<string, ReadonlyMap<string, Spec>> = new Map(
  Object.entries({
    // CLIENT SETNAME/SETINFO: redis-py and others name their connection; INFO/ID/GETNAME read this connection only
    CLIENT: { ID: S, INFO: S, GETNAME: S, SETNAME: S, SETINFO: S },
    PUBSUB: { CHANNELS: S, NUMSUB: S, NUMPAT: S, SHARDCHANNELS: S, SHARDNUMSUB: S },
    XINFO: { STREAM: R("second"), GROUPS: R("second"), CONSUMERS: R("second"), HELP: S },
    XGROUP: { CREATE: W("second"), CREATECONSUMER: W("second"), DELCONSUMER: W("second"), DESTROY: W("second"), SETID: W("second") },
    OBJECT: { ENCODING: R("second"), FREQ: R("second"), IDLETIME: R("second"), REFCOUNT: R("second"), HELP: S },
    MEMORY: { USAGE: R("second") },
    COMMAND: { COUNT: S, INFO: S, DOCS: S, LIST: S, GETKEYS: S, GETKEYSANDFLAGS: S },
  }).map(([k, v]) => [k, new Map(Object.entries(v))]),
);

/** Subcommand-less forms allowed for commands in SUBCOMMANDS (`COMMAND` alone lists every command). */
const BARE_OK = new Set(["COMMAND"]);

/**
 * Named so that their refusal says why; refused in every mode. (Everything
 * unlisted is refused as well, as `redis.unlisted`.)
 */
export const NEVER: ReadonlyMap<string, string> = new Map(
  Object.entries({
    FLUSHALL: "it empties every database", FLUSHDB: "it empties the database", SWAPDB: "it swaps whole databases",
    MOVE: "it moves keys to another database", MIGRATE: "it moves keys to another server",
    RESTORE: "it writes a serialized value, replacing keys (DUMP payloads are not checked)",
    "RESTORE-ASKING": "it writes a serialized value", DUMP: "not needed by a client; its payload feeds RESTORE",
    CONFIG: "server configuration is the operator's", SHUTDOWN: "it stops the server", DEBUG: "it can crash or stall the server",
    MODULE: "it loads code into the server", ACL: "users and permissions are the operator's",
    SLAVEOF: "it turns the server into a replica", REPLICAOF: "it turns the server into a replica", FAILOVER: "it switches the primary",
    SYNC: "replication stream", PSYNC: "replication stream", MONITOR: "it shows every client's commands, credentials included",
    SAVE: "persistence is the operator's", BGSAVE: "persistence is the operator's", BGREWRITEAOF: "persistence is the operator's",
    CLUSTER: "cluster administration", EVAL: "scripts run unchecked commands", EVALSHA: "scripts run unchecked commands",
    EVAL_RO: "scripts run unchecked commands", EVALSHA_RO: "scripts run unchecked commands", SCRIPT: "scripts run unchecked commands",
    FUNCTION: "functions run unchecked commands", FCALL: "functions run unchecked commands", FCALL_RO: "functions run unchecked commands",
    SLOWLOG: "the server's diagnostics are the operator's", LATENCY: "the server's diagnostics are the operator's",
    RESET: "it would log the connection out of the daemon's user and database",
    AUTH: "the daemon logs in for the sandbox",
    "CLIENT KILL": "it disconnects other clients", "CLIENT PAUSE": "it freezes every client of the server",
    "CLIENT UNPAUSE": "pausing is the operator's", "CLIENT UNBLOCK": "it interrupts other clients",
    "CLIENT LIST": "it shows other clients (the trading engine's connections)", "CLIENT NO-EVICT": "it changes eviction for the server",
    "CLIENT NO-TOUCH": "it changes how reads affect eviction",
    "CLIENT REPLY": "it turns replies off, and the filter keeps replies in order by counting them",
    "CLIENT TRACKING": "server-assisted caching is not supported through the tunnel", "CLIENT CACHING": "server-assisted caching is not supported through the tunnel",
    "MEMORY PURGE": "it acts on the server's allocator", "MEMORY DOCTOR": "the server's diagnostics are the operator's",
    "MEMORY STATS": "the server's diagnostics are the operator's", "MEMORY MALLOC-STATS": "the server's diagnostics are the operator's",
  }),
);

/** Commands whose first argument is a subcommand: shown and judged together ("CLIENT PAUSE"). */
const WITH_SUB = new Set(["CONFIG", "CLIENT", "DEBUG", "SCRIPT", "FUNCTION", "ACL", "CLUSTER", "MODULE", "SLOWLOG", "LATENCY", "MEMORY", "OBJECT", "XINFO", "XGROUP", "PUBSUB", "COMMAND"]);

/**
 * Paper mode reads production, which the trading engine shares: a command
 * that walks the whole keyspace in one call blocks every other client until
 * it ends (Redis runs commands one at a time). KEYS is refused there, and
 * the SCAN family's COUNT and MEMORY USAGE's SAMPLES are capped; the test
 * instance allows all of them. (A read of one huge key — LRANGE 0 -1,
 * SMEMBERS, HGETALL — is not capped: docs/POLICY-MATRIX.md "Not yet enforced".)
 */
export const PAPER_MAX_SCAN_COUNT = 1000;
const SCAN_FAMILY = new Set(["SCAN", "HSCAN", "SSCAN", "ZSCAN"]);

export const HINTS = {
  "redis.denied": "server administration is not available from a sandbox; ask a person",
  "redis.unlisted": "not on the sandbox's Redis allowlist (docs/DATABASE.md); use a listed command",
  "redis.read-only": "production Redis is read-only in paper mode; write in a test or backtest phase (REDIS_URL_TEST)",
  "redis.auth": "connect without a password: the daemon logs in upstream for the sandbox",
  "redis.select": "the phase's database comes from its Redis URL; use it without SELECT",
  "redis.stall": `it would stall production Redis for every client; iterate with SCAN … MATCH pattern COUNT n (n ≤ ${PAPER_MAX_SCAN_COUNT})`,
} as const;

export type RedisRule = keyof typeof HINTS;

export interface Refusal {
  rule: RedisRule;
  clause: string;
  /** the command as shown in the reply and the record ("CLIENT PAUSE"), sanitised */
  display: string;
  /** why, for the record */
  reason: string;
}

export type Verdict = { allow: true; cls: CommandClass; keys: KeySpec; display: string } | ({ allow: false } & Refusal);

/** What judgeCommand needs beyond the argv. */
export interface JudgeContext {
  mode: PhaseMode;
  /** the database index the daemon selected upstream */
  db: number;
}

/** Which commands need every argument kept (capped) for judging or recording. */
export function needsArgs(name: string): boolean {
  const spec = COMMANDS.get(name);
  if (spec) return spec.cls === "write" || name === "HELLO" || name === "SELECT" || name === "INFO" || name === "XREAD" || SCAN_FAMILY.has(name);
  return SUBCOMMANDS.has(name);
}

/**
 * Commands whose verdict reads arguments beyond the subcommand. Such a
 * command with more arguments than the parser keeps is refused whole
 * (redis.ts checkCommand): `COPY a b REPLACE …×70 DB 5` would hide its `DB`
 * past what the filter reads, and Redis accepts a repeated option.
 */
export const ARG_DEPENDENT: ReadonlySet<string> = new Set(["HELLO", "SELECT", "INFO", "COPY", "MEMORY", ...SCAN_FAMILY]);

/**
 * The text a verdict depends on besides mode and database, for a
 * per-connection cache: the name, plus the subcommand for commands that have
 * one (never a key); null when the verdict reads further arguments.
 */
export function verdictKey(name: string, sub: string | null): string | null {
  if (ARG_DEPENDENT.has(name)) return null;
  return WITH_SUB.has(name) || SUBCOMMANDS.has(name) ? `${name} ${sub ?? ""}` : name;
}

const INFO_SECTIONS = new Set(["DEFAULT", "SERVER", "CLIENTS", "MEMORY", "PERSISTENCE", "STATS", "REPLICATION", "CPU", "KEYSPACE"]);

/**
 * The verdict on one command. `argv[0]` and `argv[1]` are uppercased by the
 * caller into `name` and `sub`; `argv` holds the arguments as sent (a long
 * argument may be a placeholder; it never matches a keyword).
 */
export function judgeCommand(name: string, sub: string | null, argv: readonly string[], ctx: JudgeContext): Verdict {
  const subs = SUBCOMMANDS.get(name);
  const withSub = WITH_SUB.has(name) && sub !== null ? `${name} ${sub}` : null;
  const display = sanitize(withSub ?? name);
  let spec: Spec | undefined;
  if (subs) spec = sub === null ? (BARE_OK.has(name) ? S : undefined) : subs.get(sub);
  else spec = COMMANDS.get(name);

  const refuse = (rule: RedisRule, clause: string, reason: string): Verdict => ({ allow: false, rule, clause, display, reason });
  if (!spec) {
    const never = (withSub !== null ? NEVER.get(withSub) : undefined) ?? NEVER.get(name);
    if (name === "AUTH") return refuse("redis.auth", NETWORK_CLAUSE_REDIS, never!);
    if (never) return refuse("redis.denied", DENIED_CLAUSE, never);
    return refuse("redis.unlisted", DENIED_CLAUSE, "not on the allowlist");
  }

  switch (name) {
    case "HELLO":
      // HELLO [protover [AUTH user pass] [SETNAME name]]: the protocol switch is fine, a login from the sandbox is not
      if (argv.slice(2).some((a) => a.toUpperCase() === "AUTH")) return refuse("redis.auth", NETWORK_CLAUSE_REDIS, "HELLO … AUTH: the daemon logs in for the sandbox");
      break;
    case "SELECT":
      // the phase's own database (from its URL) is a no-op; any other is refused
      if (argv.length !== 2 || !/^\d{1,10}$/.test(argv[1]!) || Number(argv[1]) !== ctx.db) {
        return refuse("redis.select", DENIED_CLAUSE, `only database ${ctx.db} (from the phase's Redis URL) is reachable`);
      }
      break;
    case "INFO":
      for (const s of argv.slice(1)) if (!INFO_SECTIONS.has(s.toUpperCase())) return refuse("redis.unlisted", DENIED_CLAUSE, `INFO section ${sanitize(s.toUpperCase())} is not on the allowlist`);
      break;
    case "COPY":
      // COPY src dst DB n writes into another database
      if (argv.slice(3).some((a) => a.toUpperCase() === "DB")) return refuse("redis.select", DENIED_CLAUSE, "COPY … DB writes into another database");
      break;
    case "KEYS":
      if (ctx.mode === "paper") return refuse("redis.stall", DENIED_CLAUSE, "KEYS walks every key of production in one call");
      break;
    case "SCAN":
    case "HSCAN":
    case "SSCAN":
    case "ZSCAN": {
      if (ctx.mode !== "paper") break;
      // SCAN cursor [options]; the others: key cursor [options]
      const from = name === "SCAN" ? 2 : 3;
      for (let k = from; k < argv.length - 1; k++) {
        if (argv[k]!.toUpperCase() !== "COUNT") continue;
        const n = Number(argv[k + 1]);
        if (!Number.isFinite(n) || n > PAPER_MAX_SCAN_COUNT) {
          return refuse("redis.stall", DENIED_CLAUSE, `${name} … COUNT ${sanitize(argv[k + 1]!)} reads more than ${PAPER_MAX_SCAN_COUNT} entries of production in one call`);
        }
      }
      break;
    }
    case "MEMORY":
      // MEMORY USAGE key SAMPLES 0 walks every element of the key
      if (ctx.mode === "paper" && sub === "USAGE") {
        for (let k = 3; k < argv.length - 1; k++) {
          if (argv[k]!.toUpperCase() !== "SAMPLES") continue;
          const n = Number(argv[k + 1]);
          if (!Number.isFinite(n) || n <= 0 || n > PAPER_MAX_SCAN_COUNT) {
            return refuse("redis.stall", DENIED_CLAUSE, `MEMORY USAGE … SAMPLES ${sanitize(argv[k + 1]!)} walks every element of a production key`);
          }
        }
      }
      break;
    case "SORT":
      // SORT without STORE reads; it is classed as a write for its STORE form (paper clients use SORT_RO)
      break;
  }

  if (spec.cls === "write" && ctx.mode === "paper") return refuse("redis.read-only", READ_ONLY_CLAUSE, "a write to production");
  return { allow: true, cls: spec.cls, keys: spec.keys ?? "none", display };
}

/** The keys of a command per its KeySpec (argv as given; at most `max`). */
export function keysOf(keys: KeySpec, argv: readonly string[], max = 16): string[] {
  const a = argv;
  let out: string[] = [];
  const num = (i: number) => {
    const n = Number(a[i]);
    return Number.isInteger(n) && n >= 0 ? n : 0;
  };
  if (keys === "none") return [];
  else if (keys === "first") out = a.slice(1, 2);
  else if (keys === "second") out = a.slice(2, 3);
  else if (keys === "two") out = a.slice(1, 3);
  else if (keys === "all") out = a.slice(1);
  else if (keys === "fromSecond") out = a.slice(2);
  else if (keys === "allButLast") out = a.slice(1, -1);
  else if (keys === "pairs") out = a.slice(1).filter((_, i) => i % 2 === 0);
  else if (keys === "streams") {
    const i = a.findIndex((x, j) => j > 0 && x.toUpperCase() === "STREAMS");
    if (i > 0) {
      const rest = a.slice(i + 1);
      out = rest.slice(0, Math.floor(rest.length / 2));
    }
  } else if (keys.startsWith("numkeys@")) {
    const i = Number(keys.slice(8));
    out = a.slice(i + 1, i + 1 + num(i));
  } else if (keys.startsWith("dest+numkeys@")) {
    const i = Number(keys.slice(13));
    out = [...a.slice(1, 2), ...a.slice(i + 1, i + 1 + num(i))];
  }
  return out.slice(0, max);
}

export function sanitize(s: string): string {
  const clean = s.replace(/[^A-Z0-9_.:\- ]/gi, "?");
  return clean.length > 64 ? `${clean.slice(0, 64)}…` : clean || "?";
}
