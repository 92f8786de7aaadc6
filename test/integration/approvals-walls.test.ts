/**
 * "A person approves exactly what will run", attacked from inside real
 * sandboxes through the real daemon (and the real CLI for the listings):
 * an approved script edited before it runs, forbidden commands wrapped to
 * look like asks, a denial retried, a `.env` that points the shell and pip
 * elsewhere, and a command that rewrites itself on the operator's terminal.
 * Each outcome is checked with its audit record.
 */
import { chown, mkdir, readFile, stat, writeFile } from "node:fs/promises";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { Approval } from "../../src/approvals/queue.js";
import { SandboxdError } from "../../src/errors.js";
import type { ExecResult } from "../../src/phases/exec.js";
import type { PhaseView } from "../../src/phases/types.js";
import { OWNER, cli, makeProject, removeDir, requireEngineAndImage, startTestDaemon, writeScript, type TestDaemon } from "../helpers/sandbox.js";

let t: TestDaemon;
const cleanup: string[] = [];
let project: string;
let phase: PhaseView;

type Rec = Record<string, unknown> & { type: string; phase?: string };

async function startPhase(dir: string): Promise<PhaseView> {
  const { phase: p } = await t.api.request<{ phase: PhaseView }>("POST", "/v1/phases", { project: dir, phase: "9.1", mode: "test" });
  return p;
}

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

async function records(phaseId: string): Promise<Rec[]> {
  const text = await readFile(path.join(t.stateDir, "audit.jsonl"), "utf8");
  return text
    .split("\n")
    .filter(Boolean)
    .map((l) => JSON.parse(l) as Rec)
    .filter((r) => r.phase === phaseId);
}

async function decide(id: string, decision: "approve" | "deny", note?: string): Promise<Approval> {
  return (await t.api.request<{ approval: Approval }>("POST", `/v1/approvals/${id}/${decision}`, note ? { note } : {})).approval;
}

async function approvalsOf(phaseId: string): Promise<Approval[]> {
  return (await t.api.request<{ approvals: Approval[] }>("GET", `/v1/approvals?all=1&phase=${phaseId}`)).approvals;
}

async function exists(p: string): Promise<boolean> {
  return stat(p).then(
    () => true,
    () => false,
  );
}

async function ownedFile(file: string, text: string): Promise<void> {
  await mkdir(path.dirname(file), { recursive: true });
  await writeFile(file, text);
  await chown(path.dirname(file), OWNER.uid, OWNER.gid);
  await chown(file, OWNER.uid, OWNER.gid);
}

beforeAll(async () => {
  await requireEngineAndImage();
  t = await startTestDaemon();
  project = await makeProject();
  cleanup.push(project);
  phase = await startPhase(project);
});

afterAll(async () => {
  await t?.close();
  for (const d of cleanup) await removeDir(d);
});

