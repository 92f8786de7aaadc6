import { describe, expect, it } from "vitest";
import {
  FrameDecoder,
  FrameKind,
  HEADER_BYTES,
  MAX_FRAME_PAYLOAD,
  ProtocolError,
  daemonToShimSchema,
  encodeFrame,
  encodeHeader,
  encodeMessage,
  shimToDaemonSchema,
  type Frame,
  type FrameKindValue,
} from "../../src/shim/protocol.js";

/** Deterministic PRNG so a failing split pattern can be reproduced. */
function rng(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (s * 1664525 + 1013904223) >>> 0;
    return s / 0x1_0000_0000;
  };
}

function sampleFrames(): Frame[] {
  const bytes = Buffer.alloc(70_000);
  for (let i = 0; i < bytes.length; i++) bytes[i] = (i * 31) & 0xff;
  return [
    { kind: FrameKind.Json, execId: 0, payload: Buffer.from(JSON.stringify({ type: "shutdown" })) },
    { kind: FrameKind.Stdout, execId: 1, payload: Buffer.from("hello\n") },
    { kind: FrameKind.Stderr, execId: 0xffffffff, payload: Buffer.alloc(0) },
    { kind: FrameKind.Stdout, execId: 42, payload: bytes },
    { kind: FrameKind.Stderr, execId: 7, payload: Buffer.from("é→🙂", "utf8") },
  ];
}

function encodeAll(frames: Frame[]): Buffer {
  return Buffer.concat(frames.map((f) => encodeFrame(f.kind, f.execId, f.payload)));
}

function decodeInChunks(wire: Buffer, cuts: number[]): Frame[] {
  const decoder = new FrameDecoder();
  const out: Frame[] = [];
  let prev = 0;
  for (const cut of [...cuts, wire.length]) {
    out.push(...decoder.push(wire.subarray(prev, cut)));
    prev = cut;
  }
  return out;
}

function expectSameFrames(actual: Frame[], expected: Frame[]): void {
  expect(actual.map((f) => ({ kind: f.kind, execId: f.execId, hex: f.payload.toString("hex") }))).toEqual(
    expected.map((f) => ({ kind: f.kind, execId: f.execId, hex: f.payload.toString("hex") })),
  );
}

describe("FrameDecoder", () => {
  it("decodes many frames delivered in one chunk", () => {
    const frames = sampleFrames();
    expectSameFrames(new FrameDecoder().push(encodeAll(frames)), frames);
  });

  it("decodes frames delivered byte by byte", () => {
    const frames = sampleFrames().filter((f) => f.payload.length < 1000);
    const wire = encodeAll(frames);
    const cuts = Array.from({ length: wire.length - 1 }, (_, i) => i + 1);
    expectSameFrames(decodeInChunks(wire, cuts), frames);
  });

  it("decodes frames split at arbitrary chunk boundaries", () => {
    const frames = sampleFrames();
    const wire = encodeAll(frames);
    for (let seed = 1; seed <= 50; seed++) {
      const rand = rng(seed);
      const cuts: number[] = [];
      for (let at = Math.floor(rand() * 20); at < wire.length; at += 1 + Math.floor(rand() * 9000)) cuts.push(at);
      expectSameFrames(decodeInChunks(wire, cuts), frames);
    }
  });

  it("splits exactly at every header and payload boundary", () => {
    const frames = sampleFrames();
    const wire = encodeAll(frames);
    const cuts: number[] = [];
    let at = 0;
    for (const f of frames) {
      cuts.push(at, at + 4, at + HEADER_BYTES);
      at += HEADER_BYTES + f.payload.length;
    }
    expectSameFrames(decodeInChunks(wire, cuts), frames);
  });

  it("returns nothing until a frame is complete", () => {
    const decoder = new FrameDecoder();
    const wire = encodeFrame(FrameKind.Stdout, 3, Buffer.from("abc"));
    expect(decoder.push(wire.subarray(0, HEADER_BYTES + 2))).toEqual([]);
    const [frame] = decoder.push(wire.subarray(HEADER_BYTES + 2));
    expect(frame?.payload.toString()).toBe("abc");
  });

  it("accepts a frame of exactly the maximum size", () => {
    const payload = Buffer.alloc(MAX_FRAME_PAYLOAD, 1);
    const frames = new FrameDecoder().push(encodeFrame(FrameKind.Stdout, 1, payload));
    expect(frames).toHaveLength(1);
    expect(frames[0]?.payload.length).toBe(MAX_FRAME_PAYLOAD);
  });

  it("streamData: output comes in the pieces it is read in, never copied, JSON frames whole; joined, the same frames", () => {
    const frames = sampleFrames();
    const wire = encodeAll(frames);
    const rand = rng(77);
    for (let round = 0; round < 50; round++) {
      const decoder = new FrameDecoder({ streamData: true });
      const out: Frame[] = [];
      const chunks: Buffer[] = [];
      for (let pos = 0; pos < wire.length; ) {
        const n = 1 + Math.floor(rand() * 20_000);
        // each chunk its own allocation, as a socket read is
        const c = Buffer.from(wire.subarray(pos, pos + n));
        chunks.push(c);
        out.push(...decoder.push(c));
        pos += n;
      }
      // every output piece is a view of some chunk read
      for (const f of out) if (f.kind !== FrameKind.Json) expect(chunks.some((c) => c.buffer === f.payload.buffer)).toBe(true);
      // pieces of one frame joined again (an empty frame gives no piece)
      const joined: Frame[] = [];
      for (const f of out) {
        const last = joined[joined.length - 1];
        if (last && f.kind !== FrameKind.Json && last.kind === f.kind && last.execId === f.execId) last.payload = Buffer.concat([last.payload, f.payload]);
        else joined.push({ ...f });
      }
      expectSameFrames(joined, frames.filter((f) => f.payload.length > 0 || f.kind === FrameKind.Json));
    }
  });

  it("rejects an oversize frame from its header alone", () => {
    const header = encodeHeader(FrameKind.Stdout, 1, MAX_FRAME_PAYLOAD + 1);
    expect(() => new FrameDecoder().push(header)).toThrow(ProtocolError);
    expect(() => new FrameDecoder().push(header)).toThrow(/exceeds/);
  });

  it("rejects an unknown frame kind", () => {
    const header = encodeHeader(9 as FrameKindValue, 1, 0);
    expect(() => new FrameDecoder().push(header)).toThrow(ProtocolError);
    const zero = encodeHeader(0 as FrameKindValue, 1, 0);
    expect(() => new FrameDecoder().push(zero)).toThrow(/unknown frame kind 0/);
  });

  it("encodeHeader + payload equals encodeFrame", () => {
    const payload = Buffer.from("xyz");
    expect(Buffer.concat([encodeHeader(FrameKind.Stderr, 5, 3), payload])).toEqual(
      encodeFrame(FrameKind.Stderr, 5, payload),
    );
  });
});

