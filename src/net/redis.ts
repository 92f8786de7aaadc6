/**
 * Redis command filter for the `redis` tunnel: parses RESP from the sandbox,
 * forwards allowed commands upstream and answers refused ones itself.
 *
 * Requests must be RESP arrays of bulk strings (what every client library
 * sends). An inline command (first byte not `*`) or a malformed request is
 * refused and the connection closed. The first element, uppercased, is the
 * command; for CONFIG/CLIENT/DEBUG/SCRIPT/FUNCTION/ACL/CLUSTER/MODULE the
 * subcommand counts too ("CLIENT KILL" is refused, "CLIENT SETNAME" is not).
 * In paper mode (production) every write command is refused as well.
 *
 * Reply order with pipelining: the filter counts commands forwarded and not
 * yet answered, by counting complete top-level replies from upstream (RESP2
 * and RESP3; push messages and attributes are not replies). A refused command
 * waits until everything forwarded before it has been answered and relayed,
 * then its error is written, then forwarding resumes. Each refusal is
 * recorded (awaited) before the error is written.
 *
 * Limits: a command is buffered whole before it is forwarded (at most
 * MAX_COMMAND_BYTES). CLIENT REPLY is refused (it would break reply
 * counting). In subscribed (pub/sub) mode replies cannot be counted; a
 * refused command there is answered at once and the connection closed.
 */
import type { Duplex } from "node:stream";
import { actionLine, timestamp } from "../audit/format.js";
import type { PhaseMode } from "../phases/types.js";

export const DENIED_CLAUSE = "SKILLS.md Safety First: no destructive actions";
export const READ_ONLY_CLAUSE = "SKILLS.md §3 Read-Only Default: production is read-only";
const MAX_COMMAND_BYTES = 64 * 1024 * 1024;
const MAX_ARGS = 1024 * 1024;
const MAX_LINE = 64 * 1024;
/** parsed-but-unforwarded bytes before the client is paused */
const QUEUE_HIGH_WATER = 8 * 1024 * 1024;

/** Commands refused in every mode. "CMD SUB" entries refuse one subcommand only. */
export const DEFAULT_DENIED: readonly string[] = Object.freeze([
  "FLUSHALL", "FLUSHDB", "CONFIG", "SHUTDOWN", "DEBUG", "SLAVEOF", "REPLICAOF", "MIGRATE", "MODULE", "ACL",
  "SAVE", "BGSAVE", "BGREWRITEAOF", "SWAPDB", "FAILOVER", "CLUSTER", "RESTORE", "EVAL", "EVALSHA", "EVAL_RO",
  "EVALSHA_RO", "SCRIPT", "FUNCTION", "FCALL", "FCALL_RO", "MONITOR", "SYNC", "PSYNC", "CLIENT KILL",
  // not destructive, but it turns replies off, and the filter counts replies to keep their order
  "CLIENT REPLY",
]);

