/**
 * Approvals that scale, through the real daemon, real sandboxes and the real
 * CLI: an exec that waits for a person's decision (approved mid-wait it runs,
 * denied it gets the note, unanswered it gets the id, its client gone it
 * leaves no waiter).
 */
import { spawn, type ChildProcess } from "node:child_process";
import { createServer } from "node:http";
import { chown, mkdir, readFile, writeFile } from "node:fs/promises";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { Approval } from "../../src/approvals/queue.js";
import { SandboxdError } from "../../src/errors.js";
import type { ExecResult } from "../../src/phases/exec.js";
import type { PhaseView } from "../../src/phases/types.js";
import { CLI, OWNER, cli, tempDir, makeProject, removeDir, requireEngineAndImage, startTestDaemon, waitExit, writeScript, type TestDaemon } from "../helpers/sandbox.js";

let t: TestDaemon;
const cleanup: string[] = [];
let project: string;
let phase: PhaseView;

type Rec = Record<string, unknown> & { type: string; phase?: string };
type Shown = Approval & { waiting: number };

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

async function shown(id: string): Promise<Shown> {
  return (await t.api.request<{ approval: Shown }>("GET", `/v1/approvals/${id}`)).approval;
}

/** Whether the sandbox sees the file (writes land in the phase's layer, not the project, until accepted). */
async function exists(rel: string): Promise<boolean> {
  const probe = await writeScript(project, "import os, sys; print(os.path.exists(sys.argv[1]))");
  const r = await exec(phase, { argv: ["python3", probe, rel] });
  return r.stdout.trim() === "True";
}

async function ownedFile(file: string, text: string): Promise<void> {
  await mkdir(path.dirname(file), { recursive: true });
  await writeFile(file, text);
  await chown(path.dirname(file), OWNER.uid, OWNER.gid);
  await chown(file, OWNER.uid, OWNER.gid);
}

/** The real CLI as its own process, its output watched as it comes. */
function liveCli(args: string[]): { child: ChildProcess; out: () => string; err: () => string; until: (re: RegExp) => Promise<RegExpMatchArray> } {
  const child = spawn(process.execPath, [CLI, "--socket", t.socket, ...args], { stdio: ["ignore", "pipe", "pipe"] });
  let stdout = "";
  let stderr = "";
  child.stdout!.on("data", (c: Buffer) => (stdout += c.toString()));
  child.stderr!.on("data", (c: Buffer) => (stderr += c.toString()));
  const until = async (re: RegExp) => {
    for (let i = 0; i < 600; i++) {
      const m = stderr.match(re);
      if (m) return m;
      await new Promise((r) => setTimeout(r, 50));
    }
    throw new Error(`never printed ${re}; stderr: ${stderr}`);
  };
  return { child, out: () => stdout, err: () => stderr, until };
}

beforeAll(async () => {
  await requireEngineAndImage();
  t = await startTestDaemon();
  project = await makeProject();
  cleanup.push(project);
  const { phase: p } = await t.api.request<{ phase: PhaseView }>("POST", "/v1/phases", { project, phase: "9.2", mode: "test" });
  phase = p;
}, 120_000);

afterAll(async () => {
  await t?.close();
  for (const d of cleanup) await removeDir(d);
});

