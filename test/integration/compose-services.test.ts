/**
 * compose/ works offline: PostgreSQL (with the test database) and Redis are
 * built from Debian packages on the local base image, started with the
 * project's own docker-compose, and answer on their host ports.
 */
import { execFile } from "node:child_process";
import { createServer, connect } from "node:net";
import path from "node:path";
import { promisify } from "node:util";
import pg from "pg";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { requireEngineAndImage } from "../helpers/sandbox.js";

const run = promisify(execFile);
const DIR = path.resolve("compose");
const NAME = "sandboxdcomposetest";
let env: NodeJS.ProcessEnv;

async function freePort(): Promise<number> {
  return new Promise((resolve) => {
    const s = createServer().listen(0, "127.0.0.1", () => {
      const { port } = s.address() as { port: number };
      s.close(() => resolve(port));
    });
  });
}

function compose(args: string[], timeout = 600_000) {
  return run("docker-compose", ["-p", NAME, ...args], { cwd: DIR, env, timeout, maxBuffer: 32 * 1024 * 1024 });
}

async function until<T>(what: string, fn: () => Promise<T>, ms = 90_000): Promise<T> {
  const end = Date.now() + ms;
  let last: unknown;
  while (Date.now() < end) {
    try {
      return await fn();
    } catch (e) {
      last = e;
      await new Promise((r) => setTimeout(r, 500));
    }
  }
  throw new Error(`${what} never answered: ${(last as Error)?.message}`);
}

function redisPing(port: number): Promise<string> {
  return new Promise((resolve, reject) => {
    const s = connect(port, "127.0.0.1", () => s.write("PING\r\n"));
    s.once("data", (d) => {
      resolve(d.toString());
      s.destroy();
    });
    s.once("error", reject);
  });
}

beforeAll(async () => {
  await requireEngineAndImage();
  await run("docker-compose", ["version"]);
  env = { ...process.env, SANDBOXD_PG_PORT: String(await freePort()), SANDBOXD_REDIS_PORT: String(await freePort()), POSTGRES_PASSWORD: "compose-test-pw" };
  // no compose/.env needed: everything has a default
  await compose(["up", "-d", "--build"], 900_000);
}, 900_000);

afterAll(async () => {
  // the test's own project: its containers and volumes
  await compose(["down", "-v"]).catch(() => undefined);
}, 120_000);

describe("compose/ offline", () => {
  it("PostgreSQL answers with trading and trading_test, Redis answers PING; QuestDB's HTTP port is not published", async () => {
    const port = Number(env.SANDBOXD_PG_PORT);
    const rows = await until("PostgreSQL", async () => {
      const c = new pg.Client({ host: "127.0.0.1", port, user: "trading", password: "compose-test-pw", database: "trading_test" });
      await c.connect();
      try {
        await c.query("CREATE TABLE IF NOT EXISTS t (x int)");
        await c.query("INSERT INTO t VALUES (1)");
        return (await c.query<{ datname: string }>("SELECT datname FROM pg_database WHERE datname LIKE 'trading%' ORDER BY 1")).rows.map((r) => r.datname);
      } finally {
        await c.end();
      }
    });
    expect(rows).toEqual(["trading", "trading_test"]);
    // a wrong password is refused: logins from the network need it
    const bad = new pg.Client({ host: "127.0.0.1", port, user: "trading", password: "wrong", database: "trading" });
    await expect(bad.connect()).rejects.toThrow(/password authentication failed/);
    await bad.end().catch(() => undefined);

    expect(await until("Redis", () => redisPing(Number(env.SANDBOXD_REDIS_PORT)))).toBe("+PONG\r\n");

    const { stdout } = await compose(["config"]);
    expect(stdout).not.toMatch(/9000/);
    const ps = await compose(["ps"]);
    expect(ps.stdout).toMatch(/postgres_1\s.*Up/);
    expect(ps.stdout).toMatch(/redis_1\s.*Up/);
    expect(ps.stdout).not.toMatch(/questdb/);
  }, 180_000);
});