/** Redis write commands (refused in paper mode: production is read-only). */
export const WRITE_COMMANDS: ReadonlySet<string> = new Set([
  "SET", "SETNX", "SETEX", "PSETEX", "GETSET", "GETDEL", "GETEX", "APPEND", "INCR", "INCRBY", "INCRBYFLOAT",
  "DECR", "DECRBY", "MSET", "MSETNX", "SETRANGE", "SETBIT", "BITOP", "BITFIELD", "DEL", "UNLINK", "EXPIRE",
  "EXPIREAT", "PEXPIRE", "PEXPIREAT", "PERSIST", "RENAME", "RENAMENX", "MOVE", "COPY", "RESTORE", "SORT",
  "HSET", "HSETNX", "HMSET", "HDEL", "HINCRBY", "HINCRBYFLOAT", "HEXPIRE", "HPEXPIRE", "HEXPIREAT", "HPEXPIREAT",
  "HPERSIST", "HGETDEL", "HGETEX", "HSETEX", "LPUSH", "RPUSH", "LPUSHX", "RPUSHX", "LPOP", "RPOP", "LSET", "LREM",
  "LTRIM", "LINSERT", "LMOVE", "BLMOVE", "RPOPLPUSH", "BRPOPLPUSH", "BLPOP", "BRPOP", "LMPOP", "BLMPOP", "SADD",
  "SREM", "SPOP", "SMOVE", "SINTERSTORE", "SUNIONSTORE", "SDIFFSTORE", "ZADD", "ZINCRBY", "ZREM",
  "ZREMRANGEBYSCORE", "ZREMRANGEBYRANK", "ZREMRANGEBYLEX", "ZPOPMIN", "ZPOPMAX", "BZPOPMIN", "BZPOPMAX", "ZMPOP",
  "BZMPOP", "ZUNIONSTORE", "ZINTERSTORE", "ZDIFFSTORE", "ZRANGESTORE", "XADD", "XDEL", "XTRIM", "XGROUP", "XACK",
  "XCLAIM", "XAUTOCLAIM", "XREADGROUP", "XSETID", "PFADD", "PFMERGE", "PFDEBUG", "GEOADD", "GEORADIUS",
  "GEORADIUSBYMEMBER", "GEOSEARCHSTORE", "FLUSHALL", "FLUSHDB", "SWAPDB", "MIGRATE",
]);

const WITH_SUBCOMMAND = new Set(["CONFIG", "CLIENT", "DEBUG", "SCRIPT", "FUNCTION", "ACL", "CLUSTER", "MODULE"]);
const SUBSCRIBE = new Set(["SUBSCRIBE", "PSUBSCRIBE", "SSUBSCRIBE"]);

export interface RedisFilterOptions {
  mode: PhaseMode;
  record(event: Record<string, unknown>, lines: string[]): Promise<void>;
  /** replaces DEFAULT_DENIED */
  denied?: string[];
  /** timestamps for the audit lines */
  now?: () => Date;
}

export interface RedisFilterResult {
  /** commands forwarded upstream */
  commands: number;
  refused: number;
  error: string | null;
}

/** One parsed request: the bytes to forward and the command's name ("CLIENT KILL"). */
export interface RedisCommand {
  raw: Buffer;
  name: string;
  sub: string | null;
}

export class RespProtocolError extends Error {
  /** commands completed in the same chunk before the error */
  parsed: RedisCommand[] = [];
}

/** Incremental parser of client requests (RESP arrays of bulk strings). */
export class RequestParser {
  private parts: Buffer[] = [];
  private size = 0;
  private line: Buffer[] = [];
  private lineLen = 0;
  private args = -1; // remaining elements; -1: expecting the array header
  private bulk = 0; // bytes of bulk (+CRLF) still to read
  private bulkTarget = 0; // payload length of the current bulk
  private bulkBuf: Buffer[] = [];
  private keep = false; // keep this bulk's bytes (first two arguments)
  private argv: string[] = [];

  /** Complete commands in this chunk; throws RespProtocolError on anything but RESP arrays of bulk strings. */
  feed(chunk: Buffer): RedisCommand[] {
    const out: RedisCommand[] = [];
    try {
      this.parse(chunk, out);
    } catch (e) {
      if (e instanceof RespProtocolError) e.parsed = out;
      throw e;
    }
    return out;
  }

