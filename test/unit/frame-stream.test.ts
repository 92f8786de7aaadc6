import { randomBytes } from "node:crypto";
import { mkdtempSync, rmSync } from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { streamFrames } from "../../src/client/frame-stream.js";
import { SandboxdError } from "../../src/errors.js";
import { FrameReader, StreamFrame, frameHeader } from "../../src/frames.js";

/** Deterministic PRNG so a failing split pattern can be reproduced. */
function rng(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (s * 1664525 + 1013904223) >>> 0;
    return s / 0x1_0000_0000;
  };
}

function frame(kind: number, payload: Buffer): Buffer {
  return Buffer.concat([frameHeader(kind, payload.length), payload]);
}

describe("FrameReader({ streamOutput, borrowed })", () => {
  it("output in the pieces it is read in, events whole, although each chunk's memory is reused after its push", () => {
    const out = randomBytes(200_000);
    const err = Buffer.from("é→🙂 on stderr\n");
    const wire = Buffer.concat([
      frame(StreamFrame.Event, Buffer.from('{"type":"started"}')),
      frame(StreamFrame.Stdout, out.subarray(0, 150_000)),
      frame(StreamFrame.Stderr, err),
      frame(9, Buffer.from("a newer kind")),
      frame(StreamFrame.Stdout, Buffer.alloc(0)),
      frame(StreamFrame.Stdout, out.subarray(150_000)),
      frame(StreamFrame.Event, Buffer.from('{"type":"exit"}')),
    ]);
    const rand = rng(7);
    for (let round = 0; round < 16; round++) {
      const reader = new FrameReader({ streamOutput: true, borrowed: true });
      const lent = Buffer.alloc(70_000);
      const got = { out: [] as Buffer[], err: [] as Buffer[], events: [] as string[], other: [] as number[] };
      for (let pos = 0; pos < wire.length; ) {
        const n = wire.copy(lent, 0, pos, pos + 1 + Math.floor(rand() * (round < 4 ? 12 : round < 8 ? 3000 : 70_000)));
        pos += n;
        for (const f of reader.push(lent.subarray(0, n))) {
          if (f.kind === StreamFrame.Stdout) got.out.push(Buffer.from(f.payload));
          else if (f.kind === StreamFrame.Stderr) got.err.push(Buffer.from(f.payload));
          else if (f.kind === StreamFrame.Event) got.events.push(f.payload.toString());
          else got.other.push(f.kind);
        }
        lent.fill(0xee);
      }
      expect(reader.pending).toBe(0);
      expect(Buffer.concat(got.out).equals(out)).toBe(true);
      expect(Buffer.concat(got.err).equals(err)).toBe(true);
      expect(got.events).toEqual(['{"type":"started"}', '{"type":"exit"}']);
      expect(got.other).toEqual([9]);
    }
  });

  it("counts the rest of an output frame that never came as pending", () => {
    const reader = new FrameReader({ streamOutput: true });
    reader.push(frame(StreamFrame.Stdout, Buffer.from("0123456789")).subarray(0, 9));
    expect(reader.pending).toBe(6);
  });
});

