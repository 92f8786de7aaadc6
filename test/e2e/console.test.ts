/**
 * The operator console in a real headless Chromium (Debian's, driven by
 * playwright-core) against the real daemon with its console on a free
 * loopback port: the gate (nothing without the token; cookie after login;
 * changes need the page's CSRF header and the console's Origin and Host),
 * and each thing the page shows or does, on a real phase.
 */
import http from "node:http";
import type { AddressInfo } from "node:net";
import { writeFile } from "node:fs/promises";
import path from "node:path";
import { chromium, type Browser, type BrowserContext, type Page } from "playwright-core";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { PhaseView } from "../../src/phases/types.js";
import { ROOT, makeProject, removeDir, requireEngineAndImage, startTestDaemon, tempDir, type TestDaemon } from "../helpers/sandbox.js";

const CHROMIUM = "/usr/bin/chromium";
/** A screenshot for the README is written here when SANDBOXD_CONSOLE_SCREENSHOT=1 (otherwise to a temp dir). */
const SCREENSHOT = process.env.SANDBOXD_CONSOLE_SCREENSHOT === "1" ? path.join(ROOT, "docs", "console.png") : null;

/** What a command in the sandbox prints: terminal escapes and markup that must stay text. */
const HOSTILE_OUT = "\x1b[31mRED\x1b[0m\x1b]0;owned\x07 <script>window.__pwned=1</script><img src=x onerror=\"window.__pwned=2\">";
const HOSTILE_ARG = "<b onmouseover=alert(1)>\x1b[2J";

let d: TestDaemon;
let logLines: string[];
let base: string;
let loginUrl: string;
let token: string;
let browser: Browser;
let project: string;
let phase: PhaseView;
const dirs: string[] = [];

interface ApiError {
  code: string;
  details?: { approvalId?: string; note?: string };
}
const errorOf = (p: Promise<unknown>) => p.then(
  () => {
    throw new Error("expected a refusal");
  },
  (e: unknown) => e as ApiError,
);

beforeAll(async () => {
  await requireEngineAndImage();
  logLines = [];
  d = await startTestDaemon({ env: { SANDBOXD_CONSOLE: "127.0.0.1:0", SANDBOXD_LOG_LEVEL: "info" }, logLines });
  const line = logLines.map((l) => JSON.parse(l) as { login?: string; console?: string }).find((l) => l.login);
  loginUrl = line!.login!;
  base = line!.console!;
  token = loginUrl.split("#")[1]!;
  browser = await chromium.launch({ executablePath: CHROMIUM, args: ["--no-sandbox"], headless: true });
  project = await makeProject();
  dirs.push(project);
  await writeFile(path.join(project, "hostile.py"), `import sys\nprint(${JSON.stringify(HOSTILE_OUT)})\nprint(sys.argv[1])\n`);
  phase = (await d.api.request<{ phase: PhaseView }>("POST", "/v1/phases", { project, phase: "9.1 console", mode: "test" })).phase;
});

afterAll(async () => {
  await browser?.close();
  await d?.close();
  for (const x of dirs) await removeDir(x);
});

async function loggedIn(): Promise<{ ctx: BrowserContext; page: Page }> {
  const ctx = await browser.newContext();
  const page = await ctx.newPage();
  await page.goto(loginUrl);
  await page.waitForURL(`${base}/`);
  await page.locator(`tr[data-phase="${phase.id}"]`).waitFor();
  return { ctx, page };
}

/** A raw request with headers fetch would not let us set (Host). */
function rawRequest(method: string, url: string, headers: Record<string, string>, body?: string): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    const req = http.request(url, { method, headers }, (res) => {
      let b = "";
      res.on("data", (c: Buffer) => (b += c.toString()));
      res.on("end", () => resolve({ status: res.statusCode!, body: b }));
    });
    req.on("error", reject);
    req.end(body);
  });
}

