/**
 * The console's gate, as pure decisions over a request's headers: which
 * Host names are the console's own, who is logged in, and whether a change
 * may go through. src/console/server.ts applies the verdicts.
 *
 * - The token (256 random bits) is shown once, in the login URL. It logs a
 *   browser in (exchanged for a session cookie) or authorises a script
 *   (`Authorization: Bearer TOKEN`). It is compared as SHA-256 digests, in
 *   constant time.
 * - A session id is random and unrelated to the token; the cookie is
 *   HttpOnly, SameSite=Strict, Path=/. Cookies ignore ports, so its name
 *   carries the console's port: two daemons on one host do not collide.
 * - Changes made with a cookie need the session's CSRF value in
 *   `X-Sandboxd-CSRF` (the page gets it inside the page, which only a
 *   logged-in, same-origin reader can see) and an Origin that is the
 *   console's own. A Host that is not the console's own (DNS rebinding) is
 *   refused before anything else.
 */
import { createHash, randomBytes, timingSafeEqual } from "node:crypto";

export const CSRF_HEADER = "x-sandboxd-csrf";
/** Sessions kept at once; a new login past this drops the oldest. */
const MAX_SESSIONS = 64;

interface Session {
  csrf: string;
  createdAt: number;
}

export type Verdict =
  | { ok: true; via: "public" | "login" | "bearer" | "cookie"; session?: { id: string; csrf: string } }
  | { ok: false; code: "SBX_ERR_CONSOLE_AUTH" | "SBX_ERR_CONSOLE_FORBIDDEN"; why: string };

export interface RequestFacts {
  method: string;
  path: string;
  host: string | undefined;
  origin: string | undefined;
  authorization: string | undefined;
  cookie: string | undefined;
  csrf: string | undefined;
}

const digest = (s: string) => createHash("sha256").update(s).digest();
const same = (a: string, b: string) => timingSafeEqual(digest(a), digest(b));

/** GET /login and its script are all an unauthenticated browser is served. */
const PUBLIC = new Set(["/login", "/login.js"]);
const SAFE_METHODS = new Set(["GET", "HEAD"]);

export function parseCookies(header: string | undefined): Map<string, string> {
  const out = new Map<string, string>();
  for (const part of (header ?? "").split(";")) {
    const i = part.indexOf("=");
    if (i > 0) out.set(part.slice(0, i).trim(), part.slice(i + 1).trim());
  }
  return out;
}

export class ConsoleGate {
  readonly token: string;
  private readonly sessions = new Map<string, Session>();
  private hosts = new Set<string>();
  private origins = new Set<string>();
  cookieName = "sbx_console";

  constructor(opts: { token?: string; random?: (n: number) => Buffer; now?: () => number } = {}) {
    this.random = opts.random ?? randomBytes;
    this.now = opts.now ?? Date.now;
    this.token = opts.token ?? this.random(32).toString("hex");
  }
  private readonly random: (n: number) => Buffer;
  private readonly now: () => number;

  /** Once the port is known: the Host values (and so Origins) that are the console's own. */
  bind(host: string, port: number): void {
    const names = host === "::1" ? [`[::1]:${port}`, `localhost:${port}`] : [`${host}:${port}`, `localhost:${port}`];
    this.hosts = new Set(names);
    this.origins = new Set(names.map((n) => `http://${n}`));
    this.cookieName = `sbx_console_${port}`;
  }

  /** The token given at login: a new session (id for the cookie, CSRF value for the page), or null. */
  login(token: unknown): { id: string; csrf: string } | null {
    if (typeof token !== "string" || !same(token, this.token)) return null;
    if (this.sessions.size >= MAX_SESSIONS) this.sessions.delete(this.sessions.keys().next().value!);
    const id = this.random(32).toString("base64url");
    const csrf = this.random(32).toString("base64url");
    this.sessions.set(id, { csrf, createdAt: this.now() });
    return { id, csrf };
  }

  logout(id: string): void {
    this.sessions.delete(id);
  }

  sessionCookie(id: string): string {
    return `${this.cookieName}=${id}; HttpOnly; SameSite=Strict; Path=/`;
  }

  clearedCookie(): string {
    return `${this.cookieName}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0`;
  }

  check(r: RequestFacts): Verdict {
    if (!r.host || !this.hosts.has(r.host.toLowerCase())) {
      return { ok: false, code: "SBX_ERR_CONSOLE_FORBIDDEN", why: "this request does not name the console by its own address (Host)" };
    }
    // Browsers send Origin on every cross-origin request and on same-origin changes; when present it must be ours.
    if (r.origin !== undefined && !this.origins.has(r.origin.toLowerCase())) {
      return { ok: false, code: "SBX_ERR_CONSOLE_FORBIDDEN", why: "the request comes from another origin" };
    }
    const safe = SAFE_METHODS.has(r.method);
    if (safe && PUBLIC.has(r.path)) return { ok: true, via: "public" };
    if (r.method === "POST" && (r.path === "/login" || r.path === "/logout")) {
      // a login form posted from elsewhere (login CSRF) has a foreign Origin, refused above; no Origin at all is refused here
      if (r.origin === undefined) return { ok: false, code: "SBX_ERR_CONSOLE_FORBIDDEN", why: "a login needs the console's Origin" };
      return { ok: true, via: "login" };
    }

    const bearer = /^Bearer (\S+)$/i.exec(r.authorization ?? "");
    if (bearer) {
      // a browser never adds this header by itself, so a request carrying it is no forgery
      return same(bearer[1]!, this.token)
        ? { ok: true, via: "bearer" }
        : { ok: false, code: "SBX_ERR_CONSOLE_AUTH", why: "the bearer token is not this console's" };
    }
    const id = parseCookies(r.cookie).get(this.cookieName);
    const s = id === undefined ? undefined : this.sessions.get(id);
    if (!id || !s) return { ok: false, code: "SBX_ERR_CONSOLE_AUTH", why: "not logged in" };
    if (!safe) {
      if (r.origin === undefined) return { ok: false, code: "SBX_ERR_CONSOLE_FORBIDDEN", why: "a change needs the console's Origin" };
      if (r.csrf === undefined || !same(r.csrf, s.csrf)) {
        return { ok: false, code: "SBX_ERR_CONSOLE_FORBIDDEN", why: `a change needs the page's ${CSRF_HEADER} header` };
      }
    }
    return { ok: true, via: "cookie", session: { id, csrf: s.csrf } };
  }
}
