/**
 * TunnelServer on its own (no Docker): header parsing, refusals and their
 * records, raw piping with bytes that arrive with the header, byte counts.
 */
import { mkdtemp, rm } from "node:fs/promises";
import { DEFAULT_NETWORK } from "../../src/policy/schema.js";
/** The default services plus the raw one an operator may opt into (QuestDB HTTP). */
const WITH_RAW = {
  ...DEFAULT_NETWORK,
  services: [
    ...DEFAULT_NETWORK.services,
    { id: "net.service.questdb-http", name: "questdb-http" as const, port: 9000, justification: "opt-in" },
  ],
};
import net from "node:net";
import os from "node:os";
import path from "node:path";
import pino from "pino";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { resolveServices } from "../../src/net/services.js";
import { TunnelServer } from "../../src/net/tunnels.js";
import type { PhaseRecorder } from "../../src/phases/recorder.js";
import { systemClock } from "../../src/util/clock.js";

const TOKEN = "t".repeat(64);
let dir: string;
let echo: net.Server;
let server: TunnelServer;
const events: Array<Record<string, unknown>> = [];
const lines: string[] = [];

beforeAll(async () => {
  dir = await mkdtemp(path.join(os.tmpdir(), "sbx-tun-"));
  echo = net.createServer((s) => s.pipe(s));
  await new Promise<void>((r) => echo.listen(0, "127.0.0.1", r));
  const port = (echo.address() as net.AddressInfo).port;
  // QuestDB's HTTP port is a raw pipe: the echo server stands in for it. (Redis goes through its command filter.)
  const services = resolveServices(
    "test",
    { REDIS_URL_TEST: `redis://127.0.0.1:${port}/0`, QUESTDB_URL_TEST: `http://127.0.0.1:${port}` },
    {},
    WITH_RAW,
  );
  const rec = {
    record: async (e: Record<string, unknown>, l: string[]) => {
      events.push(e);
      lines.push(...l);
      return e;
    },
  } as unknown as PhaseRecorder;
  server = new TunnelServer({
    socketPath: path.join(dir, "tunnel.sock"),
    token: TOKEN,
    phaseId: "ph_unit",
    mode: "test",
    services: () => services,
    rec,
    clock: systemClock,
    log: pino({ level: "silent" }),
    gateway: null,
  });
  await server.listen();
});

afterAll(async () => {
  await server?.close();
  await new Promise((r) => echo?.close(r));
  await rm(dir, { recursive: true, force: true });
});

/** Connects, writes `first`, collects what comes back until the tunnel closes. */
function tunnel(first: Buffer | string, then?: Buffer): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const c = net.createConnection({ path: path.join(dir, "tunnel.sock") });
    const got: Buffer[] = [];
    let total = 0;
    c.on("data", (d: Buffer) => {
      got.push(d);
      total += d.length;
      if (then && total >= then.length) c.end();
    });
    c.on("error", reject);
    c.on("close", () => resolve(Buffer.concat(got)));
    c.write(first);
    if (then) c.write(then);
  });
}

async function until<T>(f: () => T | undefined): Promise<T> {
  for (let i = 0; i < 100; i++) {
    const v = f();
    if (v !== undefined) return v;
    await new Promise((r) => setTimeout(r, 20));
  }
  throw new Error("timed out");
}

describe("TunnelServer", () => {
  it("pipes an allowed service, including bytes sent together with the header, and records both ends", async () => {
    const payload = Buffer.alloc(300_000, 7);
    const header = JSON.stringify({ token: TOKEN, service: "questdb-http", port: 9000 }) + "\n";
    const back = await tunnel(Buffer.concat([Buffer.from(header), payload.subarray(0, 10)]), payload.subarray(10));
    expect(back.equals(payload)).toBe(true);
    const close = await until(() => events.find((e) => e.type === "net.close"));
    expect(close).toMatchObject({ service: "questdb-http", bytesIn: payload.length, bytesOut: payload.length, error: null });
    const connect = events.find((e) => e.type === "net.connect" && e.decision === "allow");
    expect(events.indexOf(connect!)).toBeLessThan(events.indexOf(close));
  });

  it("refuses and records a wrong token, a malformed or oversize header, and an unlisted service", async () => {
    const cases: Array<[string | Buffer, string]> = [
      [JSON.stringify({ token: "x".repeat(64), service: "redis", port: 6379 }) + "\n", "net.tunnel-auth"],
      ["not json\n", "net.tunnel-header"],
      [Buffer.alloc(2048, 0x41), "net.tunnel-header"],
      [JSON.stringify({ token: TOKEN, service: "mysql", port: 3306 }) + "\n", "net.unknown-service"],
      [JSON.stringify({ token: TOKEN, service: "redis", port: 6380 }) + "\n", "net.unknown-service"],
      // test mode without DATABASE_URL_TEST
      [JSON.stringify({ token: TOKEN, service: "postgres", port: 5432 }) + "\n", "db.test-database-only"],
    ];
    for (const [first, rule] of cases) {
      const before = events.length;
      expect((await tunnel(first)).length).toBe(0);
      const r = await until(() => events.slice(before).find((e) => e.type === "net.connect"));
      expect(r).toMatchObject({ decision: "forbid", rule });
      expect(typeof r.reason).toBe("string");
    }
    expect(lines.some((l) => l.includes("[NET] [CONNECT]") && l.includes("FORBID net.tunnel-auth"))).toBe(true);
  });

  it("drops connections over the rate limit and records them as one summary", async () => {
    const before = events.length;
    const header = JSON.stringify({ token: TOKEN, service: "redis", port: 6379 }) + "\n";
    // more than the burst at once
    const once = () =>
      new Promise<void>((resolve) => {
        const c = net.createConnection({ path: path.join(dir, "tunnel.sock") });
        c.on("error", () => resolve());
        c.on("close", () => resolve());
        c.end(header);
      });
    await Promise.all(Array.from({ length: 260 }, once));
    const summary = await until(() => events.slice(before).find((e) => e.rule === "net.rate-limit"));
    expect(summary).toMatchObject({ type: "net.connect", decision: "forbid" });
    expect(summary.count as number).toBeGreaterThan(0);
    const allowed = events.slice(before).filter((e) => e.type === "net.connect" && e.decision === "allow").length;
    expect(allowed + (summary.count as number)).toBe(260);
  }, 20_000);
});
