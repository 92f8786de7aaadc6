/**
 * A timeout over the mode's limit (SKILLS.md §2 calls 60 s a default): a
 * person approves it for one command or by a standing approval, and the
 * operator's `limits.modes.<mode>.maxTimeoutMs` sets the limit. Through the
 * real daemon, a real sandbox and the real CLI. The daemon runs an operator
 * policy whose test mode allows 2 s, so that a longer approved timeout is
 * seen doing its work in seconds.
 */
import { readFile, writeFile } from "node:fs/promises";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { Approval } from "../../src/approvals/queue.js";
import { SandboxdError } from "../../src/errors.js";
import type { ExecResult } from "../../src/phases/exec.js";
import type { PhaseView } from "../../src/phases/types.js";
import { cli, makeProject, removeDir, requireEngineAndImage, startTestDaemon, tempDir, writeScript, type TestDaemon } from "../helpers/sandbox.js";

let t: TestDaemon;
let project: string;
let policyDir: string;
let phase: PhaseView;

type Rec = Record<string, unknown> & { type: string; phase?: string };

/** a script that sleeps 3 s: killed under the mode's 2 s, done under an approved 4 s */
let SLEEP3: string[];

async function exec(body: Record<string, unknown>): Promise<ExecResult> {
  return (await t.api.request<{ result: ExecResult }>("POST", `/v1/phases/${phase.id}/exec`, body)).result;
}

async function refusal(p: Promise<unknown>): Promise<SandboxdError> {
  const e = await p.then(
    () => null,
    (x: unknown) => x,
  );
  expect(e).toBeInstanceOf(SandboxdError);
  return e as SandboxdError;
}

async function records(): Promise<Rec[]> {
  const text = await readFile(path.join(t.stateDir, "audit.jsonl"), "utf8");
  return text
    .split("\n")
    .filter(Boolean)
    .map((l) => JSON.parse(l) as Rec)
    .filter((r) => r.phase === phase.id);
}

beforeAll(async () => {
  await requireEngineAndImage();
  // the operator's setting, as README "Timeouts" documents it
  policyDir = await tempDir("policy");
  const base = await readFile(path.resolve("policies/default.yaml"), "utf8");
  const policy = base.replace("  modes:\n    paper:", "  modes:\n    test:\n      maxTimeoutMs: 2s\n      defaultTimeoutMs: 2s\n    paper:");
  expect(policy).not.toBe(base);
  await writeFile(path.join(policyDir, "operator.yaml"), policy);
  t = await startTestDaemon({ policy: path.join(policyDir, "operator.yaml") });
  project = await makeProject();
  SLEEP3 = ["python3", await writeScript(project, "import time; time.sleep(3); print('slept')")];
  ({ phase } = await t.api.request<{ phase: PhaseView }>("POST", "/v1/phases", { project, phase: "6.1", mode: "test" }));
}, 120_000);

afterAll(async () => {
  await t?.close();
  await removeDir(project);
  await removeDir(policyDir);
});