  private parse(chunk: Buffer, out: RedisCommand[]): void {
    let i = 0;
    while (i < chunk.length) {
      if (this.bulk > 0) {
        const take = Math.min(this.bulk, chunk.length - i);
        const piece = chunk.subarray(i, i + take);
        this.push(piece);
        if (this.keep) this.bulkBuf.push(piece);
        this.bulk -= take;
        i += take;
        if (this.bulk === 0) {
          const data = Buffer.concat(this.bulkBuf);
          if (data[this.bulkTarget] !== 0x0d || data[this.bulkTarget + 1] !== 0x0a) {
            if (this.keep) throw new RespProtocolError("bulk string not terminated by CRLF");
          }
          if (this.keep) this.argv.push(data.subarray(0, this.bulkTarget).toString("latin1"));
          this.bulkBuf = [];
          this.keep = false;
          this.argDone(out);
        }
        continue;
      }
      if (this.args === -1 && this.lineLen === 0 && chunk[i] !== 0x2a /* * */) {
        throw new RespProtocolError("inline command (not a RESP array)");
      }
      const nl = chunk.indexOf(0x0a, i);
      const end = nl < 0 ? chunk.length : nl + 1;
      const piece = chunk.subarray(i, end);
      this.push(piece);
      this.line.push(piece);
      this.lineLen += piece.length;
      i = end;
      if (this.lineLen > MAX_LINE) throw new RespProtocolError("header line too long");
      if (nl < 0) break;
      const text = Buffer.concat(this.line).toString("latin1");
      this.line = [];
      this.lineLen = 0;
      if (!text.endsWith("\r\n")) throw new RespProtocolError("header line not terminated by CRLF");
      const n = parseLength(text.slice(1, -2));
      if (this.args === -1) {
        if (text[0] !== "*" || n === null || n > MAX_ARGS) throw new RespProtocolError("bad array header");
        if (n <= 0) {
          // Redis ignores empty requests and sends no reply: so does the filter (nothing forwarded)
          this.reset();
          continue;
        }
        this.args = n;
        continue;
      }
      if (text[0] !== "$" || n === null || n < 0) throw new RespProtocolError("array element is not a bulk string");
      this.bulk = n + 2;
      this.bulkTarget = n;
      this.keep = this.argv.length < 2 && n <= 1024;
      if (this.argv.length < 2 && !this.keep) this.argv.push("?"); // a huge name or subcommand: no match, kept as is
      if (this.size + this.bulk > MAX_COMMAND_BYTES) throw new RespProtocolError(`command larger than ${MAX_COMMAND_BYTES} bytes`);
    }
  }

  private push(piece: Buffer): void {
    this.parts.push(piece);
    this.size += piece.length;
    if (this.size > MAX_COMMAND_BYTES) throw new RespProtocolError(`command larger than ${MAX_COMMAND_BYTES} bytes`);
  }

  private argDone(out: RedisCommand[]): void {
    if (--this.args > 0) return;
    const name = (this.argv[0] ?? "").toUpperCase();
    const sub = this.argv[1] !== undefined ? this.argv[1].toUpperCase() : null;
    out.push({ raw: Buffer.concat(this.parts, this.size), name, sub });
    this.reset();
  }

  private reset(): void {
    this.parts = [];
    this.size = 0;
    this.args = -1;
    this.argv = [];
  }
}

function parseLength(s: string): number | null {
  return /^-?\d{1,12}$/.test(s) ? Number(s) : null;
}

/**
 * Incremental counter of complete top-level replies (RESP2 and RESP3).
 * Push messages (`>`) and attributes (`|`) are not replies.
 */
export class ReplyCounter {
  private stack: Array<{ remaining: number; attr: boolean }> = [];
  private top: string | null = null;
  private line: Buffer[] = [];
  private lineLen = 0;
  private bulk = 0;
  private count = 0;

  /** true between frames: an injected reply cannot split one */
  get idle(): boolean {
    return this.top === null && this.stack.length === 0 && this.bulk === 0 && this.lineLen === 0;
  }

  /** Number of top-level replies completed by this chunk. */
  feed(chunk: Buffer): number {
    this.count = 0;
    let i = 0;
    while (i < chunk.length) {
      if (this.bulk > 0) {
        const take = Math.min(this.bulk, chunk.length - i);
        this.bulk -= take;
        i += take;
        if (this.bulk === 0) this.done();
        continue;
      }
      const nl = chunk.indexOf(0x0a, i);
      const end = nl < 0 ? chunk.length : nl + 1;
      this.line.push(chunk.subarray(i, end));
      this.lineLen += end - i;
      i = end;
      if (nl < 0) break;
      const text = Buffer.concat(this.line).toString("latin1");
      this.line = [];
      this.lineLen = 0;
      this.header(text.replace(/\r?\n$/, ""));
    }
    return this.count;
  }

