/**
 * The Redis command filter (src/net/redis.ts) against a tiny real RESP
 * server written here: request parsing across arbitrary chunk splits,
 * pipelined allowed and refused commands answered in order, inline commands
 * refused, writes refused in paper mode.
 */
import net from "node:net";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { checkCommand, handleRedisClient, refusalReply, ReplyCounter, RequestParser, RespProtocolError, withNamePrefix } from "../../src/net/redis.js";
import { keysOf, needsArgs } from "../../src/net/redis-commands.js";
import type { PhaseMode } from "../../src/phases/types.js";

function resp(...args: string[]): string {
  return `*${args.length}\r\n` + args.map((a) => `$${Buffer.byteLength(a)}\r\n${a}\r\n`).join("");
}

/** A tiny in-memory RESP server: GET SET DEL FLUSHALL PING ECHO KEYS; replies after a small random delay. */
const data = new Map<string, string>();
let upstreamServer: net.Server;
let upstreamPort = 0;
const seen: string[] = [];

function serveResp(sock: net.Socket): void {
  const parser = new RequestParser();
  let chain = Promise.resolve();
  sock.on("data", (chunk: Buffer) => {
    for (const cmd of parser.feed(chunk)) {
      const argv = decodeArgs(cmd.raw);
      seen.push(argv[0]!.toUpperCase());
      chain = chain.then(async () => {
        await new Promise((r) => setTimeout(r, Math.random() * 3));
        sock.write(answer(argv));
      });
    }
  });
  sock.on("error", () => undefined);
}

function decodeArgs(raw: Buffer): string[] {
  const text = raw.toString("latin1");
  const out: string[] = [];
  let i = text.indexOf("\r\n") + 2;
  while (i < text.length) {
    const nl = text.indexOf("\r\n", i);
    const n = Number(text.slice(i + 1, nl));
    out.push(text.slice(nl + 2, nl + 2 + n));
    i = nl + 2 + n + 2;
  }
  return out;
}

function answer(argv: string[]): string {
  const [c, a, b] = [argv[0]!.toUpperCase(), argv[1], argv[2]];
  switch (c) {
    case "PING":
      return "+PONG\r\n";
    case "ECHO":
      return `$${Buffer.byteLength(a!)}\r\n${a}\r\n`;
    case "SET":
      data.set(a!, b!);
      return "+OK\r\n";
    case "GET":
      return data.has(a!) ? `$${Buffer.byteLength(data.get(a!)!)}\r\n${data.get(a!)}\r\n` : "$-1\r\n";
    case "DEL":
      return `:${data.delete(a!) ? 1 : 0}\r\n`;
    case "KEYS":
      return `*${data.size}\r\n` + [...data.keys()].map((k) => `$${k.length}\r\n${k}\r\n`).join("");
    case "FLUSHALL":
      data.clear();
      return "+OK\r\n";
    default:
      return `-ERR unknown command '${c}'\r\n`;
  }
}

beforeAll(async () => {
  upstreamServer = net.createServer(serveResp);
  await new Promise<void>((r) => upstreamServer.listen(0, "127.0.0.1", r));
  upstreamPort = (upstreamServer.address() as net.AddressInfo).port;
});

afterAll(async () => {
  await new Promise((r) => upstreamServer?.close(r));
});

/** A filtered connection: sends `input` in the given pieces, reads until `expect` bytes or close. */
async function session(mode: PhaseMode, pieces: Buffer[], expectBytes: number | null) {
  const events: Array<Record<string, unknown>> = [];
  const writes: Array<Record<string, unknown>> = [];
  const lines: string[] = [];
  const front = net.createServer();
  await new Promise<void>((r) => front.listen(0, "127.0.0.1", r));
  let done!: Promise<unknown>;
  front.once("connection", (client) => {
    const upstream = net.connect({ host: "127.0.0.1", port: upstreamPort });
    done = handleRedisClient(client, upstream, {
      mode,
      record: async (e, l) => {
        await new Promise((r) => setTimeout(r, 2));
        events.push(e);
        lines.push(...l);
      },
      recordMany: async (entries) => {
        await new Promise((r) => setTimeout(r, 2));
        for (const e of entries) writes.push(e.event);
      },
    });
  });
  const c = net.connect({ host: "127.0.0.1", port: (front.address() as net.AddressInfo).port });
  await new Promise((r) => c.once("connect", r));
  const got: Buffer[] = [];
  let total = 0;
  const closed = new Promise<void>((resolve) => {
    c.on("data", (d: Buffer) => {
      got.push(d);
      total += d.length;
      if (expectBytes !== null && total >= expectBytes) c.end();
    });
    c.on("close", () => resolve());
  });
  for (const p of pieces) {
    c.write(p);
    await new Promise((r) => setImmediate(r));
  }
  // expectBytes null: the filter closes the connection itself
  await closed;
  const result = await done;
  front.close();
  return { text: Buffer.concat(got).toString("latin1"), events, writes, lines, result };
}