describe("exec --wait-approval", () => {
  it("approved mid-wait, the command runs in the same call, and the CLI said what it waited for", async () => {
    await ownedFile(path.join(project, "w", "a.sh"), "echo approved-and-ran; touch /workspace/w/a-ran\n");
    const run = liveCli(["exec", phase.id, "--wait-approval=60", "--", "sh", "w/a.sh"]);
    const m = await run.until(/waiting for approval (ap_[0-9a-f]{12}) of `sh w\/a\.sh` \(rule ([\w.-]+)[^)]*\).*a person can run: sandboxd approvals approve (ap_[0-9a-f]{12})/);
    const id = m[1]!;
    expect(m[3]).toBe(id);
    expect((await shown(id)).waiting).toBe(1);
    expect(await exists("w/a-ran")).toBe(false);
    await decide(id, "approve", "fine");
    expect(await waitExit(run.child, 60_000)).toBe(0);
    expect(run.out()).toContain("approved-and-ran");
    expect(await exists("w/a-ran")).toBe(true);
    const a = await shown(id);
    expect(a.state).toBe("used");
    expect(a.waiting).toBe(0);
    // the trail: the request, the person's decision, then the command with that approval
    const recs = (await records(phase.id)).filter((r) => r.approval === id || (r.type.startsWith("exec.") && JSON.stringify(r.argv) === '["sh","w/a.sh"]'));
    expect(recs.map((r) => r.type)).toEqual(["exec.verdict", "approval.request", "approval.approve", "exec.verdict", "exec.result"]);
    expect(recs[0]).toMatchObject({ decision: "ask", waitApprovalMs: 60_000 });
    expect(recs[3]).toMatchObject({ decision: "allow", approval: id });
  }, 120_000);

  it("denied mid-wait, the caller gets the denial with the person's note (exit 126), and nothing runs", async () => {
    await ownedFile(path.join(project, "w", "d.sh"), "touch /workspace/w/d-ran\n");
    const run = liveCli(["exec", phase.id, "--wait-approval", "--", "sh", "w/d.sh"]);
    const id = (await run.until(/waiting for approval (ap_[0-9a-f]{12})/))[1]!;
    expect(run.err()).toContain("up to 600 s");
    await decide(id, "deny", "not on a Friday");
    expect(await waitExit(run.child, 60_000)).toBe(126);
    expect(run.err()).toContain("SBX_ERR_APPROVAL_DENIED");
    expect(run.err()).toContain("not on a Friday");
    expect(await exists("w/d-ran")).toBe(false);
    expect((await shown(id)).waiting).toBe(0);
  }, 120_000);

  it("no decision in time: the usual needs-approval refusal with the id, and no waiter left", async () => {
    await ownedFile(path.join(project, "w", "t.sh"), "touch /workspace/w/t-ran\n");
    const started = Date.now();
    const e = await refusal(exec(phase, { argv: ["sh", "w/t.sh"], waitApprovalMs: 1500 }));
    expect(Date.now() - started).toBeGreaterThanOrEqual(1400);
    expect(e.code).toBe("SBX_ERR_POLICY_NEEDS_APPROVAL");
    const id = (e.details as { approvalId: string }).approvalId;
    expect(id).toMatch(/^ap_[0-9a-f]{12}$/);
    expect(e.hint).toContain(`sandboxd approvals approve ${id}`);
    const a = await shown(id);
    expect(a.state).toBe("pending");
    expect(a.waiting).toBe(0);
    expect(await exists("w/t-ran")).toBe(false);
  }, 60_000);

  it("a wait over the cap is refused as invalid before anything is judged", async () => {
    const e = await refusal(exec(phase, { argv: ["sh", "w/t.sh"], waitApprovalMs: 3_600_001 }));
    expect(e.code).toBe("SBX_ERR_VALIDATION");
    expect(e.message).toContain("waitApprovalMs");
  });

  it("the client going away mid-wait removes its waiter; approving afterwards runs nothing", async () => {
    await ownedFile(path.join(project, "w", "g.sh"), "touch /workspace/w/g-ran\n");
    const run = liveCli(["exec", phase.id, "--wait-approval=60", "--", "sh", "w/g.sh"]);
    const id = (await run.until(/waiting for approval (ap_[0-9a-f]{12})/))[1]!;
    expect((await shown(id)).waiting).toBe(1);
    run.child.kill("SIGKILL");
    await waitExit(run.child, 10_000);
    let waiting = 1;
    for (let i = 0; i < 100 && waiting > 0; i++) {
      await new Promise((r) => setTimeout(r, 50));
      waiting = (await shown(id)).waiting;
    }
    expect(waiting).toBe(0);
    await decide(id, "approve");
    await new Promise((r) => setTimeout(r, 500));
    expect(await exists("w/g-ran")).toBe(false);
    expect((await shown(id)).state).toBe("approved");
  }, 60_000);
});

