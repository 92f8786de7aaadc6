/**
 * The forker keeps its Landlock ruleset from one command to the next (made
 * anew only when /proc/self/mountinfo reports a mount change), raises a
 * command after the fork only when it was born unraised, and gives every
 * command without stdin one /dev/null (src/shim/forker.ts). Attacked from
 * inside a real sandbox: commands started back to back from the kept ruleset
 * are still in domains of their own (no signal, trace or memory read across,
 * nor into the forker or the shim); mounts made in the container's mount
 * namespace after the ruleset was made (a top-level folder covered, uncovered,
 * covered again) are followed, and no rebuild ever opens /proc to writes; no
 * descriptor of the forker reaches a command; every command and what it forks
 * at once is born with oom_score_adj 1000 under load, cannot change it, and
 * the shim and the forker stay at 0 — also when the shim's write of the
 * forker's bias fails (then the command starts through a wrapper that raises
 * itself: the forker's write after the fork, which it replaced, left every
 * command of a loaded container at 0); a command cannot change the mount
 * table to force or hold off a rebuild.
 *
 * Mounts are made from the host with nsenter into the container's mount (and
 * pid) namespace, as the daemon's workspace layer changes /workspace.
 */
import { execFile } from "node:child_process";
import { existsSync } from "node:fs";
import { readFile, rm, writeFile } from "node:fs/promises";
import path from "node:path";
import { promisify } from "node:util";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { ExecResult } from "../../src/phases/manager.js";
import { LANDLOCK_EXEC_FD_PY } from "../../src/shim/landlock.js";
import type { PhaseView } from "../../src/phases/types.js";
import { auditEvents, docker, makeProject, removeDir, requireEngineAndImage, startTestDaemon, until, writeScript, type TestDaemon } from "../helpers/sandbox.js";

const run = promisify(execFile);
let t: TestDaemon;
let project: string;
let phase: PhaseView;

beforeAll(async () => {
  await requireEngineAndImage();
  t = await startTestDaemon();
  project = await makeProject();
  ({ phase } = await t.api.request<{ phase: PhaseView }>("POST", "/v1/phases", { project, phase: "kept-rules", mode: "test" }));
}, 120_000);

afterAll(async () => {
  if (phase) await t?.api.request("DELETE", `/v1/phases/${phase.id}`).catch(() => undefined);
  await t?.close();
  if (project) await removeDir(project);
});

async function exec(argv: string[]): Promise<ExecResult> {
  return (await t.api.request<{ result: ExecResult }>("POST", `/v1/phases/${phase.id}/exec`, { argv })).result;
}

async function py(code: string): Promise<ExecResult> {
  return exec(["python3", await writeScript(project, code)]);
}

async function results(): Promise<Array<Record<string, unknown>>> {
  return (await auditEvents(t.stateDir)).filter((e) => e.phase === phase.id && e.type === "exec.result");
}

/** The container's init, as the host sees it: nsenter's target for the container's mount namespace. */
async function containerPid(): Promise<number> {
  return (await docker.getContainer(phase.containerName).inspect()).State.Pid;
}

/** A mount change in the container's mount namespace, made from the host (as the daemon's layer does for /workspace). */
async function inContainerNs(...argv: string[]): Promise<void> {
  // -p too: umount(8) reads /proc/self/mountinfo, which the container's /proc has only for its own pids
  await run("nsenter", ["-t", String(await containerPid()), "-m", "-p", "--", ...argv], { timeout: 30_000 });
}

/** The shim and the forker, host pids: tini's child, and the shim's python child. */
async function supervisorPids(): Promise<{ shim: number; forker: number }> {
  const tini = await containerPid();
  const kids = async (pid: number) => (await readFile(`/proc/${pid}/task/${pid}/children`, "utf8")).trim().split(/\s+/).filter(Boolean).map(Number);
  for (const shim of await kids(tini)) {
    if (!(await readFile(`/proc/${shim}/cmdline`, "utf8")).includes("shim.cjs")) continue;
    for (const forker of await kids(shim)) {
      if ((await readFile(`/proc/${forker}/cmdline`, "utf8")).startsWith("python3\0-I\0-S\0-c")) return { shim, forker };
    }
  }
  throw new Error("no shim with a forker in the container");
}

