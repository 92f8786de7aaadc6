/**
 * The spare layer disk (src/workspace/spare.ts), with real mounts and a real
 * daemon: a cold phase start takes the disk made ahead (the same loop device
 * ends up at its layer/), the daemon makes another after the start, the
 * stop leaves nothing mounted; a process killed with -9 holding a spare
 * leaves mounts that the next one's sweep removes; a spare of another budget
 * is not taken.
 */
import { spawn } from "node:child_process";
import { chown, mkdir, mkdtemp, readdir, rm, rmdir } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { destroySlotMounts, prepareSlotLayer } from "../../src/workspace/layer.js";
import { SpareLayer, WorkspaceLayer } from "../../src/workspace/index.js";
import type { PhaseView } from "../../src/phases/types.js";
import { OWNER, deviceAt, makeProject, mountsBelow, removeDir, requireEngineAndImage, startTestDaemon, until, writeScript, type TestDaemon } from "../helpers/sandbox.js";

const MiB = 1024 * 1024;




const warn = (m: string, e: Error) => {
  throw new Error(`${m}: ${e.message}`);
};

describe("the spare layer disk, alone", () => {
  let root: string;
  beforeAll(async () => {
    root = await mkdtemp(path.join(os.tmpdir(), "sbx-spare-"));
  });
  afterAll(async () => {
    for (const mp of (await mountsBelow(root)).reverse()) await new Promise((r) => spawn("umount", ["-l", mp]).on("exit", r));
    await rm(root, { recursive: true, force: true });
  });

  it("a layer of its budget takes it with its mounts; it is made again in a new folder; one of another budget is not taken; close removes it", async () => {
    const dir = path.join(root, "spare-layer");
    const spare = new SpareLayer({ dir, enabled: true, budgetBytes: () => 64 * MiB, warn });
    spare.refill();
    await spare.settled();
    expect(spare.status.state).toBe("ready");
    const [first] = await readdir(dir);
    const spareDisk = await deviceAt(path.join(dir, first!, "ws", "layer"));
    expect(spareDisk).toBeTruthy();

    const project = path.join(root, "project");
    await mkdir(project);
    const other = new WorkspaceLayer({ phaseDir: path.join(root, "p0"), project, hidden: [], readOnly: [], budgetBytes: 32 * MiB, takeSpare: (b) => spare.take(b) });
    await other.prepare();
    await other.mount();
    // another budget: its own disk, the spare still there
    expect(await deviceAt(other.paths.layerMnt)).not.toBe(spareDisk);
    expect(spare.status.state).toBe("ready");
    await other.destroy(null);

    const layer = new WorkspaceLayer({ phaseDir: path.join(root, "p1"), project, hidden: [], readOnly: [], budgetBytes: 64 * MiB, takeSpare: (b) => spare.take(b) });
    await layer.prepare();
    expect(spare.status.state).toBe("idle");
    await layer.mount();
    await layer.attach(null);
    // the very disk made ahead, now the phase's; its image moved with it
    expect(await deviceAt(layer.paths.layerMnt)).toBe(spareDisk);
    expect((await readdir(layer.paths.root)).sort()).toEqual(["layer", "layer.img", "stage", "view"]);
    expect((await deviceAt(layer.paths.view)) !== null).toBe(true);
    expect(await readdir(dir)).toEqual([]);

    spare.refill();
    await spare.settled();
    expect(spare.status.state).toBe("ready");
    const again = await readdir(dir);
    expect(again).toHaveLength(1);
    expect(again[0]).not.toBe(first);

    await layer.destroy(null);
    expect(await mountsBelow(path.join(root, "p1"))).toEqual([]);
    await spare.close();
    expect(await mountsBelow(dir)).toEqual([]);
    expect(await readdir(dir)).toEqual([]);
    expect(spare.take(64 * MiB)).toBeNull();
    spare.refill(); // closed: nothing is made
    await spare.settled();
    expect(await readdir(dir)).toEqual([]);
  }, 60_000);

  it("a process killed with -9 holding a spare leaves its mounts; the next one's sweep unmounts and removes them before it makes its own", async () => {
    const dir = path.join(root, "killed", "spare-layer");
    const script = [
      `const { SpareLayer } = await import(${JSON.stringify(path.resolve("dist/workspace/spare.js"))});`,
      `const s = new SpareLayer({ dir: ${JSON.stringify(dir)}, enabled: true, budgetBytes: () => ${64 * MiB}, warn: (m, e) => { console.error(m, e.message); process.exit(3); } });`,
      "s.refill(); await s.settled(); console.log('ready'); setInterval(() => {}, 1000);",
    ].join("\n");
    const child = spawn(process.execPath, ["--input-type=module", "-e", script], { stdio: ["ignore", "pipe", "inherit"] });
    await new Promise<void>((resolve, reject) => {
      child.stdout.on("data", (d: Buffer) => d.toString().includes("ready") && resolve());
      child.on("exit", (code) => reject(new Error(`the child exited ${code}`)));
    });
    child.kill("SIGKILL");
    await new Promise((r) => child.on("exit", r));
    const left = await mountsBelow(dir);
    expect(left.length).toBe(3); // view, stage, the disk
    const [dead] = await readdir(dir);

    const next = new SpareLayer({ dir, enabled: true, budgetBytes: () => 64 * MiB, warn });
    next.refill();
    await next.settled();
    expect(next.status.state).toBe("ready");
    // one spare, freshly made: the dead process's folder and its three mounts are gone
    expect((await mountsBelow(dir)).length).toBe(3);
    const now = await readdir(dir);
    expect(now).toHaveLength(1);
    expect(now[0]).not.toBe(dead);

    // A daemon killed while it made a spare leaves that make's shell running: its disk can be
    // mounted after the next daemon's first sweep. Every make sweeps again what is not its own.
    const late = path.join(dir, "s1-deadbeef-1");
    await prepareSlotLayer(late, 64 * MiB);
    expect((await mountsBelow(dir)).length).toBe(6);
    const taken = next.take(64 * MiB);
    expect(taken).not.toBeNull();
    await destroySlotMounts(path.dirname(taken!), []);
    await rmdir(path.dirname(taken!));
    next.refill();
    await next.settled();
    expect(next.status.state).toBe("ready");
    expect(await readdir(dir)).not.toContain("s1-deadbeef-1");
    expect((await mountsBelow(dir)).length).toBe(3); // the new spare's alone
    await next.close();
    expect(await mountsBelow(dir)).toEqual([]);
    expect(await readdir(dir)).toEqual([]);
  }, 60_000);
});

