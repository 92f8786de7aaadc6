/**
 * The per-command cgroup wall with cgroups readied ahead (shim feature
 * "prepare", src/shim/cgroups.ts CommandCgroups.prepare), attacked from
 * inside a real sandbox: the daemon sends a prepare for every allowed exec
 * before it makes the verdict durable, so the forker sits in the next
 * command's cgroup while other commands run, daemonize, time out and are
 * killed. Whatever the timing, each command is born in its own cgroup (never
 * the supervisor's, never another's), what it left ends with it, and the
 * forker is never killed with a command.
 */
import { readdir, readFile, writeFile } from "node:fs/promises";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { ExecResult } from "../../src/phases/manager.js";
import type { PhaseView } from "../../src/phases/types.js";
import { cgroup2Root, commandCgroupDir } from "../../src/runtime/docker.js";
import {
  docker,
  makeProject,
  removeDir,
  requireEngineAndImage,
  startTestDaemon,
  tempDir,
  testPolicy,
  until as until2,
  writeScript,
  type TestDaemon,
  auditEvents,
  DAEMONIZE_PY,
} from "../helpers/sandbox.js";

let t: TestDaemon;
const cleanup: string[] = [];

beforeAll(async () => {
  await requireEngineAndImage();
  // two commands timed out on purpose, in a row: at the default's 2 fail-fast would escalate the phase (not the wall under test)
  const base = await readFile(await testPolicy(), "utf8");
  const text = base.replace(/^( {4}runtime:) 2$/m, "$1 3");
  if (!/^ {4}runtime: 3$/m.test(text)) throw new Error("policies/default.yaml's failFast limits moved; update this test");
  const dir = await tempDir("prepare-policy");
  cleanup.push(dir);
  const policy = path.join(dir, "policy.yaml");
  await writeFile(policy, text);
  t = await startTestDaemon({ policy });
});

afterAll(async () => {
  await t?.close();
  for (const d of cleanup) await removeDir(d);
});

function exec(phase: PhaseView, body: Record<string, unknown>): Promise<ExecResult> {
  return t.api.request<{ result: ExecResult }>("POST", `/v1/phases/${phase.id}/exec`, body).then((r) => r.result);
}

async function results(phaseId: string): Promise<Array<Record<string, unknown>>> {
  return (await auditEvents(t.stateDir)).filter((e) => e.phase === phaseId && e.type === "exec.result");
}

/**
 * Where the command was born and where what it left is: its own cgroup, a
 * double-forked daemon (setsid, its parent gone) in it, and the pid of that
 * daemon, which must not outlive the command.
 */
const BORN = `
import json, os, sys, time
def cg(pid):
    # the v2 hierarchy's line (the host is hybrid: the v1 lines are the container's)
    return [l for l in open("/proc/%s/cgroup" % pid).read().splitlines() if l.startswith("0::")][0]
${DAEMONIZE_PY}left = int(os.read(r, 32).decode())
time.sleep(float(sys.argv[1]) if len(sys.argv) > 1 else 0)
print(json.dumps({"self": cg("self"), "left": left, "leftIn": cg(left), "parent": cg(os.getppid())}))
`;

/** Daemonizes, says the daemon's pid at once, then outlasts its timeout ignoring SIGTERM: the kill lands on its cgroup. */
const OUTLAST = `
import os, signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
${DAEMONIZE_PY}print(os.read(r, 32).decode(), flush=True)
# a child of its own in its session too, which ignores SIGTERM as well
if os.fork() == 0:
    time.sleep(600)
    os._exit(0)
time.sleep(60)
`;

/** Which of these pids are still processes (seen from a later command). */
const ALIVE = `
import json, sys
alive = []
for pid in sys.argv[1:]:
    try:
        state = open("/proc/%s/stat" % pid).read().rsplit(")", 1)[1].split()[0]
        if state not in ("Z", "X"):
            alive.append(int(pid))
    except OSError:
        pass
print(json.dumps(alive))
`;

/** The phase's cgroup directory from the host: its child cgroups and who is in each. */
async function cgroupTree(phase: PhaseView): Promise<Record<string, number[]>> {
  const dir = commandCgroupDir((await cgroup2Root())!, phase.containerName);
  const tree: Record<string, number[]> = {};
  for (const e of await readdir(dir, { withFileTypes: true })) {
    if (!e.isDirectory()) continue;
    const procs = await readFile(path.join(dir, e.name, "cgroup.procs"), "utf8").catch(() => "");
    tree[e.name] = procs.split("\n").filter(Boolean).map(Number);
  }
  return tree;
}

