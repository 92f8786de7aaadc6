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
import {
  containersOf,
  docker,
  makeProject,
  removeDir,
  requireEngineAndImage,
  startTestDaemon,
  writeScript,
  type TestDaemon,
  auditEvents,
  DAEMONIZE_PY,
} from "../helpers/sandbox.js";

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
  return (await auditEvents(t.stateDir)).filter((e) => e.phase === phaseId && e.type === "exec.result");
}

/** A classic daemon: fork, setsid, fork again, the middle one exits; the grandchild lives on. */
const DAEMONIZE = `
import os, sys, time
${DAEMONIZE_PY}print(os.read(r, 32).decode())
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

  it("a command cannot change a concurrent command's limits, priorities or /proc files: the other's result is its own, and so is its record", async () => {
    const project = await makeProject();
    cleanup.push(project);
    const { phase } = await t.api.request<{ phase: PhaseView }>("POST", "/v1/phases", { project, phase: "limits", mode: "test" });
    const victimScript = await writeScript(project, LIMITS_VICTIM);
    const attackerScript = await writeScript(project, LIMITS_ATTACKER);
    const victim = exec(phase, ["python3", victimScript]);
    const attacker = await exec(phase, ["python3", attackerScript]);
    expect(attacker.stderr).toBe("");
    // EPERM from the seccomp filter for every call by pid; EACCES (Landlock) for the /proc file
    expect(JSON.parse(attacker.stdout)).toEqual({
      prlimit: 1,
      setpriority: 1,
      setpriority_user: 1,
      sched_setscheduler: 1,
      sched_setaffinity: 1,
      ioprio_set: 1,
      oom_score_adj: 13,
      autogroup: 13,
      prlimit_read: "ok",
    });
    const v = await victim;
    expect(v).toMatchObject({ exitCode: 1, signal: null, timedOut: false });
    // nice 19 and oom_score_adj 1000 are every command's own (below the shim), not the attacker's doing
    expect(JSON.parse(v.stdout)).toEqual({ nofile: "untouched", nice: 19, oom: "1000", policy: 0, files: "opened 50" });

    const recorded = await results(phase.id);
    const victimRecord = recorded.find((r) => (r.argv as string[] | undefined)?.[1] === victimScript);
    expect(victimRecord).toMatchObject({ exitCode: 1, signal: null, timedOut: false, stdout: v.stdout });
    const attackerRecord = recorded.find((r) => (r.argv as string[] | undefined)?.[1] === attackerScript);
    expect(attackerRecord).toMatchObject({ exitCode: 0, stdout: attacker.stdout });

    // a command still changes its own limits and priority
    const own = await exec(phase, ["python3", await writeScript(project, OWN_LIMITS)]);
    expect(own).toMatchObject({ exitCode: 0, stdout: "nofile 64 nice 19 policy 3 affinity ok\n" });
    await t.api.request("DELETE", `/v1/phases/${phase.id}`);
  });

  it("a fork bomb in one command neither stops the forker nor costs a concurrent command its result", async () => {
    const project = await makeProject();
    cleanup.push(project);
    const { phase } = await t.api.request<{ phase: PhaseView }>("POST", "/v1/phases", { project, phase: "forkbomb", mode: "test" });
    const innocentScript = await writeScript(project, "import time\ntime.sleep(6)\nprint('finished fine')");
    const duringScript = await writeScript(project, "print('started')");
    const innocent = exec(phase, ["python3", innocentScript]);
    await new Promise((r) => setTimeout(r, 500));
    const bomb = t.api.request<{ result: ExecResult }>("POST", `/v1/phases/${phase.id}/exec`, {
      argv: ["python3", await writeScript(project, FORK_BOMB)],
      timeoutMs: 4_000,
    });
    await new Promise((r) => setTimeout(r, 2_000));
    // started while the container's pids are exhausted: refused (126 for the CLI), nothing else lost
    const during = await t.api
      .request<{ result: ExecResult }>("POST", `/v1/phases/${phase.id}/exec`, { argv: ["python3", duringScript] })
      .then(
        (r) => r.result,
        (e: Error) => e,
      );
    expect((await bomb).result).toMatchObject({ timedOut: true });
    const i = await innocent;
    expect(i).toMatchObject({ exitCode: 0, signal: null, timedOut: false, stdout: "finished fine\n" });
    const record = (await results(phase.id)).find((r) => (r.argv as string[] | undefined)?.[1] === innocentScript);
    expect(record).toMatchObject({ exitCode: 0, signal: null, timedOut: false, stdout: "finished fine\n" });
    // the forker is the one it started with: it never exited
    const logs = (await docker.getContainer(phase.containerName).logs({ stdout: true, stderr: true })).toString("utf8");
    expect(logs).not.toContain("forker exited");
    expect(logs.match(/"forker ready"/g)).toHaveLength(1);
    expect(during).toBeDefined();
    const after = await exec(phase, ["python3", await writeScript(project, "print('after')")]);
    expect(after).toMatchObject({ exitCode: 0, stdout: "after\n" });
    await t.api.request("DELETE", `/v1/phases/${phase.id}`);
  });

  it("memory spread over many small processes gets them OOM-killed, not the shim: a concurrent command keeps its result", async () => {
    const project = await makeProject();
    cleanup.push(project);
    const { phase } = await t.api.request<{ phase: PhaseView }>("POST", "/v1/phases", { project, phase: "oom", mode: "test" });
    const innocentScript = await writeScript(project, "import time\ntime.sleep(8)\nprint('finished fine')");
    const hogScript = await writeScript(project, MEMORY_HOGS);
    const innocent = exec(phase, ["python3", innocentScript]);
    await new Promise((r) => setTimeout(r, 500));
    // 200 processes of 16 MiB each: more than the phase's 2 GiB, each far smaller than the shim
    const hog = await exec(phase, ["python3", hogScript, "200", "16"]);
    expect(hog.exitCode).toBe(0);
    const killed = Number(/killed (\d+)/.exec(hog.stdout)?.[1]);
    expect(killed).toBeGreaterThan(0); // the OOM killer did run
    const i = await innocent;
    expect(i).toMatchObject({ exitCode: 0, signal: null, timedOut: false, stdout: "finished fine\n" });
    const record = (await results(phase.id)).find((r) => (r.argv as string[] | undefined)?.[1] === innocentScript);
    expect(record).toMatchObject({ exitCode: 0, signal: null, timedOut: false, stdout: "finished fine\n" });
    // same shim, same forker, and the phase runs the next command
    const logs = (await docker.getContainer(phase.containerName).logs({ stdout: true, stderr: true })).toString("utf8");
    expect(logs.match(/"shim starting"/g)).toHaveLength(1);
    expect(logs).not.toContain("forker exited");
    const after = await exec(phase, ["python3", await writeScript(project, "print(open('/proc/self/oom_score_adj').read().strip())")]);
    expect(after).toMatchObject({ exitCode: 0, stdout: "1000\n" });
    await t.api.request("DELETE", `/v1/phases/${phase.id}`);
  });
});

const MEMORY_HOGS = `
import os, sys, time
n, mb = int(sys.argv[1]), int(sys.argv[2])
kids = []
for _ in range(n):
    pid = os.fork()
    if pid == 0:
        try:
            b = bytearray(mb << 20)
            for j in range(0, len(b), 4096):
                b[j] = 1
        except MemoryError:
            pass
        time.sleep(4)
        os._exit(0)
    kids.append(pid)
