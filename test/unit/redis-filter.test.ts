/**
 * The Redis command filter (src/net/redis.ts) against a tiny real RESP
 * server written here: request parsing across arbitrary chunk splits,
 * pipelined allowed and refused commands answered in order, inline commands
 * refused, writes refused in paper mode.
 */
import net from "node:net";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { handleRedisClient, ReplyCounter, RequestParser, RespProtocolError } from "../../src/net/redis.js";
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
  return { text: Buffer.concat(got).toString("latin1"), events, lines, result };
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
      "-ERR sandboxd refused FLUSHALL (rule redis.denied, SKILLS.md Safety First: no destructive actions)\r\n",
      "$1\r\n1\r\n",
      "-ERR sandboxd refused CONFIG SET (rule redis.denied, SKILLS.md Safety First: no destructive actions)\r\n",
      "-ERR unknown command 'CLIENT'\r\n",
      "$5\r\nhello\r\n",
      "-ERR sandboxd refused CLIENT KILL (rule redis.denied, SKILLS.md Safety First: no destructive actions)\r\n",
      "$2\r\nme\r\n",
    ].join("");
    seen.length = 0;
    for (const seed of [3, 17]) {
      const r = await session("test", splitRandomly(Buffer.from(cmds.join("")), seed), Buffer.byteLength(expected));
      expect(r.text).toBe(expected);
      expect(r.events.map((e) => e.command)).toEqual(["FLUSHALL", "CONFIG SET", "CLIENT KILL"]);
      expect(r.events[0]).toMatchObject({ type: "redis.refused", rule: "redis.denied", clause: "SKILLS.md Safety First: no destructive actions" });
      expect(r.lines[0]).toMatch(/\[NET\] \[REDIS\] \[FLUSHALL\] \[FORBID redis\.denied/);
      expect(r.result).toMatchObject({ commands: 5, refused: 3 });
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
      "-ERR sandboxd refused SET (rule redis.read-only, SKILLS.md §3 Read-Only Default: production is read-only)\r\n" +
      "-ERR sandboxd refused DEL (rule redis.read-only, SKILLS.md §3 Read-Only Default: production is read-only)\r\n" +
      "$1\r\nv\r\n";
    const r = await session("paper", [Buffer.from(input)], Buffer.byteLength(expected, "latin1"));
    expect(Buffer.from(r.text, "latin1").toString("utf8")).toBe(expected);
    expect(r.events.map((e) => [e.command, e.rule])).toEqual([["SET", "redis.read-only"], ["DEL", "redis.read-only"]]);
    expect(data.get("k")).toBe("v");
    // the same writes pass in test mode
    const t = await session("test", [Buffer.from(resp("SET", "k", "w") + resp("GET", "k"))], "+OK\r\n$1\r\nw\r\n".length);
    expect(t.text).toBe("+OK\r\n$1\r\nw\r\n");
  });
});
