/**
 * The warm pool's pure parts: its lifecycle tables, the key a phase is
 * matched by, `sandboxd ps`'s line; and the pooled control channel, against
 * a scripted shim: nothing reaches the shim before the claim (no welcome, no
 * listen, no command), and the claim's welcome names the phase and its owner.
 */
import { mkdtempSync, rmSync } from "node:fs";
import net from "node:net";
import { tmpdir } from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import pino from "pino";
import { afterEach, describe, expect, it } from "vitest";
import { poolLine } from "../../src/cli/program.js";
import { POOL_TRANSITIONS, SLOT_TRANSITIONS, keyString, poolKeyOf, poolKeys, type PoolStatus } from "../../src/phases/pool.js";
import { ShimChannel } from "../../src/phases/shim-channel.js";
import { loadPolicy } from "../../src/policy/index.js";
import { FrameDecoder, FrameKind, PROTOCOL_VERSION, encodeFrame } from "../../src/shim/protocol.js";

const ROOT = fileURLToPath(new URL("../..", import.meta.url));

describe("pool lifecycles", () => {
  it("a claimed slot is never ready again, a discarded one never anything", () => {
    expect(SLOT_TRANSITIONS.claimed).toEqual([]);
    expect(SLOT_TRANSITIONS.discarded).toEqual([]);
    expect(SLOT_TRANSITIONS.ready).not.toContain("filling");
    // a start refused before its record reached the slot gives it back; a claimed one never goes back
    expect(SLOT_TRANSITIONS.taken).toContain("ready");
    expect(SLOT_TRANSITIONS.ready).not.toContain("claimed");
  });

  it("a stopped pool does not start again by itself; only closing ends every state", () => {
    expect(POOL_TRANSITIONS.stopped).toEqual(["closed"]);
    for (const s of ["off", "running", "stopped"] as const) expect(POOL_TRANSITIONS[s]).toContain("closed");
    expect(POOL_TRANSITIONS.closed).toEqual([]);
  });
});

describe("pool keys", () => {
  it("the default policy's modes share one key; a narrower phase policy has its own", async () => {
    const policy = await loadPolicy(path.join(ROOT, "policies", "default.yaml"));
    expect(poolKeys("img:1", policy)).toHaveLength(1);
    const k = poolKeyOf("img:1", policy, "backtest");
    const narrower = { ...policy, limits: { ...policy.limits, backtest: { ...policy.limits.backtest, memoryBytes: policy.limits.backtest.memoryBytes / 2 } } };
    expect(keyString(poolKeyOf("img:1", narrower, "backtest"))).not.toBe(keyString(k));
    expect(keyString(poolKeyOf("img:2", policy, "backtest"))).not.toBe(keyString(k));
    // /tmp as a cold start sizes it: the smaller of the limit and workspace.disk.tmpBytes
    expect(k.tmpfsBytes).toBe(Math.min(policy.limits.backtest.tmpfsBytes, policy.workspace.disk.tmpBytes));
  });
});

describe("ps line", () => {
  const base: PoolStatus = { state: "running", size: 2, keys: 1, ready: 1, filling: 1, hits: 3, misses: 1, hitRate: 0.75, fills: 5, failures: 0, lastError: null };
  it("says what is ready and the hit rate", () => {
    expect(poolLine(base)).toBe("pool: running, 1 ready of 2, 1 filling; hit rate 75% (3 of 4 starts)");
    expect(poolLine({ ...base, hits: 0, misses: 0, hitRate: null })).toContain("no starts yet");
  });
  it("says a stopped pool stopped, and why", () => {
    expect(poolLine({ ...base, state: "stopped", failures: 3, lastError: "no such image" })).toMatch(/^pool: STOPPED after 3 failed fills in a row \(last: no such image\)/);
    expect(poolLine({ ...base, state: "off" })).toMatch(/^pool: off/);
  });
});

describe("pooled control channel", () => {
  const TOKEN = "pool-test-token-0123456789abcdef";
  const dirs: string[] = [];
  const channels: ShimChannel[] = [];
  afterEach(async () => {
    for (const c of channels.splice(0)) await c.close({ shutdownShim: false });
    for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
  });

  it("holds everything back until the claim, then welcomes with the phase and its owner, then the listeners", async () => {
    const dir = mkdtempSync(path.join(tmpdir(), "sbx-pool-"));
    dirs.push(dir);
    const socket = path.join(dir, "control.sock");
    const channel = new ShimChannel(socket, TOKEN, "pool slot ph_x", pino({ level: "silent" }), undefined, undefined, { pooled: true });
    channels.push(channel);
    await channel.listen();
    const client = net.connect(socket);
    const decoder = new FrameDecoder();
    const got: Array<Record<string, unknown>> = [];
    client.on("data", (chunk: Buffer) => {
      for (const f of decoder.push(chunk)) got.push(JSON.parse(f.payload.toString("utf8")) as Record<string, unknown>);
    });
    const hello = { type: "hello", protocol: PROTOCOL_VERSION, token: TOKEN, pid: 7, node: "v18.20.4", running: [], features: ["owner", "execflow", "stdin", "pool"] };
    client.write(encodeFrame(FrameKind.Json, 0, Buffer.from(JSON.stringify(hello))));
    await channel.waitReady(5_000);
    expect(channel.pooledShim).toBe(true);
    channel.setServices([{ name: "postgres", port: 5432 }]);
    expect(() => channel.exec({ argv: ["true"], cwd: "/", env: {}, timeoutMs: 1000, killGraceMs: 0, uid: 1000, gid: 1000 }, {} as never)).toThrow(/not connected/);
    await new Promise((r) => setTimeout(r, 100));
    expect(got).toEqual([]);
    let lost = 0;
    channel.claim("ph_x", { uid: 1000, gid: 1000 }, () => lost++);
    await new Promise((r) => setTimeout(r, 100));
    expect(got).toEqual([
      { type: "welcome", phaseId: "ph_x", owner: { uid: 1000, gid: 1000 } },
      { type: "listen", services: [{ name: "postgres", port: 5432 }] },
    ]);
    expect(() => channel.claim("ph_y", { uid: 1, gid: 1 }, () => undefined)).toThrow();
    client.destroy();
    await new Promise((r) => setTimeout(r, 100));
    expect(lost).toBe(1);
  });
});