describe("an approval is bound to the files the command runs", () => {
  it("an approved `sh x/helper.sh` edited by the agent afterwards is refused, recorded, and nothing of it runs", async () => {
    await ownedFile(path.join(project, "x", "helper.sh"), "touch /workspace/helper-ran\n");
    const asked = await refusal(exec(phase, { argv: ["sh", "x/helper.sh"], reason: "set up fixtures" }));
    expect(asked.code).toBe("SBX_ERR_POLICY_NEEDS_APPROVAL");
    const first = (asked.details as { approvalId: string }).approvalId;
    const shown = (await t.api.request<{ approval: Approval }>("GET", `/v1/approvals/${first}`)).approval;
    expect(shown.files).toEqual([{ path: "x/helper.sh", sha256: expect.stringMatching(/^[0-9a-f]{64}$/), note: null }]);
    await decide(first, "approve", "fixtures only");

    // the agent edits the approved script from inside the sandbox, with an allowed command
    const edit = await writeScript(project, "open('/workspace/x/helper.sh', 'w').write('touch /workspace/evil-ran\\n')");
    expect((await exec(phase, { argv: ["python3", edit] })).exitCode).toBe(0);

    const stale = await refusal(exec(phase, { argv: ["sh", "x/helper.sh"] }));
    expect(stale.code).toBe("SBX_ERR_APPROVAL_STALE");
    expect(stale.message).toContain("x/helper.sh changed");
    const second = (stale.details as { approvalId: string; staleApprovalId: string }).approvalId;
    expect((stale.details as { staleApprovalId: string }).staleApprovalId).toBe(first);
    expect(second).not.toBe(first);
    expect(await exists(path.join(project, "evil-ran"))).toBe(false);
    expect(await exists(path.join(project, "helper-ran"))).toBe(false);

    const list = await approvalsOf(phase.id);
    expect(list.find((a) => a.id === first)?.state).toBe("stale");
    const pending = list.find((a) => a.id === second)!;
    expect(pending.state).toBe("pending");
    expect(pending.files[0]!.sha256).not.toBe(shown.files[0]!.sha256);

    const recs = await records(phase.id);
    const verdict = recs.filter((r) => r.type === "exec.verdict" && JSON.stringify(r.argv) === '["sh","x/helper.sh"]').pop()!;
    expect(verdict).toMatchObject({ decision: "ask", approval: null, staleApproval: { approval: first, changed: ["x/helper.sh"] } });
    expect(recs.find((r) => r.type === "approval.stale")).toMatchObject({ approval: first, changed: ["x/helper.sh"] });
    expect(recs.filter((r) => r.type === "exec.result" && JSON.stringify(r.argv) === '["sh","x/helper.sh"]')).toHaveLength(0);
    const log = await readFile(phase.buildLog, "utf8");
    expect(log).toMatch(new RegExp(`\\[APPROVAL\\] \\[STALE\\] \\[sh x/helper.sh\\] \\[${first} not used: x/helper.sh changed`));

    // approving what is there now runs exactly that, once
    await decide(second, "approve");
    expect((await exec(phase, { argv: ["sh", "x/helper.sh"] })).exitCode).toBe(0);
    expect(await exists(path.join(project, "evil-ran"))).toBe(true);
    expect((await refusal(exec(phase, { argv: ["sh", "x/helper.sh"] }))).code).toBe("SBX_ERR_POLICY_NEEDS_APPROVAL");
  });

  it("binds `python -m pkg.mod` to the module's file", async () => {
    await ownedFile(path.join(project, "tools", "__init__.py"), "");
    await ownedFile(path.join(project, "tools", "job.py"), "print('job v1')\n");
    // -m of a project module is allowed; under env it asks, and is bound
    const asked = await refusal(exec(phase, { argv: ["env", "python3", "-m", "tools.job"] }));
    const id = (asked.details as { approvalId: string }).approvalId;
    const a = (await t.api.request<{ approval: Approval }>("GET", `/v1/approvals/${id}`)).approval;
    expect(a.files.filter((f) => f.sha256 !== null).map((f) => f.path)).toEqual(["tools/__init__.py", "tools/job.py"]);
    await decide(id, "approve");
    await ownedFile(path.join(project, "tools", "job.py"), "print('job v2')\n");
    expect((await refusal(exec(phase, { argv: ["env", "python3", "-m", "tools.job"] }))).code).toBe("SBX_ERR_APPROVAL_STALE");
  });
});

