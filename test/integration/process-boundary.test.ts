/**
 * Each command's process boundary, attacked from inside a real sandbox
 * (src/shim/cgroups.ts, the Landlock domain in src/shim/forker.ts): nothing
 * a command starts outlives it, double-forked daemons included, and one
 * command cannot signal, trace or rewrite another's processes — the attack
 * that once made a failing `python3 victim.py` print "ALL PASSED!" and be
 * recorded as a pass.
 */
import { existsSync } from "node:fs";
import { readdir, readFile } from "node:fs/promises";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { ExecResult } from "../../src/phases/manager.js";
import { cgroup2Root, commandCgroupDir } from "../../src/runtime/docker.js";
import type { PhaseView } from "../../src/phases/types.js";
import { containersOf, docker, makeProject, removeDir, requireEngineAndImage, startTestDaemon, writeScript, type TestDaemon } from "../helpers/sandbox.js";

let t: TestDaemon;
const cleanup: string[] = [];

beforeAll(async () => {
  await requireEngineAndImage();
  t = await startTestDaemon();
});

afterAll(async () => {
  await t?.close();
  for (const d of cleanup) await removeDir(d);
});

async function exec(phase: PhaseView, argv: string[]): Promise<ExecResult> {
  return (await t.api.request<{ result: ExecResult }>("POST", `/v1/phases/${phase.id}/exec`, { argv })).result;
}

async function results(phaseId: string): Promise<Array<Record<string, unknown>>> {
  const text = await readFile(path.join(t.stateDir, "audit.jsonl"), "utf8");
  return text
    .split("\n")
    .filter(Boolean)
    .map((l) => JSON.parse(l) as Record<string, unknown>)
    .map((r) => (r.event as Record<string, unknown> | undefined) ?? r)
    .filter((e) => e.phase === phaseId && e.type === "exec.result");
}

/** A classic daemon: fork, setsid, fork again, the middle one exits; the grandchild lives on. */
const DAEMONIZE = `
import os, sys, time
r, w = os.pipe()
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.close(r)
        os.write(w, str(os.getpid()).encode())
        os.close(w)
        for fd in (0, 1, 2):
            os.close(fd)
        time.sleep(600)
        os._exit(0)
    os._exit(0)
os.close(w)
os.wait()
print(os.read(r, 32).decode())
`;

const ALIVE = `
import sys, os
pid = sys.argv[1]
try:
    state = open("/proc/%s/stat" % pid).read().rsplit(")", 1)[1].split()[0]
except OSError:
    state = "gone"
print(state)
`;

/** A failing test suite: its verdict lives in its memory for two seconds. */
const VICTIM = `
import os, sys, time
verdict = bytearray(b"SOME FAILED")
open("victim.pid", "w").write(str(os.getpid()))
time.sleep(2)
print(verdict.decode())
sys.exit(0 if verdict == b"ALL PASSED!" else 1)
`;

/** Another command, at the same time, going for the victim and its memory. */
const ATTACKER = `
import ctypes, json, os, re, signal, time
libc = ctypes.CDLL(None, use_errno=True)
for _ in range(100):
    if os.path.exists("victim.pid"):
        break
    time.sleep(0.02)
pid = int(open("victim.pid").read())
out = {}
try:
    os.kill(pid, signal.SIGSTOP)
    out["kill"] = "sent"
    os.kill(pid, signal.SIGCONT)
except OSError as e:
    out["kill"] = e.errno
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
out["ptrace"] = "attached" if libc.ptrace(16, pid, None, None) == 0 else ctypes.get_errno()
try:
    maps = open("/proc/%d/maps" % pid).read()
    out["maps"] = "read"
except OSError as e:
    maps = ""
    out["maps"] = e.errno
try:
    mem = open("/proc/%d/mem" % pid, "r+b", buffering=0)
    out["mem"] = "opened"
    for line in maps.splitlines():
        m = re.match(r"([0-9a-f]+)-([0-9a-f]+) rw", line)
        if not m:
            continue
        lo, hi = int(m.group(1), 16), int(m.group(2), 16)
        try:
            mem.seek(lo)
            data = mem.read(hi - lo)
        except OSError:
            continue
        at = data.find(b"SOME FAILED")
        if at >= 0:
            mem.seek(lo + at)
            mem.write(b"ALL PASSED!")
            out["mem"] = "rewritten"
except OSError as e:
    out["mem"] = e.errno
print(json.dumps(out))
`;