/** Sleeps, its pid in a file, and reports at its end whether anything stopped or traced it. */
const VICTIM = (tag: string) => `
import os, sys, time
open("${tag}.pid", "w").write(str(os.getpid()))
secret = bytearray(b"VICTIM-SECRET-${tag}")
start = time.monotonic()
time.sleep(2.5)
status = open("/proc/self/status").read()
tracer = [l.split()[1] for l in status.splitlines() if l.startswith("TracerPid:")][0]
print("tracer", tracer, "slept", round(time.monotonic() - start) , secret.decode())
`;

/**
 * Started right after the victim, from the same kept ruleset: goes for the
 * victim, the forker (its parent) and the shim (the forker's parent) with a
 * signal, ptrace, process_vm_readv and /proc/<pid>/mem; and, to show the
 * attempts are real, for a child of its own, which it may signal.
 */
const ATTACKER = (tag: string) => `
import ctypes, json, os, signal, time
libc = ctypes.CDLL(None, use_errno=True)
for _ in range(200):
    if os.path.exists("${tag}.pid"):
        break
    time.sleep(0.01)
victim = int(open("${tag}.pid").read())
forker = os.getppid()
shim = int(open("/proc/%d/stat" % forker).read().rsplit(")", 1)[1].split()[1])
class Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
libc.process_vm_readv.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]
def attack(pid):
    out = {}
    try:
        os.kill(pid, signal.SIGSTOP)
        out["kill"] = "sent"
        os.kill(pid, signal.SIGCONT)
    except OSError as e:
        out["kill"] = e.errno
    try:
        os.kill(pid, 0)
        out["kill0"] = "sent"
    except OSError as e:
        out["kill0"] = e.errno
    out["ptrace"] = "attached" if libc.ptrace(16, pid, None, None) == 0 else ctypes.get_errno()
    out["seize"] = "seized" if libc.ptrace(0x4206, pid, None, None) == 0 else ctypes.get_errno()
    buf = ctypes.create_string_buffer(64)
    local = Iovec(ctypes.cast(buf, ctypes.c_void_p), 64)
    remote = Iovec(0x400000, 64)
    n = libc.process_vm_readv(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
    out["vm_readv"] = "read" if n >= 0 else ctypes.get_errno()
    try:
        open("/proc/%d/mem" % pid, "rb").close()
        out["mem"] = "opened"
    except OSError as e:
        out["mem"] = e.errno
    return out
res = {"victim": attack(victim), "forker": attack(forker), "shim": attack(shim)}
kid = os.fork()
if kid == 0:
    time.sleep(30)
    os._exit(0)
os.kill(kid, signal.SIGTERM)
res["own_child"] = os.WTERMSIG(os.waitpid(kid, 0)[1])
print(json.dumps(res))
`;

const REFUSED = { kill: 1, kill0: 1, ptrace: 1, seize: 1, vm_readv: 1, mem: 13 }; // EPERM …, EACCES

describe("commands from one kept Landlock ruleset", () => {
  it("two commands started back to back are in two domains: neither signals, traces or reads the other, the forker or the shim; each still signals its own child", async () => {
    // warm: the ruleset is made for the first command and kept for the next ones
    expect((await py("print('warm')")).stdout).toBe("warm\n");
    // pair3: a mount change between the two, so the attacker's domain comes from a ruleset made anew
    for (const tag of ["pair1", "pair2", "pair3"]) {
      const victimScript = await writeScript(project, VICTIM(tag));
      const attackerScript = await writeScript(project, ATTACKER(tag));
      const victim = exec(["python3", victimScript]);
      if (tag === "pair3") {
        // its pid file, in the phase's layer (the view's upper dir): the victim runs, under the old ruleset
        await until("the victim started", async () => existsSync(path.join(t.stateDir, "phases", phase.id, "ws", "layer", "upper", "pair3.pid")));
        await inContainerNs("sh", "-c", "mount -t tmpfs -o size=1m kept-rules-pair /mnt && umount /mnt");
      }
      const attacker = await exec(["python3", attackerScript]);
      expect(attacker.stderr).toBe("");
      expect(JSON.parse(attacker.stdout)).toEqual({ victim: REFUSED, forker: REFUSED, shim: REFUSED, own_child: 15 });
      const v = await victim;
      expect(v).toMatchObject({ exitCode: 0, signal: null, timedOut: false, stdout: `tracer 0 slept 3 VICTIM-SECRET-${tag}\n` });
      const recorded = await results();
      expect(recorded.find((r) => (r.argv as string[])[1] === victimScript)).toMatchObject({ exitCode: 0, stdout: v.stdout });
      expect(recorded.find((r) => (r.argv as string[])[1] === attackerScript)).toMatchObject({ exitCode: 0, stdout: attacker.stdout });
    }
  }, 120_000);
});