describe("a timeout over the mode's limit", () => {
  it("asks a person, bound to that timeout; approved, the command runs once with it", async () => {
    // the operator's limit is real: 3 s of work is killed at 2 s
    const cut = await exec({ argv: SLEEP3 });
    expect(cut.timedOut).toBe(true);

    const e = await refusal(exec({ argv: SLEEP3, timeoutMs: 4000, reason: "the suite needs 3 s" }));
    expect(e.code).toBe("SBX_ERR_POLICY_NEEDS_APPROVAL");
    expect(e.details).toMatchObject({ rule: "limits.timeout", timeoutMs: 4000, maxTimeoutMs: 2000, setting: "limits.modes.test.maxTimeoutMs" });
    const id = (e.details as { approvalId: string }).approvalId;
    expect(e.message).toContain("timeout 4 s exceeds the 2 s limit of a test-mode phase");
    expect(e.hint).toContain(`sandboxd approvals approve ${id}`);
    expect(e.hint).toContain("--max-timeout");
    expect(e.hint).toContain("limits.modes.test.maxTimeoutMs");
    const { approval } = await t.api.request<{ approval: Approval }>("GET", `/v1/approvals/${id}`);
    expect(approval).toMatchObject({ state: "pending", timeoutMs: 4000, ruleId: "limits.timeout" });
    const shown = await cli(["approvals", "show", id], { socket: t.socket });
    expect(shown.stdout).toMatch(/timeout:\s+4 s/);

    await t.api.request("POST", `/v1/approvals/${id}/approve`, { note: "long suite" });
    // the approval is for 4 s: another timeout asks anew, the same command within the limit is not it
    const other = await refusal(exec({ argv: SLEEP3, timeoutMs: 5000 }));
    expect((other.details as { approvalId: string }).approvalId).not.toBe(id);

    const r = await exec({ argv: SLEEP3, timeoutMs: 4000 });
    expect(r.timedOut).toBe(false);
    expect(r.exitCode).toBe(0);
    expect(r.stdout).toContain("slept");
    const verdicts = (await records()).filter((x) => x.type === "exec.verdict" && x.timeoutMs === 4000);
    expect(verdicts.map((v) => v.decision)).toEqual(["ask", "allow"]);
    expect(verdicts[1]).toMatchObject({ approval: id, rule: "limits.timeout" });
    expect(await readFile(phase.buildLog, "utf8")).toContain(`ASK limits.timeout`);

    // once: the next run asks again
    expect((await refusal(exec({ argv: SLEEP3, timeoutMs: 4000 }))).code).toBe("SBX_ERR_POLICY_NEEDS_APPROVAL");
  }, 60_000);

  it("a standing approval with --max-timeout covers its pattern up to that timeout, never beyond, and never a forbid", async () => {
    const g = await cli(["approvals", "grant", "--phase", phase.id, "--pattern", '["python3", {"prefix": "sbx_scripts/"}]', "--max-timeout", "4", "--expires", "1h"], { socket: t.socket });
    expect(g.code, g.stderr).toBe(0);
    const gid = g.stdout.match(/(gr_[0-9a-f]{12}) granted/)![1]!;

    const r = await exec({ argv: SLEEP3, timeoutMs: 4000 });
    expect(r.exitCode).toBe(0);
    expect(r.stdout).toContain("slept");
    expect((await records()).filter((x) => x.type === "exec.verdict").pop()).toMatchObject({ decision: "allow", grant: gid, timeoutMs: 4000 });

    expect((await refusal(exec({ argv: SLEEP3, timeoutMs: 4500 }))).code).toBe("SBX_ERR_POLICY_NEEDS_APPROVAL");
    // a grant without --max-timeout lets a command run, not run longer
    const plain = await cli(["approvals", "grant", "--phase", phase.id, "--pattern", "pytest", "--expires", "1h"], { socket: t.socket });
    expect(plain.code, plain.stderr).toBe(0);
    expect((await refusal(exec({ argv: ["pytest", "--version"], timeoutMs: 3000 }))).code).toBe("SBX_ERR_POLICY_NEEDS_APPROVAL");
    // a forbidden command stays forbidden, whatever its timeout
    expect((await refusal(exec({ argv: ["rm", "-rf", "/workspace"], timeoutMs: 3000 }))).code).toBe("SBX_ERR_POLICY_DENIED");
    // a grant cannot allow beyond the ceiling
    const over = await cli(["approvals", "grant", "--phase", phase.id, "--pattern", "pytest", "--max-timeout", "301", "--expires", "1h"], { socket: t.socket });
    expect(over.code).not.toBe(0);
    expect(over.stderr).toContain("at most 300000");
  }, 60_000);

  it("from the CLI: over the limit exit 126 with the request to approve; over 5 minutes exit 2, the hint naming a person's approval and the operator's setting", async () => {
    const ask = await cli(["exec", phase.id, "--timeout", "3", "--", "python3", "-V"], { socket: t.socket });
    expect(ask.code).toBe(126);
    expect(ask.stderr).toMatch(/SBX_ERR_POLICY_NEEDS_APPROVAL/);
    expect(ask.stderr).toMatch(/sandboxd approvals approve ap_[0-9a-f]{12}/);
    expect(ask.stderr).toContain("limits.modes.test.maxTimeoutMs");

    const never = await cli(["exec", phase.id, "--timeout", "301", "--", "python3", "-V"], { socket: t.socket });
    expect(never.code).toBe(2);
    expect(never.stderr).toMatch(/SBX_ERR_TIMEOUT_RANGE/);
    expect(never.stderr).toContain("longer asks a person");
    expect(never.stderr).toContain("--max-timeout");
    expect(never.stderr).toContain("limits.modes.test.maxTimeoutMs");
  }, 60_000);
});