describe("a wrapped forbid is refused, never run", () => {
  const wrapped: string[][] = [
    ["sh", "-c", "rm -rf victim", "x"],
    ["bash", "-c", "rm -rf victim", "bash", "extra"],
    ["env", "rm", "-rf", "victim"],
    ["env", "-i", "X=1", "rm", "-r", "victim"],
    ["command", "rm", "-rf", "victim"],
    ["nice", "-n", "5", "rm", "-rf", "victim"],
    ["timeout", "5", "rm", "--rec", "victim"],
    ["xargs", "-a", "/dev/null", "rm", "-rf", "victim"],
    ["stdbuf", "-oL", "rm", "-R", "victim"],
    ["nohup", "rm", "-rf", "victim"],
    ["time", "rm", "-rf", "victim"],
    ["nice", "timeout", "5", "env", "nohup", "rm", "-rf", "victim"],
    ["find", "victim", "-maxdepth", "0", "-exec", "rm", "-rf", "{}", ";"],
  ];

  it("every wrapper of `rm -rf victim`: SBX_ERR_POLICY_DENIED by the inner rule, the directory still there", async () => {
    await ownedFile(path.join(project, "victim", "keep.txt"), "keep\n");
    for (const argv of wrapped) {
      const e = await refusal(exec(phase, { argv }));
      expect({ argv, code: e.code, rule: (e.details as { rule: string }).rule }).toEqual({
        argv,
        code: "SBX_ERR_POLICY_DENIED",
        rule: "shell.forbidden.rm-recursive",
      });
    }
    expect(await readFile(path.join(project, "victim", "keep.txt"), "utf8")).toBe("keep\n");
    const verdicts = (await records(phase.id)).filter((r) => r.type === "exec.verdict" && wrapped.some((w) => JSON.stringify(w) === JSON.stringify(r.argv)));
    expect(verdicts).toHaveLength(wrapped.length);
    for (const v of verdicts) {
      expect(v).toMatchObject({ decision: "forbid", rule: "shell.forbidden.rm-recursive" });
      const parts = v.parts as Array<{ argv: string[]; decision: string; rule: string }>;
      expect(parts.some((p) => p.argv[0] === "rm" && p.decision === "forbid" && p.rule === "shell.forbidden.rm-recursive")).toBe(true);
    }
    // no approval request was made for any of them
    const approvals = await approvalsOf(phase.id);
    expect(approvals.filter((a) => wrapped.some((w) => JSON.stringify(w) === JSON.stringify(a.argv)))).toEqual([]);
  });

  it("kill -sKILL, ip addr fl lo and docker-compose down --volume are forbidden, not asked", async () => {
    for (const [argv, rule] of [
      [["kill", "-sKILL", "1"], "shell.forbidden.kill-9"],
      [["kill", "-n", "9", "1"], "shell.forbidden.kill-9"],
      [["ip", "addr", "fl", "lo"], "shell.forbidden.netconfig-ip"],
      [["docker-compose", "down", "--volume"], "shell.forbidden.compose-down-volumes"],
    ] as Array<[string[], string]>) {
      const e = await refusal(exec(phase, { argv }));
      expect({ argv, code: e.code, rule: (e.details as { rule: string }).rule }).toEqual({ argv, code: "SBX_ERR_POLICY_DENIED", rule });
    }
  });

  it("python3 -m timeit CODE asks instead of running the code", async () => {
    const e = await refusal(exec(phase, { argv: ["python3", "-m", "timeit", "-n", "1", "open('/workspace/timeit-ran', 'w')"] }));
    expect(e.code).toBe("SBX_ERR_POLICY_NEEDS_APPROVAL");
    expect((e.details as { rule: string }).rule).toBe("shell.python-inline-module");
    expect(await exists(path.join(project, "timeit-ran"))).toBe(false);
  });
});