  private header(text: string): void {
    const type = text[0] ?? "";
    if (this.stack.length === 0 && this.top === null) this.top = type;
    switch (type) {
      case "+": case "-": case ":": case "_": case "#": case ",": case "(":
        return this.done();
      case "$": case "!": case "=": {
        const n = parseLength(text.slice(1));
        if (n === null) throw new RespProtocolError("bad bulk reply header");
        if (n < 0) return this.done();
        this.bulk = n + 2;
        return;
      }
      case "*": case "~": case ">": case "%": case "|": {
        const n = parseLength(text.slice(1));
        if (n === null) throw new RespProtocolError("bad aggregate reply header");
        const attr = type === "|";
        const size = type === "%" || attr ? n * 2 : n;
        if (size <= 0) {
          if (attr) {
            if (this.stack.length === 0) this.top = null;
            return;
          }
          return this.done();
        }
        this.stack.push({ remaining: size, attr });
        return;
      }
      default:
        throw new RespProtocolError(`unknown reply type ${JSON.stringify(type)}`);
    }
  }

  private done(): void {
    for (;;) {
      const top = this.stack.at(-1);
      if (!top) {
        if (this.top !== ">") this.count++;
        this.top = null;
        return;
      }
      if (--top.remaining > 0) return;
      this.stack.pop();
      if (top.attr) {
        if (this.stack.length === 0) this.top = null;
        return;
      }
    }
  }
}

type Item = { cmd: RedisCommand; refusal: { rule: string; clause: string; display: string } | null } | { fatal: string };

/** The refusal for a command, or null when it may be forwarded. */
export function checkCommand(cmd: { name: string; sub: string | null }, mode: PhaseMode, denied: ReadonlySet<string>): { rule: string; clause: string; display: string } | null {
  const withSub = WITH_SUBCOMMAND.has(cmd.name) && cmd.sub ? `${cmd.name} ${cmd.sub}` : null;
  const display = sanitize(withSub ?? cmd.name);
  if (denied.has(cmd.name) || (withSub && denied.has(withSub))) return { rule: "redis.denied", clause: DENIED_CLAUSE, display };
  if (mode === "paper" && WRITE_COMMANDS.has(cmd.name)) return { rule: "redis.read-only", clause: READ_ONLY_CLAUSE, display };
  return null;
}

function sanitize(s: string): string {
  const clean = s.replace(/[^A-Z0-9_.:\- ]/g, "?");
  return clean.length > 64 ? `${clean.slice(0, 64)}…` : clean || "?";
}

/**
 * Relays one tunnelled Redis connection between `client` (the sandbox) and
 * `upstream` (the real Redis, already connected). Resolves when both are closed.
 */