function splitRandomly(buf: Buffer, seed: number): Buffer[] {
  const out: Buffer[] = [];
  let i = 0;
  let s = seed;
  while (i < buf.length) {
    s = (s * 1103515245 + 12345) & 0x7fffffff;
    const n = 1 + (s % 7);
    out.push(buf.subarray(i, i + n));
    i += n;
  }
  return out;
}

describe("RequestParser", () => {
  it("parses the same commands whatever the chunk boundaries", () => {
    const input = Buffer.from(resp("SET", "k", "v\r\nwith crlf") + resp("client", "kill", "x") + "*0\r\n" + resp("GET", "k"));
    const whole = new RequestParser().feed(input);
    expect(whole.map((c) => [c.name, c.sub])).toEqual([["SET", "K"], ["CLIENT", "KILL"], ["GET", "K"]]);
    for (let seed = 1; seed < 200; seed++) {
      const p = new RequestParser();
      const cmds = splitRandomly(input, seed).flatMap((piece) => p.feed(piece));
      expect(cmds.map((c) => c.name)).toEqual(["SET", "CLIENT", "GET"]);
      expect(Buffer.concat(cmds.map((c) => c.raw)).toString()).toBe(resp("SET", "k", "v\r\nwith crlf") + resp("client", "kill", "x") + resp("GET", "k"));
    }
    // byte by byte
    const p = new RequestParser();
    const cmds = [...input].flatMap((b) => p.feed(Buffer.from([b])));
    expect(cmds).toHaveLength(3);
  });

  it("rejects inline commands and non-bulk elements", () => {
    expect(() => new RequestParser().feed(Buffer.from("FLUSHALL\r\n"))).toThrow(RespProtocolError);
    expect(() => new RequestParser().feed(Buffer.from("*1\r\n:1\r\n"))).toThrow(RespProtocolError);
    expect(() => new RequestParser().feed(Buffer.from("*1\r\n$3\r\nabcde\r\n"))).toThrow(RespProtocolError);
  });
});

describe("ReplyCounter", () => {
  it("counts complete top-level replies across splits (RESP2 and RESP3; push and attributes are not replies)", () => {
    const replies = "+OK\r\n$5\r\nab\r\nc\r\n$-1\r\n*2\r\n$1\r\na\r\n*1\r\n:1\r\n-ERR x\r\n%1\r\n+k\r\n+v\r\n>2\r\n+message\r\n+x\r\n|1\r\n+a\r\n+b\r\n_\r\n*0\r\n";
    const input = Buffer.from(replies);
    expect(new ReplyCounter().feed(input)).toBe(8);
    for (let seed = 1; seed < 200; seed++) {
      const c = new ReplyCounter();
      const n = splitRandomly(input, seed).reduce((a, piece) => a + c.feed(piece), 0);
      expect(n).toBe(8);
      expect(c.idle).toBe(true);
    }
  });
});

