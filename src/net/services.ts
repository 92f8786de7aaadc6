/**
 * Which local services a phase can reach, and where they really are.
 *
 * The project's `.env` names the services the way the trading system does —
 * DATABASE_URL (production PostgreSQL), DATABASE_URL_TEST (the isolated test
 * database), QUESTDB_URL, REDIS_URL — and the daemon's own environment can
 * override each (`SANDBOXD_SERVICE_<VAR>`, e.g. SANDBOXD_SERVICE_REDIS_URL;
 * see settings.serviceOverrides). The daemon dials these upstreams on the
 * host. Inside the sandbox the same variables point at the shim's tunnels on
 * 127.0.0.1 and carry no password: the real URLs never enter the container.
 *
 * Mode decides the PostgreSQL upstream: backtest/test → DATABASE_URL_TEST
 * only (never a fall-back to production: without it, PostgreSQL is simply not
 * available and every attempt is refused and recorded with that reason);
 * paper → DATABASE_URL. QuestDB likewise (SKILLS.md §3 Sandbox Principle:
 * isolated test databases only): backtest/test → QUESTDB_URL_TEST, paper →
 * QUESTDB_URL. Redis too: backtest/test → REDIS_URL_TEST, paper → REDIS_URL;
 * the daemon logs in with the URL's user and password and selects its
 * database (src/net/redis-upstream.ts).
 */
import type { PhaseMode } from "../phases/types.js";
import { DEFAULT_NETWORK, type NetworkPolicy, type PackageIndexPolicy } from "../policy/schema.js";

/** How the daemon treats a service's bytes. */
export type ServiceProtocol = "postgres" | "raw" | "http-proxy";

export interface ServiceDefault {
  name: string;
  /** the port the shim listens on inside the sandbox (127.0.0.1) */
  port: number;
  protocol: ServiceProtocol;
}

/** The tunnel service carrying pip's proxy connections. */
export const PIP_PROXY_SERVICE = "pip-proxy";

/**
 * SKILLS.md Network Boundaries: "Connections to localhost services (QuestDB,
 * PostgreSQL, Redis)". Which of them a phase may use, and on which port,
 * is the policy's `network` section; these are the protocols and usual ports.
 */
export const DEFAULT_SERVICES: readonly ServiceDefault[] = Object.freeze([
  { name: "postgres", port: 5432, protocol: "postgres" },
  { name: "questdb-pg", port: 8812, protocol: "postgres" },
  { name: "questdb-http", port: 9000, protocol: "raw" },
  { name: "redis", port: 6379, protocol: "raw" },
  // not a local service: pip's allow-list proxy (src/net/proxy.ts), from the policy's network.packageIndex
  { name: PIP_PROXY_SERVICE, port: 3128, protocol: "http-proxy" },
]);

export const NETWORK_CLAUSE = DEFAULT_NETWORK.clause;
export const TEST_DB_CLAUSE = "SKILLS.md §3 Read-Only Default: INSERT/UPDATE/DELETE only in test-only environments";

/** The .env variables that name services (and are rewritten for the sandbox). */
export const SERVICE_VARS = ["DATABASE_URL", "DATABASE_URL_TEST", "QUESTDB_URL", "QUESTDB_URL_TEST", "REDIS_URL", "REDIS_URL_TEST"] as const;
export type ServiceVar = (typeof SERVICE_VARS)[number];

/** Daemon-side override variable for a service variable: SANDBOXD_SERVICE_REDIS_URL … */
export function overrideVar(v: ServiceVar): string {
  return `SANDBOXD_SERVICE_${v}`;
}

export interface Upstream {
  host: string;
  port: number;
}

export interface ResolvedService extends ServiceDefault {
  /** where the daemon connects; null when the service is not available to this phase */
  upstream: Upstream | null;
  /** the database the upstream URL names (postgres services), for the gateway */
  database: string | null;
  /** the full upstream URL (with credentials) — daemon memory only, never sent to the sandbox */
  url: string | null;
  /** why the service is unavailable (recorded with every refused connection) */
  refusal: string | null;
  /** policy rule and clause recorded with each connection */
  rule: string;
  clause: string;
  /** the pip-proxy service: the allow-list it enforces */
  packageIndex?: PackageIndexPolicy;
  /** the redis service: the daemon's login and database (daemon memory only) */
  redis?: { user: string | null; password: string | null; db: number };
}

