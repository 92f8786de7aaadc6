/**
 * The stdlib Python client (clients/python/sandboxd_client.py) drives a phase
 * end to end against the real daemon, as a harness author's script would:
 * start, streamed and plain exec, an approval round trip, a refusal, stop,
 * and the audit trail of it all.
 */
import { execFile } from "node:child_process";
import { writeFile } from "node:fs/promises";
import path from "node:path";
import { promisify } from "node:util";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ROOT, makeProject, removeDir, requireEngineAndImage, startTestDaemon, tempDir, type TestDaemon } from "../helpers/sandbox.js";

const HARNESS = String.raw`
import json, sys
from sandboxd_client import Sandboxd, SandboxdError

sbx = Sandboxd(sys.argv[1])
project = sys.argv[2]
out = {"health": sbx.health()["ok"]}
phase = sbx.start_phase(project, "7.1", "backtest")
pid = phase["id"]
out["state"] = phase["state"]

chunks = []
res = sbx.exec(pid, ["pytest", "-q", "tests/test_calc.py"], on_stdout=chunks.append, reason="run the tests")
out["streamed"] = "".join(chunks)
out["streamedExit"] = res["exitCode"]
out["plainExit"] = sbx.exec(pid, ["pytest", "-q", "tests/test_broken.py"])["exitCode"]

try:
    sbx.exec(pid, ["ls"])
    out["ask"] = "ran"
except SandboxdError as e:
    out["ask"] = e.code
    approval = e.details["approvalId"]
    out["pending"] = [a["id"] for a in sbx.approvals(phase_id=pid)]
    out["approved"] = sbx.approve(approval, note="harness test")["state"]
    out["afterApproval"] = sbx.exec(pid, ["ls"])["exitCode"]

try:
    sbx.exec(pid, ["rm", "-rf", "/"])
    out["deny"] = "ran"
except SandboxdError as e:
    out["deny"] = e.code
    out["denyHint"] = e.hint is not None

out["stopped"] = sbx.stop_phase(pid)["state"]
out["types"] = [r["type"] for r in sbx.audit(phase_id=pid)]
out["verified"] = sbx.verify_audit()["ok"]
follow = sbx.follow_audit(phase_id=pid)
out["followFirst"] = next(follow)["type"]
follow.close()
try:
    Sandboxd(sys.argv[1] + ".nope").health()
except SandboxdError as e:
    out["unreachable"] = e.code
print(json.dumps(out))
`;

let d: TestDaemon;
const dirs: string[] = [];

beforeAll(async () => {
  await requireEngineAndImage();
  d = await startTestDaemon();
});

afterAll(async () => {
  await d?.close();
  for (const x of dirs) await removeDir(x);
});

describe("the Python client, against the real daemon", () => {
  it("drives a phase start to finish", async () => {
    const project = await makeProject();
    dirs.push(project);
    const dir = await tempDir("pyharness");
    dirs.push(dir);
    const script = path.join(dir, "harness.py");
    await writeFile(script, HARNESS);
    const { stdout } = await promisify(execFile)("python3", [script, d.socket, project], {
      env: { ...process.env, PYTHONPATH: path.join(ROOT, "clients", "python") },
      timeout: 120_000,
    });
    const out = JSON.parse(stdout) as Record<string, unknown>;
    expect(out.health).toBe(true);
    expect(out.state).toBe("running");
    expect(out.streamed).toMatch(/1 passed/);
    expect(out.streamedExit).toBe(0);
    expect(out.plainExit).toBe(1);
    expect(out.ask).toBe("SBX_ERR_POLICY_NEEDS_APPROVAL");
    expect((out.pending as string[]).length).toBe(1);
    expect(out.approved).toBe("approved");
    expect(out.afterApproval).toBe(0);
    expect(out.deny).toBe("SBX_ERR_POLICY_DENIED");
    expect(out.denyHint).toBe(true);
    expect(out.stopped).toBe("stopped");
    expect(out.types).toEqual(expect.arrayContaining(["phase.start", "exec.verdict", "exec.result", "approval.request", "approval.approve", "phase.complete"]));
    expect(out.verified).toBe(true);
    expect(out.followFirst).toBe((out.types as string[])[0]);
    expect(out.unreachable).toBe("SBX_ERR_DAEMON_UNREACHABLE");
  });
});
