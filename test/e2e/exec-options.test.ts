/**
 * Exec's working directory, environment and stdin, background jobs and
 * cancel by id, against the real daemon and a real sandbox, through the
 * exported TypeScript client, the real CLI and the Python client; the
 * escapes are attempted from inside the sandbox, and each outcome is
 * checked in the audit trail.
 */
import { execFile, spawn } from "node:child_process";
import { createHash } from "node:crypto";
import { chown, mkdir, symlink, writeFile } from "node:fs/promises";
import path from "node:path";
import { promisify } from "node:util";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Sandboxd, SandboxdError, type AuditRecord } from "sandboxd";
import { CLI, OWNER, ROOT, cli, makeProject, removeDir, requireEngineAndImage, startTestDaemon, writeScript, type TestDaemon } from "../helpers/sandbox.js";

let d: TestDaemon;
let sbx: Sandboxd;
let project: string;
let phaseId: string;
const scripts: Record<string, string> = {};

const CODE = {
  // where it runs, what it was given
  where: "import os, sys, hashlib\ndata = sys.stdin.buffer.read()\nprint(os.getcwd())\nprint(os.environ.get('SBX_TEST_VAR', '<unset>'))\nprint(len(data), hashlib.sha256(data).hexdigest())",
  // a link out of the workspace, made from inside the sandbox
  link: "import os\nos.symlink('/etc', 'escape_from_inside')\nprint('linked')",
  // prints, then waits: a job to watch, kill or cancel
  slow: "import sys, time\nprint('ready', flush=True)\ntime.sleep(float(sys.argv[1]) if len(sys.argv) > 1 else 30)\nprint('done', flush=True)",
  // leaves a grandchild in a session of its own, writes its pid, exits
  leaver: "import subprocess, os\np = subprocess.Popen(['sleep', '300'], start_new_session=True)\nopen('/tmp/leaver.pid', 'w').write(str(p.pid))\nprint(p.pid)",
  alive: "import os\npid = open('/tmp/leaver.pid').read().strip()\nprint('alive' if os.path.exists('/proc/' + pid) else 'gone')",
};

beforeAll(async () => {
  await requireEngineAndImage();
  d = await startTestDaemon();
  sbx = new Sandboxd({ socket: d.socket });
  project = await makeProject();
  for (const [k, v] of Object.entries(CODE)) scripts[k] = `/workspace/${await writeScript(project, v)}`;
  // a link out of the workspace that was in the project before the phase began
  await symlink("/etc", path.join(project, "escape"));
  await mkdir(path.join(project, "services", "api"));
  await writeFile(path.join(project, "services", "api", "x.txt"), "x\n");
  await promisify(execFile)("chown", ["-R", `${OWNER.uid}:${OWNER.gid}`, project]);
  await chown(path.join(project, "escape"), OWNER.uid, OWNER.gid).catch(() => undefined);
  phaseId = (await sbx.startPhase({ project, phase: "12.2", mode: "test" })).id;
}, 120_000);

afterAll(async () => {
  await d?.close();
  if (project) await removeDir(project);
});

async function records(type: string): Promise<Array<AuditRecord & Record<string, unknown>>> {
  return (await sbx.audit({ phase: phaseId })).filter((r) => r.type === type) as Array<AuditRecord & Record<string, unknown>>;
}

async function refusal(p: Promise<unknown>): Promise<SandboxdError> {
  const e = await p.then(
    () => null,
    (err: unknown) => err,
  );
  expect(e).toBeInstanceOf(SandboxdError);
  return e as SandboxdError;
}