describe("the console's gate", () => {
  it("prints the login URL once, on a loopback address, with a 256-bit token", () => {
    expect(base).toMatch(/^http:\/\/127\.0\.0\.1:\d+$/);
    expect(token).toMatch(/^[0-9a-f]{64}$/);
    expect(logLines.filter((l) => l.includes(token))).toHaveLength(1);
  });

  it("gives an unauthenticated browser nothing: 401 for the page, its script and the API", async () => {
    const ctx = await browser.newContext();
    const page = await ctx.newPage();
    const res = await page.goto(`${base}/`);
    expect(res!.status()).toBe(401);
    const text = await page.content();
    expect(text).not.toMatch(/Phases|approval queue|console\.js/i);
    expect(text).not.toContain(phase.id);
    for (const p of ["/console.js", "/console.css", "/v1/phases", `/v1/audit?phase=${phase.id}`, "/v1/approvals", "/v1/health", "/nope"]) {
      const r = await page.goto(`${base}${p}`);
      expect(r!.status(), p).toBe(401);
      const body = await r!.text();
      expect(body, p).not.toContain(phase.id);
      expect(body, p).toContain("SBX_ERR_CONSOLE_AUTH");
    }
    await ctx.close();
    // and from a script without the token
    const r = await fetch(`${base}/v1/phases`);
    expect(r.status).toBe(401);
    expect(await r.text()).not.toContain(phase.id);
  });

  it("refuses a wrong token, and logs in with the right one: an HttpOnly, SameSite=Strict session cookie that is not the token", async () => {
    const ctx = await browser.newContext();
    const page = await ctx.newPage();
    await page.goto(`${base}/login#${"0".repeat(64)}`);
    await expect.poll(() => page.locator("#status").textContent()).toMatch(/not this console's/);
    expect(page.url()).toBe(`${base}/login`); // the fragment left the address bar
    expect(await ctx.cookies()).toEqual([]);
    expect((await page.goto(`${base}/`))!.status()).toBe(401);

    await page.goto(loginUrl);
    await page.waitForURL(`${base}/`);
    await expect.poll(() => page.locator("h1").textContent()).toBe("sandboxd console");
    const cookies = await ctx.cookies();
    expect(cookies).toHaveLength(1);
    expect(cookies[0]).toMatchObject({ httpOnly: true, sameSite: "Strict", path: "/" });
    expect(cookies[0]!.value).not.toContain(token);
    expect(cookies[0]!.value.length).toBeGreaterThanOrEqual(43);
    // the page sets its headers: CSP without inline script
    const res = await page.goto(`${base}/`);
    expect(res!.headers()["content-security-policy"]).toMatch(/default-src 'self'/);
    expect(res!.headers()["content-security-policy"]).not.toMatch(/unsafe-inline/);
    await ctx.close();
  });

  it("serves the same API to a script with Authorization: Bearer TOKEN, and refuses another token", async () => {
    const ok = await fetch(`${base}/v1/phases/${phase.id}`, { headers: { authorization: `Bearer ${token}` } });
    expect(ok.status).toBe(200);
    expect(((await ok.json()) as { phase: PhaseView }).phase.state).toBe("running");
    const bad = await fetch(`${base}/v1/phases`, { headers: { authorization: `Bearer ${"f".repeat(64)}` } });
    expect(bad.status).toBe(401);
  });

  it("refuses forged changes: no CSRF header, a foreign Origin, a DNS-rebinding Host, a page on another port", async () => {
    const { ctx, page } = await loggedIn();
    const cookie = (await ctx.cookies()).map((c) => `${c.name}=${c.value}`).join("; ");
    const csrf = await page.locator('meta[name="sbx-csrf"]').getAttribute("content");
    expect(csrf).toMatch(/^[\w-]{43}$/);
    const host = new URL(base).host;
    const asked = await errorOf(d.api.request("POST", `/v1/phases/${phase.id}/exec`, { argv: ["ls", "-d", "forged"] }));
    const id = asked.details!.approvalId!;
    const approve = `${base}/v1/approvals/${id}/approve`;
    const json = { "content-type": "application/json" };

    const noHeader = await rawRequest("POST", approve, { ...json, cookie, origin: base }, "{}");
    expect(noHeader.status).toBe(403);
    expect(noHeader.body).toContain("SBX_ERR_CONSOLE_FORBIDDEN");
    const wrongHeader = await rawRequest("POST", approve, { ...json, cookie, origin: base, "x-sandboxd-csrf": "x".repeat(43) }, "{}");
    expect(wrongHeader.status).toBe(403);
    const noOrigin = await rawRequest("POST", approve, { ...json, cookie, "x-sandboxd-csrf": csrf! }, "{}");
    expect(noOrigin.status).toBe(403);
    const foreign = await rawRequest("POST", approve, { ...json, cookie, origin: "http://evil.example", "x-sandboxd-csrf": csrf! }, "{}");
    expect(foreign.status).toBe(403);
    const rebound = await rawRequest("POST", approve, { ...json, cookie, host: `evil.example:${new URL(base).port}`, origin: `http://evil.example:${new URL(base).port}`, "x-sandboxd-csrf": csrf! }, "{}");
    expect(rebound.status).toBe(403);
    const reboundRead = await rawRequest("GET", `${base}/v1/phases`, { cookie, host: "evil.example" });
    expect(reboundRead.status).toBe(403);
    expect(reboundRead.body).not.toContain(phase.id);

    // A real attack page, same site (127.0.0.1) but another port: the browser sends the Strict cookie, the console refuses the Origin.
    const evil = http.createServer((_req, res) => {
      res.writeHead(200, { "content-type": "text/html" });
      res.end(`<!doctype html><form id=f method=POST action="${approve}" enctype="text/plain"><input name='{"a":"' value='"}'></form>
<script>fetch(${JSON.stringify(approve)}, {method: "POST", mode: "no-cors", credentials: "include", body: "{}"}).finally(() => { document.title = "sent"; });</script>`);
    });
    await new Promise<void>((r) => evil.listen(0, "127.0.0.1", r));
    try {
      const attacker = await ctx.newPage();
      await attacker.goto(`http://127.0.0.1:${(evil.address() as AddressInfo).port}/`);
      await expect.poll(() => attacker.title()).toBe("sent");
      const [answer] = await Promise.all([attacker.waitForResponse(approve), attacker.evaluate(() => (document.getElementById("f") as HTMLFormElement).submit())]);
      expect(answer.status()).toBe(403);
      expect(await answer.text()).toContain("SBX_ERR_CONSOLE_FORBIDDEN");
    } finally {
      evil.close();
    }
    const after = await d.api.request<{ approval: { state: string } }>("GET", `/v1/approvals/${id}`);
    expect(after.approval.state).toBe("pending");

    // the same request from the page itself goes through
    const real = await rawRequest("POST", approve, { ...json, cookie, host, origin: base, "x-sandboxd-csrf": csrf! }, "{}");
    expect(real.status).toBe(200);
    await ctx.close();
  });
});

describe("the console's page", () => {
  it("lists a phase started through the API, with its state, mode and age", async () => {
    const { ctx, page } = await loggedIn();
    const row = page.locator(`tr[data-phase="${phase.id}"]`);
    await expect.poll(() => row.locator(".state").textContent()).toBe("running");
    expect(await row.textContent()).toContain("9.1 console");
    expect(await row.locator("td").nth(3).textContent()).toBe("test");
    expect(await row.locator(".age").textContent()).toMatch(/^\d+(s|m \d+s)$/);
    await ctx.close();
  });

  it("shows a command's verdict, exit code and output in the live audit view, hostile strings as text", async () => {
    const { ctx, page } = await loggedIn();
    await page.locator(`tr[data-phase="${phase.id}"] button.watch`).click();
    await page.locator('#audit li[data-type="phase.start"]').waitFor();
    // the command runs after the stream is open: it arrives live
    const run = d.api.request<{ result: { exitCode: number } }>("POST", `/v1/phases/${phase.id}/exec`, { argv: ["python3", "hostile.py", HOSTILE_ARG] });
    const result = page.locator('#audit li[data-type="exec.result"]').last();
    await result.waitFor();
    expect((await run).result.exitCode).toBe(0);
    const text = (await result.textContent())!;
    expect(text).toContain("exit 0");
    expect(text).toContain("\\x1b[31mRED\\x1b[0m\\x1b]0;owned\\x07");
    expect(text).toContain('<script>window.__pwned=1</script><img src=x onerror="window.__pwned=2">');
    expect(text).toContain("python3 hostile.py $'<b onmouseover=alert(1)>\\x1b[2J'");
    expect(text).not.toContain("\x1b");
    expect(await page.locator('#audit li[data-type="exec.verdict"]').last().textContent()).toMatch(/allow.*shell\.whitelist/);
    expect(await page.locator("#audit script, #audit img, #audit b").count()).toBe(0);
    expect(await page.evaluate(() => (window as { __pwned?: number }).__pwned)).toBeUndefined();
    await ctx.close();
  });

  it("shows an approval request with its wait time, command, rule and reason; approving it in the page lets the command run", async () => {
    const { ctx, page } = await loggedIn();
    const asked = await errorOf(d.api.request("POST", `/v1/phases/${phase.id}/exec`, { argv: ["ls", "-1", "services"], reason: "look at <the> services\x1b[0m" }));
    expect(asked.code).toBe("SBX_ERR_POLICY_NEEDS_APPROVAL");
    const id = asked.details!.approvalId!;
    const card = page.locator(`#approvals li[data-approval="${id}"]`);
    await card.waitFor();
    expect(await card.locator(".cmd").textContent()).toBe("ls -1 services");
    expect(await card.locator(".rule").textContent()).toMatch(/^shell\.not-whitelisted — SKILLS\.md/);
    expect(await card.locator(".reason").first().textContent()).toBe("agent's reason: look at <the> services\\x1b[0m");
    const waited = async () => Number(/waiting (\d+)s/.exec((await card.locator(".waited").textContent())!)![1]);
    const first = await waited();
    await expect.poll(waited, { timeout: 5000 }).toBeGreaterThan(first);
    expect(await page.locator("#approval-count").textContent()).not.toBe("");

    await page.locator(`tr[data-phase="${phase.id}"] button.watch`).click();
    await page.locator('#audit li[data-type="approval.request"]').last().waitFor();
    await page.screenshot({ path: SCREENSHOT ?? path.join(await tempDir("shot"), "console.png"), fullPage: true });

    await card.locator("input.note").fill("fine, read-only");
    await card.locator("button.approve").click();
    await card.waitFor({ state: "detached" });
    const a = await d.api.request<{ approval: { state: string; note: string } }>("GET", `/v1/approvals/${id}`);
    expect(a.approval).toMatchObject({ state: "approved", note: "fine, read-only" });
    const { result } = await d.api.request<{ result: { exitCode: number; stdout: string } }>("POST", `/v1/phases/${phase.id}/exec`, { argv: ["ls", "-1", "services"] });
    expect(result.exitCode).toBe(0);
    expect(result.stdout).toContain("calc.py");
    await ctx.close();
  });

  it("denies with a note from the page; the agent is refused with it", async () => {
    const { ctx, page } = await loggedIn();
    const asked = await errorOf(d.api.request("POST", `/v1/phases/${phase.id}/exec`, { argv: ["ls", "-la", "<img src=x onerror=window.__pwned=3>"] }));
    const id = asked.details!.approvalId!;
    const card = page.locator(`#approvals li[data-approval="${id}"]`);
    await card.waitFor();
    expect(await card.locator(".cmd").textContent()).toBe("ls -la '<img src=x onerror=window.__pwned=3>'");
    expect(await page.locator("#approvals img").count()).toBe(0);
    await card.locator("input.note").fill("no listing of odd names");
    await card.locator("button.deny").click();
    await card.waitFor({ state: "detached" });
    const again = await errorOf(d.api.request("POST", `/v1/phases/${phase.id}/exec`, { argv: ["ls", "-la", "<img src=x onerror=window.__pwned=3>"] }));
    expect(again.code).toBe("SBX_ERR_APPROVAL_DENIED");
    expect(again.details!.note).toBe("no listing of odd names");
    expect(await page.evaluate(() => (window as { __pwned?: number }).__pwned)).toBeUndefined();
    await ctx.close();
  });

  it("stops a phase from the page", async () => {
    const { ctx, page } = await loggedIn();
    await page.locator(`tr[data-phase="${phase.id}"] button.stop`).click();
    await expect
      .poll(async () => (await d.api.request<{ phase: PhaseView }>("GET", `/v1/phases/${phase.id}`)).phase.state, { timeout: 60_000 })
      .toBe("stopped");
    await page.locator("#show-ended").check();
    await expect.poll(() => page.locator(`tr[data-phase="${phase.id}"] .state`).textContent(), { timeout: 10_000 }).toMatch(/^stopped/);
    await ctx.close();
  });
});