killed = sum(1 for k in kids if os.WIFSIGNALED(os.waitpid(k, 0)[1]))
print("killed %d" % killed)
`;

/** A failing run that, at its end, reports the limits and priority it had. */
const LIMITS_VICTIM = `
import json, os, resource, sys, time
open("limits-victim.pid", "w").write(str(os.getpid()))
before = resource.getrlimit(resource.RLIMIT_NOFILE)
time.sleep(2)
out = {"nofile": "untouched" if resource.getrlimit(resource.RLIMIT_NOFILE) == before else resource.getrlimit(resource.RLIMIT_NOFILE),
       "nice": os.getpriority(os.PRIO_PROCESS, 0), "oom": open("/proc/self/oom_score_adj").read().strip(),
       "policy": os.sched_getscheduler(0)}
try:
    held = [open("/dev/null") for _ in range(50)]
    out["files"] = "opened 50"
except OSError as e:
    out["files"] = e.errno
print(json.dumps(out))
sys.exit(1)
`;

/** Another command going for the victim's limits, priorities and /proc files. */
const LIMITS_ATTACKER = `
import ctypes, json, os, resource, time
libc = ctypes.CDLL(None, use_errno=True)
for _ in range(100):
    if os.path.exists("limits-victim.pid"):
        break
    time.sleep(0.02)
pid = int(open("limits-victim.pid").read())
out = {}
def attempt(name, f):
    try:
        f()
        out[name] = "ok"
    except OSError as e:
        out[name] = e.errno
def ioprio():
    if libc.syscall(251, 1, pid, 3 << 13) != 0:  # ioprio_set(IOPRIO_WHO_PROCESS, pid, IOPRIO_CLASS_IDLE)
        raise OSError(ctypes.get_errno(), "ioprio_set")
attempt("prlimit", lambda: resource.prlimit(pid, resource.RLIMIT_NOFILE, (5, 5)))
attempt("setpriority", lambda: os.setpriority(os.PRIO_PROCESS, pid, 19))
attempt("setpriority_user", lambda: os.setpriority(os.PRIO_USER, os.getuid(), 19))
attempt("sched_setscheduler", lambda: os.sched_setscheduler(pid, os.SCHED_IDLE, os.sched_param(0)))
attempt("sched_setaffinity", lambda: os.sched_setaffinity(pid, {0}))
attempt("ioprio_set", ioprio)
attempt("oom_score_adj", lambda: open("/proc/%d/oom_score_adj" % pid, "w").write("0"))
attempt("autogroup", lambda: open("/proc/%d/autogroup" % pid, "w").write("19"))
attempt("prlimit_read", lambda: resource.prlimit(pid, resource.RLIMIT_NOFILE))
print(json.dumps(out))
`;

const OWN_LIMITS = `
import os, resource
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
os.nice(3)
os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
os.sched_setaffinity(0, os.sched_getaffinity(0))
print("nofile", resource.getrlimit(resource.RLIMIT_NOFILE)[0], "nice", os.getpriority(os.PRIO_PROCESS, 0),
      "policy", os.sched_getscheduler(0), "affinity ok")
`;

const FORK_BOMB = `
import os, time
while True:
    try:
        os.fork()
    except OSError:
        time.sleep(0.01)
`;
