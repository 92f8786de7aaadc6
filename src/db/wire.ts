/**
 * PostgreSQL v3 wire-protocol helpers shared by the gateway, its session and
 * its upstream login: message type bytes, message builders, field parsing, and
 * a byte reader for the (sequential) startup phase.
 */
import type { Duplex } from "node:stream";

/** ReadyForQuery's transaction status: idle, in a transaction block, in a failed block */
export type TxStatus = "I" | "T" | "E";

/** larger messages are a protocol violation (PostgreSQL's own limit is 1 GB) */
export const MAX_MESSAGE = 1 << 30;

// message type bytes
export const T_QUERY = 0x51; // Q
export const T_PARSE = 0x50; // P
export const T_BIND = 0x42; // B
export const T_EXECUTE = 0x45; // E (frontend)
export const T_DESCRIBE = 0x44; // D (frontend)
export const T_CLOSE = 0x43; // C (frontend)
export const T_FLUSH = 0x48; // H
export const T_SYNC = 0x53; // S
export const T_TERMINATE = 0x58; // X
export const T_FUNCTION_CALL = 0x46; // F
export const T_COPY_DATA = 0x64; // d
export const T_COPY_DONE = 0x63; // c
export const T_COPY_FAIL = 0x66; // f
export const T_COMMAND_COMPLETE = 0x43; // C (backend)
export const T_ERROR = 0x45; // E (backend)
export const T_READY = 0x5a; // Z
export const T_DATA_ROW = 0x44; // D (backend)

export const PROTOCOL_3 = 196608;
export const SSL_REQUEST = 80877103;
export const GSSENC_REQUEST = 80877104;
export const CANCEL_REQUEST = 80877102;

export function cstr(s: string): Buffer {
  return Buffer.from(`${s}\u0000`, "utf8");
}

export function message(type: string, ...parts: Buffer[]): Buffer {
  const len = parts.reduce((n, p) => n + p.length, 4);
  const head = Buffer.allocUnsafe(5);
  head.write(type, 0, "latin1");
  head.writeInt32BE(len, 1);
  return Buffer.concat([head, ...parts]);
}

export function int32(n: number): Buffer {
  const b = Buffer.allocUnsafe(4);
  b.writeInt32BE(n);
  return b;
}

export function errorResponse(fields: Record<string, string>): Buffer {
  const parts = Object.entries(fields).map(([k, v]) => Buffer.concat([Buffer.from(k, "latin1"), cstr(v)]));
  return message("E", ...parts, Buffer.from([0]));
}

export function readyForQuery(status: TxStatus): Buffer {
  return message("Z", Buffer.from(status, "latin1"));
}

/** ErrorResponse/NoticeResponse body → field code → value */
export function parseFields(body: Buffer): Map<string, string> {
  const out = new Map<string, string>();
  let i = 0;
  while (i < body.length && body[i] !== 0) {
    const code = String.fromCharCode(body[i]!);
    const end = body.indexOf(0, i + 1);
    if (end < 0) break;
    out.set(code, body.toString("utf8", i + 1, end));
    i = end + 1;
  }
  return out;
}

/** Rows from a CommandComplete tag: `SELECT 3`, `INSERT 0 1`, `UPDATE 2`, `COPY 5`, … (0 for tags without a count) */
export function rowsFromTag(tag: string): number {
  const m = /^(?:SELECT|INSERT \d+|UPDATE|DELETE|MERGE|COPY|FETCH|MOVE) (\d+)$/.exec(tag);
  return m ? Number(m[1]) : 0;
}

/* ------------------------------ byte reader ----------------------------- */

/** Buffered reads of exact lengths from a stream, for the startup phase only. */
export class ByteReader {
  private chunks: Buffer[] = [];
  private length = 0;
  private wake: (() => void) | undefined;
  private failure: Error | undefined;

  constructor(private readonly stream: Duplex) {
    stream.on("data", this.onData);
    stream.on("end", this.onEnd);
    stream.on("close", this.onEnd);
    stream.on("error", this.onError);
  }

  private readonly onData = (b: Buffer): void => {
    this.chunks.push(b);
    this.length += b.length;
    this.wake?.();
  };
  private readonly onEnd = (): void => {
    this.failure ??= new Error("connection closed");
    this.wake?.();
  };
  private readonly onError = (e: Error): void => {
    this.failure ??= e;
    this.wake?.();
  };

  async read(n: number): Promise<Buffer> {
    while (this.length < n) {
      if (this.failure) throw this.failure;
      await new Promise<void>((resolve) => (this.wake = resolve));
      this.wake = undefined;
    }
    const all = this.chunks.length === 1 ? this.chunks[0]! : Buffer.concat(this.chunks);
    this.chunks = all.length > n ? [all.subarray(n)] : [];
    this.length -= n;
    return all.subarray(0, n);
  }

  /** a typed message: type byte, int32 length, body */
  async message(): Promise<{ type: string; body: Buffer }> {
    const head = await this.read(5);
    const len = head.readInt32BE(1);
    if (len < 4 || len > MAX_MESSAGE) throw new Error(`bad message length ${len}`);
    const body = await this.read(len - 4);
    return { type: String.fromCharCode(head[0]!), body };
  }

  /** Stops listening and returns what was read but not consumed; the stream is left paused. */
  detach(): Buffer | undefined {
    this.stream.off("data", this.onData);
    this.stream.off("end", this.onEnd);
    this.stream.off("close", this.onEnd);
    this.stream.off("error", this.onError);
    this.stream.pause();
    const rest = this.chunks.length ? Buffer.concat(this.chunks) : undefined;
    this.chunks = [];
    this.length = 0;
    return rest;
  }
}