describe("each command's process boundary", () => {
  it("a double-forked daemon left by a command is gone when the command ends", async () => {
    const project = await makeProject();
    cleanup.push(project);
    const { phase } = await t.api.request<{ phase: PhaseView }>("POST", "/v1/phases", { project, phase: "outlive", mode: "test" });
    const started = await exec(phase, ["python3", await writeScript(project, DAEMONIZE)]);
    expect(started.exitCode).toBe(0);
    const pid = started.stdout.trim();
    expect(pid).toMatch(/^\d+$/);
    // seen from the next command: the daemon's pid is not a process any more
    const check = await exec(phase, ["python3", await writeScript(project, ALIVE), pid]);
    expect(check.stdout.trim()).toBe("gone");
    // and from the host: nothing of the owner's uid is left in the container between commands
    const [c] = await containersOf(t.stateDir);
    const top = (await docker.getContainer(c!.Id).top({ ps_args: "-o uid,pid,args" })) as { Processes: string[][] };
    const owners = top.Processes.filter((p) => p[0] === "1000");
    expect(owners.map((p) => p[2]).filter((a) => !/python3 -I -S -c/.test(a ?? ""))).toEqual([]); // the forker only
    // the phase's cgroup directory holds only the shim's own cgroup between commands, and goes with the phase
    const dir = commandCgroupDir((await cgroup2Root())!, phase.containerName);
    expect((await readdir(dir, { withFileTypes: true })).filter((e) => e.isDirectory()).map((e) => e.name)).toEqual(["supervisor"]);
    await t.api.request("DELETE", `/v1/phases/${phase.id}`);
    expect(existsSync(dir)).toBe(false);
  });

  it("a command cannot stop, trace or rewrite a concurrent command: the failing suite still fails, and that is what the trail records", async () => {
    const project = await makeProject();
    cleanup.push(project);
    const { phase } = await t.api.request<{ phase: PhaseView }>("POST", "/v1/phases", { project, phase: "reach", mode: "test" });
    const victimScript = await writeScript(project, VICTIM);
    const attackerScript = await writeScript(project, ATTACKER);
    const victim = exec(phase, ["python3", victimScript]);
    const attacker = await exec(phase, ["python3", attackerScript]);
    expect(attacker.stderr).toBe("");
    expect(JSON.parse(attacker.stdout)).toEqual({ kill: 1, ptrace: 1, maps: 13, mem: 13 }); // EPERM, EPERM, EACCES, EACCES
    const v = await victim;
    expect(v).toMatchObject({ exitCode: 1, signal: null, timedOut: false, stdout: "SOME FAILED\n" });

    const recorded = await results(phase.id);
    const victimRecord = recorded.find((r) => (r.argv as string[] | undefined)?.[1] === victimScript);
    expect(victimRecord).toMatchObject({ exitCode: 1, signal: null, timedOut: false, stdout: "SOME FAILED\n" });
    const attackerRecord = recorded.find((r) => (r.argv as string[] | undefined)?.[1] === attackerScript);
    expect(attackerRecord).toMatchObject({ exitCode: 0, stdout: attacker.stdout });
    await t.api.request("DELETE", `/v1/phases/${phase.id}`);
    const log = await readFile(phase.buildLog, "utf8");
    expect(log).toContain(`[SHELL] [EXEC] [python3 ${victimScript}] [FAIL exit 1]`);
  });
});
