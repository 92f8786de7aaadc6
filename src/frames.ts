/**
 * The exec stream's byte format, `POST /v1/phases/:id/exec?stream=frames`
 * (docs/API.md "Streaming exec"): a sequence of frames
 *
 *   u8 kind | u32be payloadLength | payload
 *
 * kind 1: an event, one JSON object (`started`, `waiting`, `exit`, `error`:
 * the same objects as the NDJSON stream's lines); kind 2: stdout bytes;
 * kind 3: stderr bytes. Output is carried as the command wrote it (secrets
 * scrubbed), never decoded or escaped: the daemon writes a 5-byte header and
 * the bytes it has. A reader skips frames of a kind it does not know (a newer
 * daemon's). No imports: the CLI's hot path and the exported client load it.
 */

export const FRAME_HEADER_BYTES = 5;
export const StreamFrame = { Event: 1, Stdout: 2, Stderr: 3 } as const;
/** The byte stream's content type (`?stream=1`, `true` or `ndjson` answers application/x-ndjson, for people and tools that want lines of JSON). */
export const FRAMES_CONTENT_TYPE = "application/vnd.sandboxd.frames";
/** Larger frames are a broken stream (the daemon sends at most the shim's 1 MiB frames, and events far smaller). */
export const MAX_STREAM_FRAME = 16 * 1024 * 1024;

export function frameHeader(kind: number, length: number): Buffer {
  const h = Buffer.allocUnsafe(FRAME_HEADER_BYTES);
  h[0] = kind;
  h.writeUInt32BE(length, 1);
  return h;
}

export interface StreamFrameOut {
  kind: number;
  payload: Buffer;
}

/**
 * Splits a byte stream into frames, copying only when a frame straddles the
 * chunks it came in (a payload inside one chunk is a view of it).
 */
export class FrameReader {
  private chunks: Buffer[] = [];
  private buffered = 0;

  /**
   * `borrowed`: each chunk pushed is only lent for the call (a pooled read
   * buffer): the bytes of an unfinished frame are copied before push
   * returns, and the frames it returns are valid only until then.
   */
  constructor(private readonly opts: { borrowed?: boolean; streamOutput?: boolean } = {}) {}

  /** streamOutput: bytes still to come of the output frame being read, and its kind */
  private outLeft = 0;
  private outKind = 0;

  push(chunk: Buffer): StreamFrameOut[] {
    if (chunk.length > 0) {
      this.chunks.push(chunk);
      this.buffered += chunk.length;
    }
    const out: StreamFrameOut[] = [];
    for (;;) {
      // streamOutput: an output frame comes out in the pieces it is read in (views, never gathered)
      while (this.outLeft > 0 && this.buffered > 0) {
        const n = Math.min(this.outLeft, this.chunks[0]!.length);
        this.outLeft -= n;
        out.push({ kind: this.outKind, payload: this.take(n) });
      }
      if (this.outLeft > 0 || this.buffered < FRAME_HEADER_BYTES) break;
      const head = this.peek(FRAME_HEADER_BYTES);
      const kind = head[0]!;
      const length = head.readUInt32BE(1);
      if (length > MAX_STREAM_FRAME) throw new Error(`exec stream: a frame of ${length} bytes (at most ${MAX_STREAM_FRAME}): not a sandboxd frame stream`);
      if (this.opts.streamOutput && (kind === StreamFrame.Stdout || kind === StreamFrame.Stderr)) {
        this.take(FRAME_HEADER_BYTES);
        this.outLeft = length;
        this.outKind = kind;
        continue;
      }
      if (this.buffered < FRAME_HEADER_BYTES + length) break;
      this.take(FRAME_HEADER_BYTES);
      out.push({ kind, payload: this.take(length) });
    }
    if (this.opts.borrowed && this.buffered > 0) this.chunks = [Buffer.concat(this.chunks, this.buffered)]; // a copy: the next read reuses them
    return out;
  }

  /** bytes received that do not make a whole frame, or of an output frame still to come (a stream that ends with some was cut off) */
  get pending(): number {
    return this.buffered + this.outLeft;
  }

  private peek(n: number): Buffer {
    const first = this.chunks[0]!;
    if (first.length >= n) return first;
    // a header split over small chunks: join just enough of them
    const parts: Buffer[] = [];
    let have = 0;
    for (const c of this.chunks) {
      parts.push(c);
      have += c.length;
      if (have >= n) break;
    }
    return Buffer.concat(parts, have);
  }

  private take(n: number): Buffer {
    this.buffered -= n;
    if (n === 0) return Buffer.alloc(0);
    const first = this.chunks[0]!;
    if (first.length > n) {
      this.chunks[0] = first.subarray(n);
      return first.subarray(0, n);
    }
    if (first.length === n) {
      this.chunks.shift();
      return first;
    }
    const out = Buffer.allocUnsafe(n);
    let off = 0;
    while (off < n) {
      const c = this.chunks[0]!;
      const want = n - off;
      if (c.length <= want) {
        c.copy(out, off);
        off += c.length;
        this.chunks.shift();
      } else {
        c.copy(out, off, 0, want);
        this.chunks[0] = c.subarray(want);
        off += want;
      }
    }
    return out;
  }
}
