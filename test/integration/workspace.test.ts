/**
 * The agent's workspace (SKILLS.md §1), from inside a real sandbox under the
 * real daemon: every change lands in the phase's layer, is judged at a
 * checkpoint, and reaches the project only when it passes; refused
 * iterations leave the project byte for byte as it was; protected paths
 * cannot be written; the layer's disk budget is the phase's alone.
 */
import { execFile } from "node:child_process";
import { createHash } from "node:crypto";
import { chown, lstat, mkdir, readFile, readdir, rm, symlink, writeFile } from "node:fs/promises";
import path from "node:path";
import { promisify } from "node:util";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { Approval } from "../../src/approvals/queue.js";
import type { ExecResult } from "../../src/phases/manager.js";
import type { PhaseView } from "../../src/phases/types.js";
import type { CheckpointResult, FileChange } from "../../src/workspace/index.js";
import { OWNER, cli, makeProject, removeDir, requireEngineAndImage, startTestDaemon, tempDir, writeScript, type TestDaemon } from "../helpers/sandbox.js";

const run = promisify(execFile);
let t: TestDaemon;
let project: string;
let phase: PhaseView;

async function exec(argv: string[], phaseId = phase.id): Promise<ExecResult> {
  const { result } = await t.api.request<{ result: ExecResult }>("POST", `/v1/phases/${phaseId}/exec`, { argv });
  return result;
}

/** Python as the agent runs it: a script (written to the project beforehand, as the tests' helper does), then `python3 <script>`. */
async function py(code: string, phaseId = phase.id, proj = project): Promise<ExecResult> {
  const script = await writeScript(proj, code);
  return exec(["python3", script], phaseId);
}

async function checkpoint(message: string, phaseId = phase.id): Promise<CheckpointResult> {
  const r = await t.api.request<CheckpointResult>("POST", `/v1/phases/${phaseId}/checkpoint`, { message });
  // Refusals are these tests' subject, one after another on one phase; fail-fast escalates at the
  // third in a row (failfast.test.ts tests that): a person lets the phase go on each time.
  if (r.iteration?.state === "rejected") {
    const { phase: v } = await t.api.request<{ phase: PhaseView }>("GET", `/v1/phases/${phaseId}`);
    if (v.state === "escalated") await t.api.request("POST", `/v1/phases/${phaseId}/resume`, { note: "workspace tests: refusals are the subject" });
  }
  return r;
}

/** Every file and folder of a tree with its mode and bytes (sbx_scripts/, the tests' own scripts, left out). */
async function snapshot(root: string): Promise<Record<string, string>> {
  const out: Record<string, string> = {};
  async function walk(rel: string): Promise<void> {
    for (const name of (await readdir(path.join(root, rel))).sort()) {
      const r = rel ? `${rel}/${name}` : name;
      if (r === "sbx_scripts" || r === "build_audit.log") continue;
      const st = await lstat(path.join(root, r));
      const mode = (st.mode & 0o7777).toString(8);
      if (st.isDirectory()) {
        out[r] = `dir ${mode} ${st.uid}`;
        await walk(r);
      } else if (st.isSymbolicLink()) out[r] = `link`;
      else out[r] = `file ${mode} ${st.uid} ${(await readFile(path.join(root, r))).toString("base64")}`;
    }
  }
  await walk("");
  return out;
}

beforeAll(async () => {
  await requireEngineAndImage();
  t = await startTestDaemon();
  project = await makeProject();
  await mkdir(path.join(project, "shared"));
  await writeFile(path.join(project, "shared", "models.py"), "class Order:\n    pass\n");
  await mkdir(path.join(project, ".git", "hooks"), { recursive: true });
  await writeFile(path.join(project, ".git", "config"), "[core]\n\trepositoryformatversion = 0\n");
  await writeFile(path.join(project, ".env"), "DATABASE_URL=postgres://prod:pw@db.internal/trading\nDATABASE_URL_TEST=postgres://test:pw@db.internal/trading_test\nFLAG=one\n");
  await run("chown", ["-R", `${OWNER.uid}:${OWNER.gid}`, project]);
  ({ phase } = await t.api.request<{ phase: PhaseView }>("POST", "/v1/phases", { project, phase: "1.1", mode: "backtest" }));
});

afterAll(async () => {
  await t?.close();
  if (project) await removeDir(project);
});

