/**
 * Redaction keeps the audit trail's structure (issue 11), through a real
 * daemon and a real sandbox: with QuestDB's default login in the project's
 * .env (`postgresql://admin:quest@…`), record types, field names and output
 * such as `requests handled: 3; questdb ok` stay intact, while the password
 * as a token is scrubbed — in audit.jsonl, build_audit.log, the API answer
 * and the daemon's own log.
 */
import { chown, readFile, writeFile } from "node:fs/promises";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { SandboxdError } from "../../src/errors.js";
import type { ExecResult } from "../../src/phases/manager.js";
import type { PhaseView } from "../../src/phases/types.js";
import { OWNER, makeProject, removeDir, requireEngineAndImage, startTestDaemon, writeScript, type TestDaemon } from "../helpers/sandbox.js";

let t: TestDaemon;
const logLines: string[] = [];
const cleanup: string[] = [];

beforeAll(async () => {
  await requireEngineAndImage();
  t = await startTestDaemon({ logLines });
});

afterAll(async () => {
  await t?.close();
  for (const d of cleanup) await removeDir(d);
});

describe("redaction keeps structure", () => {
  it("QUESTDB_URL=postgresql://admin:quest@…: types, keys and ordinary words intact; the password as a token scrubbed", async () => {
    const project = await makeProject();
    cleanup.push(project);
    await writeFile(path.join(project, ".env"), "QUESTDB_URL=postgresql://admin:quest@localhost:8812/qdb\n");
    await chown(path.join(project, ".env"), OWNER.uid, OWNER.gid);
    const { phase } = await t.api.request<{ phase: PhaseView }>("POST", "/v1/phases", { project, phase: "q.1", mode: "test" });

    // an approval request, with the password in the agent's reason
    const asked = await t.api.request("POST", `/v1/phases/${phase.id}/exec`, { argv: ["curl", "http://example.com"], reason: "retry with quest" }).then(
      () => null,
      (e: unknown) => e,
    );
    expect(asked).toBeInstanceOf(SandboxdError);
    expect((asked as SandboxdError).code).toBe("SBX_ERR_POLICY_NEEDS_APPROVAL");

    const script = await writeScript(project, ["print('requests handled: 3; questdb ok')", "print('login admin:quest@db')", "print('request quest')"].join("\n"));
    const { result } = await t.api.request<{ result: ExecResult }>("POST", `/v1/phases/${phase.id}/exec`, { argv: ["python3", script] });
    expect(result.exitCode).toBe(0);
    const want = "requests handled: 3; questdb ok\nlogin admin:[REDACTED]@db\nrequest [REDACTED]\n";
    expect(result.stdout).toBe(want);

    // the daemon's log: a line carrying outside error text passes the phase's secrets; its own words do not change
    t.daemon.log.error({ phase: phase.id, err: "upstream said: password quest rejected for request" }, "could not record a tunnel connection; refused");
    await t.api.request("DELETE", `/v1/phases/${phase.id}`);

    const records = (await readFile(path.join(t.stateDir, "audit.jsonl"), "utf8"))
      .trim()
      .split("\n")
      .map((l) => JSON.parse(l) as Record<string, unknown>)
      .filter((r) => r.phase === phase.id);
    const types = records.map((r) => r.type);
    expect(types).toEqual(expect.arrayContaining(["phase.start", "exec.verdict", "approval.request", "exec.result", "phase.complete"]));
    const verdict = records.find((r) => r.type === "exec.verdict" && (r.argv as string[])[0] === "curl")!;
    expect(Object.keys(verdict)).toContain("requestReason");
    expect(verdict.requestReason).toBe("retry with [REDACTED]");
    const res = records.find((r) => r.type === "exec.result")!;
    expect(res.stdout).toBe(want);
    const journal = records.map((r) => JSON.stringify(r)).join("\n");
    expect(journal).not.toMatch(/re\[REDACTED\]|\[REDACTED\]db|:quest@|quest rejected/);

    const build = await readFile(phase.buildLog, "utf8");
    expect(build).toContain("[APPROVAL] [REQUEST]");
    expect(build).toContain("requests handled: 3; questdb ok");
    expect(build).toContain("login admin:[REDACTED]@db");
    expect(build).toContain('reason="retry with [REDACTED]"');
    expect(build).not.toMatch(/re\[REDACTED\]|\[REDACTED\]db|:quest@|request quest/);

    const log = logLines.join("");
    expect(log).toContain('"msg":"phase started"');
    expect(log).toContain("upstream said: password [REDACTED] rejected for request");
    expect(log).not.toMatch(/re\[REDACTED\]|password quest/);
  });
});
