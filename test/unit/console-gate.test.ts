/**
 * The console's address rule (loopback only) and its gate's decisions, as
 * pure logic; test/e2e/console.test.ts performs the same attacks from a
 * real browser against the real daemon.
 */
import { describe, expect, it } from "vitest";
import { parseConsoleAddress } from "../../src/config/console.js";
import { resolveSettings } from "../../src/config/settings.js";
import { ConsoleGate, type RequestFacts } from "../../src/console/auth.js";

describe("console address", () => {
  it.each([
    ["127.0.0.1:8470", { host: "127.0.0.1", port: 8470 }],
    ["127.5.6.7:1", { host: "127.5.6.7", port: 1 }],
    ["localhost:8470", { host: "127.0.0.1", port: 8470 }],
    ["[::1]:8470", { host: "::1", port: 8470 }],
    ["8470", { host: "127.0.0.1", port: 8470 }],
    ["127.0.0.1:0", { host: "127.0.0.1", port: 0 }],
  ])("%s is loopback", (spec, want) => {
    expect(parseConsoleAddress(spec)).toEqual(want);
  });

  it.each(["0.0.0.0:8470", "[::]:8470", "192.168.1.5:8470", "10.0.0.1:80", "example.com:8470", "::1:8470", "127.0.0.1:70000", "127.0.0.1", "127.0.0.1:x", "[::ffff:10.0.0.1]:80"])(
    "%s is refused with SBX_ERR_CONSOLE_ADDRESS",
    (spec) => {
      expect(() => parseConsoleAddress(spec)).toThrow(expect.objectContaining({ code: "SBX_ERR_CONSOLE_ADDRESS" }));
    },
  );

  it("is off unless asked for; SANDBOXD_CONSOLE or --console turns it on, the flag first", () => {
    expect(resolveSettings({}, {}).console).toBeNull();
    expect(resolveSettings({}, { SANDBOXD_CONSOLE: "127.0.0.1:9000" }).console).toEqual({ host: "127.0.0.1", port: 9000 });
    expect(resolveSettings({ console: "[::1]:9001" }, { SANDBOXD_CONSOLE: "127.0.0.1:9000" }).console).toEqual({ host: "::1", port: 9001 });
    expect(() => resolveSettings({}, { SANDBOXD_CONSOLE: "0.0.0.0:9000" })).toThrow(expect.objectContaining({ code: "SBX_ERR_CONSOLE_ADDRESS" }));
  });
});

describe("console gate", () => {
  let n = 0;
  const gate = new ConsoleGate({ random: (k) => Buffer.alloc(k, ++n) });
  gate.bind("127.0.0.1", 8470);
  const own = "http://127.0.0.1:8470";
  const req = (over: Partial<RequestFacts>): RequestFacts => ({
    method: "GET",
    path: "/v1/phases",
    host: "127.0.0.1:8470",
    origin: undefined,
    authorization: undefined,
    cookie: undefined,
    csrf: undefined,
    ...over,
  });

  it("makes a 256-bit token and sessions unrelated to it", () => {
    expect(gate.token).toMatch(/^[0-9a-f]{64}$/);
    expect(gate.login("nope")).toBeNull();
    expect(gate.login(gate.token.slice(1))).toBeNull();
    const s = gate.login(gate.token)!;
    expect(s.id).not.toContain(gate.token);
    expect(gate.sessionCookie(s.id)).toBe(`sbx_console_8470=${s.id}; HttpOnly; SameSite=Strict; Path=/`);
  });

  it("lets nothing but the login page through without a session or the token", () => {
    expect(gate.check(req({ path: "/login" })).ok).toBe(true);
    expect(gate.check(req({ path: "/login.js" })).ok).toBe(true);
    for (const path of ["/", "/console.js", "/v1/phases", "/v1/health", "/anything"]) {
      expect(gate.check(req({ path }))).toMatchObject({ ok: false, code: "SBX_ERR_CONSOLE_AUTH" });
    }
    expect(gate.check(req({ cookie: "sbx_console_8470=forged" }))).toMatchObject({ ok: false, code: "SBX_ERR_CONSOLE_AUTH" });
    expect(gate.check(req({ authorization: "Bearer abc" }))).toMatchObject({ ok: false, code: "SBX_ERR_CONSOLE_AUTH" });
    expect(gate.check(req({ authorization: `Bearer ${gate.token}` }))).toMatchObject({ ok: true, via: "bearer" });
  });

  it("refuses a foreign Host before anything else, the login page included", () => {
    for (const host of ["evil.example:8470", "127.0.0.1:8471", "evil.example", undefined]) {
      expect(gate.check(req({ host, path: "/login" }))).toMatchObject({ ok: false, code: "SBX_ERR_CONSOLE_FORBIDDEN" });
      expect(gate.check(req({ host, authorization: `Bearer ${gate.token}` }))).toMatchObject({ ok: false, code: "SBX_ERR_CONSOLE_FORBIDDEN" });
    }
    expect(gate.check(req({ host: "localhost:8470", path: "/login" })).ok).toBe(true);
  });

  it("needs the session's CSRF value and the console's Origin for a change made with the cookie", () => {
    const s = gate.login(gate.token)!;
    const cookie = `other=1; sbx_console_8470=${s.id}`;
    const post = (over: Partial<RequestFacts>) => gate.check(req({ method: "POST", path: "/v1/approvals/ap_000000000000/approve", cookie, ...over }));
    expect(gate.check(req({ cookie }))).toMatchObject({ ok: true, via: "cookie" });
    expect(post({ origin: own, csrf: s.csrf })).toMatchObject({ ok: true, via: "cookie" });
    expect(post({ origin: own })).toMatchObject({ ok: false, code: "SBX_ERR_CONSOLE_FORBIDDEN" });
    expect(post({ origin: own, csrf: `${s.csrf}x` })).toMatchObject({ ok: false, code: "SBX_ERR_CONSOLE_FORBIDDEN" });
    expect(post({ csrf: s.csrf })).toMatchObject({ ok: false, code: "SBX_ERR_CONSOLE_FORBIDDEN" });
    expect(post({ origin: "http://127.0.0.1:9999", csrf: s.csrf })).toMatchObject({ ok: false, code: "SBX_ERR_CONSOLE_FORBIDDEN" });
    expect(post({ origin: "null", csrf: s.csrf })).toMatchObject({ ok: false, code: "SBX_ERR_CONSOLE_FORBIDDEN" });
    // a login posted from another origin (login CSRF), or with no Origin at all
    expect(gate.check(req({ method: "POST", path: "/login", origin: "http://evil.example" })).ok).toBe(false);
    expect(gate.check(req({ method: "POST", path: "/login" })).ok).toBe(false);
    expect(gate.check(req({ method: "POST", path: "/login", origin: own })).ok).toBe(true);
    // after logout the cookie is worth nothing
    gate.logout(s.id);
    expect(gate.check(req({ cookie }))).toMatchObject({ ok: false, code: "SBX_ERR_CONSOLE_AUTH" });
  });
});