describe("the workspace view", () => {
  it("hides .env but hands its values to commands; .git, build_audit.log are read-only inside", async () => {
    const r = await py(
      [
        "import os",
        "print('env file', os.path.exists('/workspace/.env'))",
        "print('FLAG', os.environ.get('FLAG'))",
        "for p in ['/workspace/.git/config', '/workspace/.git/hooks/pre-commit', '/workspace/build_audit.log']:",
        "    try:",
        "        with open(p, 'a') as f: f.write('[core]\\n\\tfsmonitor = /tmp/x\\n')",
        "        print(p, 'WRITTEN')",
        "    except OSError as e: print(p, e.strerror)",
      ].join("\n"),
    );
    expect(r.exitCode).toBe(0);
    expect(r.stdout).toContain("env file False");
    expect(r.stdout).toContain("FLAG one");
    expect(r.stdout).not.toContain("WRITTEN");
    expect(r.stdout).toContain("/workspace/.git/config Read-only file system");
    expect(r.stdout).toContain("/workspace/.git/hooks/pre-commit Read-only file system");
    expect(r.stdout).toMatch(/\/workspace\/build_audit.log (Read-only file system|Permission denied)/);
    expect(await readFile(path.join(project, ".git", "config"), "utf8")).not.toContain("fsmonitor");
    await expect(lstat(path.join(project, ".git", "hooks", "pre-commit"))).rejects.toMatchObject({ code: "ENOENT" });
    // the refusal is on the record (the command's output is)
    expect(await readFile(phase.buildLog, "utf8")).toContain("Read-only file system");
    expect((await checkpoint("nothing")).iteration).toBeNull();
  });
});

/** The journal's records of one type for the phase, in order. */
async function journal(type: string, phaseId = phase.id): Promise<Array<Record<string, unknown> & { ts: string; seq: number }>> {
  const text = await readFile(path.join(t.stateDir, "audit.jsonl"), "utf8");
  return text
    .split("\n")
    .filter(Boolean)
    .map((l) => JSON.parse(l) as Record<string, unknown> & { ts: string; seq: number; type: string; phase?: string })
    .filter((r) => r.type === type && r.phase === phaseId);
}

describe("live file events", () => {
  it("a write in the sandbox is on the audit trail within 100 ms (p50), with its path and kind; tool caches are not", async () => {
    const N = 20;
    // each write is timed in the sandbox (same kernel clock as the daemon's), 150 ms apart so each is its own event
    const r = await py(
      [
        "import os, time",
        "os.mkdir('/workspace/live')",
        "time.sleep(0.15)",
        `for i in range(${N}):`,
        "    t = time.time()",
        "    open(f'/workspace/live/f{i}.txt', 'w').write('x')",
        "    print(f'live/f{i}.txt', t)",
        "    time.sleep(0.15)",
        "t = time.time(); open('/workspace/live/f0.txt', 'a').write('more'); print('modify', t); time.sleep(0.15)",
        "t = time.time(); os.remove('/workspace/live/f1.txt'); print('delete', t); time.sleep(0.15)",
        "t = time.time(); open('/workspace/conftest.py', 'a').write('# x'); print('copyup', t); time.sleep(0.15)",
        "os.makedirs('/workspace/services/__pycache__', exist_ok=True); open('/workspace/services/__pycache__/calc.cpython-312.pyc', 'wb').write(b'x')",
        "time.sleep(0.3)",
      ].join("\n"),
    );
    expect(r.exitCode).toBe(0);
    const wrote = new Map(r.stdout.trim().split("\n").map((l) => l.split(" ") as [string, string]).map(([k, v]) => [k, Number(v) * 1000]));
    const deadline = Date.now() + 5000;
    let events = await journal("workspace.file");
    while (events.filter((e) => e.event === "create" && String(e.path).startsWith("live/f")).length < N && Date.now() < deadline) {
      await new Promise((res) => setTimeout(res, 100));
      events = await journal("workspace.file");
    }
    const latencies: number[] = [];
    for (let i = 0; i < N; i++) {
      const e = events.find((x) => x.path === `live/f${i}.txt` && x.event === "create");
      expect(e, `live/f${i}.txt`).toBeDefined();
      latencies.push(Date.parse(e!.ts) - wrote.get(`live/f${i}.txt`)!);
    }
    latencies.sort((a, b) => a - b);
    const p50 = latencies[Math.floor(N / 2)]!;
    console.log(`write → audit record: p50 ${p50.toFixed(1)} ms, max ${latencies.at(-1)!.toFixed(1)} ms over ${N} writes from the sandbox`);
    expect(p50).toBeLessThanOrEqual(100);
    expect(events.find((e) => e.path === "live" && e.event === "create")?.isDir).toBe(true);
    const after = (k: string) => events.filter((e) => Date.parse(e.ts) >= wrote.get(k)! - 5);
    expect(after("modify").some((e) => e.path === "live/f0.txt" && e.event === "modify")).toBe(true);
    expect(after("delete").some((e) => e.path === "live/f1.txt" && e.event === "delete")).toBe(true);
    // a project file written for the first time is a copy-up: modify, not create
    expect(after("copyup").some((e) => e.path === "conftest.py" && e.event === "modify")).toBe(true);
    expect(events.some((e) => String(e.path).includes("__pycache__"))).toBe(false);
    const log = await readFile(phase.buildLog, "utf8");
    expect(log).toMatch(/^\[[^\]]+\] \[FILE\] \[WATCH\] \[live\/f3\.txt\] \[CREATE\]$/m);
    // the same on GET /v1/events
    const res = await t.api.stream("GET", `/v1/events?phase=${phase.id}&follow=0`);
    let body = "";
    for await (const c of res) body += (c as Buffer).toString();
    expect(body.split("\n").filter(Boolean).map((l) => JSON.parse(l) as { type: string; path?: string; event?: string })).toContainEqual(
      expect.objectContaining({ type: "workspace.file", path: "live/f2.txt", event: "create" }),
    );
    // leave nothing pending for the tests after this one
    await py("import shutil\nshutil.rmtree('/workspace/live')\nsrc = open('/workspace/conftest.py').read()\nopen('/workspace/conftest.py', 'w').write(src[:-3])");
    expect((await t.api.request<{ changes: FileChange[] }>("GET", `/v1/phases/${phase.id}/files`)).changes).toEqual([]);
  });
});

