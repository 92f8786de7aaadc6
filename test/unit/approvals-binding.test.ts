/**
 * Approvals bound to what will run (src/approvals/binding.ts, queue.ts) and
 * the reserved .env names (src/policy/env.ts): which files a command runs,
 * their hashes through the real project reader on a real directory, the
 * queue's sticky denial, stale approvals and later reasons.
 */
import { createHash } from "node:crypto";
import { mkdir, mkdtemp, rm, symlink, writeFile } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { bindFiles, filesRun, moduleCandidates, projectRelative } from "../../src/approvals/binding.js";
import { ApprovalQueue, changedFiles } from "../../src/approvals/queue.js";
import { isReservedEnv, splitDotenv } from "../../src/policy/env.js";
import { initShellParser } from "../../src/policy/index.js";
import { readProjectFile } from "../../src/phases/project.js";
import type { Clock } from "../../src/util/clock.js";

let dir: string;
let project: string;

beforeAll(async () => {
  await initShellParser();
  dir = await mkdtemp(path.join(os.tmpdir(), "sbx-bind-"));
  project = path.join(dir, "proj");
  await mkdir(path.join(project, "x"), { recursive: true });
  await mkdir(path.join(project, "pkg", "mod"), { recursive: true });
  await writeFile(path.join(project, "x", "helper.sh"), "echo hi\n");
  await writeFile(path.join(project, "run.py"), "print(1)\n");
  await writeFile(path.join(project, "pkg", "__init__.py"), "");
  await writeFile(path.join(project, "pkg", "mod", "__main__.py"), "print(2)\n");
  await writeFile(path.join(dir, "outside.sh"), "echo out\n");
  await symlink(path.join(dir, "outside.sh"), path.join(project, "link-out.sh"));
  await symlink("x/helper.sh", path.join(project, "link-in.sh"));
});

afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

describe("the files a command runs", () => {
  const table: Array<[{ argv: string[] } | { command: string }, string[]]> = [
    [{ argv: ["sh", "x/helper.sh"] }, ["x/helper.sh"]],
    [{ argv: ["bash", "-e", "x.sh", "arg"] }, ["x.sh"]],
    [{ argv: ["./x.sh"] }, ["./x.sh"]],
    [{ argv: ["/workspace/x.sh", "-c", "y"] }, ["/workspace/x.sh"]],
    [{ argv: ["python3", "-I", "run.py", "-m", "x"] }, ["run.py"]],
    [{ argv: ["python", "-m", "pkg.mod"] }, ["pkg/__init__.py", "pkg/mod/__init__.py", "pkg/mod/__main__.py", "pkg/mod.py"]],
    [{ argv: ["env", "A=1", "timeout", "5", "sh", "x/helper.sh"] }, ["x/helper.sh"]],
    [{ argv: ["sh", "-c", "sh x/helper.sh && python3 run.py", "x"] }, ["x/helper.sh", "run.py"]],
    [{ argv: [".", "x/helper.sh"] }, ["x/helper.sh"]],
    [{ command: "sh x/helper.sh; ./tools/a.sh" }, ["x/helper.sh", "./tools/a.sh"]],
    [{ argv: ["python3", "-c", "print(1)"] }, []],
    [{ argv: ["curl", "x"] }, []],
    [{ argv: ["bash", "-s"] }, []],
  ];
  for (const [input, files] of table) {
    it(`${JSON.stringify(input)} → ${JSON.stringify(files)}`, () => {
      expect(filesRun(input)).toEqual(files);
    });
  }

  it("resolves paths against /workspace and keeps others outside", () => {
    expect(projectRelative("x/helper.sh")).toBe("x/helper.sh");
    expect(projectRelative("./a/../b.sh")).toBe("b.sh");
    expect(projectRelative("/workspace/b.sh")).toBe("b.sh");
    expect(projectRelative("../etc/passwd")).toBeNull();
    expect(projectRelative("/tmp/x.sh")).toBeNull();
    expect(projectRelative("/workspace")).toBeNull();
    expect(moduleCandidates("os.path")).toEqual(["os/__init__.py", "os/path/__init__.py", "os/path/__main__.py", "os/path.py"]);
    expect(moduleCandidates("../x")).toEqual([]);
  });

  it("hashes them through the project reader, never following a link out of the project", async () => {
    const read = (rel: string) => readProjectFile({ project }, rel);
    const b = await bindFiles(["x/helper.sh", "./link-in.sh", "link-out.sh", "missing.sh", "/tmp/x.sh", "x"], read);
    expect(b[0]).toEqual({ path: "x/helper.sh", sha256: createHash("sha256").update("echo hi\n").digest("hex"), note: null });
    expect(b[1]!.sha256).toBe(b[0]!.sha256); // a link inside the project is its target
    expect(b[2]).toEqual({ path: "link-out.sh", sha256: null, note: "outside the project: not bound" });
    expect(b[3]).toEqual({ path: "missing.sh", sha256: null, note: "absent" });
    expect(b[4]).toEqual({ path: "/tmp/x.sh", sha256: null, note: "outside the project: not bound" });
    expect(b[5]).toEqual({ path: "x", sha256: null, note: "not a regular file" });
    await writeFile(path.join(project, "x", "helper.sh"), "rm -rf /workspace/x\n");
    const after = await bindFiles(["x/helper.sh", "missing.sh"], read);
    expect(changedFiles(b.slice(0, 1), after.slice(0, 1))).toEqual(["x/helper.sh"]);
    expect(changedFiles([b[3]!], [after[1]!])).toEqual([]);
    await writeFile(path.join(project, "missing.sh"), "now here\n");
    const created = await bindFiles(["missing.sh"], read);
    expect(changedFiles([b[3]!], created)).toEqual(["missing.sh"]);
  });
});

