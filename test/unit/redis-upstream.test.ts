/**
 * The daemon's Redis login (src/net/redis-upstream.ts) against scripted
 * servers: what it sends first, and each way it fails.
 */
import net from "node:net";
import { afterEach, describe, expect, it } from "vitest";
import { openRedisUpstream, RedisUnreachable } from "../../src/net/redis-upstream.js";

const servers: net.Server[] = [];
afterEach(async () => {
  for (const s of servers.splice(0)) await new Promise((r) => s.close(r));
});

/** A server that records what it receives and answers each chunk with `answer(text)`. */
async function scripted(answer: (received: string, sock: net.Socket) => void): Promise<{ port: number; received: () => string }> {
  let got = "";
  const server = net.createServer((sock) => {
    sock.on("data", (d: Buffer) => {
      got += d.toString("latin1");
      answer(got, sock);
    });
    sock.on("error", () => undefined);
  });
  servers.push(server);
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  return { port: (server.address() as net.AddressInfo).port, received: () => got };
}

const login = { host: "127.0.0.1", user: "trader", password: "pw", db: 3, name: "sandboxd-ph_1" };

describe("openRedisUpstream", () => {
  it("sends AUTH, SELECT and CLIENT SETNAME before anything else, and resolves once all three are +OK", async () => {
    const s = await scripted((got, sock) => {
      if (got.split("*").length - 1 === 3) sock.write("+OK\r\n+OK\r\n+OK\r\n");
    });
    const up = await openRedisUpstream({ ...login, port: s.port }, 2_000);
    expect(s.received()).toBe(
      "*3\r\n$4\r\nAUTH\r\n$6\r\ntrader\r\n$2\r\npw\r\n" + "*2\r\n$6\r\nSELECT\r\n$1\r\n3\r\n" + "*3\r\n$6\r\nCLIENT\r\n$7\r\nSETNAME\r\n$13\r\nsandboxd-ph_1\r\n",
    );
    up.destroy();
  });

  it("sends nothing when the URL has no password, database 0 and no name", async () => {
    const s = await scripted(() => undefined);
    const up = await openRedisUpstream({ host: "127.0.0.1", port: s.port, user: null, password: null, db: 0 }, 2_000);
    expect(s.received()).toBe("");
    up.destroy();
  });

  it("fails with the server's answer, with no answer in time, when closed, and when nothing listens", async () => {
    const wrong = await scripted((_, sock) => sock.write("-WRONGPASS invalid username-password pair or user is disabled.\r\n"));
    await expect(openRedisUpstream({ ...login, port: wrong.port }, 2_000)).rejects.toThrow(/^login as trader failed: WRONGPASS invalid/);
    const badDb = await scripted((got, sock) => {
      if (got.includes("SETNAME")) sock.write("+OK\r\n-ERR DB index is out of range\r\n+OK\r\n");
    });
    await expect(openRedisUpstream({ ...login, port: badDb.port }, 2_000)).rejects.toThrow(/^SELECT 3 failed: ERR DB index is out of range/);
    const silent = await scripted(() => undefined);
    await expect(openRedisUpstream({ ...login, port: silent.port }, 200)).rejects.toThrow(/^no answer within 200 ms$/);
    const closes = await scripted((_, sock) => sock.destroy());
    await expect(openRedisUpstream({ ...login, port: closes.port }, 2_000)).rejects.toThrow(/closed the connection/);
    // a port nothing listens on any more
    const dead = await scripted(() => undefined);
    const server = servers.pop()!;
    await new Promise((r) => server.close(r));
    const err = await openRedisUpstream({ ...login, port: dead.port }, 2_000).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(RedisUnreachable);
    expect(String((err as Error).message)).toMatch(/ECONNREFUSED/);
  });
});