describe("iterations", () => {
  it("three unrelated files: refused, the project byte-identical, the view back to it, recorded", async () => {
    const before = await snapshot(project);
    const r = await py(
      [
        "import os",
        "open('/workspace/services/calc.py', 'a').write('# more\\n')",
        "open('/workspace/services/other.py', 'w').write('x = 1\\n')",
        "os.remove('/workspace/tests/test_broken.py')",
        "os.chmod('/workspace/conftest.py', 0o600)",
      ].join("\n"),
    );
    expect(r.exitCode).toBe(0);
    const files = await t.api.request<{ changes: FileChange[] }>("GET", `/v1/phases/${phase.id}/files`);
    expect(files.changes.map((c) => `${c.kind} ${c.path}`).sort()).toEqual([
      "create services/other.py",
      "delete tests/test_broken.py",
      "modify conftest.py",
      "modify services/calc.py",
    ]);
    const { iteration } = await checkpoint("three things at once");
    expect(iteration?.state).toBe("rejected");
    expect(iteration?.failures.map((f) => f.rule)).toContain("workspace.atomic-modification");
    expect(await snapshot(project)).toEqual(before);
    // the sandbox sees the last accepted state again: deleted file back, created file gone
    const v = await py("import os\nprint(os.path.exists('/workspace/tests/test_broken.py'), os.path.exists('/workspace/services/other.py'), oct(os.stat('/workspace/conftest.py').st_mode & 0o777))");
    expect(v.stdout.trim()).toBe("True False 0o644");
    const log = await readFile(phase.buildLog, "utf8");
    expect(log).toMatch(/\[FILE\] \[CREATE\] \[services\/other\.py\] \[REFUSED workspace\.atomic-modification\]/);
    expect(log).toMatch(/\[FILE\] \[DELETE\] \[tests\/test_broken\.py\] \[REFUSED workspace\.atomic-modification\]/);
    expect(log).toMatch(/ITERATION_REFUSED: iteration 1 \(three things at once\)/);
    const shown = await t.api.request<{ phase: PhaseView }>("GET", `/v1/phases/${phase.id}`);
    expect(shown.phase.workspace?.failed).toBe(1);
  });

  it("a module and its direct test: accepted through the CLI, in the project, recorded as SKILLS.md says", async () => {
    const r = await py(
      [
        "open('/workspace/services/calc.py', 'a').write('\\n\\ndef sub(a: int, b: int) -> int:\\n    return a - b\\n')",
        "open('/workspace/tests/test_calc.py', 'a').write('\\n\\ndef test_sub():\\n    from services.calc import sub\\n    assert sub(3, 2) == 1\\n')",
      ].join("\n"),
    );
    expect(r.exitCode).toBe(0);
    const diff = await cli(["diff", phase.id], { socket: t.socket });
    expect(diff.stdout).toContain("+def sub(a: int, b: int) -> int:");
    const c = await cli(["checkpoint", phase.id, "-m", "Added sub() and its test"], { socket: t.socket });
    expect(c.stderr).toBe("");
    expect(c.code).toBe(0);
    expect(c.stdout).toContain("iteration 2 accepted");
    expect(await readFile(path.join(project, "services", "calc.py"), "utf8")).toContain("def sub(");
    expect(await readFile(path.join(project, "tests", "test_calc.py"), "utf8")).toContain("def test_sub(");
    expect((await lstat(path.join(project, "services", "calc.py"))).uid).toBe(OWNER.uid);
    const log = await readFile(phase.buildLog, "utf8");
    expect(log).toMatch(/^\[[^\]]+\] \[FILE\] \[MODIFY\] \[services\/calc\.py\] \[SUCCESS\]$/m);
    expect(log).toMatch(/^\[[^\]]+\] Modified tests\/test_calc\.py: Added sub\(\) and its test$/m);
    expect((await cli(["files", phase.id], { socket: t.socket })).stdout).toBe("");
  });

  it("a validation command checkpoints first: pytest runs on the accepted iteration", async () => {
    await py("open('/workspace/services/calc.py', 'a').write('\\n\\ndef mul(a: int, b: int) -> int:\\n    return a * b\\n')");
    const r = await exec(["pytest", "-q", "tests/test_calc.py"]);
    expect(r.exitCode).toBe(0);
    expect(await readFile(path.join(project, "services", "calc.py"), "utf8")).toContain("def mul(");
    expect(await readFile(phase.buildLog, "utf8")).toMatch(/ITERATION_ACCEPTED: iteration 3 \(before pytest -q tests\/test_calc\.py\)/);
  });

  it("after an accepted iteration mounts the view anew, commands write in it and still write no /proc file (the forker's kept Landlock rules follow mounts)", async () => {
    // the iterations above were accepted: the view at /workspace is not the one the forker first saw
    const r = await py(
      [
        "open('/workspace/after_reset.txt', 'w').write('x')",
        "try:",
        // the value it has already: only Landlock can refuse it
        "    open('/proc/self/oom_score_adj', 'w').write('1000')",
        "    print('proc written')",
        "except OSError as e:",
        "    print('proc', e.errno)",
      ].join("\n"),
    );
    expect(r.stderr).toBe("");
    expect(r.exitCode).toBe(0);
    expect(r.stdout.trim()).toBe("proc 13");
    await py("import os\nos.remove('/workspace/after_reset.txt')");
  });

  it("a syntax error: refused with the compiler's message, the old content kept", async () => {
    const old = await readFile(path.join(project, "services", "calc.py"), "utf8");
    await py("open('/workspace/services/calc.py', 'a').write('\\ndef broken(:\\n    pass\\n')");
    const { iteration } = await checkpoint("broken");
    expect(iteration?.state).toBe("rejected");
    expect(iteration?.failures[0]?.rule).toBe("workspace.python-compile");
    expect(iteration?.failures[0]?.message).toMatch(/^services\/calc\.py:\d+:\d+: SyntaxError: invalid syntax/);
    expect(await readFile(path.join(project, "services", "calc.py"), "utf8")).toBe(old);
    const v = await py("print(open('/workspace/services/calc.py').read())");
    expect(v.stdout).toBe(old + "\n");
  });

  it("a 20 MB file can be written (no process limit at 10 MB), waits for a human at the checkpoint, and a rejection discards it", async () => {
    const r = await py("open('/workspace/data.bin', 'wb').write(b'0' * (20 * 1024 * 1024))");
    expect(r.exitCode).toBe(0);
    const { iteration } = await checkpoint("big data");
    expect(iteration?.state).toBe("pending");
    expect(iteration?.failures.map((f) => f.rule)).toContain("workspace.max-file-size");
    // while it waits, no command runs
    await expect(py("print(1)")).rejects.toMatchObject({ code: "SBX_ERR_ITERATION_PENDING" });
    // it waits in the approval queue too, bound to the file's bytes
    expect(iteration?.approval).toMatch(/^ap_[0-9a-f]{12}$/);
    const { approval } = await t.api.request<{ approval: Approval }>("GET", `/v1/approvals/${iteration!.approval}`);
    expect(approval).toMatchObject({ state: "pending", workspace: { iteration: iteration!.n, paths: ["data.bin"] }, ruleId: "workspace.max-file-size" });
    expect(approval.files).toEqual([{ path: "data.bin", sha256: createHash("sha256").update(Buffer.alloc(20 * 1024 * 1024, "0")).digest("hex"), note: null }]);
    const d = await cli(["iteration", "reject", phase.id, String(iteration!.n), "--note", "no data files in the repo"], { socket: t.socket });
    expect(d.stderr).toBe("");
    expect(d.stdout).toContain(`iteration ${iteration!.n} rejected`);
    await expect(lstat(path.join(project, "data.bin"))).rejects.toMatchObject({ code: "ENOENT" });
    expect((await py("import os\nprint(os.path.exists('/workspace/data.bin'))")).stdout).toBe("False\n");
    expect(await readFile(phase.buildLog, "utf8")).toMatch(/ITERATION_REFUSED: iteration \d+ \(big data\) discarded by operator: no data files in the repo/);
    expect((await t.api.request<{ approval: Approval }>("GET", `/v1/approvals/${iteration!.approval}`)).approval.state).toBe("denied");
  });

  it("a shared/ edit waits in the approval queue; approving the request applies exactly the bytes it showed", async () => {
    await py("open('/workspace/shared/models.py', 'a').write('\\n\\nclass Fill:\\n    pass\\n')");
    const { iteration } = await checkpoint("Fill model");
    expect(iteration?.state).toBe("pending");
    expect(iteration?.failures.map((f) => f.rule)).toEqual(["workspace.protected.shared"]);
    const ls = await cli(["approvals", "ls"], { socket: t.socket });
    expect(ls.stdout).toContain(iteration!.approval!);
    expect(ls.stdout).toContain(`iteration ${iteration!.n}: shared/models.py`);
    const ok = await cli(["approvals", "approve", iteration!.approval!, "--note", "reviewed the diff"], { socket: t.socket });
    expect(ok.stderr).toBe("");
    expect(await readFile(path.join(project, "shared", "models.py"), "utf8")).toContain("class Fill:");
    const { approval } = await t.api.request<{ approval: Approval }>("GET", `/v1/approvals/${iteration!.approval}`);
    expect(approval.state).toBe("used");
    const shown = await t.api.request<{ phase: PhaseView }>("GET", `/v1/phases/${phase.id}`);
    expect(shown.phase.workspace?.iterations.find((i) => (i as { n: number }).n === iteration!.n)).toMatchObject({ state: "accepted", decidedBy: expect.stringContaining(iteration!.approval!) });
    const log = await readFile(phase.buildLog, "utf8");
    expect(log).toMatch(new RegExp(`\\[APPROVAL\\] \\[REQUEST\\] \\[iteration ${iteration!.n}: shared/models\\.py\\] \\[${iteration!.approval} pending: workspace\\.protected\\.shared`));
    expect(log).toMatch(/\[FILE\] \[MODIFY\] \[shared\/models\.py\] \[SUCCESS\]/);
    // a second decision is refused
    await expect(t.api.request("POST", `/v1/approvals/${iteration!.approval}/deny`, {})).rejects.toMatchObject({ code: "SBX_ERR_APPROVAL_DECIDED" });
    // and denying one discards the iteration
    await py("open('/workspace/shared/models.py', 'a').write('\\n\\nclass Other:\\n    pass\\n')");
    const second = (await checkpoint("Other model")).iteration!;
    await t.api.request("POST", `/v1/approvals/${second.approval}/deny`, { note: "not now" });
    expect(await readFile(path.join(project, "shared", "models.py"), "utf8")).not.toContain("class Other");
    expect((await py("print('Other' in open('/workspace/shared/models.py').read())")).stdout).toBe("False\n");
  });

  it("a rename is shown and applied as a rename", async () => {
    await py("import os\nos.rename('/workspace/services/calc.py', '/workspace/services/calculator.py')");
    const files = await cli(["files", phase.id], { socket: t.socket });
    expect(files.stdout).toMatch(/^RENAME services\/calc\.py -> services\/calculator\.py/m);
    const diff = await cli(["diff", phase.id], { socket: t.socket });
    expect(diff.stdout).toContain("rename from services/calc.py");
    const { iteration } = await checkpoint("Renamed calc to calculator");
    expect(iteration?.state).toBe("accepted");
    expect(await readFile(path.join(project, "services", "calculator.py"), "utf8")).toContain("def mul(");
    await expect(lstat(path.join(project, "services", "calc.py"))).rejects.toMatchObject({ code: "ENOENT" });
    expect(await readFile(phase.buildLog, "utf8")).toMatch(/\[FILE\] \[RENAME\] \[services\/calc\.py -> services\/calculator\.py\] \[SUCCESS\]/);
  });

  it("deleting in shared/ is refused and the file comes back", async () => {
    await py("import os\nos.remove('/workspace/shared/models.py')");
    const { iteration } = await checkpoint("cleanup");
    expect(iteration?.state).toBe("rejected");
    expect(iteration?.failures.map((f) => f.rule)).toContain("workspace.protected.shared");
    expect(await readFile(path.join(project, "shared", "models.py"), "utf8")).toMatch(/^class Order:\n    pass\n/);
  });

  it("a rewritten .env never reaches the project, and the phase keeps the values it started with", async () => {
    const before = await readFile(path.join(project, ".env"), "utf8");
    const r = await py("open('/workspace/.env', 'w').write('DATABASE_URL_TEST=postgres://prod:pw@db.internal/trading\\nREDIS_URL=redis://evil:6379\\n')");
    expect(r.exitCode).toBe(0);
    const { iteration } = await checkpoint("env tweak");
    expect(iteration?.state).toBe("rejected");
    expect(iteration?.failures.map((f) => f.rule)).toContain("workspace.protected.credentials");
    expect(await readFile(path.join(project, ".env"), "utf8")).toBe(before);
    const v = await py("import os\nprint(os.path.exists('/workspace/.env'), os.environ.get('FLAG'))");
    expect(v.stdout.trim()).toBe("False one");
  });

  it("a link to a host file: the daemon neither reads nor writes through it", async () => {
    const outside = await tempDir("hostfile");
    const secret = path.join(outside, "secret.txt");
    await writeFile(secret, "HOST-SECRET\n");
    // planted on the host (the agent cannot write the project)
    await symlink(secret, path.join(project, "notes.txt"));
    await py("import os\nos.remove('/workspace/notes.txt')\nopen('/workspace/notes.txt', 'w').write('agent text\\n')");
    const diff = await cli(["diff", phase.id], { socket: t.socket });
    expect(diff.stdout).not.toContain("HOST-SECRET");
    // and one the agent makes: refused
    await py("import os\nos.symlink('/etc/shadow', '/workspace/shadow.txt')");
    const { iteration } = await checkpoint("links");
    expect(iteration?.state).toBe("rejected");
    expect(iteration?.failures.map((f) => f.rule)).toContain("workspace.symlink");
    expect(await readFile(secret, "utf8")).toBe("HOST-SECRET\n");
    expect((await lstat(path.join(project, "notes.txt"))).isSymbolicLink()).toBe(true);
    // accepted alone, the file replaces the link; the host file is untouched
    await py("import os\nos.remove('/workspace/notes.txt')\nopen('/workspace/notes.txt', 'w').write('agent text\\n')");
    expect((await checkpoint("notes")).iteration?.state).toBe("accepted");
    expect(await readFile(secret, "utf8")).toBe("HOST-SECRET\n");
    expect((await lstat(path.join(project, "notes.txt"))).isFile()).toBe(true);
    await rm(outside, { recursive: true, force: true });
  });
});