/** Writes a file in each folder given and tries /proc files: the errno or "ok" of each. */
const WRITES = `
import json, os, sys
out = {}
for d in sys.argv[1:]:
    try:
        name = os.path.join(d, "kept-rules-probe-%d" % os.getpid())
        with open(name, "w") as f:
            f.write("x")
        os.remove(name)
        out[d] = "ok"
    except OSError as e:
        out[d] = e.errno
procs = {"/proc/self/oom_score_adj": "1000", "/proc/self/oom_adj": "15", "/proc/forker/oom_score_adj": "1000", "/proc/self/attr/current": "x",
         "/proc/self/comm": "renamed", "/proc/sys/kernel/ns_last_pid": "1"}
for p, value in procs.items():
    try:
        # the values a command has already, or may set another way (comm: prctl): only the wall can refuse them
        with open(p.replace("forker", str(os.getppid())), "w") as f:
            f.write(value)
        out[p] = "ok"
    except OSError as e:
        out[p] = e.errno
print(json.dumps(out))
`;

/** EACCES from Landlock for every /proc file; EROFS where /proc/sys is mounted read-only (checked before it) */
const PROC_REFUSED = {
  "/proc/self/oom_score_adj": 13,
  "/proc/self/oom_adj": 13,
  "/proc/forker/oom_score_adj": 13,
  "/proc/self/attr/current": 13,
  "/proc/self/comm": 13,
  "/proc/sys/kernel/ns_last_pid": 30,
};

describe("the kept ruleset follows mounts", () => {
  async function writes(...dirs: string[]): Promise<Record<string, unknown>> {
    const r = await exec(["python3", await writeScript(project, WRITES), ...dirs]);
    expect(r.stderr).toBe("");
    expect(r.exitCode).toBe(0);
    return JSON.parse(r.stdout) as Record<string, unknown>;
  }

  it("a top-level folder mounted over, unmounted and mounted over again after the ruleset was made: each next command writes what is there now, and never a /proc file", async () => {
    // made and kept: /mnt is the image's read-only folder (EROFS: Landlock let it through, the file system refused)
    const before = await writes("/workspace", "/tmp", "/mnt");
    expect(before).toMatchObject({ "/workspace": "ok", "/tmp": "ok", "/mnt": 30 });
    const proc = (o: Record<string, unknown>) => Object.fromEntries(Object.entries(o).filter(([k]) => k.startsWith("/proc/")));
    const procBefore = proc(before);
    expect(procBefore).toEqual(PROC_REFUSED);
    try {
      for (let round = 0; round < 3; round++) {
        // a tmpfs over /mnt: a folder the kept ruleset's rule for /mnt does not hold
        await inContainerNs("mount", "-t", "tmpfs", "-o", `size=1m,mode=1777`, `kept-rules-${round}`, "/mnt");
        const covered = await writes("/workspace", "/tmp", "/mnt");
        expect(covered).toMatchObject({ "/workspace": "ok", "/tmp": "ok", "/mnt": "ok" });
        expect(proc(covered)).toEqual(procBefore);
        // back to the image's folder, then a new tmpfs over /tmp itself (the top-level folder commands write most)
        await inContainerNs("umount", "/mnt");
        await inContainerNs("mount", "-t", "tmpfs", "-o", "size=1m,mode=1777", `kept-rules-tmp-${round}`, "/tmp");
        const uncovered = await writes("/workspace", "/tmp", "/mnt");
        expect(uncovered).toMatchObject({ "/workspace": "ok", "/tmp": "ok", "/mnt": 30 });
        expect(proc(uncovered)).toEqual(procBefore);
        await inContainerNs("umount", "/tmp");
        // several changes between two commands, the last one a mount over /workspace's parent's sibling
        const again = await writes("/workspace", "/tmp", "/mnt");
        expect(again).toMatchObject({ "/workspace": "ok", "/tmp": "ok", "/mnt": 30 });
      }
    } finally {
      await inContainerNs("sh", "-c", "while umount /mnt 2>/dev/null; do :; done; while grep -q ' /tmp tmpfs .*kept-rules' /proc/mounts && umount /tmp; do :; done").catch(() => undefined);
    }
    // what the commands did is what the trail says
    const recorded = await results();
    expect(recorded.filter((r) => (r.stdout as string | undefined)?.includes('"/mnt": "ok"')).length).toBe(3);
  }, 120_000);
});

