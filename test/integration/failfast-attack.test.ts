/**
 * The fail-fast protocol attacked as the agent would, from inside a real
 * sandbox (commands through the daemon's exec, files written in /workspace):
 * each attack tries to keep failing without ever escalating, to hide a
 * failure, or to go on running while the phase is escalated. Each test
 * asserts the outcome and its audit record.
 */
import { readFile, writeFile } from "node:fs/promises";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { SandboxdError } from "../../src/errors.js";
import type { ExecResult } from "../../src/phases/manager.js";
import type { PhaseView } from "../../src/phases/types.js";
import { ROOT, docker, makeProject, removeDir, requireEngineAndImage, startTestDaemon, tempDir, writeScript, type TestDaemon } from "../helpers/sandbox.js";

let t: TestDaemon;
const projects: string[] = [];
const started: string[] = [];

beforeAll(async () => {
  await requireEngineAndImage();
  t = await startTestDaemon();
}, 120_000);

afterAll(async () => {
  for (const id of started) await t.api.request("DELETE", `/v1/phases/${id}`).catch(() => undefined);
  await t?.close();
  for (const p of projects) await removeDir(p);
});

async function start(name: string, policy?: string): Promise<{ phase: PhaseView; project: string }> {
  const project = await makeProject();
  projects.push(project);
  const { phase } = await t.api.request<{ phase: PhaseView }>("POST", "/v1/phases", { project, phase: name, mode: "test", ...(policy ? { policy } : {}) });
  started.push(phase.id);
  return { phase, project };
}

type Req = { argv: string[] } | { command: string };
const run = async (id: string, req: Req, timeoutMs?: number) =>
  (await t.api.request<{ result: ExecResult }>("POST", `/v1/phases/${id}/exec`, { ...req, ...(timeoutMs ? { timeoutMs } : {}) })).result;
const exec = (id: string, argv: string[]) => run(id, { argv });
const view = async (id: string) => (await t.api.request<{ phase: PhaseView }>("GET", `/v1/phases/${id}`)).phase;

/** The agent writes a file in /workspace through a command of its own. */
async function agentWrites(id: string, project: string, rel: string, text: string): Promise<void> {
  const script = await writeScript(project, `open(${JSON.stringify(`/workspace/${rel}`)}, "w").write(${JSON.stringify(text)})`);
  expect((await exec(id, ["python3", script])).exitCode).toBe(0);
}

async function audit(phase: string): Promise<Array<Record<string, unknown>>> {
  return (await t.api.request<{ records: Array<Record<string, unknown>> }>("GET", `/v1/audit?phase=${phase}`)).records;
}

const results = async (phase: string) => (await audit(phase)).filter((r) => r.type === "exec.result");