describe("live file events after checkpoints", () => {
  it("the watcher follows the layer across accepted and refused iterations", async () => {
    const before = (await journal("workspace.file")).length;
    const r = await py("import time\nt = time.time()\nopen('/workspace/after_checkpoints.txt', 'w').write('x')\nprint(t)\ntime.sleep(0.3)");
    expect(r.exitCode).toBe(0);
    const events = (await journal("workspace.file")).slice(before);
    expect(events).toContainEqual(expect.objectContaining({ path: "after_checkpoints.txt", event: "create" }));
    await py("import os\nos.remove('/workspace/after_checkpoints.txt')");
  });
});

describe("the disk budget", () => {
  it("a full layer is ENOSPC in that phase only", async () => {
    const other = await makeProject();
    const { phase: p2 } = await t.api.request<{ phase: PhaseView }>("POST", "/v1/phases", { project: other, phase: "1.2", mode: "backtest" });
    try {
      const r = await py(
        [
          "import os",
          "done = 0",
          "try:",
          "    for i in range(4):",
          "        fd = os.open('/workspace/fill%d.bin' % i, os.O_WRONLY | os.O_CREAT, 0o644)",
          "        os.posix_fallocate(fd, 0, 256 * 1024 * 1024)",
          "        os.close(fd)",
          "        done += 1",
          "except OSError as e:",
          "    print('error', e.strerror)",
          "print('done', done)",
        ].join("\n"),
      );
      expect(r.stdout).toContain("error No space left on device");
      // the tests' policy gives a layer 384 MiB (test/helpers/sandbox.ts testPolicy): one 256 MiB file fits, a second does not
      expect(r.stdout).toMatch(/done 1\n/);
      // the other phase writes, and the audit trail records, as before
      const o = await py("open('/workspace/services/extra.py', 'w').write('y = 2\\n')\nprint('ok')", p2.id, other);
      expect(o.stdout).toBe("ok\n");
      // the full phase is recovered by discarding its iteration (files over 10 MiB wait for a human)
      const { iteration } = await checkpoint("fill");
      expect(iteration?.state).toBe("pending");
      await t.api.request("POST", `/v1/phases/${phase.id}/iterations/${iteration!.n}/reject`, {});
      const again = await py("open('/workspace/small.txt', 'w').write('x')\nprint('ok')");
      expect(again.stdout).toBe("ok\n");
      expect((await checkpoint("small")).iteration?.state).toBe("accepted");
    } finally {
      await t.api.request("DELETE", `/v1/phases/${p2.id}`).catch(() => undefined);
      await removeDir(other);
    }
  });
});