/** Every descriptor open in this process and in a child it forks and execs at once: fd → target, flags. */
const FDS = `
import json, os, subprocess, sys
def fds(pid):
    out = {}
    base = "/proc/%s/fd" % pid
    for fd in sorted(os.listdir(base), key=int):
        try:
            target = os.readlink("%s/%s" % (base, fd))
        except OSError:
            continue  # the listing's own descriptor, closed already
        flags = [l.split()[1] for l in open("/proc/%s/fdinfo/%s" % (pid, fd)).read().splitlines() if l.startswith("flags:")][0]
        out[fd] = [target if not target.startswith("socket:") else "socket", flags]
    return out
if len(sys.argv) > 1:
    print(json.dumps(fds("self")))
    sys.exit(0)
me = fds("self")
child = json.loads(subprocess.run([sys.executable, sys.argv[0], "child"], capture_output=True, text=True, stdin=None).stdout)
print(json.dumps({"self": me, "child": child, "stdin_read": os.read(0, 10).decode(), "pid": os.getpid()}))
`;

describe("the kept ruleset under racing mounts", () => {
  it("commands started while /mnt is mounted over and unmounted again and again: every one writes /workspace and /tmp, none a /proc file", async () => {
    let toggling = true;
    const toggles = (async () => {
      let n = 0;
      while (toggling) {
        await inContainerNs("sh", "-c", `mount -t tmpfs -o size=1m,mode=1777 kept-rules-race-${n} /mnt && umount /mnt`);
        n++;
      }
      return n;
    })();
    const probe = await writeScript(project, WRITES);
    try {
      const runs: ExecResult[] = [];
      for (let round = 0; round < 6; round++) runs.push(...(await Promise.all(Array.from({ length: 4 }, () => exec(["python3", probe, "/workspace", "/tmp", "/mnt"])))));
      for (const r of runs) {
        expect(r.stderr).toBe("");
        const o = JSON.parse(r.stdout) as Record<string, unknown>;
        expect(o).toMatchObject({ "/workspace": "ok", "/tmp": "ok", ...PROC_REFUSED });
        // /mnt: the image's read-only folder (EROFS), the tmpfs (written), or the tmpfs that came after the
        // command's ruleset was made (EACCES: an older ruleset grants nothing on a newer mount)
        expect([30, "ok", 13]).toContain(o["/mnt"]);
      }
    } finally {
      toggling = false;
      expect(await toggles).toBeGreaterThan(0);
      await inContainerNs("sh", "-c", "while umount /mnt 2>/dev/null; do :; done").catch(() => undefined);
    }
    // quiet again: the next command sees the image's folder, and writes as before
    const after = await exec(["python3", await writeScript(project, WRITES), "/workspace", "/tmp", "/mnt"]);
    expect(JSON.parse(after.stdout)).toEqual({ "/workspace": "ok", "/tmp": "ok", "/mnt": 30, ...PROC_REFUSED });
  }, 180_000);
});

