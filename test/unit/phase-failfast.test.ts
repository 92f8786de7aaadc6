/**
 * The fail-fast state machine against a fake runtime and a scripted shim:
 * escalated on the limit, frozen, 423 for every call, resumed by a person
 * with a note (counters reset), paused and aborted. The real sandbox runs
 * the same story in test/integration/failfast.test.ts.
 */
import { readFile } from "node:fs/promises";
import { afterEach, describe, expect, it } from "vitest";
import { SandboxdError } from "../../src/errors.js";
import type { ExecScript } from "../helpers/fake-runtime.js";
import { harness, type Harness } from "../helpers/fake-runtime.js";

let h: Harness;
afterEach(async () => {
  await h?.close();
});

async function codeOf(p: Promise<unknown>): Promise<string> {
  const e = await p.then(() => null, (err: unknown) => err);
  expect(e).toBeInstanceOf(SandboxdError);
  return (e as SandboxdError).code;
}

/** The fake shim fails while `failing` holds the stderr to print, exit 1; succeeds otherwise. */
function scripted(state: { stderr: string | null }): ExecScript {
  return (msg, shim) => {
    shim.send({ type: "started", execId: msg.execId, pid: 100 });
    if (state.stderr) shim.output(msg.execId, "stderr", state.stderr);
    shim.send({ type: "exit", execId: msg.execId, exitCode: state.stderr ? 1 : 0, signal: null, timedOut: false, durationMs: 1 });
  };
}

async function started(state: { stderr: string | null }) {
  h = await harness();
  const v = await h.manager.start({ project: h.project, phase: "2.1", mode: "backtest" });
  h.runtime.shimOf(v.containerId)!.script = scripted(state);
  return v;
}