describe("streamFrames (the CLI's reader of ?stream=frames)", () => {
  let dir: string;
  afterEach(() => rmSync(dir, { recursive: true, force: true }));

  /** a fake daemon: answers one request with `response`, written in random pieces */
  async function fakeDaemon(response: Buffer, seed = 1): Promise<{ socket: string; requests: string[]; close(): void }> {
    dir = mkdtempSync(path.join(os.tmpdir(), "framestream-"));
    const socket = path.join(dir, "d.sock");
    const requests: string[] = [];
    const rand = rng(seed);
    const srv = net.createServer((c) => {
      let req = "";
      c.on("data", (d) => {
        req += d.toString("latin1");
        const head = req.indexOf("\r\n\r\n");
        const len = Number(/content-length: (\d+)/i.exec(req)?.[1] ?? -1);
        if (head < 0 || req.length < head + 4 + len) return;
        requests.push(req);
        const write = (pos: number): void => {
          if (pos >= response.length) return void c.end();
          const n = 1 + Math.floor(rand() * 40_000);
          c.write(response.subarray(pos, pos + n), () => write(pos + n));
        };
        write(0);
      });
    });
    await new Promise<void>((r) => srv.listen(socket, r));
    return { socket, requests, close: () => srv.close() };
  }

  function chunked(body: Buffer, rand: () => number): Buffer {
    const parts: Buffer[] = [];
    for (let pos = 0; pos < body.length; ) {
      const n = Math.min(body.length - pos, 1 + Math.floor(rand() * 300_000));
      parts.push(Buffer.from(`${n.toString(16)}${rand() < 0.2 ? ";ext=1" : ""}\r\n`), body.subarray(pos, pos + n), Buffer.from("\r\n"));
      pos += n;
    }
    parts.push(Buffer.from("0\r\n\r\n"));
    return Buffer.concat(parts);
  }

  it("sends the request and gets every frame of a chunked answer, in order, however it is cut", async () => {
    const out = randomBytes(3 * 1024 * 1024);
    const body = Buffer.concat([frame(StreamFrame.Event, Buffer.from('{"type":"started"}')), frame(StreamFrame.Stdout, out), frame(StreamFrame.Event, Buffer.from('{"type":"exit"}'))]);
    const head = "HTTP/1.1 200 OK\r\ncontent-type: application/vnd.sandboxd.frames\r\nTransfer-Encoding: chunked\r\nDate: x\r\n\r\n";
    const d = await fakeDaemon(Buffer.concat([Buffer.from(head), chunked(body, rng(3))]), 5);
    try {
      const got: Buffer[] = [];
      const events: string[] = [];
      let slowOnce = true;
      const { cut } = await streamFrames(d.socket, "/v1/phases/ph_000000000000/exec?stream=frames", { argv: ["x"] }, (kind, payload) => {
        if (kind === StreamFrame.Stdout) got.push(Buffer.from(payload));
        else if (kind === StreamFrame.Event) events.push(payload.toString());
        // a reader that asks to wait once: the rest still comes, in order
        if (slowOnce && got.length === 2) {
          slowOnce = false;
          return new Promise((r) => setTimeout(r, 50));
        }
      });
      expect(cut).toBe(0);
      expect(events).toEqual(['{"type":"started"}', '{"type":"exit"}']);
      expect(Buffer.concat(got).equals(out)).toBe(true);
      expect(d.requests[0]).toMatch(/^POST \/v1\/phases\/ph_000000000000\/exec\?stream=frames HTTP\/1\.1\r\n/);
      expect(d.requests[0]!.endsWith('{"argv":["x"]}')).toBe(true);
    } finally {
      d.close();
    }
  });

  it("an error answer is the daemon's coded error", async () => {
    const json = JSON.stringify({ error: { code: "SBX_ERR_PHASE_NOT_FOUND", message: "no phase ph_000000000000", hint: "list them" } });
    const d = await fakeDaemon(Buffer.from(`HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: ${json.length}\r\n\r\n${json}`));
    try {
      const e = await streamFrames(d.socket, "/x", {}, () => undefined).catch((x: unknown) => x);
      expect(e).toBeInstanceOf(SandboxdError);
      expect((e as SandboxdError).code).toBe("SBX_ERR_PHASE_NOT_FOUND");
    } finally {
      d.close();
    }
  });

  it("a stream the daemon cuts off is reported as cut, and a missing socket as unreachable", async () => {
    const body = frame(StreamFrame.Stdout, Buffer.alloc(1000, 0x61));
    const d = await fakeDaemon(Buffer.concat([Buffer.from("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"), chunked(body, rng(9)).subarray(0, 600)]));
    try {
      const { cut } = await streamFrames(d.socket, "/x", {}, () => undefined);
      expect(cut).toBeGreaterThan(0);
    } finally {
      d.close();
    }
    const e = await streamFrames(path.join(dir, "none.sock"), "/x", {}, () => undefined).catch((x: unknown) => x);
    expect((e as SandboxdError).code).toBe("SBX_ERR_DAEMON_UNREACHABLE");
  });
});