describe("the forker's descriptors", () => {
  it("a command holds its three standard descriptors and nothing of the forker's (ruleset, mountinfo, /dev/null, IPC socket, wakeup pipe), nor does what it starts; stdin is /dev/null read-only", async () => {
    // some commands first, and a mount change: the kept ruleset is an old one, then a new one
    for (let i = 0; i < 2; i++) {
      const r = await py(FDS);
      expect(r.stderr).toBe("");
      const seen = JSON.parse(r.stdout) as { self: Record<string, [string, string]>; child: Record<string, [string, string]>; stdin_read: string };
      // the listing's own descriptor (3) is closed by the time it is read: only 0, 1, 2 remain
      expect(Object.keys(seen.self)).toEqual(["0", "1", "2"]);
      expect(Object.keys(seen.child)).toEqual(["0", "1", "2"]);
      expect(seen.self["1"]![0]).toBe("socket");
      expect(seen.self["2"]![0]).toBe("socket");
      for (const [target] of Object.values(seen.self)) expect(target).not.toMatch(/landlock|mountinfo|pipe:/);
      // stdin: /dev/null, read-only, not close-on-exec (it is the command's own fd 0); read gives EOF
      expect(seen.self["0"]).toEqual(["/dev/null", "0100000"]);
      expect(seen.child["0"]).toEqual(["/dev/null", "0100000"]);
      expect(seen.stdin_read).toBe("");
      await inContainerNs("mount", "-t", "tmpfs", "-o", "size=1m", "kept-rules-fds", "/mnt");
      await inContainerNs("umount", "/mnt");
    }
    // with stdin given: a socket the shim writes and closes, and still nothing else
    const fed = (await t.api.request<{ result: ExecResult }>("POST", `/v1/phases/${phase.id}/exec`, { argv: ["python3", await writeScript(project, FDS.replace('os.read(0, 10)', 'os.read(0, 100)'))], stdin: "fed" })).result;
    expect(fed.stderr).toBe("");
    const fedSeen = JSON.parse(fed.stdout) as { self: Record<string, [string, string]>; child: Record<string, [string, string]>; stdin_read: string };
    expect(Object.keys(fedSeen.self)).toEqual(["0", "1", "2"]);
    expect(Object.keys(fedSeen.child)).toEqual(["0", "1", "2"]);
    expect(fedSeen.self["0"]![0]).toBe("socket");
    expect(fedSeen.stdin_read).toBe("fed");
    // a second command cannot reach the first's stdin through /proc (another domain's process is not ptrace-readable)
    const victimScript = await writeScript(project, VICTIM("fds"));
    const victim = exec(["python3", victimScript]);
    const reach = await py(`
import os, time
for _ in range(200):
    if os.path.exists("fds.pid"):
        break
    time.sleep(0.01)
pid = int(open("fds.pid").read())
out = []
def attempt(f):
    try:
        out.append(f())
    except OSError as e:
        out.append(e.errno)
attempt(lambda: sorted(os.listdir("/proc/%d/fd" % pid)))
attempt(lambda: os.readlink("/proc/%d/fd/0" % pid))
attempt(lambda: open("/proc/%d/fdinfo/0" % pid).read())
attempt(lambda: os.open("/proc/%d/fd/0" % pid, os.O_RDONLY))
print(out)
`);
    // the numbers of another process's descriptors are listed (one uid: the folder is its own), what they are is not
    expect(reach.stdout).toBe("[['0', '1', '2'], 13, 13, 13]\n");
    expect((await victim).exitCode).toBe(0);
  }, 120_000);

  it("a command that changes the flags of its stdin changes nothing of a later command's stdin (each has a /dev/null of its own)", async () => {
    const first = await py(`
import fcntl, os
fcntl.fcntl(0, fcntl.F_SETFL, fcntl.fcntl(0, fcntl.F_GETFL) | os.O_NONBLOCK | os.O_APPEND)
print(oct(fcntl.fcntl(0, fcntl.F_GETFL)))
`);
    expect(first.stderr).toBe("");
    const second = await py(`
import fcntl, os
print(oct(fcntl.fcntl(0, fcntl.F_GETFL)), repr(os.read(0, 5)))
`);
    expect(first.stdout).toBe("0o106000\n"); // O_LARGEFILE | O_NONBLOCK | O_APPEND: its own stdin took them
    expect(second.stderr).toBe("");
    // with one /dev/null kept by the forker for all, this read "0o106000 b''"
    expect(second.stdout).toBe("0o100000 b''\n");
  }, 60_000);
});

/** Forks at once (before Python has done anything else) and reports its own and its children's bias. */
const FORKS_AT_ONCE = `import os, sys
kids = []
for _ in range(4):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(w, open("/proc/self/oom_score_adj", "rb").read().strip())
        os._exit(0)
    os.close(w)
    kids.append(os.read(r, 16).decode())
    os.waitpid(pid, 0)
print(open("/proc/self/oom_score_adj").read().strip(), *kids)
`;

const FORK_FIRST = `import os
r, w = os.pipe()
if os.fork() == 0:
    os.write(w, open("/proc/self/oom_score_adj", "rb").read().strip())
    os._exit(0)
os.close(w)
print(open("/proc/self/oom_score_adj").read().strip(), os.read(r, 16).decode())`;

