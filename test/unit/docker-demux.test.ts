/**
 * The streaming demultiplexer of Docker's log stream: whatever the chunking
 * (byte by byte, frames split anywhere, thousands of frames in one chunk) it
 * passes the payloads through in order, holds nothing but a partial header,
 * and refuses a stream that is not multiplexed.
 */
import { Readable } from "node:stream";
import { text } from "node:stream/consumers";
import { describe, expect, it } from "vitest";
import { DockerLogDemux } from "../../src/runtime/demux.js";

function frame(type: 1 | 2, payload: string): Buffer {
  const p = Buffer.from(payload);
  const h = Buffer.alloc(8);
  h[0] = type;
  h.writeUInt32BE(p.length, 4);
  return Buffer.concat([h, p]);
}

const demux = (chunks: Buffer[]) => text(Readable.from(chunks).pipe(new DockerLogDemux()));

describe("DockerLogDemux", () => {
  const lines = Array.from({ length: 200 }, (_, i) => `line ${i} ${"é".repeat(i % 7)}\n`);
  const all = Buffer.concat(lines.map((l, i) => frame(i % 3 === 0 ? 2 : 1, l)));

  it("passes payloads through in order, stdout and stderr interleaved", async () => {
    expect(await demux([all])).toBe(lines.join(""));
  });

  it("byte by byte", async () => {
    expect(await demux([...all].map((b) => Buffer.from([b])))).toBe(lines.join(""));
  });

  it("split at every 7 and 13 bytes (headers and payloads cut anywhere)", async () => {
    for (const step of [7, 13]) {
      const chunks: Buffer[] = [];
      for (let i = 0; i < all.length; i += step) chunks.push(all.subarray(i, i + step));
      expect(await demux(chunks)).toBe(lines.join(""));
    }
  });

  it("100,000 frames in one chunk: no recursion, no quadratic copying", async () => {
    const many = Buffer.concat(Array.from({ length: 100_000 }, (_, i) => frame(1, `${i}\n`)));
    const t0 = performance.now();
    const out = await demux([many]);
    expect(out.split("\n")).toHaveLength(100_001);
    expect(performance.now() - t0).toBeLessThan(5_000);
  });

  it("refuses a stream that is not multiplexed (a TTY container's raw log)", async () => {
    await expect(demux([Buffer.from("plain text log line that is not framed\n")])).rejects.toThrow(/not a multiplexed Docker log stream/);
  });

  it("an empty frame and a log cut inside a frame", async () => {
    expect(await demux([Buffer.concat([frame(1, ""), frame(1, "ab"), frame(2, "cdef").subarray(0, 10)])])).toBe("abcd");
  });
});
