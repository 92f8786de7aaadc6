/**
 * Docker's multiplexed log stream, read as a stream: each frame is an 8-byte
 * header (stream type; three zero bytes; payload length, big-endian) and its
 * payload. Payloads pass through as they arrive, stdout and stderr
 * interleaved as written; nothing is held but an incomplete header (at most 7
 * bytes), so memory stays bounded however long the log is and backpressure
 * reaches the engine's socket. (docker-modem's demuxStream recurses once per
 * frame over a buffered log: a log of thousands of lines exhausted the stack
 * and the heap.)
 */
import { Transform, type TransformCallback } from "node:stream";

const HEADER = 8;

export class DockerLogDemux extends Transform {
  /** bytes of the current frame's payload still to pass through */
  private remaining = 0;
  /** an incomplete header carried to the next chunk */
  private partial: Buffer | null = null;

  override _transform(chunk: Buffer, _enc: BufferEncoding, done: TransformCallback): void {
    const buf = this.partial ? Buffer.concat([this.partial, chunk]) : chunk;
    this.partial = null;
    // one push per chunk read (the payloads of its frames, joined): no more than the chunk is held
    const parts: Buffer[] = [];
    let off = 0;
    while (off < buf.length) {
      if (this.remaining > 0) {
        const n = Math.min(this.remaining, buf.length - off);
        parts.push(buf.subarray(off, off + n));
        this.remaining -= n;
        off += n;
        continue;
      }
      if (buf.length - off < HEADER) {
        this.partial = Buffer.from(buf.subarray(off));
        break;
      }
      const type = buf[off]!;
      if (type > 2 || buf[off + 1] !== 0 || buf[off + 2] !== 0 || buf[off + 3] !== 0) {
        if (parts.length) this.push(Buffer.concat(parts));
        done(new Error(`not a multiplexed Docker log stream (frame header ${buf.subarray(off, off + HEADER).toString("hex")})`));
        return;
      }
      this.remaining = buf.readUInt32BE(off + 4);
      off += HEADER;
    }
    if (parts.length) this.push(parts.length === 1 ? parts[0] : Buffer.concat(parts));
    done();
  }

  override _flush(done: TransformCallback): void {
    // a log cut inside a frame (the container was removed mid-read) ends where it was cut
    done();
  }
}