export interface PhaseServices {
  services: ResolvedService[];
  /** variables to set in the sandbox's command environment (tunnel URLs, no passwords) */
  env: Record<string, string>;
}

/** Picks up SANDBOXD_SERVICE_* overrides from an environment (for settings). */
export function serviceOverridesFromEnv(env: NodeJS.ProcessEnv): Record<string, string> {
  const out: Record<string, string> = {};
  for (const v of SERVICE_VARS) {
    const value = env[overrideVar(v)];
    if (value) out[v] = value;
  }
  return out;
}

function parseUrl(raw: string | undefined): URL | null {
  if (!raw) return null;
  try {
    return new URL(raw);
  } catch {
    return null;
  }
}

function upstreamOf(url: URL, defaultPort: number): Upstream {
  // URL keeps IPv6 literals bracketed; net.connect wants them bare
  const host = url.hostname.replace(/^\[(.*)\]$/, "$1") || "127.0.0.1";
  return { host, port: url.port ? Number(url.port) : defaultPort };
}

function dbName(url: URL | null): string | null {
  if (!url) return null;
  const name = decodeURIComponent(url.pathname.replace(/^\//, ""));
  return name || null;
}

/** A Redis URL's address, login and database, or why it cannot be used. */
function redisTarget(raw: string | undefined): { url: URL; user: string | null; password: string | null; db: number } | { invalid: string } | { missing: true } {
  if (raw === undefined) return { missing: true };
  const url = parseUrl(raw);
  if (!url) return { invalid: "is not a valid URL" };
  if (url.protocol === "rediss:") return { invalid: "asks for TLS (rediss://), which the daemon does not speak upstream; use redis:// on a trusted network" };
  if (url.protocol !== "redis:") return { invalid: `is not a redis:// URL (${url.protocol})` };
  const path = url.pathname.replace(/^\//, "");
  const dbText = url.searchParams.get("db") ?? path;
  if (dbText !== "" && !/^\d{1,5}$/.test(dbText)) return { invalid: `names database ${JSON.stringify(dbText.slice(0, 20))}, not a number` };
  const user = url.username ? decodeURIComponent(url.username) : null;
  const password = url.password ? decodeURIComponent(url.password) : null;
  // an ACL user with no password still logs in by name (a nopass user accepts any password)
  return { url, user: user === "default" && password === null ? null : user, password: password ?? (user !== null && user !== "default" ? "" : null), db: dbText === "" ? 0 : Number(dbText) };
}

/**
 * Why a database chosen by mode (production `prodVar` in paper mode, its
 * `_TEST` twin otherwise) has no usable URL.
 */
function byModeRefusal(mode: PhaseMode, prodVar: "DATABASE_URL" | "QUESTDB_URL" | "REDIS_URL", prod: string | undefined, test: string | undefined, what: string): string {
  const testVar = `${prodVar}_TEST`;
  if (mode === "paper") {
    return prod ? `${prodVar} is not a valid URL` : `${prodVar} is not set (project .env or SANDBOXD_SERVICE_${prodVar})`;
  }
  if (test) return `${testVar} is not a valid URL`;
  return (
    `a ${mode}-mode phase may use only the test ${what}, and ${testVar} is not set` +
    (prod ? ` (${prodVar}, production, is never used in this mode)` : "")
  );
}

/**
 * Resolve a phase's services from the project's .env (`vars`, as readDotenv
 * returned them) and the daemon's overrides, for a mode, under the policy's
 * network section. Services the policy does not list are left out (nothing
 * listens for them); the sandbox's variables are rewritten all the same, so
 * a real URL never enters the container.
 */
export function resolveServices(
  mode: PhaseMode,
  vars: Readonly<Record<string, string>>,
  overrides: Readonly<Record<string, string>> = {},
  network: Readonly<NetworkPolicy> = DEFAULT_NETWORK,
): PhaseServices {
  const pick = (v: ServiceVar): string | undefined => overrides[v] || vars[v] || undefined;
  const prodUrl = pick("DATABASE_URL");
  const testUrl = pick("DATABASE_URL_TEST");
  // QuestDB, like PostgreSQL, by mode: the test instance outside paper mode, never production
  const questProd = pick("QUESTDB_URL");
  const questTest = pick("QUESTDB_URL_TEST");
  const questRaw = mode === "paper" ? questProd : questTest;
  const questUrl = parseUrl(questRaw);
  // Redis, like PostgreSQL, by mode
  const redisProd = pick("REDIS_URL");
  const redisTest = pick("REDIS_URL_TEST");

  const services: ResolvedService[] = [];
  const env: Record<string, string> = {};
  const allowed = (name: string) => network.services.find((s) => s.name === name);
  const def = (name: string): ServiceDefault => {
    const d = DEFAULT_SERVICES.find((s) => s.name === name)!;
    return { ...d, port: allowed(name)?.port ?? d.port };
  };
  const ruleOf = (name: string) => allowed(name)?.id ?? `net.service.${name}`;

  // PostgreSQL, chosen by mode.
  {
    const d = def("postgres");
    const paper = mode === "paper";
    const raw = paper ? prodUrl : testUrl;
    const url = parseUrl(raw);
    const refusal = url ? null : byModeRefusal(mode, "DATABASE_URL", prodUrl, testUrl, "database");
    services.push({
      ...d,
      upstream: url ? upstreamOf(url, 5432) : null,
      database: dbName(url),
      url: url ? raw! : null,
      refusal,
      // outside paper mode, a missing test database is refused under the read-only rule, not the network one
      rule: !paper && !url ? "db.test-database-only" : ruleOf("postgres"),
      clause: !paper && !url ? TEST_DB_CLAUSE : network.clause,
    });
    // Both names point at the database the tunnel really reaches in this mode.
    const db = dbName(url) ?? dbName(parseUrl(paper ? testUrl : prodUrl)) ?? "postgres";
    const inside = `postgresql://sandbox@127.0.0.1:${d.port}/${encodeURIComponent(db)}`;
    if (prodUrl !== undefined || testUrl !== undefined) {
      if (prodUrl !== undefined) env.DATABASE_URL = inside;
      if (testUrl !== undefined) env.DATABASE_URL_TEST = inside;
    }
  }

  // QuestDB: one URL names the host; the PostgreSQL wire (8812) and HTTP (9000) ports are both tunnelled.
  const questRefusal = byModeRefusal(mode, "QUESTDB_URL", questProd, questTest, "QuestDB");
  for (const name of ["questdb-pg", "questdb-http"] as const) {
    const d = def(name);
    let upstream: Upstream | null = null;
    if (questUrl) {
      const isHttp = questUrl.protocol === "http:" || questUrl.protocol === "https:";
      const wantsHttp = name === "questdb-http";
      upstream =
        isHttp === wantsHttp
          ? upstreamOf(questUrl, wantsHttp ? 9000 : 8812)
          : { host: upstreamOf(questUrl, 0).host, port: wantsHttp ? 9000 : 8812 };
    }
    services.push({
      ...d,
      upstream,
      database: name === "questdb-pg" ? (dbName(questUrl) ?? "qdb") : null,
      url: questUrl ? questUrl.href : null,
      refusal: upstream ? null : questRefusal,
      // outside paper mode, a missing test instance is refused under the read-only rule, not the network one
      rule: !upstream && mode !== "paper" ? "db.test-database-only" : ruleOf(name),
      clause: !upstream && mode !== "paper" ? TEST_DB_CLAUSE : network.clause,
    });
  }
  if (questUrl) {
    const isHttp = questUrl.protocol === "http:" || questUrl.protocol === "https:";
    const scheme = isHttp ? "http" : questUrl.protocol.replace(/:$/, "");
    const user = !isHttp && questUrl.username ? `${questUrl.username}@` : "";
    const port = def(isHttp ? "questdb-http" : "questdb-pg").port;
    const rest = questUrl.pathname === "/" ? "" : questUrl.pathname;
    const inside = `${scheme}://${user}127.0.0.1:${port}${rest}`;
    // both names point at the instance the tunnel really reaches in this mode
    if (questProd !== undefined) env.QUESTDB_URL = inside;
    if (questTest !== undefined) env.QUESTDB_URL_TEST = inside;
  } else {
    // no usable URL for this mode: the variables still must not carry a real address into the sandbox
    const fallback = `postgresql://127.0.0.1:${def("questdb-pg").port}/qdb`;
    if (questProd !== undefined) env.QUESTDB_URL = fallback;
    if (questTest !== undefined) env.QUESTDB_URL_TEST = fallback;
  }

  // Redis: the test instance outside paper mode, never production
  {
    const d = def("redis");
    const paper = mode === "paper";
    const raw = paper ? redisProd : redisTest;
    const parsed = redisTarget(raw);
    const refusal = raw !== undefined && "invalid" in parsed
      ? `${paper ? "REDIS_URL" : "REDIS_URL_TEST"} ${parsed.invalid}`
      : "url" in parsed ? null : byModeRefusal(mode, "REDIS_URL", redisProd, redisTest, "Redis instance");
    const ok = "url" in parsed ? parsed : null;
    services.push({
      ...d,
      upstream: ok ? upstreamOf(ok.url, 6379) : null,
      database: ok ? String(ok.db) : null,
      url: ok ? raw! : null,
      refusal,
      // outside paper mode, a missing test instance is refused under the read-only rule, not the network one
      rule: !paper && !ok ? "redis.test-instance-only" : ruleOf("redis"),
      clause: !paper && !ok ? TEST_DB_CLAUSE : network.clause,
      ...(ok ? { redis: { user: ok.user, password: ok.password, db: ok.db } } : {}),
    });
    // both names point at the instance the tunnel really reaches in this mode, with no credentials
    const inside = `redis://127.0.0.1:${d.port}/${ok?.db ?? 0}`;
    if (redisProd !== undefined) env.REDIS_URL = inside;
    if (redisTest !== undefined) env.REDIS_URL_TEST = inside;
  }

  const listed = services.filter((s) => allowed(s.name));
  const index = network.packageIndex;
  if (index) {
    listed.push({
      name: PIP_PROXY_SERVICE,
      port: index.port,
      protocol: "http-proxy",
      upstream: null,
      database: null,
      url: null,
      refusal: null,
      rule: index.id,
      clause: index.clause,
      packageIndex: index,
    });
    Object.assign(env, proxyEnv(index));
  }
  return { services: listed, env };
}

/**
 * pip (and anything else that honours the usual variables) goes through the
 * proxy without the agent doing anything; the service tunnels on 127.0.0.1
 * stay direct. pip reads PIP_PROXY and PIP_INDEX_URL like its --proxy and
 * --index-url options; urllib and requests read HTTPS_PROXY/https_proxy.
 */
export function proxyEnv(index: Readonly<PackageIndexPolicy>): Record<string, string> {
  const proxy = `http://127.0.0.1:${index.port}`;
  const direct = "127.0.0.1,localhost,::1";
  return {
    PIP_PROXY: proxy,
    PIP_INDEX_URL: index.indexUrl,
    HTTPS_PROXY: proxy,
    https_proxy: proxy,
    HTTP_PROXY: proxy,
    http_proxy: proxy,
    NO_PROXY: direct,
    no_proxy: direct,
  };
}

/**
 * The listen list sent to the shim: only the services this phase really has
 * (an upstream for this mode, or the package-index proxy). Nothing listens on
 * the port of a service that is listed by policy but not configured: a
 * connection there is refused by the kernel like any closed port (immediate
 * ECONNREFUSED, not an accept then a silent close), and a suite that starts
 * its own server on that port can bind it. The refusal is still recorded, with
 * the service's own reason, by the conntrack watch (net/stray.ts, see
 * `unavailableAt`).
 */
export function listenList(s: PhaseServices): Array<{ name: string; port: number }> {
  return s.services.filter(isAvailable).map(({ name, port }) => ({ name, port }));
}

function isAvailable(s: ResolvedService): boolean {
  return s.protocol === "http-proxy" || (s.upstream !== null && s.refusal === null);
}

/**
 * The service the policy lists on 127.0.0.1:`port` that this phase does not
 * have (no upstream in this mode), for the record of a refused connection
 * there; undefined for any other port.
 */
export function unavailableAt(s: PhaseServices, address: string, port: number): ResolvedService | undefined {
  if (address !== "127.0.0.1") return undefined;
  return s.services.find((x) => x.port === port && !isAvailable(x));
}