describe("the approval queue", () => {
  const clock: Clock = { now: () => new Date(Date.UTC(2026, 0, 1)), monotonicMs: () => 0 } as Clock;
  let n = 0;
  const queue = () => new ApprovalQueue(path.join(dir, `approvals-${++n}.json`), clock, (() => {
    let i = 0;
    return () => `ap_${String(++i).padStart(12, "0")}`;
  })());
  const why = { ruleId: "shell.not-whitelisted", clause: "SKILLS.md §2", policyReason: "asks" };
  const key = { argv: ["sh", "x/helper.sh"] };
  const file = (sha: string | null) => [{ path: "x/helper.sh", sha256: sha, note: sha ? null : "absent" }];

  it("binds the files at request time; using the approval with other content makes it stale", async () => {
    const q = queue();
    const { approval } = await q.request("ph_1", key, why, file("a"));
    await q.decide(approval.id, "approve");
    const stale = await q.use(approval.id, file("b"));
    expect(stale.changed).toEqual(["x/helper.sh"]);
    expect(q.get(approval.id).state).toBe("stale");
    expect(q.approvedFor("ph_1", key)).toBeNull();
    const again = await q.request("ph_1", key, why, file("b"));
    expect(again.created).toBe(true);
    await q.decide(again.approval.id, "approve");
    expect((await q.use(again.approval.id, file("b"))).changed).toEqual([]);
    expect(q.get(again.approval.id).state).toBe("used");
  });

  it("keeps a denial for the same command in the same phase, until a person approves it after all", async () => {
    const q = queue();
    const { approval } = await q.request("ph_1", key, why);
    await q.decide(approval.id, "deny", "no shell scripts today");
    const d = await q.deniedFor("ph_1", key);
    expect(d).toMatchObject({ id: approval.id, note: "no shell scripts today", retries: 1 });
    expect(await q.deniedFor("ph_2", key)).toBeNull();
    expect(await q.deniedFor("ph_1", { argv: ["sh", "y.sh"] })).toBeNull();
    await expect(q.decide(approval.id, "deny")).rejects.toMatchObject({ code: "SBX_ERR_APPROVAL_DECIDED" });
    await q.decide(approval.id, "approve", "on second thought");
    expect(await q.deniedFor("ph_1", key)).toBeNull();
    expect(q.approvedFor("ph_1", key)?.id).toBe(approval.id);
  });

  it("adds a new reason given on a retry of the pending request, once", async () => {
    const q = queue();
    const first = await q.request("ph_1", key, { ...why, requestReason: "first" });
    const second = await q.request("ph_1", key, { ...why, requestReason: "the helper sets up fixtures" });
    expect(second).toMatchObject({ created: false, reasonAdded: true });
    expect(second.approval.id).toBe(first.approval.id);
    const third = await q.request("ph_1", key, { ...why, requestReason: "the helper sets up fixtures" });
    expect(third.reasonAdded).toBe(false);
    expect(q.get(first.approval.id)).toMatchObject({ requestReason: "first", retries: 2, laterReasons: [{ reason: "the helper sets up fixtures" }] });
  });

  it("reads records written before files and reasons existed", async () => {
    const file = path.join(dir, "old", "approvals.json");
    await mkdir(path.dirname(file), { recursive: true });
    const old = { id: "ap_1", phaseId: "ph_1", argv: ["x"], command: null, ruleId: "r", clause: "c", policyReason: "p", requestReason: null, state: "pending", requestedAt: "t", decidedAt: null, note: null, usedAt: null };
    await writeFile(file, JSON.stringify([old]));
    const q = await ApprovalQueue.open(path.dirname(file), clock);
    expect(q.get("ap_1")).toMatchObject({ files: [], laterReasons: [], retries: 0 });
  });
});

describe("reserved .env names", () => {
  it("drops what changes what runs or where packages come from, and keeps the rest", () => {
    const { kept, dropped } = splitDotenv({
      BASH_ENV: "/workspace/evil.sh",
      ENV: "/workspace/evil.sh",
      PIP_INDEX_URL: "https://evil.example/simple",
      PIP_EXTRA_INDEX_URL: "https://evil.example/simple",
      PIP_CONFIG_FILE: "/workspace/pip.conf",
      PYTHONSTARTUP: "x.py",
      PYTHONUSERBASE: "/workspace/u",
      PYTHONWARNINGS: "ignore::evil.W",
      GCONV_PATH: "/workspace/g",
      LD_PRELOAD: "/workspace/x.so",
      BASH_FUNC_ls: "() { rm -rf x; }",
      https_proxy: "http://evil",
      XDG_CONFIG_HOME: "/workspace/cfg",
      TMPDIR: "/workspace",
      DATABASE_URL: "postgres://x",
      API_KEY: "k",
      LOG_LEVEL: "debug",
    });
    expect(kept).toEqual({ DATABASE_URL: "postgres://x", API_KEY: "k", LOG_LEVEL: "debug" });
    expect(dropped).toContain("BASH_ENV");
    expect(dropped).toHaveLength(14);
    for (const n of ["PATH", "HOME", "IFS", "PS4", "PROMPT_COMMAND", "NO_PROXY", "LD_LIBRARY_PATH", "NLSPATH", "LOCPATH", "PYTHONPATH", "PYTHONHOME", "PYTHONBREAKPOINT", "PYTHONINSPECT", "PIP_TRUSTED_HOST", "SANDBOXD_X"]) {
      expect({ n, reserved: isReservedEnv(n) }).toEqual({ n, reserved: true });
    }
    for (const n of ["DATABASE_URL", "REDIS_URL", "PYTHONSAFEPATH", "PYTHONHASHSEED", "MODE"]) expect({ n, reserved: isReservedEnv(n) }).toEqual({ n, reserved: false });
  });
});
