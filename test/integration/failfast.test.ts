/**
 * SKILLS.md Fail-Fast Protocol run by the supervisor, in real sandboxes of a
 * real daemon, driven over its socket and with the real CLI: a test that
 * keeps failing escalates the phase (frozen: docker inspect says Paused), the
 * report names the attempts and the failing test, every call answers 423
 * until a person resumes with a note; import errors escalate after two; a
 * success in between resets; pytest's counts come from its JUnit report,
 * exact; a person pauses, resumes and aborts; /v1/events tells it all in order.
 */
import { readFile, writeFile, chown } from "node:fs/promises";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { SandboxdError } from "../../src/errors.js";
import type { ExecResult, PhaseReport } from "../../src/phases/manager.js";
import type { PhaseView } from "../../src/phases/types.js";
import type { CheckpointResult } from "../../src/workspace/index.js";
import { OWNER, cli, docker, makeProject, removeDir, requireEngineAndImage, startTestDaemon, writeScript, type TestDaemon } from "../helpers/sandbox.js";

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

async function start(name: string): Promise<{ phase: PhaseView; project: string }> {
  const project = await makeProject();
  projects.push(project);
  const { phase } = await t.api.request<{ phase: PhaseView }>("POST", "/v1/phases", { project, phase: name, mode: "test" });
  started.push(phase.id);
  return { phase, project };
}

const exec = async (id: string, argv: string[]) => (await t.api.request<{ result: ExecResult }>("POST", `/v1/phases/${id}/exec`, { argv })).result;
const paused = async (containerId: string) => (await docker.getContainer(containerId).inspect()).State.Paused;

async function refusal(p: Promise<unknown>): Promise<SandboxdError> {
  const e = await p.then(() => null, (err: unknown) => err);
  expect(e).toBeInstanceOf(SandboxdError);
  return e as SandboxdError;
}

async function put(project: string, rel: string, text: string): Promise<void> {
  await writeFile(path.join(project, rel), text);
  await chown(path.join(project, rel), OWNER.uid, OWNER.gid);
}

async function events(phase: string): Promise<Array<Record<string, unknown>>> {
  const res = await t.api.stream("GET", `/v1/events?phase=${phase}&since=0&follow=0`);
  let text = "";
  for await (const c of res) text += (c as Buffer).toString("utf8");
  return text.split("\n").filter(Boolean).map((l) => JSON.parse(l) as Record<string, unknown>);
}

