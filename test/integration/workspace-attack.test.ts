/**
 * Attacks on the workspace walls (issue #10) from inside a real sandbox under
 * the real daemon: each one tries to get a change the rules forbid into the
 * project, and asserts the project is left as it was and the trail says why.
 */
import { execFile } from "node:child_process";
import { lstat, mkdir, readFile, readdir, readlink, writeFile } from "node:fs/promises";
import path from "node:path";
import { promisify } from "node:util";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { ExecResult } from "../../src/phases/manager.js";
import type { PhaseView } from "../../src/phases/types.js";
import type { CheckpointResult } from "../../src/workspace/index.js";
import { OWNER, makeProject, removeDir, requireEngineAndImage, startTestDaemon, writeScript, type TestDaemon } from "../helpers/sandbox.js";

const run = promisify(execFile);
let t: TestDaemon;
let project: string;
let phase: PhaseView;

async function exec(argv: string[]): Promise<ExecResult> {
  const { result } = await t.api.request<{ result: ExecResult }>("POST", `/v1/phases/${phase.id}/exec`, { argv });
  return result;
}
async function py(code: string): Promise<ExecResult> {
  return exec(["python3", await writeScript(project, code)]);
}
async function checkpoint(message: string): Promise<CheckpointResult> {
  return t.api.request<CheckpointResult>("POST", `/v1/phases/${phase.id}/checkpoint`, { message });
}
async function trail(): Promise<string> {
  return readFile(path.join(t.stateDir, "audit.jsonl"), "utf8");
}
const exists = (p: string) => lstat(p).then(() => true, () => false);

beforeAll(async () => {
  await requireEngineAndImage();
  t = await startTestDaemon();
  project = await makeProject();
  await mkdir(path.join(project, ".git", "hooks"), { recursive: true });
  await writeFile(path.join(project, ".git", "config"), "[core]\n\trepositoryformatversion = 0\n");
  await writeFile(path.join(project, ".env"), "DATABASE_URL=postgres://prod:pw@db.internal/trading\n");
  await writeFile(path.join(project, ".envrc"), "dotenv\n");
  await writeFile(path.join(project, "services", "calc.py"), "def add(a, b):\n    return a + b\n");
  await run("chown", ["-R", `${OWNER.uid}:${OWNER.gid}`, project]);
  ({ phase } = await t.api.request<{ phase: PhaseView }>("POST", "/v1/phases", { project, phase: "1.1", mode: "backtest" }));
}, 120_000);

afterAll(async () => {
  await t?.close();
  if (project) await removeDir(project);
});

/** The trail's record of the last refused iteration. */
async function lastRefusal(): Promise<{ state: string; failures: Array<{ rule: string; path: string }> }> {
  const recs = (await trail())
    .split("\n")
    .filter(Boolean)
    .map((l) => JSON.parse(l) as { type: string; state?: string; failures?: Array<{ rule: string; path: string }> })
    .filter((r) => r.type === "workspace.iteration" && r.state === "rejected");
  const r = recs.at(-1);
  return { state: r?.state ?? "none", failures: r?.failures ?? [] };
}

describe("links that alias a protected path", () => {
  it("a link to .env or .git inside the project is refused; the project keeps no alias", async () => {
    const r = await py("import os\nos.symlink('../.env', '/workspace/services/cfg')\nos.symlink('../.git', '/workspace/services/g')");
    expect(r.exitCode).toBe(0);
    const c = await checkpoint("links to protected paths");
    expect(c.iteration?.state).toBe("rejected");
    const failed = c.iteration?.failures.filter((f) => f.rule === "workspace.symlink").map((f) => f.path).sort();
    expect(failed).toEqual(["services/cfg", "services/g"]);
    expect(await exists(path.join(project, "services", "cfg"))).toBe(false);
    expect(await exists(path.join(project, "services", "g"))).toBe(false);
    const rec = await lastRefusal();
    expect(rec.failures).toContainEqual(expect.objectContaining({ rule: "workspace.symlink", path: "services/g" }));
    expect(await readFile(path.join(project, "build_audit.log"), "utf8")).toContain("[services/g] [REFUSED workspace.symlink]");
  });

  it("a link to the project's root, or through a link already in the project, is refused", async () => {
    // planted by the operator on the host: a folder link the agent cannot follow to judge
    const { symlink } = await import("node:fs/promises");
    await symlink("services", path.join(project, "svc"));
    const r = await py("import os\nos.symlink('..', '/workspace/services/root')\nos.symlink('../svc/calc.py', '/workspace/services/via')");
    expect(r.exitCode).toBe(0);
    const c = await checkpoint("root and chained links");
    expect(c.iteration?.state).toBe("rejected");
    expect(c.iteration?.failures.filter((f) => f.rule === "workspace.symlink").map((f) => f.path).sort()).toEqual(["services/root", "services/via"]);
    expect(await exists(path.join(project, "services", "root"))).toBe(false);
    expect(await exists(path.join(project, "services", "via"))).toBe(false);
    expect((await lastRefusal()).failures).toContainEqual(expect.objectContaining({ rule: "workspace.symlink", path: "services/root" }));
  });

  it("a link within the project to an ordinary file is still accepted", async () => {
    await py("import os\nos.symlink('calc.py', '/workspace/services/calc_alias.py')");
    const c = await checkpoint("an alias");
    expect(c.iteration?.state).toBe("accepted");
    expect(await readlink(path.join(project, "services", "calc_alias.py"))).toBe("calc.py");
  });
});

