/**
 * Reading command output without allocating per read.
 *
 * A socket read in Node allocates a fresh 64 KiB buffer outside V8's heap
 * for every read. Output streams send thousands of them a second; the heap
 * holds almost nothing else, so the young generation is rarely collected,
 * the buffers' external memory piles up, and V8 answers with full
 * mark-compacts of the whole heap every few tens of milliseconds (measured:
 * most of the daemon's CPU for a 200 MiB stream, BENCHMARKS.md issue 14).
 *
 * Here a socket reads into buffers taken from a pool (Node's `onread` with
 * a buffer generator) and larger than Node's own (fewer reads, fewer
 * frames). A buffer goes back to the pool when every holder has let go: the
 * reader's own hold ends when its callback returns; whoever keeps a view
 * past that (a write still queued to a client) says so with `retain` and
 * `release`. A view that is never released is simply garbage-collected with
 * its buffer (the pool then allocates another): a missed release costs an
 * allocation, never corrupts output. Anyone else who keeps a view after the
 * callback must copy it.
 *
 * Used by the shim (a command's output sockets) and the daemon (the shim's
 * control connection). No imports but node:net: the shim bundle carries it.
 */
import net from "node:net";

/** one read's buffer: larger than Node's 64 KiB, so a fast writer costs a quarter of the reads and frames */
export const POOLED_READ_BYTES = 256 * 1024;

export class ReadPool {
  private readonly free: ArrayBuffer[] = [];
  /** buffers handed out and not yet back, with how many holders each has */
  private readonly holders = new WeakMap<ArrayBufferLike, number>();

  constructor(
    readonly size: number = POOLED_READ_BYTES,
    /** how many idle buffers to keep (the rest are left to the garbage collector) */
    private readonly keep: number = 8,
  ) {}

  /** A buffer for the next read, held once (by the reader). */
  take(): Buffer {
    const ab = this.free.pop() ?? new ArrayBuffer(this.size);
    this.holders.set(ab, 1);
    return Buffer.from(ab, 0, this.size);
  }

  /** One more holder of the buffer `view` is a view of (no-op for a buffer not from this pool). */
  retain(view: Uint8Array): void {
    const n = this.holders.get(view.buffer);
    if (n !== undefined) this.holders.set(view.buffer, n + 1);
  }

  /** A holder let go; the last one returns the buffer to the pool. */
  release(view: Uint8Array): void {
    const ab = view.buffer;
    const n = this.holders.get(ab);
    if (n === undefined) return;
    if (n > 1) return void this.holders.set(ab, n - 1);
    this.holders.delete(ab);
    if (this.free.length < this.keep && ab instanceof ArrayBuffer) this.free.push(ab);
  }

  /** idle buffers (tests) */
  get idle(): number {
    return this.free.length;
  }
}

/** the process's pool for output: the daemon's writers release into it (api/app.ts) */
export const outputPool = new ReadPool();

interface HandleLike {
  readStop?: () => number;
  useUserBuffer?: (b: Uint8Array) => void;
  reading?: boolean;
}

/**
 * `sock`'s connection, read from now on into `pool`'s buffers: `onChunk`
 * gets each read as a view that is valid until it returns (retain it to
 * keep it longer). Returns the socket to use from now on (events, pause,
 * resume, write, destroy) — `sock` itself is spent — or null when this Node
 * cannot hand over the connection; the caller then reads `sock` as usual.
 * Bytes `sock` had already read come first, to `onChunk`, before this
 * returns. A socket that has seen its end is not taken over.
 */
export function readPooled(sock: net.Socket, pool: ReadPool, onChunk: (chunk: Buffer) => void): net.Socket | null {
  const s = sock as unknown as { _handle: HandleLike | null; _readableState?: { ended?: boolean } };
  const handle = s._handle;
  if (!handle || typeof handle.useUserBuffer !== "function" || typeof handle.readStop !== "function") return null;
  if (sock.destroyed || sock.connecting || s._readableState?.ended) return null;
  // stop the old socket's reads, then take what it had read already
  const stop = () => {
    handle.readStop!();
    handle.reading = false;
  };
  stop();
  const early: Buffer[] = [];
  if (sock.readableLength > 0) {
    // (read() may start the handle reading again for the old socket: stopped once more after)
    for (let c = sock.read() as Buffer | null; c !== null; c = sock.read() as Buffer | null) early.push(c);
    stop();
  }
  if (s._readableState?.ended) {
    // it read its end meanwhile: go on with the old socket, the early bytes put back first
    for (const c of early.reverse()) sock.unshift(c);
    return null;
  }
  // the old object lets go of the connection (its close only ends a server's count of it)
  s._handle = null;
  sock.destroy();
  // Node asks for the next read's buffer as soon as a read is delivered (and one at the start), so
  // a socket always holds one it has not filled: given back at its close, or every short-lived
  // socket (a command's stdout of a few bytes) would cost a fresh buffer and its zeroing.
  let lent: Buffer | null = null;
  const next = new net.Socket({
    handle: handle as never,
    readable: true,
    writable: true,
    onread: {
      buffer: () => (lent = pool.take()),
      callback: (n: number, buf: Uint8Array) => {
        if (lent !== null && buf.buffer === lent.buffer) lent = null; // filled: released below, not at the close
        try {
          onChunk(Buffer.from(buf.buffer, buf.byteOffset, n));
        } finally {
          pool.release(buf);
        }
      },
    },
  } as net.SocketConstructorOpts);
  next.once("close", () => {
    // the handle is closed: nothing reads into it any more
    if (lent !== null) pool.release(lent);
    lent = null;
  });
  for (const c of early) onChunk(c);
  return next;
}