describe("fail-fast in a real sandbox", () => {
  it("a test failing three times escalates on the third: frozen, reported, 423 until a person resumes; then work goes on", async () => {
    const { phase, project } = await start("4.1");
    const pytest = ["pytest", "-q", "tests/test_broken.py"];
    const r1 = await exec(phase.id, pytest);
    expect(r1.failure).toMatchObject({ category: "test", counted: true, count: 1, limit: 3 });
    expect(r1.tests).toEqual({ tests: 1, passed: 0, failures: 1, errors: 0, skipped: 0, failed: ["tests.test_broken::test_broken"] });
    expect(r1.escalation).toBeNull();
    expect((await exec(phase.id, pytest)).failure?.count).toBe(2);
    const r3 = await exec(phase.id, pytest);
    expect(r3.failure?.count).toBe(3);
    expect(r3.escalation).toMatchObject({ n: 1, category: "test" });

    const view = (await t.api.request<{ phase: PhaseView }>("GET", `/v1/phases/${phase.id}`)).phase;
    expect(view.state).toBe("escalated");
    expect(await paused(view.containerId!)).toBe(true);

    const report = await readFile(r3.escalation!.report, "utf8");
    expect(report).toMatch(/^\[ESCALATION\] Phase 4\.1 \(ph_[0-9a-f]{12}\) failed after 3 attempts\n---\n/);
    expect(report).toContain("Error Category: Test");
    expect(report.match(/^ {2}[123]\. \[.*\] pytest -q tests\/test_broken\.py → FAIL exit 1 \[Test: 1 failed, 0 errors, 0 passed, 0 skipped of 1; first: tests\.test_broken::test_broken\]$/gm)).toHaveLength(3);
    expect(report).toMatch(/Last Error:\n(  .*\n)*  .*assert 4 == 5/);
    expect(report).toMatch(/Recommendation: .*tests\.test_broken::test_broken/);
    // in the build log and the audit trail too
    expect(await readFile(view.buildLog, "utf8")).toContain(`[ESCALATION] Phase 4.1 (${phase.id}) failed after 3 attempts`);

    // every mutating call: 423, naming the report
    const e = await refusal(exec(phase.id, ["pytest", "-q"]));
    expect(e.code).toBe("SBX_ERR_PHASE_ESCALATED");
    expect(e.status).toBe(423);
    expect(e.message).toContain(r3.escalation!.report);

    const ls = await cli(["escalations", "ls"], { socket: t.socket });
    expect(ls.stdout).toMatch(new RegExp(`${phase.id}\\s+4\\.1\\s+1\\s+test\\s+.*open`));
    const show = await cli(["escalations", "show", phase.id], { socket: t.socket });
    expect(show.stdout).toContain("Self-Correction Attempts:");

    // the person fixes the test and resumes with a note
    const noNote = await cli(["phase", "resume", phase.id], { socket: t.socket });
    expect(noNote.code).not.toBe(0);
    expect(noNote.stderr).toContain("needs a note");
    await put(project, "tests/test_broken.py", "from services.calc import add\n\n\ndef test_broken():\n    assert add(2, 2) == 4\n");
    const resumed = await cli(["phase", "resume", phase.id, "--note", "the test expected 5; fixed the test"], { socket: t.socket });
    expect(resumed.stdout.trim()).toBe(`${phase.id} running`);
    expect(await paused(view.containerId!)).toBe(false);
    const ok = await exec(phase.id, ["pytest", "-q"]);
    expect(ok.exitCode).toBe(0);
    expect(ok.failure).toBeNull();
    expect(ok.tests).toMatchObject({ tests: 2, passed: 2, failures: 0 });

    // events, in order
    const ev = await events(phase.id);
    const seqs = ev.map((x) => x.seq as number);
    expect([...seqs].sort((a, b) => a - b)).toEqual(seqs);
    expect(ev.map((x) => `${x.type}${x.category ? `:${x.category}` : ""}`)).toEqual([
      "phase.start",
      "phase.ready",
      "exec.result:test",
      "exec.result:test",
      "exec.result:test",
      "phase.escalated:test",
      "phase.resumed",
      "exec.result",
    ]);
    expect(ev.find((x) => x.type === "phase.resumed")).toMatchObject({ note: "the test expected 5; fixed the test", countersReset: true, state: "running" });

    // the phase report at stop: pytest's real counts, validation PASS, the escalation resolved
    const stop = await cli(["phase", "stop", phase.id], { socket: t.socket });
    expect(stop.stdout).toMatch(new RegExp(`^${phase.id} stopped\\n- Files modified: .*\\n- Tests passed: 2/2 \\(0 failed, 0 errors, 0 skipped; last pytest run\\)\\n- Validation: PASS\\n- Attempts: 3 failed attempt\\(s\\)\\n- Escalations: 1 \\(#1 test: resumed\\)`));
    const rep = JSON.parse((await cli(["report", phase.id, "--json"], { socket: t.socket })).stdout) as PhaseReport;
    expect(rep).toMatchObject({ outcome: "complete", tests: { tests: 2, passed: 2 }, validation: { status: "PASS" } });
    expect(await readFile(view.buildLog, "utf8")).toMatch(/\[PHASE_COMPLETE\] Phase 4\.1 .*\n.*- Files modified/);
  }, 180_000);

  it("pytest's counts are exact for a suite with passes, failures, errors and skips", async () => {
    const { phase, project } = await start("4.2");
    await put(
      project,
      "tests/test_mixed.py",
      [
        "import pytest",
        "",
        "@pytest.fixture",
        "def broken():",
        "    raise RuntimeError('fixture down')",
        "",
        "def test_pass_a():",
        "    assert True",
        "",
        "def test_pass_b():",
        "    assert 1 + 1 == 2",
        "",
        "def test_fail():",
        "    assert 'a' == 'b'",
        "",
        "def test_error(broken):",
        "    assert True",
        "",
        "@pytest.mark.skip(reason='not today')",
        "def test_skip():",
        "    assert False",
        "",
      ].join("\n"),
    );
    const r = await exec(phase.id, ["pytest", "-q", "tests/test_mixed.py"]);
    expect(r.exitCode).toBe(1);
    expect(r.tests).toEqual({ tests: 5, passed: 2, failures: 1, errors: 1, skipped: 1, failed: ["tests.test_mixed::test_fail", "tests.test_mixed::test_error"] });
    expect(r.failure).toMatchObject({ category: "test", evidence: "1 failed, 1 errors, 2 passed, 1 skipped of 5; first: tests.test_mixed::test_fail" });
    // the report file was read back and removed: nothing left in the sandbox's /tmp
    const ls = await exec(phase.id, ["python3", await writeScript(project, "import glob; print(glob.glob('/tmp/.sandboxd-junit-*'))")]);
    expect(ls.stdout.trim()).toBe("[]");
  }, 120_000);

  it("import errors escalate after two; a passing run between failures resets the count", async () => {
    const { phase, project } = await start("4.3");
    const bad = await writeScript(project, "import numpyy_not_installed");
    // python: fail, the same command passes once fixed (resets), fail → count 1
    expect((await exec(phase.id, ["python3", bad])).failure).toMatchObject({ category: "import", count: 1, limit: 2, evidence: "ModuleNotFoundError: No module named 'numpyy_not_installed'" });
    await put(project, bad, "print('ok')\n");
    expect((await exec(phase.id, ["python3", bad])).failure).toBeNull();
    await put(project, bad, "import numpyy_not_installed\n");
    const again = await exec(phase.id, ["python3", bad]);
    expect(again.failure).toMatchObject({ count: 1 });
    expect(again.escalation).toBeNull();
    const second = await exec(phase.id, ["python3", bad]);
    expect(second.failure).toMatchObject({ category: "import", count: 2, limit: 2 });
    expect(second.escalation?.category).toBe("import");
    expect((await t.api.request<{ phase: PhaseView }>("GET", `/v1/phases/${phase.id}`)).phase.state).toBe("escalated");
    // abort: failed, report kept
    const ab = await cli(["phase", "abort", phase.id, "--note", "wrong package name in the spec"], { socket: t.socket });
    expect(ab.stdout).toMatch(new RegExp(`^${phase.id} failed\\n`));
    expect(ab.stdout).toContain("- Escalations: 1 (#1 import: aborted)");
    const v = (await t.api.request<{ phase: PhaseView }>("GET", `/v1/phases/${phase.id}`)).phase;
    expect(v.endReason).toBe("aborted by operator: wrong package name in the spec");
    expect(await readFile(second.escalation!.report, "utf8")).toContain("Error Category: Import");
    expect((await readFile(v.buildLog, "utf8"))).toMatch(/\[PHASE_FAILED\] Phase 4\.3 .*aborted by operator/);
    const ev = (await events(phase.id)).map((x) => x.type);
    expect(ev.slice(-2)).toEqual(["phase.escalated", "phase.failed"]);
  }, 120_000);

  it("a person pauses (frozen, 423 SBX_ERR_PHASE_PAUSED) and resumes a running phase", async () => {
    const { phase } = await start("4.4");
    const p = await cli(["phase", "pause", phase.id, "--note", "looking at the logs"], { socket: t.socket });
    expect(p.stdout.trim()).toBe(`${phase.id} paused`);
    expect(await paused(phase.containerId!)).toBe(true);
    const e = await refusal(exec(phase.id, ["pytest", "-q"]));
    expect(e.code).toBe("SBX_ERR_PHASE_PAUSED");
    expect(e.status).toBe(423);
    const x = await cli(["exec", phase.id, "--", "pytest", "-q"], { socket: t.socket });
    expect(x.code).toBe(75);
    expect((await cli(["phase", "resume", phase.id], { socket: t.socket })).stdout.trim()).toBe(`${phase.id} running`);
    expect(await paused(phase.containerId!)).toBe(false);
    expect((await exec(phase.id, ["pytest", "-q", "tests/test_calc.py"])).exitCode).toBe(0);
    const ev = (await events(phase.id)).map((x) => `${x.type}:${x.state ?? ""}`);
    expect(ev).toEqual(["phase.start:starting", "phase.ready:running", "phase.paused:paused", "phase.resumed:running", "exec.result:"]);
  }, 120_000);

  it("refused iterations are attempts (category iteration): the third in a row escalates, the report lists the accepted iterations' files", async () => {
    const { phase, project } = await start("4.5");
    const py = async (code: string) => exec(phase.id, ["python3", await writeScript(project, code)]);
    const checkpoint = (message: string) => t.api.request<CheckpointResult>("POST", `/v1/phases/${phase.id}/checkpoint`, { message });
    await py("open('/workspace/services/calc.py', 'a').write('\\n\\ndef mul(a: int, b: int) -> int:\\n    return a * b\\n')");
    expect((await checkpoint("Added mul")).iteration?.state).toBe("accepted");
    for (let i = 1; i <= 3; i++) {
      await py(`open('/workspace/services/calc.py', 'a').write('\\ndef broken${i}(:\\n    pass\\n')`);
      const it3 = (await checkpoint(`broken ${i}`)).iteration!;
      expect(it3.state).toBe("rejected");
    }
    const view = (await t.api.request<{ phase: PhaseView }>("GET", `/v1/phases/${phase.id}`)).phase;
    expect(view.state).toBe("escalated");
    expect(await paused(view.containerId!)).toBe(true);
    const esc = view.escalations!.at(-1)!;
    expect(esc).toMatchObject({ n: 1, category: "iteration" });
    expect(esc.summary).toBe("3 iteration failures in a row (limit 3)");
    const report = await readFile(esc.report, "utf8");
    expect(report).toContain("Error Category: Iteration");
    expect(report).toContain("Files Modified: services/calc.py (accepted iterations)");
    expect(report).toMatch(/  1\. \[[^\]]+\] iteration 2 \(broken 1\): services\/calc\.py → REFUSED workspace\.python-compile \[Iteration: workspace\.python-compile: services\/calc\.py:\d+:\d+: SyntaxError/);
    expect(report).toMatch(/  3\. \[[^\]]+\] iteration 4 \(broken 3\)/);
    // the trail: each refusal, counted, then the escalation
    const ev = (await events(phase.id)).filter((x) => x.type === "failfast.attempt" || x.type === "phase.escalated");
    expect(ev.map((x) => `${x.type}:${x.category}:${x.count ?? ""}`)).toEqual([
      "failfast.attempt:iteration:1",
      "failfast.attempt:iteration:2",
      "failfast.attempt:iteration:3",
      "phase.escalated:iteration:3",
    ]);
  }, 120_000);

  it("an accepted iteration resets the iteration count; the stop report lists the files the accepted iterations changed", async () => {
    const { phase, project } = await start("4.6");
    const py = async (code: string) => exec(phase.id, ["python3", await writeScript(project, code)]);
    const checkpoint = (message: string) => t.api.request<CheckpointResult>("POST", `/v1/phases/${phase.id}/checkpoint`, { message });
    const attempts = async () => (await events(phase.id)).filter((x) => x.type === "failfast.attempt").map((x) => x.count);
    await py("open('/workspace/services/calc.py', 'a').write('\\ndef broken(:\\n    pass\\n')");
    expect((await checkpoint("broken")).iteration?.state).toBe("rejected");
    await py("open('/workspace/services/calc.py', 'a').write('\\n\\ndef mul(a: int, b: int) -> int:\\n    return a * b\\n')");
    expect((await checkpoint("Added mul")).iteration?.state).toBe("accepted");
    await py("open('/workspace/services/calc.py', 'a').write('\\ndef broken(:\\n    pass\\n')");
    expect((await checkpoint("broken again")).iteration?.state).toBe("rejected");
    // 1, then reset by the accepted iteration, then 1 again: not 2
    expect(await attempts()).toEqual([1, 1]);
    await py("import os\nos.makedirs('/workspace/services/io', exist_ok=True)\nopen('/workspace/services/io/__init__.py', 'w').write('')\nopen('/workspace/services/io/feed.py', 'w').write('X = 1\\n')");
    expect((await checkpoint("Added the feed module")).iteration?.state).toBe("accepted");
    const stop = await cli(["phase", "stop", phase.id], { socket: t.socket });
    expect(stop.code).toBe(0);
    const rep = (await t.api.request<{ report: PhaseReport }>("GET", `/v1/phases/${phase.id}/report`)).report;
    expect(rep.filesModified).toEqual(["services/calc.py", "services/io/__init__.py", "services/io/feed.py"]);
    expect(rep.attempts.total).toBe(2);
    const log = await readFile(path.join(project, "build_audit.log"), "utf8");
    expect(log).toMatch(/\[PHASE_COMPLETE\] Phase 4\.6 \(ph_[0-9a-f]{12}\): stopped by operator\n- Files modified: services\/calc\.py, services\/io\/__init__\.py, services\/io\/feed\.py\n/);
  }, 120_000);
});
