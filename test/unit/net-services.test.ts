import { describe, expect, it } from "vitest";
import { DEFAULT_NETWORK } from "../../src/policy/schema.js";
/** The default services plus the raw one an operator may opt into (QuestDB HTTP). */
const WITH_RAW = {
  ...DEFAULT_NETWORK,
  services: [
    ...DEFAULT_NETWORK.services,
    { id: "net.service.questdb-http", name: "questdb-http" as const, port: 9000, justification: "opt-in" },
  ],
};
import { listenList, resolveServices, serviceOverridesFromEnv } from "../../src/net/services.js";
import { daemonToShimSchema, tunnelHeaderSchema } from "../../src/shim/protocol.js";
import { readFile } from "node:fs/promises";
import { DEFAULT_POLICY_FILE, combine, loadPolicy, parsePolicy } from "../../src/policy/load.js";

const ENV = {
  DATABASE_URL: "postgresql://trader:pr0d-pw@db.internal:6543/trading",
  DATABASE_URL_TEST: "postgresql://tester:t3st-pw@127.0.0.1:5433/trading_test",
  QUESTDB_URL: "postgresql://admin:quest@qdb.internal:8812/qdb",
  REDIS_URL: "redis://:r3dis-pw@cache.internal:6380/3",
};

const byName = (s: ReturnType<typeof resolveServices>, n: string) => s.services.find((x) => x.name === n)!;

describe("resolveServices", () => {
  it("test and backtest modes reach the test database only", () => {
    for (const mode of ["test", "backtest"] as const) {
      const s = resolveServices(mode, ENV, {}, WITH_RAW);
      expect(byName(s, "postgres")).toMatchObject({ upstream: { host: "127.0.0.1", port: 5433 }, database: "trading_test", refusal: null });
      expect(s.env.DATABASE_URL).toBe("postgresql://sandbox@127.0.0.1:5432/trading_test");
      expect(s.env.DATABASE_URL_TEST).toBe("postgresql://sandbox@127.0.0.1:5432/trading_test");
    }
  });

  it("never falls back to production in test mode", () => {
    const { DATABASE_URL_TEST: _, ...prodOnly } = ENV;
    const pg = byName(resolveServices("test", prodOnly, {}, WITH_RAW), "postgres");
    expect(pg.upstream).toBeNull();
    expect(pg.refusal).toMatch(/DATABASE_URL_TEST is not set.*never used/);
  });

  it("paper mode reaches production", () => {
    const s = resolveServices("paper", ENV, {}, WITH_RAW);
    expect(byName(s, "postgres")).toMatchObject({ upstream: { host: "db.internal", port: 6543 }, database: "trading" });
    expect(s.env.DATABASE_URL).toBe("postgresql://sandbox@127.0.0.1:5432/trading");
  });

  it("rewrites every service variable to a password-less tunnel URL", () => {
    const s = resolveServices("test", ENV, {}, WITH_RAW);
    expect(s.env).toEqual({
      DATABASE_URL: "postgresql://sandbox@127.0.0.1:5432/trading_test",
      DATABASE_URL_TEST: "postgresql://sandbox@127.0.0.1:5432/trading_test",
      QUESTDB_URL: "postgresql://admin@127.0.0.1:8812/qdb",
      REDIS_URL: "redis://127.0.0.1:6379/3",
    });
    for (const v of Object.values(s.env)) expect(v).not.toMatch(/pw|quest$/);
    expect(byName(s, "questdb-pg").upstream).toEqual({ host: "qdb.internal", port: 8812 });
    expect(byName(s, "questdb-http").upstream).toEqual({ host: "qdb.internal", port: 9000 });
    expect(byName(s, "redis").upstream).toEqual({ host: "cache.internal", port: 6380 });
    expect(listenList(s)).toEqual([
      { name: "postgres", port: 5432 },
      { name: "questdb-pg", port: 8812 },
      { name: "questdb-http", port: 9000 },
      { name: "redis", port: 6379 },
    ]);
  });

  it("daemon overrides win over the project's .env", () => {
    const overrides = serviceOverridesFromEnv({ SANDBOXD_SERVICE_REDIS_URL: "redis://10.1.1.1:7000/0", OTHER: "x" });
    expect(overrides).toEqual({ REDIS_URL: "redis://10.1.1.1:7000/0" });
    expect(byName(resolveServices("test", ENV, overrides, WITH_RAW), "redis").upstream).toEqual({ host: "10.1.1.1", port: 7000 });
  });

  it("services that are not configured are listed but refused, and no variable is invented", () => {
    const s = resolveServices("test", {}, {}, WITH_RAW);
    expect(s.env).toEqual({});
    for (const svc of s.services) expect(svc.refusal).toBeTruthy();
  });
});

describe("tunnel protocol", () => {
  it("validates listen messages and tunnel headers strictly", () => {
    expect(daemonToShimSchema.safeParse({ type: "listen", services: [{ name: "redis", port: 6379 }] }).success).toBe(true);
    expect(daemonToShimSchema.safeParse({ type: "listen", services: [{ name: "redis", port: 0 }] }).success).toBe(false);
    expect(daemonToShimSchema.safeParse({ type: "listen", services: [], extra: 1 }).success).toBe(false);
    expect(tunnelHeaderSchema.safeParse({ token: "a".repeat(64), service: "redis", port: 6379 }).success).toBe(true);
    expect(tunnelHeaderSchema.safeParse({ token: "a".repeat(64), service: "Redis; rm", port: 6379 }).success).toBe(false);
  });
});

describe("policy network section", () => {
  it("default.yaml lists the checked services (PostgreSQL, QuestDB wire, Redis); a phase policy can only remove services", async () => {
    const base = await loadPolicy();
    expect(base.network.services.map((x) => `${x.name}:${x.port}`)).toEqual(["postgres:5432", "questdb-pg:8812", "redis:6379"]);
    const text = await readFile(DEFAULT_POLICY_FILE, "utf8");
    const cut = text.slice(0, text.indexOf("\nnetwork:"));
    const narrow = parsePolicy(
      `${cut}\nnetwork:\n  clause: "SKILLS.md Network Boundaries"\n  services:\n    - {id: net.service.redis, name: redis, port: 6379, justification: only the cache here}\n    - {id: net.service.pg, name: postgres, port: 6000, justification: another port is not a narrowing}\n`,
      "narrow.yaml",
    );
    const c = combine(base, narrow);
    expect(c.network.services.map((x) => x.name)).toEqual(["redis"]);
    const s = resolveServices("test", ENV, {}, c.network);
    expect(listenList(s)).toEqual([{ name: "redis", port: 6379 }]);
    // the variables of services left out are still rewritten: no real URL enters the sandbox
    expect(s.env.DATABASE_URL).toBe("postgresql://sandbox@127.0.0.1:5432/trading_test");
    // without a network section: the defaults
    expect(parsePolicy(cut, "none.yaml").network.services).toHaveLength(3);
  });

  it("rejects a service listed twice or on a port already used", async () => {
    const text = await readFile(DEFAULT_POLICY_FILE, "utf8");
    const cut = text.slice(0, text.indexOf("\nnetwork:"));
    expect(() =>
      parsePolicy(
        `${cut}\nnetwork:\n  clause: "SKILLS.md Network Boundaries"\n  services:\n    - {id: net.a.b, name: redis, port: 6379, justification: the cache of the system}\n    - {id: net.c.d, name: postgres, port: 6379, justification: the database of the system}\n`,
        "dup.yaml",
      ),
    ).toThrow(/port 6379 is listed twice/);
  });
});