describe("exec: cwd, env, stdin", () => {
  it("runs in the directory, with the variable and the bytes given; the trail keeps names, sizes and hashes, never values", async () => {
    const input = Buffer.from([0, 1, 2, 255, 10, 65]);
    const r = await sbx.exec(phaseId, { argv: ["python3", scripts.where!], cwd: "services/api", env: { SBX_TEST_VAR: "v-4f1c9e" }, stdin: input });
    expect(r.exitCode).toBe(0);
    const sha = createHash("sha256").update(input).digest("hex");
    expect(r.stdout.split("\n")).toEqual(["/workspace/services/api", "v-4f1c9e", `${input.length} ${sha}`, ""]);
    expect(r.id).toMatch(/^ex_[0-9a-f]{12}$/);
    const v = (await records("exec.verdict")).find((x) => x.id === r.id)!;
    expect(v).toMatchObject({ cwd: "services/api", env: ["SBX_TEST_VAR"], stdin: { bytes: input.length, sha256: sha }, background: false });
    expect(JSON.stringify(v)).not.toContain("v-4f1c9e");
    // without them: the workspace, nothing set, an empty stdin (/dev/null)
    const plain = await sbx.exec(phaseId, { argv: ["python3", scripts.where!] });
    expect(plain.stdout.split("\n").slice(0, 3)).toEqual(["/workspace", "<unset>", `0 ${createHash("sha256").digest("hex")}`]);
  });

  it("refuses a cwd out of the workspace, by path or through a link made inside the sandbox, and records the attempt", async () => {
    for (const cwd of ["..", "/etc", "../workspace2", "escape", "escape/ssl", "nope", "services/calc.py"]) {
      const e = await refusal(sbx.exec(phaseId, { argv: ["python3", scripts.where!], cwd }));
      expect([cwd, e.code]).toEqual([cwd, "SBX_ERR_EXEC_CWD"]);
    }
    // the agent makes the link itself, in its view of the workspace
    expect((await sbx.exec(phaseId, { argv: ["python3", scripts.link!] })).stdout).toBe("linked\n");
    const e = await refusal(sbx.exec(phaseId, { argv: ["python3", scripts.where!], cwd: "escape_from_inside" }));
    expect(e.code).toBe("SBX_ERR_EXEC_CWD");
    expect(e.message).toContain("symbolic link");
    const refused = await records("exec.refused");
    expect(refused.map((r) => r.cwd)).toEqual(expect.arrayContaining(["..", "/etc", "escape", "escape_from_inside"]));
    expect(refused.every((r) => r.code === "SBX_ERR_EXEC_CWD")).toBe(true);
    // none of them ran: no verdict names those directories
    expect((await records("exec.verdict")).filter((r) => String(r.cwd).includes("escape"))).toEqual([]);
  });

  it("refuses reserved variable names (the .env list) and names no values in the record", async () => {
    const tries: Array<Record<string, string>> = [{ LD_PRELOAD: "/tmp/x.so" }, { PATH: "/tmp" }, { PYTHONPATH: "/tmp" }, { SANDBOXD_PHASE: "x" }, { PIP_INDEX_URL: "http://evil" }];
    for (const env of tries) {
      const e = await refusal(sbx.exec(phaseId, { argv: ["python3", scripts.where!], env }));
      expect(e.code).toBe("SBX_ERR_ENV_RESERVED");
    }
    const bad = await refusal(sbx.exec(phaseId, { argv: ["python3", scripts.where!], env: { "A=B": "x" } }));
    expect(bad.code).toBe("SBX_ERR_VALIDATION");
    const refused = (await records("exec.refused")).filter((r) => r.code === "SBX_ERR_ENV_RESERVED");
    expect(refused.map((r) => r.env)).toEqual(expect.arrayContaining([["LD_PRELOAD"], ["PATH"], ["PIP_INDEX_URL"]]));
    expect(JSON.stringify(refused)).not.toContain("http://evil");
  });

  it("an approval is bound to the directory it was asked in: approved in one, it does not run in another", async () => {
    const asked = await refusal(sbx.exec(phaseId, { argv: ["ls", "-1"] }));
    expect(asked.code).toBe("SBX_ERR_POLICY_NEEDS_APPROVAL");
    const id = (asked.details as { approvalId: string }).approvalId;
    await sbx.approve(id, "a listing of the workspace");
    const elsewhere = await refusal(sbx.exec(phaseId, { argv: ["ls", "-1"], cwd: "services" }));
    expect(elsewhere.code).toBe("SBX_ERR_APPROVAL_STALE");
    const fresh = await sbx.approval((elsewhere.details as { approvalId: string }).approvalId);
    // the person sees the directory in the new request
    expect(fresh.files).toEqual([{ path: "/workspace/services/", sha256: null, note: "working directory" }]);
    expect((await records("exec.verdict")).filter((r) => Array.isArray(r.argv) && r.argv[0] === "ls" && r.decision === "allow")).toEqual([]);
  });

  it("caps stdin at 512 KiB", async () => {
    const e = await refusal(sbx.exec(phaseId, { argv: ["python3", scripts.where!], stdin: Buffer.alloc(512 * 1024 + 1) }));
    expect(e.code).toBe("SBX_ERR_REQUEST_TOO_LARGE");
    const ok = await sbx.exec(phaseId, { argv: ["python3", scripts.where!], stdin: Buffer.alloc(512 * 1024, 7) });
    expect(ok.stdout.split("\n")[2]).toMatch(/^524288 /);
  });
});

