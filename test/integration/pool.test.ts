/**
 * The warm pool (src/phases/pool.ts) against the real engine and image: a
 * phase claimed from the pool runs in a container that was running before
 * its request and is its project's alone; a second pooled phase finds
 * nothing of the first (files, processes, /tmp, environment, packages); the
 * pool refills, falls back cold when empty, stops after failed fills, and
 * leaves nothing behind at shutdown. The restart's reap is
 * test/e2e/pool-restart.test.ts; the figure is bench/run.mjs's `pool` row.
 */
import { chown, readdir, readFile, writeFile } from "node:fs/promises";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { readRecords } from "../../src/audit/read.js";
import type { ExecResult, PoolStatus } from "../../src/phases/manager.js";
import type { PhaseView } from "../../src/phases/types.js";
import { OWNER, TEST_IMAGE, cli, docker, makeProject, removeDir, requireEngineAndImage, startTestDaemon, writeScript, type TestDaemon } from "../helpers/sandbox.js";

async function poolOf(t: TestDaemon): Promise<PoolStatus> {
  return (await t.api.request<{ pool: PoolStatus }>("GET", "/v1/phases")).pool;
}

/** Until `done(pool)` (fills take a container start each). */
async function poolUntil(t: TestDaemon, done: (p: PoolStatus) => boolean, timeoutMs = 90_000): Promise<PoolStatus> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const p = await poolOf(t);
    if (done(p)) return p;
    if (Date.now() > deadline) throw new Error(`the pool did not get there in time: ${JSON.stringify(p)}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

async function startPhase(t: TestDaemon, project: string, name: string): Promise<PhaseView> {
  const { phase } = await t.api.request<{ phase: PhaseView }>("POST", "/v1/phases", { project, phase: name, mode: "backtest" });
  return phase;
}

async function exec(t: TestDaemon, id: string, argv: string[], background = false): Promise<ExecResult> {
  const body = { argv, ...(background ? { background: true } : {}) };
  const { result } = await t.api.request<{ result: ExecResult }>("POST", `/v1/phases/${id}/exec`, body);
  return result;
}

/** Python as the agent runs it: a script in the project, then `python3 <script>`. */
async function py(t: TestDaemon, id: string, project: string, code: string): Promise<ExecResult> {
  return exec(t, id, ["python3", await writeScript(project, code)]);
}

/** Containers of this daemon that are its warm pool's (unclaimed or claimed). */
async function poolContainers(instance: string): Promise<string[]> {
  const found = await docker.listContainers({ all: true, filters: { label: [`sandboxd.instance=${instance}`, "sandboxd.pool=1"] } });
  return found.map((c) => c.Id);
}

describe("warm pool", () => {
  let t: TestDaemon;
  let instance: string;
  const projects: string[] = [];

  beforeAll(async () => {
    await requireEngineAndImage();
    t = await startTestDaemon({ env: { SANDBOXD_POOL_SIZE: "2" } });
    instance = (await readFile(path.join(t.stateDir, "instance"), "utf8")).trim();
    for (let i = 0; i < 2; i++) projects.push(await makeProject());
    await writeFile(path.join(projects[0]!, "only_a.txt"), "project A\n");
    await writeFile(path.join(projects[0]!, ".env"), "A_SECRET=alpha-secret-value-123\n");
    await writeFile(path.join(projects[1]!, "only_b.txt"), "project B\n");
    for (const p of projects) for (const f of await readdir(p)) await chown(path.join(p, f), OWNER.uid, OWNER.gid);
  }, 120_000);

  afterAll(async () => {
    await t?.close();
    for (const p of projects) await removeDir(p);
  });

  let a: PhaseView;

  it("a phase claimed from the pool runs in a container started before its request, as the owner, and sees its own project only", async () => {
    await poolUntil(t, (p) => p.ready >= 2);
    const before = Date.now();
    a = await startPhase(t, projects[0]!, "pool-a");
    expect(a.state).toBe("running");
    expect(a.pooled?.filledAt).toBeTruthy();
    // the claim attached the project to a container that was running already
    const info = await docker.getContainer(a.containerId!).inspect();
    expect(Date.parse(info.State.StartedAt)).toBeLessThan(before);
    expect(info.Config.Labels["sandboxd.pool"]).toBe("1");
    expect(info.Config.Labels["sandboxd.phase"]).toBe(a.id);
    expect(info.Name).toBe(`/sandboxd-${a.id}`);

    const r = await py(t, a.id, projects[0]!, [
      "import os, json",
      "print(json.dumps({'uid': os.getuid(), 'ws': sorted(os.listdir('/workspace')), 'secret': [len(os.environ.get('A_SECRET', '')), os.environ.get('A_SECRET', '')[:5]], 'pkgw': os.access('/opt/sandboxd-packages/user', os.W_OK)}))",
    ].join("\n"));
    expect(r.exitCode, r.stderr).toBe(0);
    const seen = JSON.parse(r.stdout) as { uid: number; ws: string[]; secret: [number, string]; pkgw: boolean };
    expect(seen.uid).toBe(OWNER.uid);
    expect(seen.ws).toContain("only_a.txt");
    expect(seen.ws).not.toContain("only_b.txt");
    // the credential file is hidden in the view, its values are the commands' environment
    expect(seen.ws).not.toContain(".env");
    expect(seen.secret).toEqual(["alpha-secret-value-123".length, "alpha"]);
    // the project's package disk reached the container at the claim, owned by the project owner
    expect(seen.pkgw).toBe(true);

    const records = await readRecords(t.stateDir, { phase: a.id });
    const start = records.find((r) => r.type === "phase.start")!;
    expect(start.pooled).toBeTruthy();
    expect(records.find((r) => r.type === "phase.ready")?.pooled).toBe(true);
    const confine = records.find((r) => r.type === "net.confine")!;
    expect(confine.recorded).toBe(true);
    expect(confine.pooled).toBe(true);
    // the namespace was confined at the fill, and its refusals are this phase's now
    const out = await py(t, a.id, projects[0]!, "import socket\ntry:\n    socket.create_connection(('10.9.8.7', 80), timeout=3)\nexcept OSError as e:\n    print(type(e).__name__)");
    expect(out.stdout.trim()).toBe("ConnectionRefusedError");
    await expect
      .poll(async () => (await readRecords(t.stateDir, { phase: a.id })).some((x) => x.type === "net.connect" && x.address === "10.9.8.7" && x.decision === "forbid"), { timeout: 10_000 })
      .toBe(true);
  });

  it("a second pooled phase never sees the first's files, processes, /tmp, environment or packages", async () => {
    // the first leaves traces everywhere it can: /tmp, the package disk, its view, a running process
    const leave = await py(t, a.id, projects[0]!, [
      "import os",
      "open('/tmp/a_marker', 'w').write('from A')",
      "open('/opt/sandboxd-packages/user/a_pkg_marker', 'w').write('from A')",
      "open('/workspace/a_wrote.txt', 'w').write('from A')",
    ].join("\n"));
    expect(leave.exitCode, leave.stderr).toBe(0);
    const sleeper = await writeScript(projects[0]!, "import time\nopen('/tmp/a_sleeping', 'w').write('1')\ntime.sleep(300)");
    await t.api.request("POST", `/v1/phases/${a.id}/exec`, { argv: ["python3", sleeper], background: true, timeoutMs: 60_000 });

    await poolUntil(t, (p) => p.ready >= 1);
    const b = await startPhase(t, projects[1]!, "pool-b");
    expect(b.pooled?.filledAt).toBeTruthy();
    expect(b.containerId).not.toBe(a.containerId);
    const r = await py(t, b.id, projects[1]!, [
      "import os, json",
      "procs = []",
      "for p in os.listdir('/proc'):",
      "    if p.isdigit():",
      "        try: procs.append(open(f'/proc/{p}/cmdline','rb').read().replace(b'\\0', b' ').decode())",
      "        except OSError: pass",
      "print(json.dumps({",
      "  'tmp': sorted(os.listdir('/tmp')),",
      "  'pkg': sorted(os.listdir('/opt/sandboxd-packages/user')),",
      "  'ws': sorted(os.listdir('/workspace')),",
      "  'env': sorted(k for k in os.environ if 'SECRET' in k),",
      "  'sleeper': any('s' in c and 'time.sleep' in c or 'sbx_scripts' in c and 'sleep' in c for c in procs),",
      "  'procs': procs,",
      "}))",
    ].join("\n"));
    expect(r.exitCode, r.stderr).toBe(0);
    const seen = JSON.parse(r.stdout) as { tmp: string[]; pkg: string[]; ws: string[]; env: string[]; procs: string[] };
    expect(seen.tmp.filter((f) => f.startsWith("a_"))).toEqual([]);
    expect(seen.pkg).not.toContain("a_pkg_marker");
    expect(seen.ws).toContain("only_b.txt");
    expect(seen.ws).not.toContain("only_a.txt");
    expect(seen.ws).not.toContain("a_wrote.txt");
    expect(seen.env).toEqual([]);
    expect(seen.procs.some((c) => c.includes(path.basename(sleeper)))).toBe(false);
    // and A still has its own, untouched by B
    const still = await py(t, a.id, projects[0]!, "import os\nprint(sorted(f for f in os.listdir('/tmp') if f.startswith('a_')))");
    expect(still.stdout).toContain("a_marker");
    await t.api.request("DELETE", `/v1/phases/${b.id}`);
    await t.api.request("DELETE", `/v1/phases/${a.id}`);
    // a pooled phase's container is destroyed with it, never put back
    await expect(docker.getContainer(a.containerId!).inspect()).rejects.toThrow();
  });

  it("refills after claims, falls back to a cold start when empty, and says so in ps and the events", async () => {
    const full = await poolUntil(t, (p) => p.ready >= 2 && p.filling === 0);
    expect(full.fills).toBeGreaterThanOrEqual(4);
    // three starts at once against two ready slots: two claims, one cold start
    const [p1, p2, p3] = await Promise.all([0, 1, 2].map((i) => startPhase(t, projects[1]!, `burst-${i}`)));
    const pooled = [p1!, p2!, p3!].filter((p) => p.pooled);
    expect(pooled.length).toBe(2);
    const cold = [p1!, p2!, p3!].find((p) => !p.pooled)!;
    const info = await docker.getContainer(cold.containerId!).inspect();
    expect(info.Config.Labels["sandboxd.pool"]).toBeUndefined();
    for (const p of [p1!, p2!, p3!]) expect((await exec(t, p.id, ["python3", "--version"])).exitCode).toBe(0);
    const after = await poolOf(t);
    expect(after.hits).toBe(4);
    expect(after.misses).toBe(1);
    expect(after.hitRate).toBeCloseTo(0.8);
    const ps = await cli(["ps"], { socket: t.socket });
    expect(ps.code, ps.stderr).toBe(0);
    expect(ps.stdout).toMatch(/pool: running, \d ready of 2.*hit rate 80% \(4 of 5 starts\)/);
    for (const p of [p1!, p2!, p3!]) await t.api.request("DELETE", `/v1/phases/${p.id}`);
    // the fills are in the trail and the events stream, with the pool's figures
    const events = await cli(["events", "--no-follow"], { socket: t.socket });
    const fills = events.stdout.split("\n").filter((l) => l.includes('"pool.fill"'));
    expect(fills.length, events.stderr).toBeGreaterThanOrEqual(4);
    expect(JSON.parse(fills.at(-1)!).pool).toMatchObject({ size: 2 });
  });

  it("leaves no pool container, mount or folder behind when the daemon stops", async () => {
    await poolUntil(t, (p) => p.ready >= 2);
    expect((await poolContainers(instance)).length).toBe(2);
    const stateDir = t.stateDir;
    await t.daemon.close();
    expect(await poolContainers(instance)).toEqual([]);
    const left = await readdir(path.join(stateDir, "phases"));
    for (const id of left) expect(await readdir(path.join(stateDir, "phases", id))).not.toContain("pool.json");
    const mounts = await readFile("/proc/self/mountinfo", "utf8");
    expect(mounts).not.toContain(stateDir);
  });
});

describe("warm pool whose fills fail", () => {
  let t: TestDaemon;

  afterAll(async () => {
    await t?.close();
  });

  it("stops refilling after repeated failures, records each and says so in ps; phases still start cold", async () => {
    // an image the engine does not have: every fill fails at the container's creation
    t = await startTestDaemon({ env: { SANDBOXD_POOL_SIZE: "1", SANDBOXD_IMAGE: "sandboxd-sandbox:no-such-image-for-the-pool" } });
    const stopped = await poolUntil(t, (p) => p.state === "stopped");
    expect(stopped.failures).toBe(3);
    expect(stopped.lastError).toMatch(/no-such-image/);
    const trail = await readRecords(t.stateDir, {});
    expect(trail.filter((r) => r.type === "pool.fill.failed").map((r) => r.consecutive)).toEqual([1, 2, 3]);
    expect(trail.some((r) => r.type === "pool.stopped")).toBe(true);
    // no further fill: the count stays
    await new Promise((r) => setTimeout(r, 1_500));
    expect((await readRecords(t.stateDir, {})).filter((r) => r.type === "pool.fill.failed").length).toBe(3);
    const ps = await cli(["ps"], { socket: t.socket });
    expect(ps.stdout).toContain("pool: STOPPED after 3 failed fills in a row");
    // every failed fill was undone: no folder, no mount (but the daemon's spare layer disk, src/workspace/spare.ts)
    const phases = await readdir(path.join(t.stateDir, "phases")).catch(() => []);
    expect(phases).toEqual([]);
    const mounted = (await readFile("/proc/self/mountinfo", "utf8")).split("\n").filter((l) => l.includes(t.stateDir));
    expect(mounted.filter((l) => !l.includes(`${t.stateDir}/spare-layer/`))).toEqual([]);
    void TEST_IMAGE;
  });
});