const validExec = {
  type: "exec",
  execId: 1,
  argv: ["sh", "-c", "true"],
  cwd: "/workspace",
  env: { PATH: "/usr/bin:/bin" },
  timeoutMs: 1000,
  killGraceMs: 100,
  uid: 1000,
  gid: 1000,
};

const validHello = {
  type: "hello",
  protocol: 1,
  token: "t".repeat(32),
  pid: 7,
  node: "v18.20.4",
  running: [],
};

describe("message schemas", () => {
  it("accept well-formed messages and round-trip through encodeMessage", () => {
    expect(daemonToShimSchema.parse(validExec)).toEqual(validExec);
    expect(shimToDaemonSchema.parse(validHello)).toEqual(validHello);
    const [frame] = new FrameDecoder().push(encodeMessage(daemonToShimSchema.parse(validExec)));
    expect(frame?.kind).toBe(FrameKind.Json);
    expect(frame?.execId).toBe(0);
    expect(JSON.parse(frame!.payload.toString())).toEqual(validExec);
  });

  it("reject unknown fields", () => {
    expect(daemonToShimSchema.safeParse({ ...validExec, shell: true }).success).toBe(false);
    expect(daemonToShimSchema.safeParse({ type: "shutdown", force: true }).success).toBe(false);
    expect(shimToDaemonSchema.safeParse({ ...validHello, admin: true }).success).toBe(false);
  });

  it("reject bad types and out-of-range values", () => {
    const bad: Record<string, unknown>[] = [
      { ...validExec, execId: 0 },
      { ...validExec, execId: 1.5 },
      { ...validExec, execId: 2 ** 32 },
      { ...validExec, argv: [] },
      { ...validExec, argv: "sh -c true" },
      { ...validExec, env: { PATH: 1 } },
      { ...validExec, timeoutMs: 0 },
      { ...validExec, uid: -1 },
      { type: "signal", execId: 1, signal: "SIGSTOP" },
      { type: "welcome" },
      { type: "nope" },
    ];
    for (const message of bad) {
      expect(daemonToShimSchema.safeParse(message).success, JSON.stringify(message)).toBe(false);
    }
    const badFromShim: Record<string, unknown>[] = [
      { ...validHello, protocol: 2 },
      { ...validHello, token: "short" },
      { type: "exit", execId: 1, exitCode: 256, signal: null, timedOut: false, durationMs: 1 },
      { type: "exit", execId: 1, exitCode: 0, signal: null, timedOut: "no", durationMs: 1 },
      { type: "spawn_error", execId: 1, code: "E".repeat(33), message: "x" },
    ];
    for (const message of badFromShim) {
      expect(shimToDaemonSchema.safeParse(message).success, JSON.stringify(message)).toBe(false);
    }
  });
});
