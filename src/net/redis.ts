/**
 * Redis command filter for the `redis` tunnel: parses RESP from the sandbox,
 * judges every command against the allowlist (src/net/redis-commands.ts),
 * forwards allowed ones upstream and answers refused ones itself.
 *
 * Requests must be RESP arrays of bulk strings (what every client library
 * sends). An inline command (first byte not `*`) or a malformed request is
 * refused and the connection closed.
 *
 * Reply order with pipelining: the filter counts commands forwarded and not
 * yet answered, by counting complete top-level replies from upstream (RESP2
 * and RESP3; push messages and attributes are not replies). A refused command
 * waits until everything forwarded before it has been answered and relayed,
 * then its error is written, then forwarding resumes. Each refusal is
 * recorded (awaited) before the error is written.
 *
 * Connection names: CLIENT SETNAME and HELLO … SETNAME are forwarded with
 * the name prefixed `sandboxd-` (withNamePrefix).
 *
 * Transactions: a command refused between MULTI and EXEC makes the EXEC
 * fail as a queueing error does in Redis: the filter sends DISCARD instead
 * and answers `-EXECABORT`, so nothing of the transaction runs.
 *
 * Audit: every allowed write is recorded with its keys (capped; values never)
 * before it is forwarded — the writes of one incoming chunk together
 * (`recordMany`, one group commit). Reads are only counted; the counts go
 * into the connection's `net.close` record.
 *
 * Limits: a command is buffered whole before it is forwarded (at most
 * MAX_COMMAND_BYTES). In subscribed (pub/sub) mode replies cannot be
 * counted; a refused command there is answered at once and the connection
 * closed.
 */
import type { Duplex } from "node:stream";
import { actionLine, timestamp } from "../audit/format.js";
import type { PhaseMode } from "../domain.js";
import { ARG_DEPENDENT, DENIED_CLAUSE, HINTS, judgeCommand, keysOf, needsArgs, verdictKey, type Verdict } from "./redis-commands.js";

export { DENIED_CLAUSE, READ_ONLY_CLAUSE } from "./redis-commands.js";
/** Recorded with each allowed write (test and backtest phases write only to the test instance). */
export const TEST_WRITE_CLAUSE = "SKILLS.md §3 Read-Only Default: INSERT/UPDATE/DELETE only in test-only environments";
const MAX_COMMAND_BYTES = 64 * 1024 * 1024;
const MAX_ARGS = 1024 * 1024;
const MAX_LINE = 64 * 1024;
/** arguments kept (for judging and for the record of a write); the rest are forwarded unread */
const MAX_KEPT_ARGS = 64;
/** an argument longer than this is kept as a placeholder (`<n bytes>`), which matches no keyword */
const MAX_KEPT_ARG = 512;
/** a key in a record is cut to this many characters */
const MAX_RECORDED_KEY = 200;
/** parsed-but-unforwarded bytes before the client is paused */
const QUEUE_HIGH_WATER = 8 * 1024 * 1024;
const SUBSCRIBE = new Set(["SUBSCRIBE", "PSUBSCRIBE", "SSUBSCRIBE"]);
/** verdicts cached per connection (by command name, and subcommand where there is one) */
const MAX_CACHED_VERDICTS = 256;
const DISCARD = Buffer.from("*1\r\n$7\r\nDISCARD\r\n");

export interface RedisFilterOptions {
  mode: PhaseMode;
  /** the database index the daemon selected upstream (SELECT of this one is a no-op; others are refused) */
  db?: number;
  record(event: Record<string, unknown>, lines: string[]): Promise<void>;
  /** several records durable together (EventRecorder.recordMany); falls back to `record` per entry */
  recordMany?(entries: Array<{ event: Record<string, unknown>; lines: string[] }>): Promise<unknown>;
  /** timestamps for the audit lines */
  now?: () => Date;
}

export interface RedisFilterResult {
  /** commands forwarded upstream */
  commands: number;
  reads: number;
  writes: number;
  refused: number;
  error: string | null;
}