describe("fail-fast attacked from inside the sandbox", () => {
  it("a trivial pytest success (--version, a passing subset) does not reset the test count: the third real failure escalates", async () => {
    const { phase } = await start("atk.1");
    const broken = ["pytest", "-q", "tests/test_broken.py"];
    expect((await exec(phase.id, broken)).failure).toMatchObject({ category: "test", count: 1 });
    // the attack: a pytest that passes without running the failing test, between failures
    expect((await exec(phase.id, ["pytest", "--version"])).exitCode).toBe(0);
    const subset = await exec(phase.id, ["pytest", "-q", "tests/test_calc.py"]);
    expect(subset.exitCode).toBe(0);
    expect(subset.tests).toMatchObject({ tests: 1, passed: 1 });
    expect((await exec(phase.id, broken)).failure).toMatchObject({ category: "test", count: 2 });
    expect((await exec(phase.id, ["pytest", "-q", "-k", "not broken"])).exitCode).toBe(0);
    const third = await exec(phase.id, broken);
    expect(third.failure).toMatchObject({ category: "test", count: 3, limit: 3 });
    expect(third.escalation).toMatchObject({ n: 1, category: "test" });
    expect((await view(phase.id)).state).toBe("escalated");
    // the trail: the green runs reset nothing, each says so
    const rs = await results(phase.id);
    const greens = rs.filter((r) => r.exitCode === 0 && String(r.argv).includes("pytest"));
    expect(greens).toHaveLength(3);
    for (const g of greens) expect(g.failFast).toMatchObject({ reset: [] });
    expect(rs.filter((r) => r.category === "test").map((r) => (r.failFast as { count: number }).count)).toEqual([1, 2, 3]);
    expect((await audit(phase.id)).some((r) => r.type === "phase.escalated" && r.category === "test")).toBe(true);
  }, 180_000);

  it("the failing test fixed and run again (or within the full suite) does reset", async () => {
    const { phase, project } = await start("atk.2");
    const broken = ["pytest", "-q", "tests/test_broken.py"];
    expect((await exec(phase.id, broken)).failure?.count).toBe(1);
    expect((await exec(phase.id, broken)).failure?.count).toBe(2);
    await agentWrites(phase.id, project, "tests/test_broken.py", "def test_broken():\n    assert 2 + 2 == 4\n");
    const all = await exec(phase.id, ["pytest", "-q"]);
    expect(all.failure).toBeNull();
    const rec = (await results(phase.id)).at(-1)!;
    expect(rec.failFast).toMatchObject({ reset: ["test"] });
    await agentWrites(phase.id, project, "tests/test_broken.py", "def test_broken():\n    assert 2 + 2 == 5\n");
    expect((await exec(phase.id, broken)).failure?.count).toBe(1);
  }, 180_000);

  it("pytest made to exit 0 by the agent's own code (os._exit(0) in a conftest.py hook, in a test) is a counted test failure, not a pass", async () => {
    const { phase, project } = await start("atk.3");
    // the session killed after pytest's report is written: the report still says a test failed
    await agentWrites(phase.id, project, "conftest.py", "import os\n\n\ndef pytest_sessionfinish(session, exitstatus):\n    os._exit(0)\n");
    const a = await exec(phase.id, ["pytest", "-q", "tests/test_broken.py"]);
    expect(a.exitCode).toBe(0);
    expect(a.tests).toMatchObject({ tests: 1, failures: 1 });
    expect(a.failure).toMatchObject({ category: "test", counted: true, count: 1 });
    expect(a.failure!.evidence).toMatch(/\(the command exited 0; pytest's report says its tests failed\)$/);
    // killed from a test, before any report: nothing shows a pass
    await agentWrites(phase.id, project, "conftest.py", "");
    await agentWrites(phase.id, project, "tests/test_zz_exit.py", "import os\n\n\ndef test_zz():\n    os._exit(0)\n");
    const b = await exec(phase.id, ["pytest", "-q", "tests/test_broken.py", "tests/test_zz_exit.py"]);
    expect(b.exitCode).toBe(0);
    expect(b.tests).toBeNull();
    expect(b.failure).toMatchObject({ category: "test", counted: true, count: 2 });
    expect(b.failure!.evidence).toMatch(/exited 0 without the JUnit report/);
    const rs = (await results(phase.id)).filter((r) => r.category === "test");
    expect(rs.map((r) => [r.exitCode, (r.failFast as { count: number }).count])).toEqual([[0, 1], [0, 2]]);
    // the phase report does not call it a pass
    const rep = (await t.api.request<{ report: { validation: { status: string } } }>("GET", `/v1/phases/${phase.id}/report`)).report;
    expect(rep.validation.status).not.toBe("PASS");
    // pytest --version is neither a pass nor a failure
    const v = await exec(phase.id, ["pytest", "--version"]);
    expect(v.failure).toBeNull();
    expect((await results(phase.id)).at(-1)!.failFast).toEqual({ reset: [] });
  }, 180_000);

  it("pytest run inside a Python script that hides its exit code is still read: its report says the tests failed", async () => {
    const { phase, project } = await start("atk.4");
    const hide = await writeScript(project, "import sys, pytest\npytest.main(['-q', 'tests/test_broken.py'])\nsys.exit(0)");
    const r = await exec(phase.id, ["python3", hide]);
    expect(r.exitCode).toBe(0);
    expect(r.tests).toMatchObject({ tests: 1, failures: 1, failed: ["tests.test_broken::test_broken"] });
    expect(r.failure).toMatchObject({ category: "test", counted: true, count: 1 });
    expect(r.failure!.evidence).toMatch(/^1 failed, 0 errors, 0 passed, 0 skipped of 1; first: tests\.test_broken::test_broken \(the command exited 0/);
    // and a command string gets its report too (counts exact, not "no JUnit report read")
    const s = await run(phase.id, { command: "pytest -q tests/test_broken.py" });
    expect(s.tests).toMatchObject({ tests: 1, failures: 1 });
    expect(s.failure).toMatchObject({ category: "test", count: 2 });
    const third = await exec(phase.id, ["python3", hide]);
    expect(third.escalation).toMatchObject({ category: "test" });
    const rs = await results(phase.id);
    expect(rs.filter((x) => x.category === "test").map((x) => (x.tests as { failures: number }).failures)).toEqual([1, 1, 1]);
  }, 180_000);

  it("a green report forged by a script at the path in its environment resets nothing and is not the phase's test result", async () => {
    const { phase, project } = await start("atk.4b");
    const broken = ["pytest", "-q", "tests/test_broken.py"];
    expect((await exec(phase.id, broken)).failure?.count).toBe(1);
    const forge = await writeScript(
      project,
      [
        "import os",
        "path = os.environ['PYTEST_ADDOPTS'].split('=', 1)[1]",
        "open(path, 'w').write('<testsuites><testsuite tests=\"2\" failures=\"0\" errors=\"0\" skipped=\"0\">'",
        "    '<testcase classname=\"tests.test_broken\" name=\"test_broken\"/><testcase classname=\"tests.test_calc\" name=\"test_add\"/></testsuite></testsuites>')",
        "print(path)",
      ].join("\n"),
    );
    const f = await exec(phase.id, ["python3", forge]);
    expect(f.exitCode).toBe(0);
    expect(f.stdout).toMatch(/^\/tmp\/\.sandboxd-junit-[0-9a-f]{24}\.xml$/m);
    expect(f.failure).toBeNull();
    expect((await results(phase.id)).at(-1)!.failFast).toEqual({ reset: [] });
    expect((await exec(phase.id, broken)).failure?.count).toBe(2);
    // the phase's test result is pytest's own last report, not the forged one
    const rep = (await t.api.request<{ report: { tests: { failures: number } | null; validation: { status: string } } }>("GET", `/v1/phases/${phase.id}/report`)).report;
    expect(rep.tests).toMatchObject({ failures: 1 });
    expect(rep.validation.status).not.toBe("PASS");
  }, 180_000);

  it("commands racing the escalation: none hangs, none starts on a frozen shim; each ends with its result or SBX_ERR_PHASE_ESCALATED, recorded", async () => {
    const { phase, project } = await start("atk.8");
    const broken = ["pytest", "-q", "tests/test_broken.py"];
    await exec(phase.id, broken);
    await exec(phase.id, broken);
    const nap = await writeScript(project, "import time\ntime.sleep(0.3)\nprint('slept')");
    const t0 = Date.now();
    const racers = Array.from({ length: 8 }, () =>
      run(phase.id, { argv: ["python3", nap] }, 60_000).then(
        (r) => ({ ok: r.exitCode }),
        (e: SandboxdError) => ({ code: e.code }),
      ),
    );
    const third = exec(phase.id, broken);
    const settled = await Promise.all(racers);
    expect((await third).escalation).toMatchObject({ category: "test" });
    expect(Date.now() - t0).toBeLessThan(20_000);
    for (const s of settled) {
      if ("code" in s) expect(s.code).toBe("SBX_ERR_PHASE_ESCALATED");
      else expect(s.ok).toBe(0);
    }
    // while escalated, a background job is refused too
    const job = await t.api.request("POST", `/v1/phases/${phase.id}/exec`, { argv: ["python3", nap], background: true }).then(() => null, (e: SandboxdError) => e);
    expect(job?.code).toBe("SBX_ERR_PHASE_ESCALATED");
    // every allowed verdict has its result or its error on record
    const recs = await audit(phase.id);
    const verdicts = recs.filter((r) => r.type === "exec.verdict" && r.decision === "allow").map((r) => r.id);
    const ends = new Set(recs.filter((r) => r.type === "exec.result" || r.type === "exec.error").map((r) => r.id));
    for (const v of verdicts) expect(ends.has(v), String(v)).toBe(true);
    expect(recs.filter((r) => r.type === "exec.error").every((r) => r.code === "SBX_ERR_PHASE_ESCALATED")).toBe(true);
  }, 180_000);

  it("a Python program whose error output is thrown away is still a runtime failure, counted", async () => {
    const { phase, project } = await start("atk.5");
    const crash = await writeScript(project, "raise ValueError('bad candle')");
    const a = await run(phase.id, { command: `python3 ${crash} > /dev/null 2>&1` });
    expect(a.exitCode).toBe(1);
    expect(a.failure).toMatchObject({ category: "runtime", counted: true, count: 1, limit: 2 });
    expect(a.failure!.evidence).toMatch(/^python exit 1 with its error output discarded \(2>\/dev\/null\)/);
    const b = await run(phase.id, { command: `python3 ${crash} 2>/dev/null` });
    expect(b.escalation).toMatchObject({ category: "runtime" });
    expect((await results(phase.id)).map((x) => x.category)).toEqual(["runtime", "runtime"]);
  }, 180_000);

  it("a command running when the phase escalates ends at once with SBX_ERR_PHASE_ESCALATED naming the report; it does not run on after the resume", async () => {
    const { phase, project } = await start("atk.6");
    const sleeper = await writeScript(project, "import time\nprint('up', flush=True)\nfor i in range(40):\n    time.sleep(1)\nopen('/workspace/sleeper-done', 'w').write('x')\n");
    const inflight = run(phase.id, { argv: ["python3", sleeper] }, 60_000).then(
      (r) => ({ r }),
      (e: unknown) => ({ e }),
    );
    // and a background job of the same
    const { job } = await t.api.request<{ job: { id: string } }>("POST", `/v1/phases/${phase.id}/exec`, { argv: ["python3", sleeper], background: true, timeoutMs: 60_000 });
    // the sleeper is running (listed) before the failures begin
    for (let i = 0; i < 100 && (await t.api.request<{ execs: Array<{ pid: number | null }> }>("GET", `/v1/phases/${phase.id}/execs`)).execs.every((x) => x.pid === null); i++) {
      await new Promise((r) => setTimeout(r, 100));
    }
    const bad = await writeScript(project, "import numpyy_not_installed");
    expect((await exec(phase.id, ["python3", bad])).failure?.count).toBe(1);
    const second = await exec(phase.id, ["python3", bad]);
    expect(second.escalation).toMatchObject({ category: "import" });
    const t0 = Date.now();
    const out = await Promise.race([inflight, new Promise<{ late: true }>((r) => setTimeout(() => r({ late: true }), 15_000))]);
    expect(Date.now() - t0).toBeLessThan(15_000);
    expect("e" in out).toBe(true);
    const e = (out as { e: SandboxdError }).e;
    expect(e).toBeInstanceOf(SandboxdError);
    expect(e.code).toBe("SBX_ERR_PHASE_ESCALATED");
    expect(e.message).toContain(second.escalation!.report);
    expect(e.message).toMatch(/killed/);
    const errRecs = (await audit(phase.id)).filter((r) => r.type === "exec.error" && String(r.argv).includes(sleeper));
    expect(errRecs).toHaveLength(2);
    const ids = errRecs.map((r) => String(r.id));
    expect(ids).toContain(job.id);
    expect(ids.filter((x) => x !== job.id)).toEqual([expect.stringMatching(/^ex_[0-9a-f]{12}$/)]);
    for (const r of errRecs) expect(r).toMatchObject({ code: "SBX_ERR_PHASE_ESCALATED", escalation: 1 });
    // the job's view settles a moment after its record is durable
    const jobView = async () => (await t.api.request<{ job: { state: string; error: { code: string } | null } }>("GET", `/v1/phases/${phase.id}/jobs/${job.id}`)).job;
    await expect.poll(jobView, { timeout: 5_000 }).toMatchObject({ state: "failed", error: { code: "SBX_ERR_PHASE_ESCALATED" } });
    // frozen while escalated; resumed, the sleeper is gone and never finished
    expect((await docker.getContainer(phase.containerId!).inspect()).State.Paused).toBe(true);
    await t.api.request("POST", `/v1/phases/${phase.id}/resume`, { note: "package name fixed" });
    const ps = await writeScript(
      project,
      "import os\nfor p in os.listdir('/proc'):\n    if p.isdigit():\n        try:\n            print(open(f'/proc/{p}/cmdline').read().replace('\\0', ' '))\n        except OSError:\n            pass",
    );
    const listed = await exec(phase.id, ["python3", ps]);
    expect(listed.stdout).toContain(ps);
    expect(listed.stdout).not.toContain(sleeper);
    await new Promise((r) => setTimeout(r, 1_500));
    const done = await writeScript(project, "import os\nprint(os.path.exists('/workspace/sleeper-done'))");
    expect((await exec(phase.id, ["python3", done])).stdout.trim()).toBe("False");
  }, 180_000);

  it("the counters and escalation reports are out of the agent's reach", async () => {
    const { phase, project } = await start("atk.7");
    expect((await exec(phase.id, ["pytest", "-q", "tests/test_broken.py"])).failure?.count).toBe(1);
    const look = await writeScript(
      project,
      [
        "import os",
        "found = []",
        "for root, dirs, files in os.walk('/', onerror=lambda e: None):",
        "    if root.startswith(('/proc', '/sys')):",
        "        dirs[:] = []",
        "        continue",
        "    found += [os.path.join(root, f) for f in files if f == 'failfast.json' or f.startswith('escalation-')]",
        "print(found)",
      ].join("\n"),
    );
    const r = await exec(phase.id, ["python3", look]);
    expect(r.stdout.trim()).toBe("[]");
    // the count survives whatever the agent tried
    expect((await exec(phase.id, ["pytest", "-q", "tests/test_broken.py"])).failure?.count).toBe(2);
  }, 180_000);

  it("memory let go for a moment in every sustain window (a dip at every few samples) still escalates", async () => {
    let text = await readFile(path.join(ROOT, "policies", "default.yaml"), "utf8");
    text = text.replace(/^( {4}memoryEscalateBytes:) 1GiB/m, "$1 300MiB").replace(/^( {4}memorySustainMs:) 30s/m, "$1 6s");
    const dir = await tempDir("ffa-policy");
    projects.push(dir);
    await writeFile(path.join(dir, "policy.yaml"), text);
    const { phase, project } = await start("atk.9", path.join(dir, "policy.yaml"));
    // 400 MiB held for 2.5 s, let go for 1.2 s, again: before, no 6 s window was ever whole
    const hog = await writeScript(
      project,
      "import time\nend = time.time() + 40\nwhile time.time() < end:\n    x = bytearray(400 * 1024 * 1024)\n    for i in range(0, len(x), 4096):\n        x[i] = 1\n    time.sleep(2.5)\n    del x\n    time.sleep(1.2)\n",
    );
    const t0 = Date.now();
    const out = await run(phase.id, { argv: ["python3", hog] }, 60_000).then(
      (r) => ({ r }),
      (e: SandboxdError) => ({ e }),
    );
    // escalated while the hog still ran (it ends by itself at 40 s, and holds nothing after)
    expect(Date.now() - t0).toBeLessThan(38_000);
    expect("e" in out && out.e.code).toBe("SBX_ERR_PHASE_ESCALATED");
    const v = await view(phase.id);
    expect(v.state).toBe("escalated");
    expect(v.escalations!.at(-1)).toMatchObject({ category: "memory" });
    const esc = (await audit(phase.id)).find((r) => r.type === "phase.escalated")!;
    expect(esc).toMatchObject({ scope: "memory" });
    expect((esc.memory as { overMs: number }).overMs).toBeGreaterThanOrEqual(6_000);
  }, 120_000);
});