/** The host pid of the forker (python3 -I -S -c, the owner's) and of the shim, from the host's /proc. */
async function starters(pids: number[]): Promise<{ forker: number[]; shim: number[]; other: number[] }> {
  const out = { forker: [] as number[], shim: [] as number[], other: [] as number[] };
  for (const pid of pids) {
    const cmdline = (await readFile(`/proc/${pid}/cmdline`, "utf8").catch(() => "")).split("\0");
    if (cmdline[0] === "python3" && cmdline[1] === "-I" && cmdline[2] === "-S" && cmdline[3] === "-c" && /PR_SET_DUMPABLE/.test(cmdline[4] ?? "")) out.forker.push(pid);
    else if (cmdline.some((a) => /shim/.test(a))) out.shim.push(pid);
    else out.other.push(pid);
  }
  return out;
}

/**
 * Polls the phase's cgroups from the host while commands run: how often the
 * forker was seen alone in a command's cgroup (readied ahead), and whether a
 * command's cgroup ever held the forker with two or more other processes.
 */
function watchForker(phase: PhaseView, forkerPid: number): { stop(): Promise<{ readied: number; polls: number }> } {
  let stopped = false;
  let readied = 0;
  let polls = 0;
  const loop = (async () => {
    while (!stopped) {
      const tree = await cgroupTree(phase).catch(() => ({}) as Record<string, number[]>);
      polls++;
      for (const [name, pids] of Object.entries(tree)) if (name.startsWith("cmd-") && pids.length === 1 && pids[0] === forkerPid) readied++;
      await new Promise((r) => setTimeout(r, 1));
    }
  })();
  return {
    stop: async () => {
      stopped = true;
      await loop;
      return { readied, polls };
    },
  };
}

async function containerLog(phase: PhaseView): Promise<string> {
  return (await docker.getContainer(phase.containerName).logs({ stdout: true, stderr: true })).toString("utf8");
}

