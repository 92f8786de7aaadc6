/**
 * The daemon's side of "prepare" (src/phases/shim-channel.ts): it names the
 * id the next exec takes, goes only to a shim that said it understands it,
 * and never to a warm pool's container before its claim (whose shim has no
 * owner, no forker and runs nothing yet).
 */
import { mkdtempSync, rmSync } from "node:fs";
import net from "node:net";
import { tmpdir } from "node:os";
import path from "node:path";
import pino from "pino";
import { afterEach, describe, expect, it } from "vitest";
import { ShimChannel } from "../../src/phases/shim-channel.js";
import { FrameDecoder, FrameKind, PROTOCOL_VERSION, encodeFrame } from "../../src/shim/protocol.js";

const TOKEN = "prepare-test-token-0123456789abcdef";
const dirs: string[] = [];
const channels: ShimChannel[] = [];
const clients: net.Socket[] = [];

afterEach(async () => {
  for (const c of clients.splice(0)) c.destroy();
  for (const c of channels.splice(0)) await c.close({ shutdownShim: false });
  for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
});

/** A channel and a shim connected to it that says hello with `features`; what the daemon sends it is collected. */
async function connected(features: string[] | undefined, opts: { pooled?: boolean } = {}): Promise<{ channel: ShimChannel; seen: Array<Record<string, unknown>>; settle(): Promise<void> }> {
  const dir = mkdtempSync(path.join(tmpdir(), "sbx-prepare-"));
  dirs.push(dir);
  const socket = path.join(dir, "control.sock");
  const channel = new ShimChannel(socket, TOKEN, "ph_test", pino({ level: "silent" }), { uid: 1000, gid: 1000 }, undefined, opts);
  channels.push(channel);
  await channel.listen();
  const client = net.connect(socket);
  clients.push(client);
  const decoder = new FrameDecoder();
  const seen: Array<Record<string, unknown>> = [];
  client.on("data", (chunk: Buffer) => {
    for (const f of decoder.push(chunk)) if (f.kind === FrameKind.Json) seen.push(JSON.parse(f.payload.toString("utf8")) as Record<string, unknown>);
  });
  const hello = { type: "hello", protocol: PROTOCOL_VERSION, token: TOKEN, pid: 42, node: "v18.20.4", running: [], ...(features ? { features } : {}) };
  client.write(encodeFrame(FrameKind.Json, 0, Buffer.from(JSON.stringify(hello))));
  await channel.waitReady(5_000);
  // a round trip through the kernel's socket buffers: what was sent has arrived
  const settle = () => new Promise<void>((r) => setTimeout(r, 50));
  return { channel, seen, settle };
}

const EXEC = { argv: ["true"], cwd: "/workspace", env: {}, timeoutMs: 1_000, killGraceMs: 100, uid: 1000, gid: 1000 };
const noHandlers = { onStarted() {}, onStdout() {}, onStderr() {}, onExit() {}, onSpawnError() {}, onLost() {} };

describe("prepare", () => {
  it("names the id the next exec takes, to a shim with the feature", async () => {
    const { channel, seen, settle } = await connected(["owner", "prepare"]);
    channel.prepare();
    const id = channel.exec(EXEC, noHandlers);
    channel.prepare();
    await settle();
    expect(seen.filter((m) => m.type === "prepare" || m.type === "exec").map((m) => [m.type, m.execId])).toEqual([
      ["prepare", id],
      ["exec", id],
      ["prepare", id + 1],
    ]);
  });

  it("is not sent to a shim from before (its strict schema would drop the message, and nothing would be readied anyway)", async () => {
    const { channel, seen, settle } = await connected(["owner"]);
    channel.prepare();
    await settle();
    expect(seen.some((m) => m.type === "prepare")).toBe(false);
  });

  it("is not sent to a warm pool's container before its claim, and is after it", async () => {
    const { channel, seen, settle } = await connected(["owner", "pool", "prepare"], { pooled: true });
    channel.prepare();
    await settle();
    expect(seen).toEqual([]); // not even a welcome
    channel.claim("ph_claimed", { uid: 1000, gid: 1000 }, () => undefined);
    channel.prepare();
    await settle();
    expect(seen.map((m) => m.type)).toEqual(["welcome", "prepare"]);
  });
});
