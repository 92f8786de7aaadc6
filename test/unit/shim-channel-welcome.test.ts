/**
 * The daemon names the phase owner in its welcome only to shims that say
 * they understand it: a container started by an older version keeps a shim
 * whose strict welcome schema would refuse the field (and so never be
 * welcomed again after a daemon upgrade).
 */
import { mkdtempSync, rmSync } from "node:fs";
import net from "node:net";
import { tmpdir } from "node:os";
import path from "node:path";
import pino from "pino";
import { afterEach, describe, expect, it } from "vitest";
import { ShimChannel } from "../../src/phases/shim-channel.js";
import { FrameDecoder, FrameKind, PROTOCOL_VERSION, encodeFrame } from "../../src/shim/protocol.js";

const TOKEN = "welcome-test-token-0123456789abcdef";
const dirs: string[] = [];
const channels: ShimChannel[] = [];

afterEach(async () => {
  for (const c of channels.splice(0)) await c.close({ shutdownShim: false });
  for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
});

async function welcomeFor(features: string[] | undefined): Promise<Record<string, unknown>> {
  const dir = mkdtempSync(path.join(tmpdir(), "sbx-welcome-"));
  dirs.push(dir);
  const socket = path.join(dir, "control.sock");
  const channel = new ShimChannel(socket, TOKEN, "ph_test", pino({ level: "silent" }), { uid: 1000, gid: 1000 });
  channels.push(channel);
  await channel.listen();
  const client = net.connect(socket);
  const decoder = new FrameDecoder();
  const welcome = new Promise<Record<string, unknown>>((resolve) =>
    client.on("data", (chunk: Buffer) => {
      for (const f of decoder.push(chunk)) {
        const m = JSON.parse(f.payload.toString("utf8")) as Record<string, unknown>;
        if (f.kind === FrameKind.Json && m.type === "welcome") resolve(m);
      }
    }),
  );
  const hello = { type: "hello", protocol: PROTOCOL_VERSION, token: TOKEN, pid: 42, node: "v18.20.4", running: [], ...(features ? { features } : {}) };
  client.write(encodeFrame(FrameKind.Json, 0, Buffer.from(JSON.stringify(hello))));
  try {
    return await welcome;
  } finally {
    client.destroy();
  }
}

describe("welcome", () => {
  it("names the owner to a shim that understands it", async () => {
    expect(await welcomeFor(["owner"])).toEqual({ type: "welcome", phaseId: "ph_test", owner: { uid: 1000, gid: 1000 } });
  });

  it("leaves it out for a shim from before (no features in its hello)", async () => {
    expect(await welcomeFor(undefined)).toEqual({ type: "welcome", phaseId: "ph_test" });
  });
});