describe("phase end", () => {
  it("stop checkpoints the last changes, removes the layer, and shows the iterations", async () => {
    const { phase: p } = await t.api.request<{ phase: PhaseView }>("POST", "/v1/phases", { project, phase: "1.3", mode: "backtest" });
    await py("open('/workspace/services/last.py', 'w').write('z = 3\\n')", p.id);
    const { phase: ended } = await t.api.request<{ phase: PhaseView }>("DELETE", `/v1/phases/${p.id}`);
    expect(ended.state).toBe("stopped");
    expect(await readFile(path.join(project, "services", "last.py"), "utf8")).toBe("z = 3\n");
    await expect(lstat(path.join(t.stateDir, "phases", p.id, "ws"))).rejects.toMatchObject({ code: "ENOENT" });
    const shown = await cli(["phase", "show", p.id], { socket: t.socket });
    expect(shown.stdout).toMatch(/iterations:\s+1 accepted, 0 refused/);
    const mounts = await readFile("/proc/self/mountinfo", "utf8");
    expect(mounts).not.toContain(p.id);
    await chown(project, OWNER.uid, OWNER.gid);
  });
});

describe("across a daemon crash", () => {
  it("after SIGKILL the re-adopted phase keeps its .env as read at start, its layer and its pending changes", async () => {
    const { spawnDaemon, waitExit } = await import("../helpers/sandbox.js");
    const { ApiClient } = await import("../../src/cli/client.js");
    const stateDir = await tempDir("wscrash");
    const socket = path.join(stateDir, "d.sock");
    const proj = await makeProject();
    await writeFile(path.join(proj, ".env"), "DATABASE_URL=postgres://prod:pw@db.internal/trading\nDATABASE_URL_TEST=postgres://test:pw@db.internal/trading_test\nFLAG=one\n");
    await run("chown", ["-R", `${OWNER.uid}:${OWNER.gid}`, proj]);
    let d = await spawnDaemon(stateDir, socket);
    const api = new ApiClient(socket);
    try {
      const { phase: p } = await api.request<{ phase: PhaseView }>("POST", "/v1/phases", { project: proj, phase: "9.1", mode: "backtest" });
      const pyIn = async (code: string) => (await api.request<{ result: ExecResult }>("POST", `/v1/phases/${p.id}/exec`, { argv: ["python3", await writeScript(proj, code)] })).result;
      // the agent rewrites .env (a create in its view) and starts other work
      await pyIn("open('/workspace/.env', 'w').write('DATABASE_URL_TEST=postgres://prod:pw@db.internal/trading\\nFLAG=two\\n')\nopen('/workspace/services/wip.py', 'w').write('w = 1\\n')");
      d.child.kill("SIGKILL");
      await waitExit(d.child);
      // had anything rewritten the project's .env meanwhile, a restarted daemon must not read it
      await writeFile(path.join(proj, ".env"), "FLAG=host-edit\n");
      d = await spawnDaemon(stateDir, socket);
      const r = await pyIn("import os\nprint(os.environ.get('FLAG'), os.path.exists('/workspace/services/wip.py'))");
      expect(r.stdout).toBe("one True\n");
      const { changes } = await api.request<{ changes: FileChange[] }>("GET", `/v1/phases/${p.id}/files`);
      expect(changes.map((c) => `${c.kind} ${c.path}`).sort()).toEqual(["create .env", "create services/wip.py"]);
      const { iteration } = await api.request<CheckpointResult>("POST", `/v1/phases/${p.id}/checkpoint`, { message: "after the crash" });
      expect(iteration?.state).toBe("rejected");
      expect(iteration?.failures.map((f) => f.rule)).toContain("workspace.protected.credentials");
      expect(await readFile(path.join(proj, ".env"), "utf8")).toBe("FLAG=host-edit\n");
      await api.request("DELETE", `/v1/phases/${p.id}`);
      expect(await readFile("/proc/self/mountinfo", "utf8")).not.toContain(p.id);
    } finally {
      if (d.child.exitCode === null) {
        d.child.kill("SIGTERM");
        await waitExit(d.child).catch(() => undefined);
      }
      await removeDir(proj);
      await removeDir(stateDir);
    }
  });
});