/** One parsed request: the bytes to forward, the command's name, and its first arguments (capped). */
export interface RedisCommand {
  raw: Buffer;
  name: string;
  sub: string | null;
  /** the arguments as sent (latin1), argv[0] is the command; only the first two unless the parser was asked for more */
  argv: string[];
  /** the number of arguments sent (argv may hold fewer) */
  argc: number;
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
  private keep = false; // keep this bulk's bytes
  private argv: string[] = [];
  private full = false; // keep every argument of this command (capped)
  private argc = 0;

  /** `wantArgs(name)`: keep the arguments after the second for this command (judging, records) */
  constructor(private readonly wantArgs: (name: string) => boolean = () => false) {}

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
        this.argc = n;
        continue;
      }
      if (text[0] !== "$" || n === null || n < 0) throw new RespProtocolError("array element is not a bulk string");
      this.bulk = n + 2;
      this.bulkTarget = n;
      const k = this.argv.length;
      if (k === 1) this.full = this.wantArgs((this.argv[0] ?? "").toUpperCase());
      const wanted = k < 2 || (this.full && k < MAX_KEPT_ARGS);
      this.keep = wanted && n <= (k < 2 ? 1024 : MAX_KEPT_ARG);
      // a huge argument: kept as a placeholder that matches no command or keyword
      if (wanted && !this.keep) this.argv.push(k === 0 ? "?" : `<${n} bytes>`);
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
    out.push({ raw: Buffer.concat(this.parts, this.size), name, sub, argv: this.argv, argc: this.argc });
    this.reset();
  }

  private reset(): void {
    this.parts = [];
    this.size = 0;
    this.args = -1;
    this.argv = [];
    this.full = false;
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

type Item = { cmd: RedisCommand; verdict: Verdict; ready: boolean } | { fatal: string };
type Entry = { event: Record<string, unknown>; lines: string[] };

/**
 * The verdict on a parsed command. A command whose verdict depends on its
 * arguments, sent with more of them than the parser keeps, is refused: what
 * the filter did not read could hold AUTH (HELLO), DB (COPY) or a section
 * (INFO).
 */
export function checkCommand(cmd: RedisCommand, mode: PhaseMode, db = 0): Verdict {
  if (ARG_DEPENDENT.has(cmd.name) && cmd.argc > cmd.argv.length) {
    if (cmd.name === "HELLO") return { allow: false, rule: "redis.auth", clause: DENIED_CLAUSE, display: "HELLO", reason: "HELLO with more arguments than the filter reads" };
    return { allow: false, rule: "redis.unlisted", clause: DENIED_CLAUSE, display: cmd.name, reason: `${cmd.name} with more arguments (${cmd.argc - 1}) than the filter reads` };
  }
  return judgeCommand(cmd.name, cmd.sub, cmd.argv, { mode, db });
}

/** What every connection name set from a sandbox starts with. */
export const CLIENT_NAME_PREFIX = "sandboxd-";

function encodeCommand(argv: readonly string[]): Buffer {
  const parts = [`*${argv.length}\r\n`];
  for (const a of argv) parts.push(`$${Buffer.byteLength(a, "latin1")}\r\n${a}\r\n`);
  return Buffer.from(parts.join(""), "latin1");
}

/**
 * CLIENT SETNAME, CLIENT SETINFO LIB-NAME and HELLO … SETNAME: the name the server shows (CLIENT
 * LIST, the operator's monitoring) gets the sandbox's prefix, so a sandbox
 * cannot pass for the trading engine. The rewritten bytes, or null when the
 * command sets no name.
 */
export function withNamePrefix(cmd: RedisCommand): Buffer | null {
  let i = -1;
  if (cmd.name === "CLIENT" && cmd.sub === "SETNAME" && cmd.argc === 3 && cmd.argv.length === 3) i = 2;
  // CLIENT SETINFO LIB-NAME shows in CLIENT LIST too (`lib-name=`); LIB-VER is a version, left as sent
  else if (cmd.name === "CLIENT" && cmd.sub === "SETINFO" && cmd.argc === 4 && cmd.argv.length === 4 && cmd.argv[2]!.toUpperCase() === "LIB-NAME") i = 3;
  else if (cmd.name === "HELLO" && cmd.argc === cmd.argv.length) {
    const j = cmd.argv.findIndex((a, k) => k >= 2 && a.toUpperCase() === "SETNAME");
    if (j > 0 && j + 1 < cmd.argv.length) i = j + 1;
  }
  if (i < 0) return null;
  const argv = [...cmd.argv];
  argv[i] = CLIENT_NAME_PREFIX + argv[i]!;
  return encodeCommand(argv);
}

/** The error a refused command gets: the command, the rule, the clause and what to do instead. */
export function refusalReply(v: Extract<Verdict, { allow: false }>): string {
  return `-ERR sandboxd refused ${v.display} (rule ${v.rule}, ${v.clause}): ${HINTS[v.rule]}\r\n`;
}

function recordedKey(k: string): string {
  // keys are arbitrary bytes; shown as UTF-8 where they are, capped
  const text = Buffer.from(k, "latin1").toString("utf8");
  return text.length > MAX_RECORDED_KEY ? `${text.slice(0, MAX_RECORDED_KEY)}…` : text;
}

/**
 * Relays one tunnelled Redis connection between `client` (the sandbox) and
 * `upstream` (the real Redis, connected and logged in). Resolves when both are closed.
 */
export function handleRedisClient(client: Duplex, upstream: Duplex, opts: RedisFilterOptions): Promise<RedisFilterResult> {
  const now = opts.now ?? (() => new Date());
  const db = opts.db ?? 0;
  const requests = new RequestParser(needsArgs);
  const replies = new ReplyCounter();
  const queue: Item[] = [];
  let queuedBytes = 0;
  let pending = 0;
  let busy = false; // a refusal is being recorded, or an aborted EXEC's DISCARD answered
  let swallow = false; // the next reply is the filter's own DISCARD's
  let subscribed = false;
  let inMulti = false;
  let multiAborted = false; // a command of the open MULTI was refused
  let finished = false; // no more commands will be processed
  let clientEnded = false;
  let commands = 0;
  let reads = 0;
  let writes = 0;
  let refused = 0;
  let error: string | null = null;

  // the hot path: a read costs a map lookup and a counter, its verdict is shared
  const verdicts = new Map<string, Verdict>();
  const judge = (cmd: RedisCommand): Verdict => {
    const key = verdictKey(cmd.name, cmd.sub);
    if (key === null) return checkCommand(cmd, opts.mode, db);
    let v = verdicts.get(key);
    if (!v) {
      v = checkCommand(cmd, opts.mode, db);
      if (verdicts.size < MAX_CACHED_VERDICTS) verdicts.set(key, v);
    }
    return v;
  };
  const commit = (entries: Entry[]): Promise<unknown> =>
    opts.recordMany ? opts.recordMany(entries) : Promise.all(entries.map((e) => opts.record(e.event, e.lines)));

  return new Promise<RedisFilterResult>((resolve) => {
    let closedCount = 0;
    const onClose = () => {
      if (++closedCount < 2) return;
      resolve({ commands, reads, writes, refused, error });
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

    const failClosed = (e: unknown, what: string) => {
      // nothing runs unrecorded: a record that cannot be made ends the connection
      error ??= `could not record ${what}: ${(e as Error).message}`;
      finished = true;
      client.destroy();
      upstream.destroy();
    };

    const refuse = async (event: Record<string, unknown>, line: string, reply: string, close: boolean) => {
      busy = true;
      refused++;
      try {
        await opts.record(event, [line]);
      } catch (e) {
        return failClosed(e, "a refusal");
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

    const forward = (raw: Buffer) => {
      pending++;
      if (!upstream.write(raw)) {
        client.pause();
        upstream.once("drain", () => client.resume());
      }
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
        if (!item.ready) return; // its record is not durable yet
        const v = item.verdict;
        if (!v.allow) {
          if ((pending > 0 || !replies.idle) && !subscribed) return;
          queue.shift();
          queuedBytes -= item.cmd.raw.length;
          if (inMulti) multiAborted = true;
          void refuse(
            { type: "redis.refused", command: v.display, rule: v.rule, clause: v.clause, reason: v.reason, mode: opts.mode },
            actionLine(timestamp(now()), "NET", "REDIS", v.display, `FORBID ${v.rule} (${v.clause}): ${v.reason}`),
            refusalReply(v),
            subscribed,
          );
          return;
        }
        const name = item.cmd.name;
        if (name === "EXEC" && multiAborted && !subscribed) {
          if (pending > 0 || !replies.idle) return;
          queue.shift();
          queuedBytes -= item.cmd.raw.length;
          // The server queued the rest of the transaction: discard it, and answer the EXEC as
          // Redis answers one after a queueing error. Nothing else is in flight meanwhile.
          inMulti = false;
          multiAborted = false;
          busy = true;
          swallow = true;
          forward(DISCARD);
          return;
        }
        queue.shift();
        queuedBytes -= item.cmd.raw.length;
        if (SUBSCRIBE.has(name)) subscribed = true;
        else if (name === "MULTI") inMulti = true;
        else if (name === "EXEC" || name === "DISCARD") {
          inMulti = false;
          multiAborted = false;
        }
        commands++;
        if (v.cls === "read") reads++;
        else if (v.cls === "write") writes++;
        forward(name === "CLIENT" || name === "HELLO" ? (withNamePrefix(item.cmd) ?? item.cmd.raw) : item.cmd.raw);
      }
      if (queuedBytes < QUEUE_HIGH_WATER && client.isPaused() && upstream.writableNeedDrain !== true) client.resume();
      if (queue.length === 0 && clientEnded && !finished && !busy) {
        finished = true;
        upstream.end();
      }
    };

    const writeEntry = (cmd: RedisCommand, v: Extract<Verdict, { allow: true }>): Entry => {
      const keys = keysOf(v.keys, cmd.argv).map(recordedKey);
      return {
        event: { type: "redis.write", command: v.display, keys, args: cmd.argc - 1, mode: opts.mode, rule: "redis.write", clause: TEST_WRITE_CLAUSE },
        lines: [actionLine(timestamp(now()), "NET", "REDIS", `${v.display}${keys.length ? ` ${keys.join(" ")}` : ""}`, `ALLOW redis.write (${TEST_WRITE_CLAUSE})`)],
      };
    };

    client.on("data", (chunk: Buffer) => {
      if (finished || queue.some((q) => "fatal" in q)) return;
      const entries: Entry[] = [];
      const gated: Array<{ ready: boolean }> = [];
      const add = (cmds: RedisCommand[]) => {
        for (const cmd of cmds) {
          const verdict = judge(cmd);
          const item = { cmd, verdict, ready: true };
          if (verdict.allow && verdict.cls === "write") {
            entries.push(writeEntry(cmd, verdict));
            item.ready = false;
            gated.push(item);
          }
          queue.push(item);
          queuedBytes += cmd.raw.length;
        }
      };
      try {
        add(requests.feed(chunk));
      } catch (e) {
        if (e instanceof RespProtocolError) add(e.parsed);
        queue.push({ fatal: e instanceof RespProtocolError ? e.message : String(e) });
      }
      if (entries.length > 0) {
        // the chunk's writes are durable together before the first of them is forwarded
        let committed: Promise<unknown>;
        try {
          committed = commit(entries);
        } catch (e) {
          committed = Promise.reject(e);
        }
        committed.then(
          () => {
            for (const g of gated) g.ready = true;
            pump();
          },
          (e: unknown) => failClosed(e, "a write"),
        );
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
      if (swallow) {
        // only the filter's DISCARD was in flight: these bytes are its answer
        if (n === 0) return;
        swallow = false;
        busy = false;
        client.write("-EXECABORT Transaction discarded because of previous errors.\r\n");
        pump();
        return;
      }
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
    upstream.resume();
  });
}