describe("the spare layer disk in the daemon", () => {
  let t: TestDaemon;
  let project: string;
  beforeAll(async () => {
    await requireEngineAndImage();
    t = await startTestDaemon();
    project = await makeProject();
    for (const f of await readdir(project)) await chown(path.join(project, f), OWNER.uid, OWNER.gid);
  }, 120_000);
  afterAll(async () => {
    await t?.close();
    await removeDir(project);
  });

  it("a cold phase start takes the spare (its disk becomes the phase's layer), the daemon makes another, the stop leaves nothing mounted", async () => {
    const spareDir = path.join(t.stateDir, "spare-layer");
    const first = await until("the spare layer disk", async () => (await readdir(spareDir).catch(() => []))[0]);
    const spareDisk = await until("the spare layer disk", () => deviceAt(path.join(spareDir, first, "ws", "layer")));
    const { phase } = await t.api.request<{ phase: PhaseView }>("POST", "/v1/phases", { project, phase: "spare-a", mode: "backtest" });
    expect(phase.state).toBe("running");
    const layerMnt = path.join(t.stateDir, "phases", phase.id, "ws", "layer");
    expect(await deviceAt(layerMnt)).toBe(spareDisk);
    // remade after the start, in a new folder
    const second = await until("a new spare", async () => (await readdir(spareDir)).find((n) => n !== first));
    await until("a new spare's disk", () => deviceAt(path.join(spareDir, second, "ws", "layer")));
    expect(await readdir(spareDir)).toEqual([second]);
    // the phase works on it
    const script = await writeScript(project, "open('/workspace/new.txt', 'w').write('hi\\n')\nprint(open('/workspace/new.txt').read(), end='')");
    const { result } = await t.api.request<{ result: { exitCode: number; stdout: string } }>("POST", `/v1/phases/${phase.id}/exec`, { argv: ["python3", script] });
    expect(result.exitCode).toBe(0);
    expect(result.stdout).toBe("hi\n");
    await t.api.request("DELETE", `/v1/phases/${phase.id}`);
    expect(await mountsBelow(path.join(t.stateDir, "phases", phase.id))).toEqual([]);
    // the daemon's stop removes the spare: nothing of the state dir stays mounted
    await t.daemon.close();
    expect(await mountsBelow(t.stateDir)).toEqual([]);
    expect(await readdir(spareDir).catch(() => [])).toEqual([]);
  }, 120_000);
});