describe("the .env rewrite against a real database", () => {
  it("a backtest phase that rewrites .env leaves the next backtest phase on the test database", async () => {
    const { startPostgres } = await import("../helpers/postgres.js");
    const db = await startPostgres();
    const proj = await makeProject();
    try {
      const gw = `${db.gateway.user}:${encodeURIComponent(db.gateway.password)}@127.0.0.1:${db.port}`;
      const envText = `DATABASE_URL=postgresql://${gw}/trading\nDATABASE_URL_TEST=postgresql://${gw}/trading_test\n`;
      await writeFile(path.join(proj, ".env"), envText);
      await run("chown", ["-R", `${OWNER.uid}:${OWNER.gid}`, proj]);
      const { phase: p1 } = await t.api.request<{ phase: PhaseView }>("POST", "/v1/phases", { project: proj, phase: "7.1", mode: "backtest" });
      // the attack: production's URL copied into DATABASE_URL_TEST
      const w = await py(`open('/workspace/.env', 'w').write(${JSON.stringify(`DATABASE_URL_TEST=postgresql://${gw}/trading\n`)})`, p1.id, proj);
      expect(w.exitCode).toBe(0);
      await t.api.request("DELETE", `/v1/phases/${p1.id}`);
      const { phase: ended } = await t.api.request<{ phase: PhaseView }>("GET", `/v1/phases/${p1.id}`);
      expect((ended.workspace?.iterations as Array<{ state: string }>).at(-1)?.state).toBe("rejected");
      expect(await readFile(path.join(proj, ".env"), "utf8")).toBe(envText);

      const { phase: p2 } = await t.api.request<{ phase: PhaseView }>("POST", "/v1/phases", { project: proj, phase: "7.2", mode: "backtest" });
      const r = await py(
        [
          "import os, psycopg2",
          "c = psycopg2.connect(os.environ['DATABASE_URL_TEST'])",
          "cur = c.cursor()",
          "cur.execute('select current_database()')",
          "print(cur.fetchone()[0])",
        ].join("\n"),
        p2.id,
        proj,
      );
      expect(r.stderr).toBe("");
      expect(r.stdout).toBe("trading_test\n");
      await t.api.request("DELETE", `/v1/phases/${p2.id}`);
    } finally {
      await db.stop();
      await removeDir(proj);
    }
  });
});