describe("background jobs", () => {
  it("start, output, wait: the job answers at once and outlives its request", async () => {
    const t0 = Date.now();
    const job = await sbx.startJob(phaseId, { argv: ["python3", scripts.slow!, "3"], cwd: "services" });
    expect(Date.now() - t0).toBeLessThan(3000);
    expect(job).toMatchObject({ state: "running", cwd: "services" });
    expect(job.id).toMatch(/^jb_[0-9a-f]{12}$/);
    expect((await sbx.execs(phaseId)).map((e) => e.id)).toContain(job.id);
    let out = await sbx.jobOutput(phaseId, job.id);
    for (let i = 0; i < 50 && !out.stdout.includes("ready\n"); i++) {
      await new Promise((r) => setTimeout(r, 100));
      out = await sbx.jobOutput(phaseId, job.id);
    }
    expect(out.stdout).toBe("ready\n");
    const still = await sbx.waitJob(phaseId, job.id, 200);
    expect(still.state).toBe("running");
    const ended = await sbx.waitJob(phaseId, job.id, 20_000);
    expect(ended.state).toBe("exited");
    expect(ended.result).toMatchObject({ exitCode: 0, stdout: "ready\ndone\n", id: job.id, cancelled: null });
    expect((await sbx.jobs(phaseId)).find((j) => j.id === job.id)?.state).toBe("exited");
    const v = (await records("exec.verdict")).find((r) => r.id === job.id)!;
    expect(v).toMatchObject({ background: true, cwd: "services" });
    expect((await records("exec.result")).find((r) => r.id === job.id)).toMatchObject({ exitCode: 0 });
  });

  it("a job is refused as any command is, and nothing is listed", async () => {
    const e = await refusal(sbx.startJob(phaseId, { argv: ["rm", "-rf", "/workspace"] }));
    expect(e.code).toBe("SBX_ERR_POLICY_DENIED");
    expect((await sbx.jobs(phaseId)).some((j) => j.argv?.[0] === "rm")).toBe(false);
  });

  it("kill: SIGTERM, recorded before the signal; what the job started goes with it", async () => {
    const job = await sbx.startJob(phaseId, { argv: ["python3", scripts.slow!, "50"] });
    const killed = await sbx.killJob(phaseId, job.id, "enough");
    expect(killed.state).toBe("exited");
    expect(killed.result).toMatchObject({ exitCode: null, signal: "SIGTERM", cancelled: { note: "enough" } });
    const cancel = (await records("exec.cancel")).find((r) => r.id === job.id)!;
    const result = (await records("exec.result")).find((r) => r.id === job.id)!;
    expect(cancel).toMatchObject({ background: true, note: "enough" });
    expect(cancel.seq).toBeLessThan(result.seq);
    expect(result.cancelled).toMatchObject({ note: "enough" });
    // the job's own boundary: a grandchild in a session of its own dies with the job
    const leaver = await sbx.startJob(phaseId, { argv: ["python3", scripts.leaver!] });
    expect((await sbx.waitJob(phaseId, leaver.id, 20_000)).result?.exitCode).toBe(0);
    expect((await sbx.exec(phaseId, { argv: ["python3", scripts.alive!] })).stdout).toBe("gone\n");
  });

  it("the CLI: --background prints the id; jobs ls, output, wait; cancel; the stop of the phase ends a running job", async () => {
    const start = await cli(["exec", phaseId, "--background", "--cwd", "services", "--", "python3", scripts.slow!, "2"], { socket: d.socket });
    expect(start.code).toBe(0);
    const id = start.stdout.trim();
    expect(id).toMatch(/^jb_[0-9a-f]{12}$/);
    // the CLI has exited; the job runs on
    expect((await sbx.job(phaseId, id)).state).toBe("running");
    const ls = await cli(["jobs", "ls", phaseId], { socket: d.socket });
    expect(ls.stdout).toContain(id);
    const wait = await cli(["jobs", "wait", phaseId, id, "--timeout", "20"], { socket: d.socket });
    expect(wait.code).toBe(0);
    expect((await cli(["jobs", "output", phaseId, id], { socket: d.socket })).stdout).toBe("ready\ndone\n");

    // stdin piped to the CLI, variables and cwd as flags
    const piped = await new Promise<{ code: number | null; stdout: string }>((resolve) => {
      const child = spawn(process.execPath, [CLI, "--socket", d.socket, "exec", phaseId, "-i", "--env", "SBX_TEST_VAR=from-cli", "--cwd", "/workspace/services", "--", "python3", scripts.where!], { stdio: ["pipe", "pipe", "inherit"] });
      let out = "";
      child.stdout.on("data", (c: Buffer) => (out += c.toString()));
      child.on("close", (code) => resolve({ code, stdout: out }));
      child.stdin.end("hello\n");
    });
    expect(piped.code).toBe(0);
    expect(piped.stdout.split("\n").slice(0, 3)).toEqual(["/workspace/services", "from-cli", `6 ${createHash("sha256").update("hello\n").digest("hex")}`]);
    const reserved = await cli(["exec", phaseId, "--env", "LD_PRELOAD=x", "--", "python3", scripts.where!], { socket: d.socket });
    expect(reserved.code).toBe(2);
    expect(reserved.stderr).toContain("SBX_ERR_ENV_RESERVED");

    // cancel by id a command run in the foreground by another client
    const running = sbx.exec(phaseId, { argv: ["python3", scripts.slow!, "50"] });
    let execId: string | undefined;
    for (let i = 0; i < 100 && !execId; i++) {
      execId = (await sbx.execs(phaseId)).find((e) => !e.background && e.pid !== null)?.id;
      if (!execId) await new Promise((r) => setTimeout(r, 100));
    }
    const execsCli = await cli(["execs", phaseId], { socket: d.socket });
    expect(execsCli.stdout).toContain(execId!);
    const cancel = await cli(["cancel", phaseId, execId!, "--note", "wrong test"], { socket: d.socket });
    expect(cancel.code).toBe(0);
    const r = await running;
    expect(r).toMatchObject({ id: execId, signal: "SIGTERM", cancelled: { note: "wrong test" } });
    expect(r.failure).toBeNull(); // a cancel is not a failed attempt
    expect((await cli(["cancel", phaseId, execId!], { socket: d.socket })).code).not.toBe(0);

    // a job still running when its phase stops ends with it
    const last = await sbx.startJob(phaseId, { argv: ["python3", scripts.slow!, "50"] });
    await sbx.stopPhase(phaseId);
    const after = await sbx.job(phaseId, last.id);
    expect(after.state).not.toBe("running");
    expect(after.endedAt).not.toBeNull();
  }, 120_000);
});