/** Every way a command might lower (or touch) its own bias, its thread's, or its parent command's. */
const OWN_BIAS = `
import json, os, threading
out = {}
def attempt(name, path, value):
    try:
        with open(path, "w") as f:
            f.write(value)
        out[name] = "ok"
    except OSError as e:
        out[name] = e.errno
attempt("self_0", "/proc/self/oom_score_adj", "0")
attempt("self_1000", "/proc/self/oom_score_adj", "1000")
attempt("self_min", "/proc/self/oom_score_adj", "-1000")
attempt("legacy", "/proc/self/oom_adj", "0")
attempt("thread_self", "/proc/thread-self/oom_score_adj", "0")
attempt("task", "/proc/%d/task/%d/oom_score_adj" % (os.getpid(), threading.get_native_id()), "0")
# reopened for writing through a descriptor opened to read it
fd = os.open("/proc/self/oom_score_adj", os.O_RDONLY)
attempt("reopen", "/proc/self/fd/%d" % fd, "0")
# a child, in the same domain, on its parent
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    try:
        with open("/proc/%d/oom_score_adj" % os.getppid(), "w") as f:
            f.write("0")
        os.write(w, b"ok")
    except OSError as e:
        os.write(w, str(e.errno).encode())
    os._exit(0)
os.waitpid(pid, 0)
got = os.read(r, 16)
out["child_on_parent"] = got.decode() if got == b"ok" else int(got)
out["now"] = open("/proc/self/oom_score_adj").read().strip()
print(json.dumps(out))
`;

describe("the commands' OOM bias, born with it", () => {
  it("under load, every command and what it forks at once has oom_score_adj 1000; the shim and the forker are at 0 between commands", async () => {
    const { shim, forker } = await supervisorPids();
    // load: two busy commands for the container's CPUs while a dozen others start
    const busyScript = await writeScript(project, "import time\nend = time.monotonic() + 4\nwhile time.monotonic() < end:\n    pass\nprint(open('/proc/self/oom_score_adj').read().strip())");
    const busy = [exec(["python3", busyScript]), exec(["python3", busyScript])];
    const forksScript = await writeScript(project, FORKS_AT_ONCE);
    const forkFirst = await writeScript(project, FORK_FIRST);
    const runs = await Promise.all([
      ...Array.from({ length: 12 }, () => exec(["python3", forksScript])),
      // forks before Python's site or anything else is loaded (-S): its first statement
      ...Array.from({ length: 6 }, () => exec(["python3", "-S", forkFirst])),
    ]);
    for (const r of runs.slice(0, 12)) expect(r).toMatchObject({ exitCode: 0, stderr: "", stdout: "1000 1000 1000 1000 1000\n" });
    for (const r of runs.slice(12)) expect(r).toMatchObject({ exitCode: 0, stderr: "", stdout: "1000 1000\n" });
    for (const b of await Promise.all(busy)) expect(b).toMatchObject({ exitCode: 0, stdout: "1000\n" });
    // the raise was the bias the forker held for the fork: it was never written after it (no below_supervisor)
    const logs = (await docker.getContainer(phase.containerName).logs({ stdout: true, stderr: true })).toString("utf8");
    expect(logs).not.toContain("could not set the forker's oom_score_adj");
    // the supervisors, as the host sees them, with nothing in flight
    expect((await readFile(`/proc/${shim}/oom_score_adj`, "utf8")).trim()).toBe("0");
    expect((await readFile(`/proc/${forker}/oom_score_adj`, "utf8")).trim()).toBe("0");
    // every record says what the command printed
    const recorded = await results();
    expect(recorded.filter((r) => (r.argv as string[])[1] === forksScript && r.stdout === "1000 1000 1000 1000 1000\n")).toHaveLength(12);
  }, 180_000);

  it("a command cannot change its own bias, its thread's, or (from a child) its parent's, by any /proc path: refused (EACCES), still 1000", async () => {
    const r = await py(OWN_BIAS);
    expect(r.stderr).toBe("");
    expect(JSON.parse(r.stdout)).toEqual({
      self_0: 13,
      self_1000: 13,
      self_min: 13,
      legacy: 13,
      thread_self: 13,
      task: 13,
      reopen: 13,
      child_on_parent: 13,
      now: "1000",
    });
    const record = (await results()).find((e) => e.stdout === r.stdout);
    expect(record).toMatchObject({ exitCode: 0 });
  }, 60_000);
});

