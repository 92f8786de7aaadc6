/**
 * Attacks on long timeouts (rule limits.timeout; standing approvals with
 * maxTimeoutMs): values the API must refuse, a grant reused beyond its
 * scope, and processes that try to outlive the timeout (a daemonised
 * grandchild, a background job). The daemon runs an operator policy whose
 * test mode allows 2 s, so each bound is seen at work in seconds.
 */
import { readFile, writeFile } from "node:fs/promises";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { SandboxdError } from "../../src/errors.js";
import type { ExecResult } from "../../src/phases/exec.js";
import type { JobView } from "../../src/phases/jobs.js";
import type { PhaseView } from "../../src/phases/types.js";
import { makeProject, removeDir, requireEngineAndImage, startTestDaemon, tempDir, writeScript, type TestDaemon } from "../helpers/sandbox.js";

let t: TestDaemon;
let project: string;
let policyDir: string;
let a: PhaseView;
let b: PhaseView;
let SLEEP3: string[];

type Rec = Record<string, unknown> & { type: string; phase?: string };

async function exec(p: PhaseView, body: Record<string, unknown>): Promise<ExecResult> {
  return (await t.api.request<{ result: ExecResult }>("POST", `/v1/phases/${p.id}/exec`, body)).result;
}

async function refusal(p: Promise<unknown>): Promise<SandboxdError> {
  const e = await p.then(
    () => null,
    (x: unknown) => x,
  );
  expect(e).toBeInstanceOf(SandboxdError);
  return e as SandboxdError;
}

async function records(p: PhaseView): Promise<Rec[]> {
  return (await readFile(path.join(t.stateDir, "audit.jsonl"), "utf8"))
    .split("\n")
    .filter(Boolean)
    .map((l) => JSON.parse(l) as Rec)
    .filter((r) => r.phase === p.id);
}

function grant(body: Record<string, unknown>): Promise<{ grant: { id: string } }> {
  return t.api.request<{ grant: { id: string } }>("POST", "/v1/grants", { expiresInMs: 3_600_000, ...body });
}

beforeAll(async () => {
  await requireEngineAndImage();
  policyDir = await tempDir("policy");
  const base = await readFile(path.resolve("policies/default.yaml"), "utf8");
  const policy = base.replace("  modes:\n    paper:", "  modes:\n    test:\n      maxTimeoutMs: 2s\n      defaultTimeoutMs: 2s\n    paper:");
  expect(policy).not.toBe(base);
  await writeFile(path.join(policyDir, "operator.yaml"), policy);
  t = await startTestDaemon({ policy: path.join(policyDir, "operator.yaml") });
  project = await makeProject();
  SLEEP3 = ["python3", await writeScript(project, "import time; time.sleep(3); print('slept')")];
  a = (await t.api.request<{ phase: PhaseView }>("POST", "/v1/phases", { project, phase: "12.9", mode: "test" })).phase;
  b = (await t.api.request<{ phase: PhaseView }>("POST", "/v1/phases", { project, phase: "12.10", mode: "test" })).phase;
}, 120_000);

afterAll(async () => {
  await t?.close();
  await removeDir(project);
  await removeDir(policyDir);
});