describe("fail-fast with a fake runtime", () => {
  it("three test failures: escalated on the third, frozen, report written, 423 after, resume with a note", async () => {
    const state = { stderr: "E   assert 1 == 2\n" as string | null };
    const v = await started(state);
    const r1 = await h.manager.exec(v.id, { argv: ["pytest", "-q"] });
    expect(r1.failure).toMatchObject({ category: "test", counted: true, count: 1, limit: 3 });
    expect(r1.escalation).toBeNull();
    await h.manager.exec(v.id, { argv: ["pytest", "-q"] });
    const r3 = await h.manager.exec(v.id, { argv: ["pytest", "-q"] });
    expect(r3.failure).toMatchObject({ category: "test", count: 3 });
    expect(r3.escalation).toMatchObject({ n: 1, category: "test" });
    expect((await h.manager.get(v.id)).state).toBe("escalated");
    expect(h.runtime.calls.some((c) => c.startsWith("pause "))).toBe(true);
    const text = await readFile(r3.escalation!.report, "utf8");
    expect(text).toMatch(/^\[ESCALATION\] Phase 2\.1 \(ph_[0-9a-f]{12}\) failed after 3 attempts/);
    expect(text.match(/^ {2}\d\. .*pytest -q → FAIL exit 1/gm)).toHaveLength(3);
    // every mutating call answers 423 naming the report
    const e = await h.manager.exec(v.id, { argv: ["python3", "x"] }).catch((x: SandboxdError) => x);
    expect(e).toBeInstanceOf(SandboxdError);
    expect((e as SandboxdError).code).toBe("SBX_ERR_PHASE_ESCALATED");
    expect((e as SandboxdError).status).toBe(423);
    expect((e as SandboxdError).message).toContain(r3.escalation!.report);
    expect(await h.manager.escalations(false)).toHaveLength(1);
    // a person decides: a note is required
    expect(await codeOf(h.manager.resume(v.id))).toBe("SBX_ERR_VALIDATION");
    const resumed = await h.manager.resume(v.id, "fixture fixed");
    expect(resumed.state).toBe("running");
    expect(h.runtime.calls.some((c) => c.startsWith("unpause "))).toBe(true);
    expect(await h.manager.escalations(false)).toHaveLength(0);
    // counters reset: one more failure does not escalate
    expect((await h.manager.exec(v.id, { argv: ["pytest", "-q"] })).failure).toMatchObject({ count: 1 });
    // a pytest exiting 0 without the report the daemon asked for (the fake shim writes none) is no pass
    state.stderr = null;
    expect((await h.manager.exec(v.id, { argv: ["pytest", "-q"] })).failure).toMatchObject({ category: "test", count: 2, evidence: expect.stringMatching(/without the JUnit report/) });
    const types = (await h.records()).map((r) => r.type);
    expect(types.filter((t) => t === "phase.escalated")).toHaveLength(1);
    expect(types.filter((t) => t === "phase.resumed")).toHaveLength(1);
    const resumedRec = (await h.records()).find((r) => r.type === "phase.resumed")!;
    expect(resumedRec).toMatchObject({ note: "fixture fixed", from: "escalated", countersReset: true });
  });

  it("import errors escalate after two; a pass between failures resets", async () => {
    const state = { stderr: "ModuleNotFoundError: No module named 'nope'\n" as string | null };
    const v = await started(state);
    await h.manager.exec(v.id, { argv: ["python3", "main.py"] });
    state.stderr = null;
    await h.manager.exec(v.id, { argv: ["python3", "main.py"] });
    state.stderr = "ModuleNotFoundError: No module named 'nope'\n";
    expect((await h.manager.exec(v.id, { argv: ["python3", "main.py"] })).failure).toMatchObject({ category: "import", count: 1 });
    const r = await h.manager.exec(v.id, { argv: ["python3", "main.py"] });
    expect(r.failure).toMatchObject({ category: "import", count: 2, limit: 2 });
    expect(r.escalation?.category).toBe("import");
  });

  it("a person pauses and resumes; a paused phase answers 423; abort ends it failed with the report kept", async () => {
    const state = { stderr: null as string | null };
    const v = await started(state);
    expect((await h.manager.pause(v.id, "lunch")).state).toBe("paused");
    expect(await codeOf(h.manager.exec(v.id, { argv: ["python3", "x"] }))).toBe("SBX_ERR_PHASE_PAUSED");
    expect((await h.manager.resume(v.id)).state).toBe("running");
    expect((await h.manager.exec(v.id, { argv: ["python3", "x"] })).exitCode).toBe(0);
    await h.manager.pause(v.id);
    const ended = await h.manager.abort(v.id, "wrong spec");
    expect(ended.state).toBe("failed");
    expect(ended.endReason).toBe("aborted by operator: wrong spec");
    const report = await h.manager.report(v.id);
    expect(report.outcome).toBe("failed");
    const types = (await h.records()).map((r) => r.type);
    expect(types).toEqual(expect.arrayContaining(["phase.paused", "phase.resumed", "phase.failed"]));
  });

  it("the iteration hook: three refused iterations escalate; a success of the checkpoint resets", async () => {
    const v = await started({ stderr: null });
    const refused = { category: "iteration" as const, source: "checkpoint" as const, action: "iteration", result: "REJECTED", evidence: "files.atomic (3 files)" };
    expect(await h.manager.recordAttempt(v.id, refused)).toMatchObject({ counted: true, count: 1, limit: 3, escalation: null });
    await h.manager.recordAttempt(v.id, refused);
    const third = await h.manager.recordAttempt(v.id, refused);
    expect(third.escalation).toMatchObject({ category: "iteration" });
    expect((await h.manager.get(v.id)).state).toBe("escalated");
    expect(await codeOf(h.manager.recordAttempt(v.id, refused))).toBe("SBX_ERR_PHASE_ESCALATED");
    expect((await h.records()).filter((r) => r.type === "failfast.attempt")).toHaveLength(3);
  });

  it("stop writes [PHASE_COMPLETE] with validation, attempts and approvals", async () => {
    const state = { stderr: "Found 2 errors in 1 file (checked 3 source files)\n" as string | null };
    const v = await started(state);
    await h.manager.exec(v.id, { argv: ["mypy", "."] });
    state.stderr = null;
    await h.manager.exec(v.id, { argv: ["mypy", "."] });
    await h.manager.stop(v.id);
    const report = await h.manager.report(v.id);
    expect(report).toMatchObject({ outcome: "complete", validation: { status: "PASS", ran: ["mypy"] }, attempts: { total: 1, open: {} } });
    const log = await readFile((await h.manager.get(v.id)).buildLog, "utf8");
    expect(log).toMatch(/\[PHASE_COMPLETE\] Phase 2\.1 \(ph_[0-9a-f]{12}\): stopped by operator\n.*- Files modified: none/);
    expect(log).toMatch(/- Validation: PASS/);
    expect(log).toMatch(/- Approvals: 0 requested/);
  });
});