describe("cgroups readied ahead (prepare), attacked from inside", () => {
  it("parallel execs racing each other's prepares: each is born in its own cgroup, its daemon in it and gone with it; the forker stays in the supervisor's", async () => {
    const project = await makeProject();
    cleanup.push(project);
    const { phase } = await t.api.request<{ phase: PhaseView }>("POST", "/v1/phases", { project, phase: "prepare-race", mode: "test" });
    const born = await writeScript(project, BORN);
    expect((await exec(phase, { argv: ["python3", await writeScript(project, "pass")] })).exitCode).toBe(0); // the forker is up
    const forker = (await starters((await cgroupTree(phase)).supervisor!)).forker;
    expect(forker).toHaveLength(1);
    // watched from the host meanwhile: the forker seen alone in a command's cgroup is one readied ahead
    const watch = watchForker(phase, forker[0]!);
    // waves of concurrent commands, some lingering so prepares land while they run and end
    const runs: Array<Promise<ExecResult>> = [];
    for (let wave = 0; wave < 4; wave++) {
      for (let i = 0; i < 6; i++) runs.push(exec(phase, { argv: ["python3", born, String((i % 3) * 0.15)] }));
      await new Promise((r) => setTimeout(r, 40));
    }
    const done = await Promise.all(runs);
    const seenByHost = await watch.stop();
    expect(seenByHost.readied).toBeGreaterThan(0); // the attack did race prepares
    const seen = done.map((r) => {
      expect(r).toMatchObject({ exitCode: 0, signal: null, timedOut: false, stderr: "" });
      return JSON.parse(r.stdout) as { self: string; left: number; leftIn: string; parent: string };
    });
    const cgroupsOf = seen.map((s) => s.self);
    // never the supervisor's, always a command's own, and no two commands in one
    for (const s of seen) {
      expect(s.self).toMatch(/^0::.*\/cmd-\d+$/);
      expect(s.leftIn).toBe(s.self);
    }
    expect(new Set(cgroupsOf).size).toBe(seen.length);
    // every daemon ended with its command
    const alive = await exec(phase, { argv: ["python3", await writeScript(project, ALIVE), ...seen.map((s) => String(s.left))] });
    expect(JSON.parse(alive.stdout)).toEqual([]);
    // from the host: between commands only the supervisor's cgroup is left, with the shim and the forker in it
    const tree = await until2("the command cgroups removed", async () => {
      const now = await cgroupTree(phase);
      return Object.keys(now).length === 1 ? now : null;
    });
    expect(Object.keys(tree)).toEqual(["supervisor"]);
    const inSupervisor = await starters(tree.supervisor!);
    expect(inSupervisor.forker).toHaveLength(1);
    expect(inSupervisor.other).toEqual([]);
    // the forker it started with served every command
    const logs = await containerLog(phase);
    expect(logs).not.toContain("forker exited");
    expect(logs.match(/"forker ready"/g)).toHaveLength(1);
    const recorded = await results(phase.id);
    expect(recorded.filter((r) => (r.argv as string[] | undefined)?.[1] === born)).toHaveLength(runs.length);
    await t.api.request("DELETE", `/v1/phases/${phase.id}`);
  }, 120_000);

  it("timeouts and kills landing while the forker sits in a readied cgroup end their own commands only: the forker lives, every other command keeps its result, and a refused command readies nothing", async () => {
    const project = await makeProject();
    cleanup.push(project);
    const { phase } = await t.api.request<{ phase: PhaseView }>("POST", "/v1/phases", { project, phase: "prepare-kill", mode: "test" });
    const quick = await writeScript(project, "import os\nprint(os.getpid())");
    expect((await exec(phase, { argv: ["python3", quick] })).exitCode).toBe(0); // the forker is up

    // refused by the policy: no prepare, so no cgroup is readied for it (none appears, not even for the 2 s an unused one lives)
    const refused = await exec(phase, { argv: ["true"] }).then(
      () => null,
      (e: Error) => e,
    );
    expect(refused?.message).toMatch(/requires approval/);
    expect(Object.keys(await cgroupTree(phase))).toEqual(["supervisor"]);

    const outlast = await writeScript(project, OUTLAST);
    const forker = (await starters((await cgroupTree(phase)).supervisor!)).forker;
    expect(forker).toHaveLength(1);
    const watch = watchForker(phase, forker[0]!);
    // commands timing out (SIGTERM ignored: the SIGKILL goes to the cgroup) at staggered times ...
    const victims = [400, 900].map((timeoutMs) => exec(phase, { argv: ["python3", outlast], timeoutMs }));
    // ... while short commands keep coming, each with its prepare, in three chains
    const shorts: ExecResult[] = [];
    const until = Date.now() + 2_500;
    await Promise.all(
      [0, 1, 2].map(async () => {
        while (Date.now() < until) shorts.push(await exec(phase, { argv: ["python3", quick] }));
      }),
    );
    const timedOut = await Promise.all(victims);
    expect((await watch.stop()).readied).toBeGreaterThan(0); // prepares did land meanwhile
    for (const v of timedOut) expect(v).toMatchObject({ timedOut: true, signal: "SIGKILL" });
    expect(shorts.length).toBeGreaterThan(10);
    for (const r of shorts) expect(r).toMatchObject({ exitCode: 0, signal: null, timedOut: false, stderr: "" });
    // what the timed-out commands left (a daemon each) ended with them
    const leftovers = timedOut.map((v) => v.stdout.trim());
    for (const p of leftovers) expect(p).toMatch(/^\d+$/);
    const alive = await exec(phase, { argv: ["python3", await writeScript(project, ALIVE), ...leftovers] });
    expect(JSON.parse(alive.stdout)).toEqual([]);
    // the forker was never killed with a command: the one it started with, in the supervisor's cgroup
    const logs = await containerLog(phase);
    expect(logs).not.toContain("forker exited");
    expect(logs).not.toContain("replacing the forker");
    expect(logs.match(/"forker ready"/g)).toHaveLength(1);
    const tree = await until2("the command cgroups removed", async () => {
      const now = await cgroupTree(phase);
      return Object.keys(now).length === 1 ? now : null;
    });
    expect((await starters(tree.supervisor!)).forker).toEqual(forker);
    // and the trail says so: each victim timed out, each short command exited 0
    const recorded = await results(phase.id);
    expect(recorded.filter((r) => (r.argv as string[] | undefined)?.[1] === outlast).map((r) => [r.timedOut, r.signal])).toEqual(victims.map(() => [true, "SIGKILL"]));
    const quickRecords = recorded.filter((r) => (r.argv as string[] | undefined)?.[1] === quick);
    expect(quickRecords).toHaveLength(shorts.length + 1);
    expect(quickRecords.every((r) => r.exitCode === 0 && r.timedOut === false)).toBe(true);
    await t.api.request("DELETE", `/v1/phases/${phase.id}`);
  }, 120_000);
});
