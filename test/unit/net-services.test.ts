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
import { listenList, proxyEnv, resolveServices, serviceOverridesFromEnv, unavailableAt } from "../../src/net/services.js";
import { daemonToShimSchema, tunnelHeaderSchema } from "../../src/shim/protocol.js";
import { readFile } from "node:fs/promises";
import { DEFAULT_POLICY_FILE, combine, loadPolicy, parsePolicy } from "../../src/policy/load.js";

const ENV = {
  DATABASE_URL: "postgresql://trader:pr0d-pw@db.internal:6543/trading",
  DATABASE_URL_TEST: "postgresql://tester:t3st-pw@127.0.0.1:5433/trading_test",
  QUESTDB_URL: "postgresql://admin:quest@qdb.internal:8812/qdb",
  QUESTDB_URL_TEST: "postgresql://qtester:qt3st-pw@127.0.0.1:8813/qdb_test",
  REDIS_URL: "redis://:r3dis-pw@cache.internal:6380/3",
  REDIS_URL_TEST: "redis://tester:r3dis-t3st-pw@127.0.0.1:6390/5",
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

  it("QuestDB outside paper mode: the test instance only, never production (SKILLS.md §3 Sandbox Principle)", () => {
    for (const mode of ["test", "backtest"] as const) {
      const s = resolveServices(mode, ENV, {}, WITH_RAW);
      expect(byName(s, "questdb-pg")).toMatchObject({ upstream: { host: "127.0.0.1", port: 8813 }, database: "qdb_test", refusal: null });
      const { QUESTDB_URL_TEST: _, ...prodOnly } = ENV;
      const q = resolveServices(mode, prodOnly, {}, WITH_RAW);
      for (const name of ["questdb-pg", "questdb-http"]) {
        expect(byName(q, name).upstream).toBeNull();
        expect(byName(q, name)).toMatchObject({ rule: "db.test-database-only" });
        expect(byName(q, name).refusal).toMatch(/QUESTDB_URL_TEST is not set.*QUESTDB_URL, production, is never used/);
      }
      // the variable still names the tunnel, never the real host
      expect(q.env.QUESTDB_URL).toBe("postgresql://127.0.0.1:8812/qdb");
    }
    const paper = resolveServices("paper", ENV, {}, WITH_RAW);
    expect(byName(paper, "questdb-pg")).toMatchObject({ upstream: { host: "qdb.internal", port: 8812 }, database: "qdb", refusal: null });
    expect(paper.env.QUESTDB_URL).toBe("postgresql://admin@127.0.0.1:8812/qdb");
    expect(paper.env.QUESTDB_URL_TEST).toBe("postgresql://admin@127.0.0.1:8812/qdb");
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
      QUESTDB_URL: "postgresql://qtester@127.0.0.1:8812/qdb_test",
      QUESTDB_URL_TEST: "postgresql://qtester@127.0.0.1:8812/qdb_test",
      REDIS_URL: "redis://127.0.0.1:6379/5",
      REDIS_URL_TEST: "redis://127.0.0.1:6379/5",
      ...proxyEnv(DEFAULT_NETWORK.packageIndex!),
    });
    for (const v of Object.values(s.env)) expect(v).not.toMatch(/pw|quest$/);
    expect(byName(s, "questdb-pg").upstream).toEqual({ host: "127.0.0.1", port: 8813 });
    expect(byName(s, "questdb-http").upstream).toEqual({ host: "127.0.0.1", port: 9000 });
    expect(byName(s, "redis").upstream).toEqual({ host: "127.0.0.1", port: 6390 });
    expect(listenList(s)).toEqual([
      { name: "postgres", port: 5432 },
      { name: "questdb-pg", port: 8812 },
      { name: "questdb-http", port: 9000 },
      { name: "redis", port: 6379 },
      { name: "pip-proxy", port: 3128 },
    ]);
  });

  it("daemon overrides win over the project's .env", () => {
    const overrides = serviceOverridesFromEnv({ SANDBOXD_SERVICE_REDIS_URL_TEST: "redis://10.1.1.1:7000/0", OTHER: "x" });
    expect(overrides).toEqual({ REDIS_URL_TEST: "redis://10.1.1.1:7000/0" });
    expect(byName(resolveServices("test", ENV, overrides, WITH_RAW), "redis").upstream).toEqual({ host: "10.1.1.1", port: 7000 });
    expect(serviceOverridesFromEnv({ SANDBOXD_SERVICE_REDIS_URL: "redis://10.1.1.2:7001/1" })).toEqual({ REDIS_URL: "redis://10.1.1.2:7001/1" });
  });

  it("Redis by mode: test/backtest reach REDIS_URL_TEST only (refused without it, never production); paper reaches REDIS_URL", () => {
    for (const mode of ["test", "backtest"] as const) {
      const r = byName(resolveServices(mode, ENV, {}, WITH_RAW), "redis");
      expect(r).toMatchObject({ upstream: { host: "127.0.0.1", port: 6390 }, refusal: null, redis: { user: "tester", password: "r3dis-t3st-pw", db: 5 } });
      const { REDIS_URL_TEST: _, ...prodOnly } = ENV;
      const s = resolveServices(mode, prodOnly, {}, WITH_RAW);
      const refused = byName(s, "redis");
      expect(refused).toMatchObject({ upstream: null, rule: "redis.test-instance-only" });
      expect(refused.refusal).toMatch(/REDIS_URL_TEST is not set.*REDIS_URL, production, is never used/);
      expect(refused.redis).toBeUndefined();
      // the variable names the tunnel, never the real host or password
      expect(s.env.REDIS_URL).toBe("redis://127.0.0.1:6379/0");
    }
    const paper = resolveServices("paper", ENV, {}, WITH_RAW);
    expect(byName(paper, "redis")).toMatchObject({ upstream: { host: "cache.internal", port: 6380 }, redis: { user: null, password: "r3dis-pw", db: 3 } });
    expect(paper.env.REDIS_URL).toBe("redis://127.0.0.1:6379/3");
    expect(paper.env.REDIS_URL_TEST).toBe("redis://127.0.0.1:6379/3");
    // URLs the tunnel cannot use are refused with the reason
    for (const [url, why] of [
      ["rediss://:pw@h:6380/0", /TLS/],
      ["redis://h:6379/abc", /not a number/],
      ["http://h:6379/0", /not a redis:\/\/ URL/],
    ] as const) {
      const r = byName(resolveServices("paper", { REDIS_URL: url }, {}, WITH_RAW), "redis");
      expect(r.upstream).toBeNull();
      expect(r.refusal).toMatch(why);
    }
    // an ACL user
    expect(byName(resolveServices("paper", { REDIS_URL: "redis://trader:p%40ss@h:6379" }, {}, WITH_RAW), "redis").redis).toEqual({ user: "trader", password: "p@ss", db: 0 });
  });

  it("services that are not configured are refused, nothing listens for them, and no variable is invented", () => {
    const s = resolveServices("test", {}, {}, WITH_RAW);
    expect(s.env).toEqual(proxyEnv(DEFAULT_NETWORK.packageIndex!));
    for (const svc of s.services.filter((x) => x.protocol !== "http-proxy")) expect(svc.refusal).toBeTruthy();
    // only the package-index proxy listens; the other ports are closed, as in any container
    expect(listenList(s)).toEqual([{ name: "pip-proxy", port: 3128 }]);
    expect(unavailableAt(s, "127.0.0.1", 5432)).toMatchObject({ name: "postgres", rule: "db.test-database-only" });
    expect(unavailableAt(s, "127.0.0.1", 6379)).toMatchObject({ name: "redis", rule: "net.service.redis" });
    expect(unavailableAt(s, "127.0.0.2", 5432)).toBeUndefined();
    expect(unavailableAt(s, "127.0.0.1", 3128)).toBeUndefined();
    expect(unavailableAt(s, "127.0.0.1", 5433)).toBeUndefined();
    // test mode with only production configured: PostgreSQL is not listened for either
    const prodOnly = resolveServices("test", { DATABASE_URL: "postgresql://u:pw@db.internal/trading" }, {}, DEFAULT_NETWORK);
    expect(listenList(prodOnly).map((x) => x.name)).toEqual(["pip-proxy"]);
    expect(unavailableAt(prodOnly, "127.0.0.1", 5432)?.refusal).toMatch(/DATABASE_URL_TEST is not set/);
  });

  it("points pip (and urllib, requests) at the proxy and keeps the tunnels direct", () => {
    const s = resolveServices("test", ENV, {}, DEFAULT_NETWORK);
    expect(byName(s, "pip-proxy")).toMatchObject({ port: 3128, protocol: "http-proxy", upstream: null, refusal: null, rule: "net.package-index" });
    expect(byName(s, "pip-proxy").clause).toMatch(/^SKILLS\.md .*pip from PyPI only/);
    expect(s.env).toMatchObject({
      PIP_PROXY: "http://127.0.0.1:3128",
      PIP_INDEX_URL: "https://pypi.org/simple",
      HTTPS_PROXY: "http://127.0.0.1:3128",
      https_proxy: "http://127.0.0.1:3128",
      HTTP_PROXY: "http://127.0.0.1:3128",
      http_proxy: "http://127.0.0.1:3128",
      NO_PROXY: "127.0.0.1,localhost,::1",
      no_proxy: "127.0.0.1,localhost,::1",
    });
    // without a package index in policy: no listener, no proxy variables
    const none = resolveServices("test", ENV, {}, { ...DEFAULT_NETWORK, packageIndex: undefined });
    expect(none.services.map((x) => x.name)).not.toContain("pip-proxy");
    expect(Object.keys(none.env).filter((k) => /proxy|PIP_/i.test(k))).toEqual([]);
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

  const withNetwork = async (network: string) => {
    const text = await readFile(DEFAULT_POLICY_FILE, "utf8");
    const cut = text.slice(0, text.indexOf("\nnetwork:"));
    return `${cut}\nnetwork:\n  clause: "SKILLS.md Network Boundaries"\n  services:\n    - {id: net.service.redis, name: redis, port: 6379, justification: only the cache here}\n${network}`;
  };
  const INDEX_HEAD = `  packageIndex:\n    id: net.package-index\n    clause: "SKILLS.md Network Boundaries: pip from PyPI only"\n    justification: pip installs from these hosts\n`;

  it("default.yaml gives pip PyPI (the index and its file host) through the proxy on 3128", async () => {
    const base = await loadPolicy();
    expect(base.network.packageIndex).toEqual(DEFAULT_NETWORK.packageIndex);
    expect(base.network.packageIndex).toMatchObject({
      port: 3128,
      indexUrl: "https://pypi.org/simple",
      hosts: [
        { name: "pypi.org", port: 443 },
        { name: "files.pythonhosted.org", port: 443 },
      ],
    });
  });

  it("validates the package index whole, every problem with its path", async () => {
    const text = await withNetwork(
      INDEX_HEAD +
        "    port: 6379\n" +
        "    indexUrl: http://pypi.org/simple\n" +
        "    hosts:\n" +
        "      - {name: pypi.org.}\n" +
        "      - {name: 10.0.0.1}\n" +
        "      - {name: Files.PythonHosted.org}\n" +
        "      - {name: mirror.internal, pin: {address: mirror.internal, port: 443}}\n" +
        "      - {name: pypi.org, proxy: yes}\n",
    );
    let message = "";
    try {
      parsePolicy(text, "bad-index.yaml");
    } catch (e) {
      message = (e as Error).message;
    }
    expect(message).toMatch(/network\.packageIndex\.indexUrl: must be https:\/\//);
    expect(message).toMatch(/network\.packageIndex\.hosts\[0\]\.name: a lower-case DNS host name/);
    expect(message).toMatch(/network\.packageIndex\.hosts\[1\]\.name: /);
    expect(message).toMatch(/network\.packageIndex\.hosts\[2\]\.name: a lower-case DNS host name/);
    expect(message).toMatch(/network\.packageIndex\.hosts\[3\]\.pin\.address: an IPv4 or IPv6 address/);
    expect(message).toMatch(/network\.packageIndex\.hosts\[4\]\.proxy: unknown key/);
    // the cross-field checks run once the shape is right
    const clash = await withNetwork(INDEX_HEAD + "    port: 6379\n    indexUrl: https://pypi.org/simple\n    hosts:\n      - {name: files.pythonhosted.org}\n      - {name: files.pythonhosted.org}\n");
    expect(() => parsePolicy(clash, "clash.yaml")).toThrow(/hosts\[1\]\.name: host files\.pythonhosted\.org is listed twice/);
    expect(() => parsePolicy(clash, "clash.yaml")).toThrow(/indexUrl: host pypi\.org is not among hosts/);
    const port = await withNetwork(INDEX_HEAD + "    port: 6379\n    indexUrl: https://pypi.org/simple\n    hosts: [{name: pypi.org}]\n");
    expect(() => parsePolicy(port, "port.yaml")).toThrow(/network\.packageIndex\.port: port 6379 is already service redis's/);
  });

  it("a phase policy narrows the package index: hosts both list alike, never a new pin", async () => {
    const base = parsePolicy(
      await withNetwork(
        INDEX_HEAD +
          "    port: 3128\n    indexUrl: https://pypi.org/simple\n    hosts:\n" +
          "      - {name: pypi.org}\n      - {name: files.pythonhosted.org}\n      - {name: mirror.internal, pin: {address: 10.0.0.5, port: 443}}\n",
      ),
      "base.yaml",
    );
    const phase = parsePolicy(
      await withNetwork(
        INDEX_HEAD +
          "    port: 3128\n    indexUrl: https://mirror.internal/simple\n    hosts:\n" +
          "      - {name: pypi.org, pin: {address: 192.168.1.9, port: 443}}\n      - {name: files.pythonhosted.org}\n      - {name: mirror.internal, pin: {address: 10.0.0.5, port: 443}}\n      - {name: extra.example}\n",
      ),
      "phase.yaml",
    );
    const c = combine(base, phase).network.packageIndex!;
    // pypi.org is dropped: the phase policy pinned it elsewhere; extra.example was never in the base
    expect(c.hosts.map((h) => h.name)).toEqual(["files.pythonhosted.org", "mirror.internal"]);
    expect(c.indexUrl).toBe("https://mirror.internal/simple");
    expect(c.port).toBe(3128);
    // a phase policy without one, or on another port: no package index at all
    const none = parsePolicy(await withNetwork(""), "none.yaml");
    expect(combine(base, none).network.packageIndex).toBeUndefined();
    expect(resolveServices("test", {}, {}, combine(base, none).network).env).toEqual({});
    const moved = parsePolicy(await withNetwork(INDEX_HEAD + "    port: 3129\n    indexUrl: https://pypi.org/simple\n    hosts: [{name: pypi.org}]\n"), "moved.yaml");
    expect(combine(base, moved).network.packageIndex).toBeUndefined();
    // the base's index URL stays when the phase's host did not survive
    const onlyFiles = parsePolicy(
      await withNetwork(INDEX_HEAD + "    port: 3128\n    indexUrl: https://extra.example/simple\n    hosts: [{name: extra.example}, {name: pypi.org}]\n"),
      "only.yaml",
    );
    expect(combine(base, onlyFiles).network.packageIndex).toMatchObject({ indexUrl: "https://pypi.org/simple", hosts: [{ name: "pypi.org" }] });
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
