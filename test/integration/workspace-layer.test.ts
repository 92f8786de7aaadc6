/**
 * The change layer on the host, without a container: a real overlay on a
 * real loop-mounted ext4, written through the view as a command would, read
 * back as a change set, applied or discarded. (The container side — the view
 * propagating into a running sandbox — is in workspace.test.ts.) Each case
 * runs twice: with the daemon's host helper (mount steps and xattr reads as
 * system calls in one long-lived process) and without it (a process per
 * step, the fallback for a host without python3).
 */
import { chmod, lstat, mkdir, readFile, readdir, rename, rm, symlink, unlink, writeFile } from "node:fs/promises";
import path from "node:path";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { applyChangeSet, WorkspaceLayer } from "../../src/workspace/index.js";
import { HelperUnavailable, HostHelper, hostHelper } from "../../src/workspace/hosthelper.js";
import { tempDir } from "../helpers/sandbox.js";

let project: string;
let phaseDir: string;
let layer: WorkspaceLayer;

async function snapshot(root: string): Promise<Record<string, string>> {
  const out: Record<string, string> = {};
  async function walk(rel: string): Promise<void> {
    for (const name of (await readdir(path.join(root, rel))).sort()) {
      const r = rel ? `${rel}/${name}` : name;
      const st = await lstat(path.join(root, r));
      if (st.isDirectory()) {
        out[r] = `dir ${(st.mode & 0o7777).toString(8)}`;
        await walk(r);
      } else out[r] = `file ${(st.mode & 0o7777).toString(8)} ${(await readFile(path.join(root, r))).toString("base64")}`;
    }
  }
  await walk("");
  return out;
}

async function setUp(useHelper: boolean): Promise<void> {
  project = await tempDir("wsproj");
  phaseDir = await tempDir("wsphase");
  await mkdir(path.join(project, "services"));
  await mkdir(path.join(project, "tests"));
  await mkdir(path.join(project, "shared"));
  await mkdir(path.join(project, ".git"));
  await writeFile(path.join(project, ".git", "config"), "[core]\n");
  await writeFile(path.join(project, ".env"), "DATABASE_URL=postgres://u:p@h/db\n");
  await writeFile(path.join(project, "services", "risk.py"), "x = 1\n");
  await writeFile(path.join(project, "tests", "test_risk.py"), "def test_x():\n    pass\n");
  await writeFile(path.join(project, "shared", "models.py"), "class M: pass\n");
  await writeFile(path.join(project, "run.sh"), "#!/bin/sh\n");
  layer = new WorkspaceLayer({ phaseDir, project, hidden: [".env"], readOnly: [".git"], budgetBytes: 64 * 1024 * 1024, hostHelper: useHelper });
  await layer.prepare();
  await layer.mount();
  await layer.attach(null);
}