export function handleRedisClient(client: Duplex, upstream: Duplex, opts: RedisFilterOptions): Promise<RedisFilterResult> {
  const denied = new Set((opts.denied ?? DEFAULT_DENIED).map((d) => d.toUpperCase().trim().replace(/\s+/g, " ")));
  const now = opts.now ?? (() => new Date());
  const requests = new RequestParser();
  const replies = new ReplyCounter();
  const queue: Item[] = [];
  let queuedBytes = 0;
  let pending = 0;
  let busy = false; // a refusal is being recorded
  let subscribed = false;
  let finished = false; // no more commands will be processed
  let clientEnded = false;
  let commands = 0;
  let refused = 0;
  let error: string | null = null;

  return new Promise<RedisFilterResult>((resolve) => {
    let closedCount = 0;
    const onClose = () => {
      if (++closedCount < 2) return;
      resolve({ commands, refused, error });
    };
    client.once("close", () => {
      if (!upstream.destroyed) upstream.destroy();
      onClose();
    });
    upstream.once("close", () => {
      if (!client.destroyed) client.end();
      setTimeout(() => client.destroy(), 30_000).unref();
      onClose();
    });
    client.on("error", (e: Error) => {
      error ??= `sandbox side: ${e.message}`;
    });
    upstream.on("error", (e: Error) => {
      error ??= `upstream: ${e.message}`;
      client.destroy();
    });

    const refuse = async (event: Record<string, unknown>, line: string, reply: string, close: boolean) => {
      busy = true;
      refused++;
      try {
        await opts.record(event, [line]);
      } catch (e) {
        // fail closed: a refusal that cannot be recorded ends the connection
        error ??= `could not record a refusal: ${(e as Error).message}`;
        client.destroy();
        upstream.destroy();
        return;
      }
      busy = false;
      if (client.destroyed) return;
      client.write(reply);
      if (close) {
        finished = true;
        client.end();
        upstream.end();
        return;
      }
      pump();
    };

    const pump = () => {
      while (!busy && queue.length > 0 && !client.destroyed) {
        const item = queue[0]!;
        if ("fatal" in item) {
          if ((pending > 0 || !replies.idle) && !subscribed) return;
          queue.shift();
          const reason = item.fatal;
          void refuse(
            { type: "redis.refused", command: null, rule: "redis.protocol", clause: DENIED_CLAUSE, reason },
            actionLine(timestamp(now()), "NET", "REDIS", "?", `FORBID redis.protocol (${DENIED_CLAUSE}): ${reason}`),
            `-ERR sandboxd refused the request: ${reason.replace(/[\r\n]/g, " ")}; send RESP arrays of bulk strings (rule redis.protocol, ${DENIED_CLAUSE})\r\n`,
            true,
          );
          return;
        }
        if (item.refusal) {
          if ((pending > 0 || !replies.idle) && !subscribed) return;
          queue.shift();
          queuedBytes -= item.cmd.raw.length;
          const r = item.refusal;
          void refuse(
            { type: "redis.refused", command: r.display, rule: r.rule, clause: r.clause },
            actionLine(timestamp(now()), "NET", "REDIS", r.display, `FORBID ${r.rule} (${r.clause})`),
            `-ERR sandboxd refused ${r.display} (rule ${r.rule}, ${r.clause})\r\n`,
            subscribed,
          );
          return;
        }
        queue.shift();
        queuedBytes -= item.cmd.raw.length;
        if (SUBSCRIBE.has(item.cmd.name)) subscribed = true;
        commands++;
        pending++;
        if (!upstream.write(item.cmd.raw)) {
          client.pause();
          upstream.once("drain", () => client.resume());
        }
      }
      if (queuedBytes < QUEUE_HIGH_WATER && client.isPaused() && upstream.writableNeedDrain !== true) client.resume();
      if (queue.length === 0 && clientEnded && !finished && !busy) {
        finished = true;
        upstream.end();
      }
    };

    client.on("data", (chunk: Buffer) => {
      if (finished || queue.some((q) => "fatal" in q)) return;
      const add = (cmds: RedisCommand[]) => {
        for (const cmd of cmds) {
          queue.push({ cmd, refusal: checkCommand(cmd, opts.mode, denied) });
          queuedBytes += cmd.raw.length;
        }
      };
      try {
        add(requests.feed(chunk));
      } catch (e) {
        if (e instanceof RespProtocolError) add(e.parsed);
        queue.push({ fatal: e instanceof RespProtocolError ? e.message : String(e) });
      }
      if (queuedBytes >= QUEUE_HIGH_WATER) client.pause();
      pump();
    });
    client.once("end", () => {
      clientEnded = true;
      pump();
    });

    upstream.on("data", (chunk: Buffer) => {
      let n = 0;
      try {
        n = replies.feed(chunk);
      } catch (e) {
        error ??= `upstream sent an unparsable reply: ${(e as Error).message}`;
        client.write(chunk);
        client.destroy();
        upstream.destroy();
        return;
      }
      pending = Math.max(0, pending - n);
      if (!client.write(chunk)) {
        upstream.pause();
        client.once("drain", () => upstream.resume());
      }
      if (pending === 0) pump();
    });
    upstream.once("end", () => {
      if (!client.destroyed) client.end();
    });
    client.resume();
  });
}
