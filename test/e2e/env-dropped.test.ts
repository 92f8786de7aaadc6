/**
 * `.env` names the daemon does not give to commands (src/policy/env.ts) are
 * said at phase start — in the start's answer, the CLI's output and the
 * trail — never dropped silently. The real CLI over the real socket.
 */
import { chown, readFile, writeFile } from "node:fs/promises";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { PhaseView } from "../../src/phases/types.js";
import { OWNER, cli, makeProject, removeDir, requireEngineAndImage, startTestDaemon, writeScript, type TestDaemon } from "../helpers/sandbox.js";

let t: TestDaemon;
let project: string;

beforeAll(async () => {
  await requireEngineAndImage();
  t = await startTestDaemon();
  project = await makeProject();
  await writeFile(path.join(project, ".env"), "PYTHONPATH=/opt/lib\nLD_LIBRARY_PATH=/opt/so\nAPP_SETTING=kept\n");
  await chown(path.join(project, ".env"), OWNER.uid, OWNER.gid);
}, 120_000);

afterAll(async () => {
  await t?.close();
  await removeDir(project);
});

describe(".env entries the daemon drops", () => {
  it("are named with why in the CLI's start output, the answer, `phase show` and the trail; the kept ones reach commands", async () => {
    const started = await cli(["phase", "start", project, "--phase", "3.1", "--mode", "test"], { socket: t.socket });
    expect(started.code, started.stderr).toBe(0);
    const id = started.stdout.trim();
    expect(id).toMatch(/^ph_[0-9a-f]+$/); // stdout stays the id alone
    expect(started.stderr).toContain("the project's .env sets 2 name(s) its commands do not get");
    expect(started.stderr).toMatch(/^ {2}LD_LIBRARY_PATH: .+$/m);
    expect(started.stderr).toMatch(/^ {2}PYTHONPATH: .+$/m);
    expect(started.stderr).not.toContain("APP_SETTING");
    expect(started.stderr).not.toContain("/opt/lib"); // names, never values

    const { phase } = await t.api.request<{ phase: PhaseView }>("GET", `/v1/phases/${id}`);
    expect(phase.envDropped?.map((d) => d.name)).toEqual(["LD_LIBRARY_PATH", "PYTHONPATH"]);
    expect(phase.envDropped?.every((d) => d.why.length > 10)).toBe(true);
    const shown = await cli(["phase", "show", id], { socket: t.socket });
    expect(shown.stdout).toMatch(/\.env not given:\s+LD_LIBRARY_PATH, PYTHONPATH/);

    const journal = (await readFile(path.join(t.stateDir, "audit.jsonl"), "utf8")).split("\n").filter(Boolean).map((l) => JSON.parse(l) as Record<string, unknown>);
    const start = journal.find((r) => r.type === "phase.start" && r.phase === id)!;
    expect(start.envReserved).toEqual(["LD_LIBRARY_PATH", "PYTHONPATH"]);
    expect((start.envDropped as Array<{ name: string }>).map((d) => d.name)).toEqual(["LD_LIBRARY_PATH", "PYTHONPATH"]);
    expect(JSON.stringify(start)).not.toContain("/opt/lib");
    expect(await readFile(path.join(project, "build_audit.log"), "utf8")).toMatch(/\[ENV\] \[RESERVED\].*not given to commands: LD_LIBRARY_PATH, PYTHONPATH/);

    const probe = await writeScript(project, "import os; print(os.environ.get('PYTHONPATH'), os.environ.get('LD_LIBRARY_PATH'), os.environ.get('APP_SETTING'))");
    const r = await cli(["exec", id, "--", "python3", probe], { socket: t.socket });
    expect(r.stdout.trim()).toBe("None None kept");
    await t.api.request("DELETE", `/v1/phases/${id}`);
  }, 120_000);

  it("a project whose .env sets nothing reserved gets no such line", async () => {
    const clean = await makeProject();
    try {
      const started = await cli(["phase", "start", clean, "--phase", "3.2", "--mode", "test"], { socket: t.socket });
      expect(started.code).toBe(0);
      expect(started.stderr).toBe("");
      await t.api.request("DELETE", `/v1/phases/${started.stdout.trim()}`);
    } finally {
      await removeDir(clean);
    }
  }, 120_000);
});