describe.each([
  { mode: "the host helper", useHelper: true },
  { mode: "a process per step", useHelper: false },
])("workspace layer (host side), through $mode", ({ useHelper }) => {
  beforeEach(async () => {
    await setUp(useHelper);
  });

  afterEach(async () => {
    await layer.destroy(null);
    await rm(project, { recursive: true, force: true });
    await rm(phaseDir, { recursive: true, force: true });
  });

  it("hides .env, keeps .git read-only, and reads nothing changed from a fresh view", async () => {
    const view = layer.paths.view;
    await expect(lstat(path.join(view, ".env"))).rejects.toMatchObject({ code: "ENOENT" });
    await expect(writeFile(path.join(view, ".git", "config"), "x")).rejects.toMatchObject({ code: "EROFS" });
    expect((await layer.changes()).changes).toEqual([]);
  });

  it("reads creates, edits, deletes, renames and modes; discarding restores the project byte for byte", async () => {
    const before = await snapshot(project);
    const view = layer.paths.view;
    await writeFile(path.join(view, "services", "risk.py"), "x = 2\n");
    await writeFile(path.join(view, "services", "new.py"), "y = 1\n");
    await unlink(path.join(view, "shared", "models.py"));
    await rename(path.join(view, "tests", "test_risk.py"), path.join(view, "tests", "test_risk2.py"));
    await chmod(path.join(view, "run.sh"), 0o755);
    await writeFile(path.join(view, ".env"), "DATABASE_URL_TEST=postgres://prod\n");
    const { changes } = await layer.changes();
    const byPath = Object.fromEntries(changes.map((c) => [c.path, c]));
    expect(byPath["services/risk.py"]).toMatchObject({ kind: "modify", sizeBytes: 6 });
    expect(byPath["services/new.py"]).toMatchObject({ kind: "create", sizeBytes: 6 });
    expect(byPath["shared/models.py"]).toMatchObject({ kind: "delete" });
    expect(byPath["tests/test_risk2.py"]).toMatchObject({ kind: "rename", from: "tests/test_risk.py" });
    expect(byPath["run.sh"]).toMatchObject({ kind: "modify", modeOnly: true, mode: 0o755 });
    expect(byPath[".env"]).toMatchObject({ kind: "create" });
    expect(changes).toHaveLength(6);

    await layer.reset(null);
    expect(await snapshot(project)).toEqual(before);
    expect(await snapshot(layer.paths.view)).toEqual(Object.fromEntries(Object.entries(before).filter(([k]) => k !== ".env")));
    expect((await layer.changes()).changes).toEqual([]);
  });

  it("applies an iteration to the project and starts the next from it", async () => {
    const view = layer.paths.view;
    await writeFile(path.join(view, "services", "risk.py"), "x = 3\n");
    await mkdir(path.join(view, "services", "pkg"));
    await writeFile(path.join(view, "services", "pkg", "a.py"), "a = 1\n");
    await rename(path.join(view, "tests", "test_risk.py"), path.join(view, "services", "pkg", "test_moved.py"));
    await rm(path.join(view, "shared"), { recursive: true });
    await chmod(path.join(view, "run.sh"), 0o700);
    const set = await layer.changes();
    await layer.unmount(null);
    await applyChangeSet(set, { project, upper: layer.paths.upper, upperDev: await layer.upperDevice(), uid: process.getuid!(), gid: process.getgid!() });
    await layer.reset(null);
    expect(await readFile(path.join(project, "services", "risk.py"), "utf8")).toBe("x = 3\n");
    expect(await readFile(path.join(project, "services", "pkg", "a.py"), "utf8")).toBe("a = 1\n");
    expect(await readFile(path.join(project, "services", "pkg", "test_moved.py"), "utf8")).toContain("def test_x");
    await expect(lstat(path.join(project, "tests", "test_risk.py"))).rejects.toMatchObject({ code: "ENOENT" });
    await expect(lstat(path.join(project, "shared"))).rejects.toMatchObject({ code: "ENOENT" });
    expect((await lstat(path.join(project, "run.sh"))).mode & 0o777).toBe(0o700);
    expect(await readFile(path.join(project, ".env"), "utf8")).toContain("postgres://u:p@h/db");
    expect((await layer.changes()).changes).toEqual([]);
    expect(await readFile(path.join(view, "services", "risk.py"), "utf8")).toBe("x = 3\n");
  });

  it("never writes through a link planted in the project", async () => {
    const outside = await tempDir("outside");
    await writeFile(path.join(outside, "host.txt"), "host\n");
    await layer.unmount(null);
    await symlink(outside, path.join(project, "escape"));
    await layer.reset(null);
    const view = layer.paths.view;
    // through the view on the host the link resolves to the host folder; a command in
    // the sandbox would see the container's; what matters is what apply does
    // (an apply that fails says what it had applied — nothing here — and why: the link)
    await expect(
      applyChangeSet(
        { changes: [{ kind: "create", path: "escape/host.txt", isDir: false, sizeBytes: 1 }] },
        { project, upper: layer.paths.upper, upperDev: await layer.upperDevice(), uid: 0, gid: 0 },
      ),
    ).rejects.toMatchObject({ code: "SBX_ERR_PATH_INVALID", applied: [], failedAt: { path: "escape/host.txt" } });
    expect(await readFile(path.join(outside, "host.txt"), "utf8")).toBe("host\n");
    expect(view).toBeTruthy();
    await rm(outside, { recursive: true, force: true });
  });

  it("the layer's budget is a hard limit: ENOSPC", async () => {
    const big = Buffer.alloc(1024 * 1024, 1);
    let err: NodeJS.ErrnoException | null = null;
    try {
      for (let i = 0; i < 80; i++) await writeFile(path.join(layer.paths.view, `big${i}.bin`), big);
    } catch (e) {
      err = e as NodeJS.ErrnoException;
    }
    expect(err?.code).toBe("ENOSPC");
  });

  it("a folder removed and made again (opaque) lists every file it lost; one made anew inside is a create", async () => {
    const view = layer.paths.view;
    await rm(path.join(view, "services"), { recursive: true });
    await mkdir(path.join(view, "services"));
    await writeFile(path.join(view, "services", "fresh.py"), "f = 1\n");
    await mkdir(path.join(view, "tests", "unit"));
    const { changes } = await layer.changes();
    expect(changes).toContainEqual(expect.objectContaining({ kind: "delete", path: "services/risk.py" }));
    expect(changes).toContainEqual(expect.objectContaining({ kind: "create", path: "services/fresh.py" }));
    expect(changes).toContainEqual(expect.objectContaining({ kind: "create", path: "tests/unit", isDir: true }));
    // tests/ was only written into, not made again: nothing of it is lost
    expect(changes.filter((c) => c.kind === "delete").map((c) => c.path)).toEqual(["services/risk.py"]);
  });
});

describe("the host helper", () => {
  afterEach(async () => {
    await layer.destroy(null);
    await rm(project, { recursive: true, force: true });
    await rm(phaseDir, { recursive: true, force: true });
  });

  it("is started again after it died; the layer goes on", async () => {
    await setUp(true);
    const first = hostHelper().pid;
    expect(first).toBeGreaterThan(0);
    process.kill(first!, "SIGKILL");
    await new Promise((r) => setTimeout(r, 100));
    await writeFile(path.join(layer.paths.view, "services", "risk.py"), "x = 9\n");
    await layer.reset(null);
    expect(hostHelper().pid).not.toBe(first);
    expect(await readFile(path.join(layer.paths.view, "services", "risk.py"), "utf8")).toBe("x = 1\n");
    await expect(writeFile(path.join(layer.paths.view, ".git", "config"), "x")).rejects.toMatchObject({ code: "EROFS" });
  });

  it("says it is unavailable when its interpreter cannot start, and never half-runs a step", async () => {
    await setUp(true);
    const h = new HostHelper("/nonexistent/python3");
    await expect(h.run([{ op: "umount-lazy", target: layer.paths.view }])).rejects.toBeInstanceOf(HelperUnavailable);
    // the view is still mounted
    await expect(writeFile(path.join(layer.paths.view, ".git", "config"), "x")).rejects.toMatchObject({ code: "EROFS" });
  });

  it("a failed step stops the request and says which", async () => {
    await setUp(true);
    await expect(hostHelper().run([{ op: "bind", source: path.join(project, "nope"), target: path.join(project, "services") }])).rejects.toThrow(/No such file/);
  });
});