describe("the Python client", () => {
  it("exec with cwd, env and stdin; a job started, waited for and read", async () => {
    const p2 = await makeProject();
    try {
      const where = `/workspace/${await writeScript(p2, CODE.where)}`;
      const slow = `/workspace/${await writeScript(p2, CODE.slow)}`;
      const harness = String.raw`
import json, sys
from sandboxd_client import Sandboxd
sbx = Sandboxd(sys.argv[1])
pid = sbx.start_phase(sys.argv[2], "12.3", "test")["id"]
r = sbx.exec(pid, ["python3", sys.argv[3]], cwd="services", env={"SBX_TEST_VAR": "py"}, stdin=b"abc")
job = sbx.start_job(pid, ["python3", sys.argv[4], "1"])
done = sbx.wait_job(pid, job["id"], timeout_ms=20000)
out = {"stdout": r["stdout"], "job": job["id"], "state": done["state"], "exit": done["result"]["exitCode"],
       "output": sbx.job_output(pid, job["id"])["stdout"], "listed": [j["id"] for j in sbx.jobs(pid)]}
sbx.stop_phase(pid)
print(json.dumps(out))
`;
      const { stdout } = await promisify(execFile)("python3", ["-c", harness, d.socket, p2, where, slow], {
        env: { ...process.env, PYTHONPATH: path.join(ROOT, "clients", "python") },
        timeout: 90_000,
      });
      const out = JSON.parse(stdout) as Record<string, unknown>;
      expect(String(out.stdout).split("\n").slice(0, 3)).toEqual(["/workspace/services", "py", `3 ${createHash("sha256").update("abc").digest("hex")}`]);
      expect(out).toMatchObject({ state: "exited", exit: 0, output: "ready\ndone\n" });
      expect(out.listed).toContain(out.job);
    } finally {
      await removeDir(p2);
    }
  }, 120_000);
});