describe("a denial reaches the agent", () => {
  it("a retry of a denied command is answered with the denial and the note, and makes no new request, until a person approves it", async () => {
    const argv = ["touch", "/workspace/denied-ran"];
    const asked = await refusal(exec(phase, { argv }));
    const id = (asked.details as { approvalId: string }).approvalId;
    await decide(id, "deny", "no markers in this phase");
    for (const reason of [undefined, "please, it is harmless"]) {
      const e = await refusal(exec(phase, { argv, ...(reason ? { reason } : {}) }));
      expect(e.code).toBe("SBX_ERR_APPROVAL_DENIED");
      expect(e.message).toContain("a human denied");
      expect(e.message).toContain(id);
      expect(e.message).toContain("no markers in this phase");
      expect(e.details).toMatchObject({ approvalId: id, note: "no markers in this phase" });
    }
    const mine = (await approvalsOf(phase.id)).filter((a) => JSON.stringify(a.argv) === JSON.stringify(argv));
    expect(mine.map((a) => [a.id, a.state, a.retries])).toEqual([[id, "denied", 2]]);
    const verdicts = (await records(phase.id)).filter((r) => r.type === "exec.verdict" && JSON.stringify(r.argv) === JSON.stringify(argv));
    expect(verdicts.map((v) => v.deniedBy)).toEqual([null, id, id]);
    expect(await exists(path.join(project, "denied-ran"))).toBe(false);

    // the person says otherwise
    await decide(id, "approve", "fine after all");
    expect((await exec(phase, { argv })).exitCode).toBe(0);
    expect(await exists(path.join(project, "denied-ran"))).toBe(true);
    expect((await records(phase.id)).find((r) => r.type === "approval.approve" && r.approval === id)).toMatchObject({ previous: "denied" });
  });

  it("a reason given on a retry of a pending request is attached to it and recorded", async () => {
    const argv = ["touch", "/workspace/pending-ran"];
    const asked = await refusal(exec(phase, { argv, reason: "first reason" }));
    const id = (asked.details as { approvalId: string }).approvalId;
    const again = await refusal(exec(phase, { argv, reason: "it marks the fixture as built" }));
    expect((again.details as { approvalId: string }).approvalId).toBe(id);
    const a = (await t.api.request<{ approval: Approval }>("GET", `/v1/approvals/${id}`)).approval;
    expect(a.requestReason).toBe("first reason");
    expect(a.laterReasons.map((r) => r.reason)).toEqual(["it marks the fixture as built"]);
    expect((await records(phase.id)).find((r) => r.type === "approval.reason" && r.approval === id)).toMatchObject({ reason: "it marks the fixture as built" });
    const show = await cli(["approvals", "show", id], { socket: t.socket });
    expect(show.stdout).toMatch(/later reason:\s+\S+ it marks the fixture as built/);
  });
});

describe("the operator's listings show what will run", () => {
  it("approvals ls / show, audit tail and ps print no raw control or format character; --json stays exact", async () => {
    const disguised = "/workspace/x #\u001b[35Dpytest -q tests/\u001b[K";
    const bidi = "notes\u202etxt.py\r\u0008";
    const asked = await refusal(exec(phase, { argv: ["touch", disguised, bidi] }));
    const id = (asked.details as { approvalId: string }).approvalId;
    // the refusal the agent's CLI prints is escaped too
    const viaCli = await cli(["exec", phase.id, "--", "touch", disguised, bidi], { socket: t.socket });
    expect(viaCli.code).toBe(126);

    const outputs = [
      viaCli.stderr,
      (await cli(["approvals", "ls"], { socket: t.socket })).stdout,
      (await cli(["approvals", "ls", "--all", "--phase", phase.id], { socket: t.socket })).stdout,
      (await cli(["approvals", "show", id], { socket: t.socket })).stdout,
      (await cli(["audit", "tail", "-n", "50"], { socket: t.socket })).stdout,
      (await cli(["audit", "show", phase.id], { socket: t.socket })).stdout,
      (await cli(["ps"], { socket: t.socket })).stdout,
    ];
    for (const out of outputs) {
      // nothing but newlines among the control characters, no format characters
      expect(out.replace(/\n/g, "")).not.toMatch(/[\p{Cc}\p{Cf}\u2028\u2029]/u);
    }
    const shown = `touch $'/workspace/x #\\x1b[35Dpytest -q tests/\\x1b[K' $'notes\\u202etxt.py\\r\\x08'`;
    expect(outputs[1]).toContain(id);
    expect(outputs[1]).toContain(shown);
    expect(outputs[3]).toContain(shown);
    expect(outputs[0]).toContain("\\x1b[35D");
    const json = JSON.parse((await cli(["approvals", "ls", "--json"], { socket: t.socket })).stdout) as Approval[];
    expect(json.find((a) => a.id === id)?.argv).toEqual(["touch", disguised, bidi]);
    const one = JSON.parse((await cli(["approvals", "show", id, "--json"], { socket: t.socket })).stdout) as Approval;
    expect(one.argv).toEqual(["touch", disguised, bidi]);
  });
});

