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
import { ROOT, cli, makeProject, removeDir, requireEngineAndImage, startTestDaemon, tempDir, testAuditKey, type TestDaemon } from "../helpers/sandbox.js";

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
pieces, text = [], []
res = sbx.exec(pid, ["pytest", "-q", "tests/test_calc.py"], on_stdout_bytes=pieces.append, on_stdout=text.append)
out["bytesTyped"] = all(type(p) is bytes for p in pieces)
out["bytesMatchText"] = b"".join(pieces).decode("utf-8") == "".join(text) and b"1 passed" in b"".join(pieces)
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

const AUDIT_HARNESS = String.raw`
import json, os, sys
from sandboxd_client import Sandboxd, SandboxdError

sbx = Sandboxd(sys.argv[1])
out = {"key": sbx.audit_key()}
bundle = os.path.join(sys.argv[2], "trail.bundle")
out["export"] = sbx.export_audit(bundle, nonce="py-client.1")
out["partLeft"] = os.path.exists(bundle + ".part")
out["mode"] = oct(os.stat(bundle).st_mode & 0o777)
try:
    sbx.export_audit(bundle + "2", nonce="no spaces")
    out["badNonce"] = "exported"
except SandboxdError as e:
    out["badNonce"] = e.code
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
    expect(out.bytesTyped).toBe(true);
    expect(out.bytesMatchText).toBe(true);
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

  it("the audit key and a bundle export answering a nonce, which the CLI then verifies against that key", async () => {
    const dir = await tempDir("pyaudit");
    dirs.push(dir);
    const script = path.join(dir, "audit.py");
    await writeFile(script, AUDIT_HARNESS);
    const { stdout } = await promisify(execFile)("python3", [script, d.socket, dir], {
      env: { ...process.env, PYTHONPATH: path.join(ROOT, "clients", "python") },
      timeout: 120_000,
    });
    const out = JSON.parse(stdout) as {
      key: { fingerprint: string; publicKey: string; keyFile: string };
      export: { path: string; records: number; lastSeq: number; key: string; nonce: string };
      partLeft: boolean;
      mode: string;
      badNonce: string;
    };
    expect(out.key.keyFile).toBe(testAuditKey(d.stateDir));
    expect(out.key.publicKey).toMatch(/^-----BEGIN PUBLIC KEY-----/);
    expect(out.export).toMatchObject({ path: path.join(dir, "trail.bundle"), key: out.key.fingerprint, nonce: "py-client.1" });
    expect(out.export.records).toBe(out.export.lastSeq);
    expect(out.partLeft).toBe(false);
    expect(out.mode).toBe("0o600");
    expect(out.badNonce).toBe("SBX_ERR_VALIDATION");
    const pub = path.join(dir, "daemon.pub");
    await writeFile(pub, out.key.publicKey);
    const v = await cli(["audit", "verify", "--bundle", out.export.path, "--key", pub, "--nonce", "py-client.1"], { socket: path.join(dir, "none.sock") });
    expect(v.stdout).toMatch(new RegExp(`verifies: ${out.export.records} records, chain intact, anchor at seq ${out.export.lastSeq} signed with key ${out.key.fingerprint} \\(pinned\\)`));
    expect(v.code).toBe(0);
  });
});