describe("handleRedisClient", () => {
  it("forwards allowed commands, refuses denied ones, and keeps pipelined replies in order", async () => {
    data.clear();
    data.set("keep", "me");
    const cmds = [
      resp("SET", "a", "1"),
      resp("FLUSHALL"),
      resp("GET", "a"),
      resp("CONFIG", "SET", "dir", "/tmp"),
      resp("CLIENT", "SETNAME", "x"),
      resp("ECHO", "hello"),
      resp("client", "kill", "127.0.0.1:1"),
      resp("GET", "keep"),
    ];
    const expected = [
      "+OK\r\n",
      "-ERR sandboxd refused FLUSHALL (rule redis.denied, SKILLS.md Safety First: no destructive actions): server administration is not available from a sandbox; ask a person\r\n",
      "$1\r\n1\r\n",
      "-ERR sandboxd refused CONFIG SET (rule redis.denied, SKILLS.md Safety First: no destructive actions): server administration is not available from a sandbox; ask a person\r\n",
      "-ERR unknown command 'CLIENT'\r\n",
      "$5\r\nhello\r\n",
      "-ERR sandboxd refused CLIENT KILL (rule redis.denied, SKILLS.md Safety First: no destructive actions): server administration is not available from a sandbox; ask a person\r\n",
      "$2\r\nme\r\n",
    ].join("");
    seen.length = 0;
    for (const seed of [3, 17]) {
      const r = await session("test", splitRandomly(Buffer.from(cmds.join("")), seed), Buffer.byteLength(expected));
      expect(r.text).toBe(expected);
      expect(r.events.map((e) => e.command)).toEqual(["FLUSHALL", "CONFIG SET", "CLIENT KILL"]);
      expect(r.events[0]).toMatchObject({ type: "redis.refused", rule: "redis.denied", clause: "SKILLS.md Safety First: no destructive actions" });
      expect(r.lines[0]).toMatch(/\[NET\] \[REDIS\] \[FLUSHALL\] \[FORBID redis\.denied/);
      expect(r.result).toMatchObject({ commands: 5, refused: 3, reads: 2, writes: 1 });
      // the allowed write is recorded, with its key, before it is forwarded
      expect(r.writes.map((e) => [e.command, e.keys])).toEqual([["SET", ["a"]]]);
    }
    expect(seen).not.toContain("FLUSHALL");
    expect(seen).not.toContain("CONFIG");
    expect(data.get("keep")).toBe("me");
  });

  it("refuses an inline command and closes the connection", async () => {
    data.set("keep", "me");
    const r = await session("test", [Buffer.from(resp("PING")), Buffer.from("FLUSHALL\r\n")], null);
    expect(r.text).toMatch(/^\+PONG\r\n-ERR sandboxd refused the request: inline command/);
    expect(r.events[0]).toMatchObject({ type: "redis.refused", rule: "redis.protocol" });
    expect(data.get("keep")).toBe("me");
  });

  it("refuses writes in paper mode and allows reads", async () => {
    data.clear();
    data.set("k", "v");
    const input = resp("GET", "k") + resp("SET", "k", "w") + resp("DEL", "k") + resp("GET", "k");
    const expected =
      "$1\r\nv\r\n" +
      "-ERR sandboxd refused SET (rule redis.read-only, SKILLS.md §3 Read-Only Default: production is read-only): production Redis is read-only in paper mode; write in a test or backtest phase (REDIS_URL_TEST)\r\n" +
      "-ERR sandboxd refused DEL (rule redis.read-only, SKILLS.md §3 Read-Only Default: production is read-only): production Redis is read-only in paper mode; write in a test or backtest phase (REDIS_URL_TEST)\r\n" +
      "$1\r\nv\r\n";
    const r = await session("paper", [Buffer.from(input)], Buffer.byteLength(expected, "latin1"));
    expect(Buffer.from(r.text, "latin1").toString("utf8")).toBe(expected);
    expect(r.events.filter((e) => e.type === "redis.refused").map((e) => [e.command, e.rule])).toEqual([["SET", "redis.read-only"], ["DEL", "redis.read-only"]]);
    expect(data.get("k")).toBe("v");
    // the same writes pass in test mode
    const t = await session("test", [Buffer.from(resp("SET", "k", "w") + resp("GET", "k"))], "+OK\r\n$1\r\nw\r\n".length);
    expect(t.text).toBe("+OK\r\n$1\r\nw\r\n");
  });
});

/** argv → the verdict's rule (null: allowed), per mode. */
function rule(mode: PhaseMode, argv: string[], db = 0): string | null {
  const raw = Buffer.from(resp(...argv));
  const [cmd] = new RequestParser(needsArgs).feed(raw);
  const v = checkCommand(cmd!, mode, db);
  return v.allow ? null : v.rule;
}

describe("the allowlist (judgeCommand)", () => {
  // every attack the review reproduced, and the classes around them
  const never: Array<[string[], string]> = [
    [["RESTORE", "k", "0", "\x00\x05hello\x0b\x00payload", "REPLACE"], "redis.denied"],
    [["restore", "k", "0", "x"], "redis.denied"],
    [["CLIENT", "PAUSE", "2000", "ALL"], "redis.denied"],
    [["CLIENT", "PAUSE", "2000", "WRITE"], "redis.denied"],
    [["CLIENT", "KILL", "ADDR", "127.0.0.1:1"], "redis.denied"],
    [["CLIENT", "LIST"], "redis.denied"],
    [["CLIENT", "REPLY", "OFF"], "redis.denied"],
    [["CLIENT", "TRACKING", "ON"], "redis.denied"],
    [["CLIENT", "NO-EVICT", "ON"], "redis.denied"],
    [["CLIENT", "UNBLOCK", "5"], "redis.denied"],
    [["CLIENT", "WHATEVER"], "redis.unlisted"],
    [["SLOWLOG", "RESET"], "redis.denied"],
    [["SLOWLOG", "GET"], "redis.denied"],
    [["LATENCY", "RESET"], "redis.denied"],
    [["MEMORY", "PURGE"], "redis.denied"],
    [["MEMORY", "DOCTOR"], "redis.denied"],
    [["SELECT", "5"], "redis.select"],
    [["SELECT", "0", "extra"], "redis.select"],
    [["SELECT", "00x"], "redis.select"],
    [["AUTH", "secret"], "redis.auth"],
    [["AUTH", "default", "secret"], "redis.auth"],
    [["HELLO", "3", "AUTH", "default", "secret"], "redis.auth"],
    [["HELLO", "2", "SETNAME", "x", "auth", "u", "p"], "redis.auth"],
    [["RESET"], "redis.denied"],
    [["CONFIG", "SET", "dir", "/tmp"], "redis.denied"],
    [["CONFIG", "GET", "*"], "redis.denied"],
    [["FLUSHALL"], "redis.denied"],
    [["FLUSHDB", "ASYNC"], "redis.denied"],
    [["DEBUG", "SLEEP", "10"], "redis.denied"],
    [["MODULE", "LOAD", "/tmp/x.so"], "redis.denied"],
    [["SCRIPT", "LOAD", "return 1"], "redis.denied"],
    [["EVAL", "return redis.call('flushall')", "0"], "redis.denied"],
    [["EVALSHA", "abc", "0"], "redis.denied"],
    [["FUNCTION", "FLUSH"], "redis.denied"],
    [["FCALL", "f", "0"], "redis.denied"],
    [["SHUTDOWN", "NOSAVE"], "redis.denied"],
    [["REPLICAOF", "10.0.0.1", "6379"], "redis.denied"],
    [["SLAVEOF", "10.0.0.1", "6379"], "redis.denied"],
    [["MIGRATE", "h", "1", "k", "0", "1000"], "redis.denied"],
    [["ACL", "SETUSER", "x", "on", ">p", "+@all"], "redis.denied"],
    [["MONITOR"], "redis.denied"],
    [["SWAPDB", "0", "1"], "redis.denied"],
    [["MOVE", "k", "1"], "redis.denied"],
    [["COPY", "a", "b", "DB", "3"], "redis.select"],
    [["DUMP", "k"], "redis.denied"],
    [["SAVE"], "redis.denied"],
    [["BGSAVE"], "redis.denied"],
    [["SYNC"], "redis.denied"],
    [["WAIT", "1", "0"], "redis.unlisted"],
    [["LOLWUT"], "redis.unlisted"],
    [["INFO", "commandstats"], "redis.unlisted"],
    [["INFO", "everything"], "redis.unlisted"],
    [["CLUSTER", "RESET"], "redis.denied"],
    [["FAILOVER"], "redis.denied"],
    [["PFDEBUG", "GETREG", "k"], "redis.unlisted"],
  ];

  it("refuses the never-list and everything unlisted, in every mode", () => {
    for (const mode of ["paper", "test", "backtest"] as const) {
      for (const [argv, want] of never) {
        expect([argv.join(" "), mode, rule(mode, argv)]).toEqual([argv.join(" "), mode, want]);
      }
    }
  });

  const reads = [
    ["GET", "k"], ["MGET", "a", "b"], ["HGETALL", "h"], ["LRANGE", "l", "0", "-1"], ["SMEMBERS", "s"], ["ZRANGE", "z", "0", "-1", "WITHSCORES"],
    ["XRANGE", "x", "-", "+"], ["XREAD", "COUNT", "10", "STREAMS", "x", "0"], ["XLEN", "x"], ["XINFO", "STREAM", "x"], ["XPENDING", "x", "g"],
    ["EXISTS", "k"], ["TTL", "k"], ["PTTL", "k"], ["TYPE", "k"], ["SCAN", "0", "MATCH", "a*"], ["HSCAN", "h", "0"], ["SSCAN", "s", "0"],
    ["ZSCAN", "z", "0"], ["SCAN", "0", "COUNT", "1000"], ["ZSCAN", "z", "0", "MATCH", "a*", "COUNT", "500"], ["DBSIZE"], ["PING"], ["ECHO", "x"], ["INFO"], ["INFO", "keyspace"], ["INFO", "memory", "stats"],
    ["TIME"], ["SELECT", "0"], ["HELLO"], ["HELLO", "3"], ["HELLO", "3", "SETNAME", "me"], ["CLIENT", "SETNAME", "me"],
    ["CLIENT", "SETINFO", "LIB-NAME", "redis-py"], ["CLIENT", "INFO"], ["CLIENT", "ID"], ["CLIENT", "GETNAME"],
    ["SUBSCRIBE", "c"], ["PSUBSCRIBE", "c*"], ["UNSUBSCRIBE"], ["PUBSUB", "CHANNELS"], ["MULTI"], ["EXEC"], ["DISCARD"], ["WATCH", "k"],
    ["UNWATCH"], ["SORT_RO", "l"], ["GEORADIUS_RO", "g", "0", "0", "1", "km"], ["PFCOUNT", "h"], ["OBJECT", "ENCODING", "k"],
    ["MEMORY", "USAGE", "k"], ["COMMAND"], ["COMMAND", "COUNT"], ["QUIT"],
  ];
  const writes = [
    ["SET", "k", "v"], ["SET", "k", "v", "EX", "10"], ["DEL", "k"], ["EXPIRE", "k", "10"], ["HSET", "h", "f", "v"], ["LPUSH", "l", "x"],
    ["SADD", "s", "x"], ["ZADD", "z", "1", "m"], ["XADD", "x", "*", "f", "v"], ["XREADGROUP", "GROUP", "g", "c", "STREAMS", "x", ">"],
    ["XACK", "x", "g", "1-0"], ["XGROUP", "CREATE", "x", "g", "$", "MKSTREAM"], ["PUBLISH", "c", "m"], ["INCR", "n"], ["MSET", "a", "1", "b", "2"],
    ["RENAME", "a", "b"], ["COPY", "a", "b"], ["BLPOP", "a", "b", "0"], ["ZUNIONSTORE", "d", "2", "a", "b"], ["PFADD", "h", "x"], ["SORT", "l"],
  ];

  it("allows reads and session commands in every mode", () => {
    for (const mode of ["paper", "test", "backtest"] as const) for (const argv of reads) expect([argv.join(" "), rule(mode, argv)]).toEqual([argv.join(" "), null]);
  });

  it("allows data writes (PUBLISH included) only in test and backtest; paper mode refuses them as read-only", () => {
    for (const argv of writes) {
      expect([argv.join(" "), rule("paper", argv)]).toEqual([argv.join(" "), "redis.read-only"]);
      expect([argv.join(" "), rule("test", argv)]).toEqual([argv.join(" "), null]);
      expect([argv.join(" "), rule("backtest", argv)]).toEqual([argv.join(" "), null]);
    }
  });

  it("paper mode refuses what would stall production for every client: KEYS, a SCAN whose COUNT is over 1,000; the test instance allows both", () => {
    const stalls = [["KEYS", "*"], ["keys", "order:*"], ["SCAN", "0", "COUNT", "1001"], ["SCAN", "0", "MATCH", "a*", "count", "100000"], ["HSCAN", "h", "0", "COUNT", "5000"],
      ["SSCAN", "s", "0", "COUNT", "1e9"], ["ZSCAN", "z", "0", "COUNT", "Infinity"], ["SCAN", "0", "COUNT", "10", "COUNT", "99999"],
      ["MEMORY", "USAGE", "k", "SAMPLES", "0"], ["memory", "usage", "k", "samples", "100000"]];
    for (const argv of stalls) {
      expect([argv.join(" "), rule("paper", argv)]).toEqual([argv.join(" "), "redis.stall"]);
      expect([argv.join(" "), rule("test", argv)]).toEqual([argv.join(" "), null]);
      expect([argv.join(" "), rule("backtest", argv)]).toEqual([argv.join(" "), null]);
    }
    expect(rule("paper", ["MEMORY", "USAGE", "k", "SAMPLES", "5"])).toBeNull();
    expect(rule("paper", ["MEMORY", "USAGE", "SAMPLES", "SAMPLES", "5"])).toBeNull();
    // the key of HSCAN is never read as an option (a key named COUNT)
    expect(rule("paper", ["HSCAN", "COUNT", "0", "COUNT", "10"])).toBeNull();
    const [cmd] = new RequestParser(needsArgs).feed(Buffer.from(resp("SCAN", "0", "COUNT", "50000")));
    const v = checkCommand(cmd!, "paper");
    expect(v.allow).toBe(false);
    if (!v.allow) expect(refusalReply(v)).toMatch(/^-ERR sandboxd refused SCAN \(rule redis\.stall, .*\): it would stall production Redis for every client; iterate with SCAN … MATCH pattern COUNT n \(n ≤ 1000\)\r\n$/);
  });

  it("SELECT passes only for the phase's own database", () => {
    expect(rule("test", ["SELECT", "3"], 3)).toBeNull();
    expect(rule("test", ["SELECT", "0"], 3)).toBe("redis.select");
  });

  it("a HELLO whose AUTH lies beyond the arguments the filter reads is refused", () => {
    const argv = ["HELLO", "3", ...Array.from({ length: 80 }, (_, i) => (i % 2 ? "x" : "SETNAME")), "AUTH", "u", "p"];
    expect(rule("test", argv)).toBe("redis.auth");
  });

  it("the refusal names the command, the rule, the clause and what to do", () => {
    const [cmd] = new RequestParser(needsArgs).feed(Buffer.from(resp("CLIENT", "PAUSE", "2000", "ALL")));
    const v = checkCommand(cmd!, "paper");
    expect(v.allow).toBe(false);
    if (!v.allow) expect(refusalReply(v)).toBe("-ERR sandboxd refused CLIENT PAUSE (rule redis.denied, SKILLS.md Safety First: no destructive actions): server administration is not available from a sandbox; ask a person\r\n");
  });

  it("finds the keys of a write for its record (values never)", () => {
    const keys = (argv: string[]) => {
      const [cmd] = new RequestParser(needsArgs).feed(Buffer.from(resp(...argv)));
      const v = checkCommand(cmd!, "test");
      return v.allow ? keysOf(v.keys, cmd!.argv) : null;
    };
    expect(keys(["SET", "orders:1", "secret-value"])).toEqual(["orders:1"]);
    expect(keys(["MSET", "a", "1", "b", "2"])).toEqual(["a", "b"]);
    expect(keys(["DEL", "a", "b", "c"])).toEqual(["a", "b", "c"]);
    expect(keys(["BLPOP", "a", "b", "0"])).toEqual(["a", "b"]);
    expect(keys(["ZUNIONSTORE", "d", "2", "a", "b", "WEIGHTS", "1", "2"])).toEqual(["d", "a", "b"]);
    expect(keys(["XREADGROUP", "GROUP", "g", "c", "COUNT", "1", "STREAMS", "s1", "s2", ">", ">"])).toEqual(["s1", "s2"]);
    expect(keys(["XGROUP", "CREATE", "x", "g", "$"])).toEqual(["x"]);
    expect(keys(["BITOP", "AND", "dest", "a", "b"])).toEqual(["dest", "a", "b"]);
    expect(keys(["SET", "k".repeat(2000), "v"])).toEqual(["<2000 bytes>"]);
    expect(keys(["DEL", "a", "k".repeat(600)])).toEqual(["a", "<600 bytes>"]);
  });
});

describe("connection names from a sandbox", () => {
  const rewrite = (...argv: string[]) => {
    const [cmd] = new RequestParser(needsArgs).feed(Buffer.from(resp(...argv)));
    return withNamePrefix(cmd!)?.toString("latin1") ?? null;
  };
  it("prefixes CLIENT SETNAME, CLIENT SETINFO LIB-NAME and HELLO … SETNAME, and leaves everything else alone", () => {
    expect(rewrite("CLIENT", "SETINFO", "LIB-NAME", "trading-engine")).toBe(resp("CLIENT", "SETINFO", "LIB-NAME", "sandboxd-trading-engine"));
    expect(rewrite("client", "setinfo", "lib-name", "redis-py")).toBe(resp("client", "setinfo", "lib-name", "sandboxd-redis-py"));
    expect(rewrite("CLIENT", "SETINFO", "LIB-VER", "5.0.1")).toBeNull();
    expect(rewrite("CLIENT", "SETNAME", "trading-engine")).toBe(resp("CLIENT", "SETNAME", "sandboxd-trading-engine"));
    expect(rewrite("client", "setname", "x")).toBe(resp("client", "setname", "sandboxd-x"));
    expect(rewrite("HELLO", "3", "SETNAME", "engine")).toBe(resp("HELLO", "3", "SETNAME", "sandboxd-engine"));
    expect(rewrite("HELLO", "3")).toBeNull();
    expect(rewrite("CLIENT", "GETNAME")).toBeNull();
    expect(rewrite("GET", "SETNAME")).toBeNull();
  });
});