describe("a forker the shim cannot bias for the fork", () => {
  // before the fix (the forker wrote the bias into the command after the fork, racing its exec) every
  // command here came out "0 0 0 0 0": the write met the new image's /proc file while it was still root's
  it("when the shim's write of the forker's oom_score_adj fails, each command starts through the wrapper that raises itself: it and what it forks at once at 1000 under load, the failure logged", async () => {
    const { forker } = await supervisorPids();
    // the forker's pid in the container's pid namespace: the last of NSpid
    const nspid = /^NSpid:\s+(.*)$/m.exec(await readFile(`/proc/${forker}/status`, "utf8"))![1]!.trim().split(/\s+/).pop()!;
    // a read-only file over the forker's /proc/<pid>/oom_score_adj in the container's mount namespace: the shim's write fails (EROFS)
    const target = `/proc/${nspid}/oom_score_adj`;
    await inContainerNs("mount", "--bind", "-o", "ro", "/etc/hostname", target);
    try {
      const busyScript = await writeScript(project, "import time\nend = time.monotonic() + 3\nwhile time.monotonic() < end:\n    pass\nprint(open('/proc/self/oom_score_adj').read().strip())");
      const busy = exec(["python3", busyScript]);
      const forksScript = await writeScript(project, FORKS_AT_ONCE);
      const forkFirst = await writeScript(project, FORK_FIRST);
      const runs = await Promise.all([
        ...Array.from({ length: 8 }, () => exec(["python3", forksScript])),
        ...Array.from({ length: 8 }, () => exec(["python3", "-S", forkFirst])),
      ]);
      for (const r of runs.slice(0, 8)) expect(r).toMatchObject({ exitCode: 0, stderr: "", stdout: "1000 1000 1000 1000 1000\n" });
      for (const r of runs.slice(8)) expect(r).toMatchObject({ exitCode: 0, stderr: "", stdout: "1000 1000\n" });
      expect(await busy).toMatchObject({ exitCode: 0, stdout: "1000\n" });
      const logs = (await docker.getContainer(phase.containerName).logs({ stdout: true, stderr: true })).toString("utf8");
      expect(logs).toContain("could not set the forker's oom_score_adj");
      // the commands still write what they may, and no /proc file (the bind was a mount change: a new ruleset)
      const w = await exec(["python3", await writeScript(project, WRITES), "/workspace", "/tmp"]);
      // started through the wrapper: its error pipe closed at the exec, nothing else of the forker's held
      const fds = await py(FDS);
      expect(fds.stderr).toBe("");
      const seen = JSON.parse(fds.stdout) as { self: Record<string, [string, string]>; child: Record<string, [string, string]> };
      expect(Object.keys(seen.self)).toEqual(["0", "1", "2"]);
      expect(Object.keys(seen.child)).toEqual(["0", "1", "2"]);
      expect(seen.self["0"]).toEqual(["/dev/null", "0100000"]);
      // each in a domain of its own all the same (the wrapper's): no signal, trace or read across
      const victimScript = await writeScript(project, VICTIM("raised"));
      const victim = exec(["python3", victimScript]);
      const attacker = await exec(["python3", await writeScript(project, ATTACKER("raised"))]);
      expect(attacker.stderr).toBe("");
      expect(JSON.parse(attacker.stdout)).toEqual({ victim: REFUSED, forker: REFUSED, shim: REFUSED, own_child: 15 });
      expect(await victim).toMatchObject({ exitCode: 0, stdout: "tracer 0 slept 3 VICTIM-SECRET-raised\n" });
      // the wrapper runs unconfined until it confines itself, in the command's cwd: modules planted there
      // (the project's root, /workspace) are not what it imports (-I: neither the cwd nor PYTHON* variables)
      const plant = "open('/tmp/kept-rules-hijacked', 'w').write(__name__)\n";
      for (const name of ["ctypes.py", "errno.py", "os.py", "sys.py"]) await writeFile(path.join(project, name), plant);
      try {
        const planted = await py("import os\nprint(os.getcwd(), os.path.exists('ctypes.py'), os.path.exists('/tmp/kept-rules-hijacked'), open('/proc/self/oom_score_adj').read().strip())");
        expect(planted).toMatchObject({ exitCode: 0, stderr: "", stdout: "/workspace True False 1000\n" });
      } finally {
        for (const name of ["ctypes.py", "errno.py", "os.py", "sys.py"]) await rm(path.join(project, name), { force: true });
      }
      // (the forker's own file is the read-only bind now: EROFS before Landlock's EACCES)
      expect(JSON.parse(w.stdout)).toMatchObject({ "/workspace": "ok", "/tmp": "ok", ...PROC_REFUSED, "/proc/forker/oom_score_adj": 30 });
    } finally {
      await inContainerNs("umount", target);
    }
    // the forker itself was never raised
    expect((await readFile(`/proc/${forker}/oom_score_adj`, "utf8")).trim()).toBe("0");
  }, 180_000);
});

