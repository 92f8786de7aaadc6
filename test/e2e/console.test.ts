/**
 * The operator console in a real headless Chromium (Debian's, driven by
 * playwright-core) against the real daemon with its console on a free
 * loopback port: the gate (nothing without the token; cookie after login;
 * changes need the page's CSRF header and the console's Origin and Host),
 * and each thing the page shows or does, on a real phase.
 */
import http from "node:http";
import type { AddressInfo } from "node:net";
import { rm, writeFile } from "node:fs/promises";
import path from "node:path";
import { chromium, type Browser, type BrowserContext, type Page } from "playwright-core";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { PhaseView } from "../../src/phases/types.js";
import { spawn } from "node:child_process";
import { CLI, ROOT, TEST_ENV, cli, makeProject, removeDir, requireEngineAndImage, startTestDaemon, tempDir, testAuditKey, writeScript, type TestDaemon } from "../helpers/sandbox.js";
import { readFile } from "node:fs/promises";

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
/** the phase the iteration and escalation views are tried on */
let reviewPhase: PhaseView | undefined;
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

async function loggedIn(waitForPhase = true): Promise<{ ctx: BrowserContext; page: Page }> {
  const ctx = await browser.newContext();
  const page = await ctx.newPage();
  await page.goto(loginUrl);
  await page.waitForURL(`${base}/`);
  if (waitForPhase) await page.locator(`tr[data-phase="${phase.id}"]`).waitFor();
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
    // kept where SANDBOXD_CONSOLE_SCREENSHOT says; else taken (the page renders whole) and thrown away
    const shotDir = SCREENSHOT ? null : await tempDir("shot");
    try {
      await page.screenshot({ path: SCREENSHOT ?? path.join(shotDir!, "console.png"), fullPage: true });
    } finally {
      if (shotDir) await rm(shotDir, { recursive: true, force: true });
    }

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

  it("shows a pending iteration with its rule and diff; accepting it in the page applies it to the project", async () => {
    const p2 = await makeProject();
    dirs.push(p2);
    const mk = await writeScript(p2, "import os\nos.makedirs('shared', exist_ok=True)\nopen('shared/new_model.py', 'w').write('X = 1  # <b>bold</b>\\n')");
    const ph = (await d.api.request<{ phase: PhaseView }>("POST", "/v1/phases", { project: p2, phase: "9.2 review", mode: "test" })).phase;
    reviewPhase = ph;
    const { ctx, page } = await loggedIn();
    expect((await d.api.request<{ result: { exitCode: number } }>("POST", `/v1/phases/${ph.id}/exec`, { argv: ["python3", mk] })).result.exitCode).toBe(0);
    const cp = await d.api.request<{ iteration: { n: number; state: string } }>("POST", `/v1/phases/${ph.id}/checkpoint`, { message: "add a <b>shared</b> model" });
    expect(cp.iteration.state).toBe("pending");
    const card = page.locator(`#iterations li[data-iteration="${ph.id}/${cp.iteration.n}"]`);
    await card.waitFor();
    expect(await card.locator(".message").textContent()).toBe("add a <b>shared</b> model");
    expect(await card.locator(".failure").first().textContent()).toContain("workspace.protected.shared");
    await expect.poll(() => card.locator("pre.diff").textContent()).toContain("+X = 1  # <b>bold</b>");
    expect(await card.locator("pre.diff").textContent()).toContain("shared/new_model.py");
    expect(await page.locator("#iterations b").count()).toBe(0);
    expect(await page.locator("#review-count").textContent()).not.toBe("");
    await card.locator("input.note").fill("reviewed: a new constant");
    await card.locator("button.accept").click();
    await card.waitFor({ state: "detached" });
    const shown = (await d.api.request<{ phase: { workspace: { iterations: Array<{ n: number; state: string }> } } }>("GET", `/v1/phases/${ph.id}`)).phase;
    expect(shown.workspace.iterations.find((i) => i.n === cp.iteration.n)!.state).toBe("accepted");
    expect(await readFile(path.join(p2, "shared", "new_model.py"), "utf8")).toBe("X = 1  # <b>bold</b>\n");
    await ctx.close();
  });

  it("shows an escalation with its report; resume needs a note; abort ends the phase", async () => {
    const ph = reviewPhase!;
    const failThrice = async () => {
      let last: { escalation: { n: number } | null } | null = null;
      for (let i = 0; i < 3; i++) last = (await d.api.request<{ result: { escalation: { n: number } | null } }>("POST", `/v1/phases/${ph.id}/exec`, { argv: ["pytest", "-q", "tests/test_broken.py"] })).result;
      return last!.escalation!;
    };
    const first = await failThrice();
    const { ctx, page } = await loggedIn();
    const card = page.locator(`#escalations li[data-escalation="${ph.id}/${first.n}"]`);
    await card.waitFor();
    await expect.poll(() => card.locator("pre.report").textContent()).toContain("[ESCALATION]");
    expect(await card.locator(".summary").textContent()).not.toBe("");
    // the daemon wants a note to resume after an escalation: the page says so, nothing changes
    await card.locator("button.resume").click();
    await expect.poll(() => page.locator("#status").textContent()).toContain("SBX_ERR_VALIDATION");
    expect((await d.api.request<{ phase: PhaseView }>("GET", `/v1/phases/${ph.id}`)).phase.state).toBe("escalated");
    await card.locator("input.note").fill("fixture data was stale; refreshed");
    await card.locator("button.resume").click();
    await card.waitFor({ state: "detached" });
    expect((await d.api.request<{ phase: PhaseView }>("GET", `/v1/phases/${ph.id}`)).phase.state).toBe("running");

    const second = await failThrice();
    const card2 = page.locator(`#escalations li[data-escalation="${ph.id}/${second.n}"]`);
    await card2.waitFor();
    await card2.locator("input.note").fill("giving up on this phase");
    await card2.locator("button.abort").click();
    await card2.waitFor({ state: "detached" });
    // the abort ends the phase (its container goes): answered once it has begun
    await expect.poll(async () => (await d.api.request<{ phase: PhaseView }>("GET", `/v1/phases/${ph.id}`)).phase.state, { timeout: 60_000 }).toBe("failed");
    const ended = (await d.api.request<{ phase: PhaseView }>("GET", `/v1/phases/${ph.id}`)).phase;
    expect(ended.endReason).toContain("giving up on this phase");
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

describe("the console at daemon stop", () => {
  it("ends a page's live audit stream and lets the daemon stop promptly", async () => {
    const { ctx, page } = await loggedIn(false); // the phase has ended: listed once ended phases are shown
    await page.locator("#show-ended").check();
    await page.locator(`tr[data-phase="${phase.id}"] button.watch`).click();
    await page.locator('#audit li[data-type="phase.start"]').waitFor();
    const t0 = Date.now();
    await d.daemon.close();
    // an open follower (and the page's kept-alive connections) used to hold the close forever
    expect(Date.now() - t0).toBeLessThan(15_000);
    const r = await fetch(`${base}/v1/health`, { headers: { authorization: `Bearer ${token}` } }).catch((e: Error) => e);
    expect(r).toBeInstanceOf(Error);
    await ctx.close();
  });
});

describe("sandboxd start --console", () => {
  it("refuses an address that is not loopback, with its code, before anything starts", async () => {
    const dir = await tempDir("cstate");
    dirs.push(dir);
    const r = await cli(["start", "--state-dir", dir, "--console", "0.0.0.0:8470"], { socket: path.join(dir, "s.sock") });
    expect(r.code).toBe(1);
    expect(r.stderr).toContain("SBX_ERR_CONSOLE_ADDRESS");
    expect(r.stderr).toMatch(/ssh -L/);
  });

  it("prints the login URL once on the daemon's stdout, and the console answers", async () => {
    const dir = await tempDir("cstate");
    dirs.push(dir);
    const child = spawn(process.execPath, [CLI, "--socket", path.join(dir, "s.sock"), "start", "--state-dir", dir, "--console", "127.0.0.1:0"], {
      stdio: ["ignore", "pipe", "pipe"],
      // its own signing key (removeDir takes it and its witness away), never the machine's /etc/sandboxd one
      env: { ...process.env, ...TEST_ENV, SANDBOXD_AUDIT_KEY: testAuditKey(dir) },
    });
    let out = "";
    child.stdout.on("data", (c: Buffer) => (out += c.toString()));
    try {
      await expect.poll(() => out, { timeout: 60_000 }).toMatch(/"login":"http:\/\/127\.0\.0\.1:\d+\/login#[0-9a-f]{64}"/);
      const login = /"login":"([^"]+)"/.exec(out)![1]!;
      const [url, tok] = login.split("/login#") as [string, string];
      expect((await fetch(`${url}/v1/phases`)).status).toBe(401);
      expect((await fetch(`${url}/v1/phases`, { headers: { authorization: `Bearer ${tok}` } })).status).toBe(200);
    } finally {
      const exited = new Promise((r) => child.once("exit", r));
      child.kill("SIGTERM");
      await exited;
    }
    expect(out.split(/"login":/).length - 1).toBe(1);
  });
});