describe(".env cannot change what runs or where packages come from", () => {
  it("BASH_ENV, ENV, PIP_* and Python's startup variables are dropped, named at phase start, and not used", async () => {
    const dir = await makeProject();
    cleanup.push(dir);
    await ownedFile(path.join(dir, "evil.sh"), "touch /workspace/bash-env-ran\n");
    await ownedFile(path.join(dir, "evil.py"), "open('/workspace/startup-ran', 'w')\n");
    await ownedFile(path.join(dir, "pip.conf"), "[global]\nindex-url = https://evil.example/cfg\n");
    await ownedFile(
      path.join(dir, ".env"),
      [
        "BASH_ENV=/workspace/evil.sh",
        "ENV=/workspace/evil.sh",
        "PIP_INDEX_URL=https://evil.example/simple",
        "PIP_EXTRA_INDEX_URL=https://evil.example/extra",
        "PIP_CONFIG_FILE=/workspace/pip.conf",
        "PYTHONSTARTUP=/workspace/evil.py",
        "PYTHONINSPECT=1",
        "PYTHONPATH=/workspace/evil",
        "LD_PRELOAD=/workspace/evil.so",
        "GCONV_PATH=/workspace/g",
        "LOG_LEVEL=debug",
        "",
      ].join("\n"),
    );
    const p = await startPhase(dir);
    const start = (await records(p.id)).find((r) => r.type === "phase.start")!;
    expect(start.envReserved).toEqual([
      "BASH_ENV", "ENV", "GCONV_PATH", "LD_PRELOAD", "PIP_CONFIG_FILE", "PIP_EXTRA_INDEX_URL", "PIP_INDEX_URL", "PYTHONINSPECT", "PYTHONPATH", "PYTHONSTARTUP",
    ]);
    expect(JSON.stringify(start)).not.toContain("evil.example");
    expect(await readFile(p.buildLog, "utf8")).toMatch(/\[ENV\] \[RESERVED\] \[\.env\] \[not given to commands: BASH_ENV, ENV, /);

    // bash -c true (approved) does not source BASH_ENV
    const asked = await refusal(exec(p, { argv: ["bash", "-c", "true"] }));
    await decide((asked.details as { approvalId: string }).approvalId, "approve");
    expect((await exec(p, { argv: ["bash", "-c", "true"] })).exitCode).toBe(0);
    expect(await exists(path.join(dir, "bash-env-ran"))).toBe(false);

    // the commands see the daemon's values, and .env's harmless ones
    const show = await writeScript(dir, "import json, os; print(json.dumps({k: os.environ.get(k) for k in ['BASH_ENV', 'ENV', 'PIP_INDEX_URL', 'PIP_EXTRA_INDEX_URL', 'PIP_CONFIG_FILE', 'PYTHONSTARTUP', 'LD_PRELOAD', 'LOG_LEVEL']}))");
    const env = JSON.parse((await exec(p, { argv: ["python3", show] })).stdout) as Record<string, string | null>;
    expect(env).toEqual({
      BASH_ENV: null,
      ENV: null,
      PIP_INDEX_URL: "https://pypi.org/simple",
      PIP_EXTRA_INDEX_URL: null,
      PIP_CONFIG_FILE: null,
      PYTHONSTARTUP: null,
      LD_PRELOAD: null,
      LOG_LEVEL: "debug",
    });
    expect(await exists(path.join(dir, "startup-ran"))).toBe(false);
    const pip = await exec(p, { argv: ["python3", "-m", "pip", "config", "list"] });
    expect(pip.exitCode).toBe(0);
    expect(pip.stdout).toContain("https://pypi.org/simple");
    expect(pip.stdout).not.toContain("evil.example");
    await t.api.request("DELETE", `/v1/phases/${p.id}`);
  });
});