/** A command's own tries at the mount table: to force or prevent the forker's rebuild, or to change what a folder is. */
const MOUNT_TRIES = `
import ctypes, json, os
libc = ctypes.CDLL(None, use_errno=True)
out = {}
def call(name, rc):
    out[name] = "ok" if rc == 0 else ctypes.get_errno()
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
call("mount_tmpfs_tmp", libc.mount(b"x", b"/tmp", b"tmpfs", 0, None))
call("bind_over_workspace", libc.mount(b"/tmp", b"/workspace", None, 4096, None))  # MS_BIND
call("umount_workspace", libc.umount2(b"/workspace", 2))  # MNT_DETACH
call("remount_proc", libc.mount(None, b"/proc", None, 32 | 4096, None))  # MS_REMOUNT | MS_BIND
call("unshare_user_mnt", libc.unshare(0x10000000 | 0x00020000))  # CLONE_NEWUSER | CLONE_NEWNS
call("unshare_mnt", libc.unshare(0x00020000))
call("fsopen", 0 if libc.syscall(430, b"tmpfs", 0) >= 0 else -1)
call("open_tree", 0 if libc.syscall(428, -100, b"/tmp", 1) >= 0 else -1)  # OPEN_TREE_CLONE
call("pivot_root", libc.syscall(41 if os.uname().machine == "aarch64" else 155, b"/tmp", b"/tmp"))
print(json.dumps(out))
`;

describe("a command and the mount table", () => {
  it("a command cannot change the mount table, in the container's namespace or a new one: every try refused, the table as it was, the next command writes as before", async () => {
    const mountinfo = async () => (await readFile(`/proc/${await containerPid()}/mountinfo`, "utf8")).split("\n").map((l) => l.split(" ").slice(4, 5).join()).sort();
    const before = await mountinfo();
    const r = await py(MOUNT_TRIES);
    expect(r.stderr).toBe("");
    const tries = JSON.parse(r.stdout) as Record<string, unknown>;
    // EPERM everywhere: no capability, Docker's seccomp profile, and Landlock forbids any mount change to a confined process
    expect(tries).toEqual({ mount_tmpfs_tmp: 1, bind_over_workspace: 1, umount_workspace: 1, remount_proc: 1, unshare_user_mnt: 1, unshare_mnt: 1, fsopen: 1, open_tree: 1, pivot_root: 1 });
    expect(await mountinfo()).toEqual(before);
    const after = await exec(["python3", await writeScript(project, WRITES), "/workspace", "/tmp"]);
    expect(JSON.parse(after.stdout)).toEqual({ "/workspace": "ok", "/tmp": "ok", ...PROC_REFUSED });
    const record = (await results()).find((e) => e.stdout === r.stdout);
    expect(record).toMatchObject({ exitCode: 0 });
  }, 60_000);
});

describe("the self-raising wrapper's word on a failed exec", () => {
  it("a program that cannot be run: the wrapper writes 'ENOENT …' on the descriptor it was given and exits 127 (what the forker answers the shim with)", async () => {
    // in the sandbox, as the agent's uid: the wrapper the forker starts a command through when it cannot bias it
    const r = await run(
      "docker",
      ["exec", "-u", "1000", phase.containerName, "sh", "-c", 'python3 -I -S -c "$1" 5 /no/such/program 5>&1 >/dev/null; echo " exit $?"', "sh", LANDLOCK_EXEC_FD_PY],
      { timeout: 30_000 },
    );
    expect(r.stdout).toBe("ENOENT No such file or directory exit 127\n");
  }, 60_000);
});

describe("the cgroup files beneath a granted folder", () => {
  it("the ruleset grants writes beneath /run, where the phase's cgroup is mounted read-write: every cgroup file is still refused to a command (root's, EACCES), its own cgroup's and its limits included", async () => {
    const r = await py(`
import json, os
tried, written = 0, []
for root, dirs, files in os.walk("/run/sandboxd-cgroup"):
    for f in files:
        p = os.path.join(root, f)
        tried += 1
        try:
            with open(p, "w") as fh:
                fh.write("max")
            written.append(p)
        except OSError as e:
            if e.errno != 13:
                written.append("%s: %d" % (p, e.errno))
print(json.dumps({"own": open("/proc/self/cgroup").read().strip().rsplit("/", 1)[1], "tried": tried > 50, "written": written}))
`);
    expect(r.stderr).toBe("");
    expect(JSON.parse(r.stdout)).toEqual({ own: expect.stringMatching(/^cmd-/), tried: true, written: [] });
  }, 60_000);
});