describe("standing approvals", () => {
  const grantCli = async (args: string[]) => {
    const r = await cli(["approvals", "grant", ...args], { socket: t.socket });
    expect(r.code, r.stderr).toBe(0);
    return r.stdout.match(/(gr_[0-9a-f]{12}) granted until/)![1]!;
  };

  it("a grant lets the same command run without asking, bound to the script's content, until revoked; every use audited", async () => {
    await ownedFile(path.join(project, "g", "x.sh"), "echo granted-ran\n");
    expect((await refusal(exec(phase, { argv: ["sh", "g/x.sh"] }))).code).toBe("SBX_ERR_POLICY_NEEDS_APPROVAL");
    const id = await grantCli(["--phase", phase.id, "--argv", "sh g/x.sh", "--expires", "2h", "--note", "fixtures"]);
    for (let i = 0; i < 2; i++) expect((await exec(phase, { argv: ["sh", "g/x.sh"] })).stdout).toContain("granted-ran");
    const listed = await cli(["approvals", "grants"], { socket: t.socket });
    expect(listed.stdout).toMatch(new RegExp(`${id}.*sh g/x.sh.*\\b2\\b.*active`));
    const recs = await records(phase.id);
    expect(recs.find((r) => r.type === "grant.create")).toMatchObject({ grant: id, argv: ["sh", "g/x.sh"], note: "fixtures" });
    expect(recs.filter((r) => r.type === "exec.verdict" && r.grant === id)).toHaveLength(2);
    expect(await readFile(phase.buildLog, "utf8")).toContain(`grant=${id}`);

    // an edited script is not what the person granted
    await ownedFile(path.join(project, "g", "x.sh"), "echo edited\n");
    expect((await refusal(exec(phase, { argv: ["sh", "g/x.sh"] }))).code).toBe("SBX_ERR_POLICY_NEEDS_APPROVAL");
    await ownedFile(path.join(project, "g", "x.sh"), "echo granted-ran\n");
    expect((await exec(phase, { argv: ["sh", "g/x.sh"] })).exitCode).toBe(0);

    const revoked = await cli(["approvals", "revoke", id, "--note", "done"], { socket: t.socket });
    expect(revoked.code, revoked.stderr).toBe(0);
    expect((await refusal(exec(phase, { argv: ["sh", "g/x.sh"] }))).code).toBe("SBX_ERR_POLICY_NEEDS_APPROVAL");
    expect((await records(phase.id)).find((r) => r.type === "grant.revoke")).toMatchObject({ grant: id, note: "done", uses: 3 });
  }, 120_000);

  it("a project grant by pattern covers its phases until it expires", async () => {
    await ownedFile(path.join(project, "g", "p1.sh"), "echo p1\n");
    const id = await grantCli(["--project", project, "--pattern", '["sh", {"prefix": "g/p"}]', "--expires", "3s"]);
    expect((await exec(phase, { argv: ["sh", "g/p1.sh"] })).stdout).toContain("p1");
    await new Promise((r) => setTimeout(r, 3200));
    expect((await refusal(exec(phase, { argv: ["sh", "g/p1.sh"] }))).code).toBe("SBX_ERR_POLICY_NEEDS_APPROVAL");
    const all = await cli(["approvals", "grants", "--all"], { socket: t.socket });
    expect(all.stdout).toMatch(new RegExp(`${id}.*expired`));
  }, 60_000);

  it("a grant never lifts a forbid", async () => {
    await grantCli(["--phase", phase.id, "--pattern", "rm", "--expires", "1h"]);
    const e = await refusal(exec(phase, { argv: ["rm", "-rf", "/"] }));
    expect(e.code).toBe("SBX_ERR_POLICY_DENIED");
    const v = (await records(phase.id)).filter((r) => r.type === "exec.verdict").pop()!;
    expect(v).toMatchObject({ decision: "forbid", grant: null });
  }, 60_000);
});

describe("the notification hook", () => {
  it("SANDBOXD_NOTIFY_COMMAND gets each new request as JSON on stdin, and SANDBOXD_NOTIFY_URL gets it POSTed; a failing notifier fails nothing", async () => {
    const out = await tempDir("notify");
    cleanup.push(out);
    const posted: string[] = [];
    const server = createServer((req, res) => {
      let b = "";
      req.on("data", (c: Buffer) => (b += c.toString()));
      req.on("end", () => {
        posted.push(b);
        res.end("ok");
      });
    });
    await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
    const port = (server.address() as { port: number }).port;
    const n = await startTestDaemon({
      env: { SANDBOXD_NOTIFY_COMMAND: `cat > ${out}/$SANDBOXD_APPROVAL_ID.json; exit 3`, SANDBOXD_NOTIFY_URL: `http://127.0.0.1:${port}/hook` },
    });
    try {
      const dir = await makeProject();
      cleanup.push(dir);
      await ownedFile(path.join(dir, "n.sh"), "true\n");
      const { phase: p } = await n.api.request<{ phase: PhaseView }>("POST", "/v1/phases", { project: dir, phase: "9.3", mode: "test" });
      const e = await refusal(n.api.request("POST", `/v1/phases/${p.id}/exec`, { argv: ["sh", "n.sh"], reason: "notify me" }));
      expect(e.code).toBe("SBX_ERR_POLICY_NEEDS_APPROVAL");
      const id = (e.details as { approvalId: string }).approvalId;
      const file = path.join(out, `${id}.json`);
      let text = "";
      for (let i = 0; i < 100 && (text === "" || posted.length === 0); i++) {
        await new Promise((r) => setTimeout(r, 50));
        text = await readFile(file, "utf8").catch(() => "");
      }
      const got = JSON.parse(text) as { event: string; approval: Approval };
      expect(got.event).toBe("approval.request");
      expect(got.approval).toMatchObject({ id, argv: ["sh", "n.sh"], state: "pending", requestReason: "notify me" });
      expect(JSON.parse(posted[0]!)).toMatchObject({ event: "approval.request", approval: { id } });
      // a retry of the pending request is no new request: no second notification
      await refusal(n.api.request("POST", `/v1/phases/${p.id}/exec`, { argv: ["sh", "n.sh"] }));
      await new Promise((r) => setTimeout(r, 300));
      expect(posted).toHaveLength(1);
    } finally {
      await n.close();
      server.close();
    }
  }, 120_000);

  it("a notify URL that is neither https nor loopback is refused at start", async () => {
    await expect(startTestDaemon({ env: { SANDBOXD_NOTIFY_URL: "http://example.com/hook" } })).rejects.toThrow(/neither https nor a loopback/);
  });
});