describe("long timeouts under attack", () => {
  it("0, negative, fractional, string, null, huge and over-ceiling timeouts are refused before anything runs; so are such grants", async () => {
    const before = (await records(a)).length;
    for (const timeoutMs of [0, -5, 1.5, "4000", null, 1e12, 300_001, 86_400_001]) {
      const e = await refusal(exec(a, { argv: SLEEP3, timeoutMs }));
      expect(["SBX_ERR_VALIDATION", "SBX_ERR_TIMEOUT_RANGE"], String(timeoutMs)).toContain(e.code);
    }
    // nothing ran: no verdict, no result (a range refusal is said to the caller, before any record)
    expect((await records(a)).filter((r) => r.type === "exec.verdict" || r.type === "exec.result").length).toBe(0);
    expect((await records(a)).length).toBe(before);
    for (const maxTimeoutMs of [0, -1, 1.5, 300_001, "300000"]) {
      const e = await refusal(grant({ phase: a.id, pattern: ["python3"], maxTimeoutMs }));
      expect(e.code, String(maxTimeoutMs)).toBe("SBX_ERR_VALIDATION");
    }
  }, 60_000);

  it("a phase's grant covers neither another phase of the project, nor another command, nor a longer timeout; revoked, it covers nothing; each use is audited", async () => {
    const g = (await grant({ phase: a.id, pattern: ["python3", { prefix: "sbx_scripts/" }], maxTimeoutMs: 4000 })).grant;
    const ok = await exec(a, { argv: SLEEP3, timeoutMs: 4000 });
    expect(ok.stdout).toContain("slept");
    const used = (await records(a)).filter((r) => r.type === "exec.verdict").pop();
    expect(used).toMatchObject({ decision: "allow", grant: g.id, timeoutMs: 4000, rule: "limits.timeout" });
    expect(await readFile(a.buildLog, "utf8")).toContain(`grant=${g.id}`);

    // another phase of the same project
    expect((await refusal(exec(b, { argv: SLEEP3, timeoutMs: 4000 }))).code).toBe("SBX_ERR_POLICY_NEEDS_APPROVAL");
    expect((await records(b)).filter((r) => r.type === "exec.verdict").pop()).toMatchObject({ decision: "ask", grant: null, rule: "limits.timeout" });
    // another command, a longer timeout, a compound command that tacks something on
    expect((await refusal(exec(a, { argv: ["pytest", "-q"], timeoutMs: 4000 }))).code).toBe("SBX_ERR_POLICY_NEEDS_APPROVAL");
    expect((await refusal(exec(a, { argv: SLEEP3, timeoutMs: 4001 }))).code).toBe("SBX_ERR_POLICY_NEEDS_APPROVAL");
    expect((await refusal(exec(a, { command: `${SLEEP3.join(" ")}; pytest -q`, timeoutMs: 4000 }))).code).toBe("SBX_ERR_POLICY_NEEDS_APPROVAL");
    // revoked: nothing
    await t.api.request("POST", `/v1/grants/${g.id}/revoke`, { note: "done" });
    expect((await refusal(exec(a, { argv: SLEEP3, timeoutMs: 4000 }))).code).toBe("SBX_ERR_POLICY_NEEDS_APPROVAL");
  }, 90_000);

  it("a grandchild that daemonises (double fork, setsid) does not outlive its command's timeout, nor its command", async () => {
    const hb = "/tmp/sbx-heartbeat";
    const daemonise = (thenSleep: number) =>
      writeScript(
        project,
        [
          "import os, sys, time",
          "if os.fork() == 0:",
          "    os.setsid()",
          "    if os.fork() == 0:",
          "        for i in range(200):",
          `            open(${JSON.stringify(hb)}, 'a').write('x')`,
          "            time.sleep(0.1)",
          "        os._exit(0)",
          "    os._exit(0)",
          `time.sleep(${thenSleep})`,
          "print('parent done')",
        ].join("\n"),
      );
    const size = await writeScript(project, `import os\ntry:\n    print(os.path.getsize(${JSON.stringify(hb)}))\nexcept FileNotFoundError:\n    print(0)`);
    const grows = async (): Promise<boolean> => {
      const s1 = Number((await exec(a, { argv: ["python3", size] })).stdout.trim());
      await new Promise((r) => setTimeout(r, 1500));
      const s2 = Number((await exec(a, { argv: ["python3", size] })).stdout.trim());
      return s2 > s1;
    };
    // killed at its timeout
    const timed = await exec(a, { argv: ["python3", await daemonise(30)], timeoutMs: 1500 });
    expect(timed.timedOut).toBe(true);
    expect(await grows()).toBe(false);
    // a command that ignores SIGTERM ends at its timeout plus the kill grace (2 s), not later
    const stubborn = await writeScript(project, "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(30)");
    // (in a phase of its own: two timeouts in a row in one phase are fail-fast's escalation)
    const c = (await t.api.request<{ phase: PhaseView }>("POST", "/v1/phases", { project, phase: "12.11", mode: "test" })).phase;
    const t0 = Date.now();
    const killed = await exec(c, { argv: ["python3", stubborn], timeoutMs: 1500 });
    expect(killed.timedOut).toBe(true);
    expect(Date.now() - t0).toBeLessThan(1500 + 2000 + 3000);
    // ended on its own, the daemonised grandchild left behind
    const quick = await exec(a, { argv: ["python3", await daemonise(0.2)] });
    expect(quick.exitCode).toBe(0);
    expect(await grows()).toBe(false);
  }, 90_000);

  it("a background job is bound by its timeout like a command, and over the mode's limit it asks like one", async () => {
    // phase b: phase a has had its one timeout (fail-fast escalates at the second in a row)
    const res = await t.api.request<{ job: JobView }>("POST", `/v1/phases/${b.id}/exec`, { argv: ["python3", await writeScript(project, "import time; time.sleep(30)")], background: true, timeoutMs: 1500 });
    const started = Date.now();
    const done = await t.api.request<{ job: JobView }>("GET", `/v1/phases/${b.id}/jobs/${res.job.id}/wait?timeoutMs=20000`);
    expect(done.job.result?.timedOut).toBe(true);
    expect(Date.now() - started).toBeLessThan(10_000);
    expect((await refusal(t.api.request("POST", `/v1/phases/${b.id}/exec`, { argv: SLEEP3, background: true, timeoutMs: 4000 }))).code).toBe("SBX_ERR_POLICY_NEEDS_APPROVAL");
    const verdict = (await records(b)).filter((r) => r.type === "exec.verdict").pop();
    expect(verdict).toMatchObject({ decision: "ask", rule: "limits.timeout", background: true });
  }, 60_000);
});