describe("what held", () => {
  it("a process left behind by a command does not outlive it to change a file after the judgement", async () => {
    const r = await py("import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n        for fd in (0, 1, 2): os.close(fd)\n        time.sleep(3)\n        open('/workspace/services/calc.py', 'a').write('late\\n')\n    os._exit(0)\nprint('started')");
    expect(r.stdout.trim()).toBe("started");
    await new Promise((res) => setTimeout(res, 4000));
    const v = await py("print(open('/workspace/services/calc.py').read(), end='')");
    expect(v.stdout).toBe("def add(a, b):\n    return a + b\n");
  });

  it("a folder removed and made again (an opaque folder in the layer) is judged as every file it lost, with or without getfattr on the host", async () => {
    const before = await readFile(path.join(project, "services", "calc.py"), "utf8");
    await py("import shutil, os\nshutil.rmtree('/workspace/services')\nos.mkdir('/workspace/services')\nopen('/workspace/services/calc.py', 'w').write('x = 1\\n')");
    const c = await checkpoint("replace the folder");
    expect(c.iteration?.state).toBe("rejected");
    expect(c.iteration?.changes.filter((x) => x.kind === "delete").map((x) => x.path)).toContain("services/__init__.py");
    expect(await readFile(path.join(project, "services", "calc.py"), "utf8")).toBe(before);
    expect(await exists(path.join(project, "services", "__init__.py"))).toBe(true);
    expect((await lastRefusal()).state).toBe("rejected");
  });

  it("a .git file in a subfolder (gitdir: pointer) is refused as repository metadata", async () => {
    await py("import os\nos.makedirs('/workspace/vendor', exist_ok=True)\nopen('/workspace/vendor/.git','w').write('gitdir: ../evil\\n')");
    const c = await checkpoint("gitfile");
    expect(c.iteration?.state).toBe("rejected");
    expect(c.iteration?.failures.map((f) => f.rule)).toContain("workspace.protected.git");
    expect(await exists(path.join(project, "vendor"))).toBe(false);
  });
});

describe("credential files below the root", () => {
  it("config/.env and deploy/server.key are not readable in the sandbox; a rewrite is refused and the project keeps them", async () => {
    const p2 = await makeProject();
    await mkdir(path.join(p2, "config"));
    await mkdir(path.join(p2, "deploy"), { mode: 0o750 });
    await writeFile(path.join(p2, "config", ".env"), "DATABASE_URL=postgres://prod:pw@db.internal/trading\n");
    await writeFile(path.join(p2, "config", "app.yaml"), "name: app\n");
    await writeFile(path.join(p2, "deploy", "server.key"), "-----BEGIN PRIVATE KEY-----\n");
    await run("chown", ["-R", `${OWNER.uid}:${OWNER.gid}`, p2]);
    const { phase: ph } = await t.api.request<{ phase: PhaseView }>("POST", "/v1/phases", { project: p2, phase: "1.2", mode: "backtest" });
    try {
      const ex = async (code: string) => (await t.api.request<{ result: ExecResult }>("POST", `/v1/phases/${ph.id}/exec`, { argv: ["python3", await writeScript(p2, code)] })).result;
      const r = await ex(
        "import os\nfor p in ['/workspace/config/.env', '/workspace/deploy/server.key']:\n    print(p, os.path.exists(p))\nprint(sorted(os.listdir('/workspace/config')))\nst = os.stat('/workspace/deploy')\nprint(oct(st.st_mode & 0o7777), st.st_uid)\nopen('/workspace/config/app.yaml', 'a').write('x: 1\\n')",
      );
      expect(r.stdout).toContain("/workspace/config/.env False");
      expect(r.stdout).toContain("/workspace/deploy/server.key False");
      expect(r.stdout).toContain("['app.yaml']");
      // the folders on the way are the project's, as they were
      expect(r.stdout).toContain(`0o750 ${OWNER.uid}`);
      // an ordinary edit in the same folder is one change and is accepted
      const ok = await t.api.request<CheckpointResult>("POST", `/v1/phases/${ph.id}/checkpoint`, { message: "config edit" });
      expect(ok.iteration?.state).toBe("accepted");
      expect(ok.iteration?.changes.map((c) => c.path)).toEqual(["config/app.yaml"]);
      // written again in the sandbox: refused, the host's file kept
      await ex("open('/workspace/config/.env', 'w').write('DATABASE_URL=postgres://evil\\n')");
      const c = await t.api.request<CheckpointResult>("POST", `/v1/phases/${ph.id}/checkpoint`, { message: "env" });
      expect(c.iteration?.state).toBe("rejected");
      expect(c.iteration?.failures.map((f) => f.rule)).toContain("workspace.protected.credentials");
      expect(await readFile(path.join(p2, "config", ".env"), "utf8")).toBe("DATABASE_URL=postgres://prod:pw@db.internal/trading\n");
      expect((await lastRefusal()).failures).toContainEqual(expect.objectContaining({ rule: "workspace.protected.credentials", path: "config/.env" }));
    } finally {
      await t.api.request("POST", `/v1/phases/${ph.id}/stop`, {}).catch(() => undefined);
      await removeDir(p2);
    }
  });
});
