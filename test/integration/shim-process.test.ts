/**
 * Runs the real shim bundle (dist/shim/shim.cjs) as a host process against a
 * test double of the daemon on a unix socket, and checks from outside (/proc)
 * that what the shim claims to have killed is really gone.
 *
 * Needs root, like the shim in its container: commands run as uid/gid 65534.
 */
import { execFileSync, spawn, type ChildProcess } from "node:child_process";
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmdirSync, rmSync, statSync, writeFileSync } from "node:fs";
import net from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import {
  FrameDecoder,
  FrameKind,
  encodeFrame,
  shimToDaemonSchema,
  type ExecMessage,
  type ShimToDaemon,
} from "../../src/shim/protocol.js";

const repoRoot = join(import.meta.dirname, "../..");
const bundle = join(repoRoot, "dist/shim/shim.cjs");
const TOKEN = "test-token-0123456789abcdef-SECRET";
const NOBODY = 65534;
const isRoot = process.getuid?.() === 0;

/** Rebuilds the bundle when it is missing or older than the shim's sources. */
function ensureBundle(): void {
  const srcDir = join(repoRoot, "src/shim");
  const newestSource = Math.max(...readdirSync(srcDir).map((f) => statSync(join(srcDir, f)).mtimeMs));
  if (existsSync(bundle) && statSync(bundle).mtimeMs >= newestSource) return;
  execFileSync(process.execPath, [join(repoRoot, "scripts/bundle.mjs")], { cwd: repoRoot, stdio: "pipe" });
}

/* --------------------------- the daemon's side --------------------------- */

type Event =
  | { type: "message"; message: ShimToDaemon }
  | { type: "output"; kind: number; execId: number; data: Buffer };

/** One control connection from the shim, seen from the daemon. */
class Conn {
  readonly events: Event[] = [];
  closed = false;
  private readonly problems: string[] = [];
  private readonly wakers = new Set<() => void>();

  constructor(
    readonly socket: net.Socket,
    autoWelcome: boolean,
  ) {
    const decoder = new FrameDecoder();
    socket.on("data", (chunk: Buffer) => {
      for (const frame of decoder.push(chunk)) {
        if (frame.kind === FrameKind.Json) {
          // The daemon treats the shim as untrusted: everything must validate.
          const parsed = shimToDaemonSchema.safeParse(JSON.parse(frame.payload.toString("utf8")));
          if (!parsed.success) {
            this.problems.push(`invalid message from the shim: ${parsed.error.message}`);
            continue;
          }
          this.events.push({ type: "message", message: parsed.data });
          if (autoWelcome && parsed.data.type === "hello") {
            this.send({ type: "welcome", phaseId: "phase-test", ...(viaForker ? { owner: { uid: NOBODY, gid: NOBODY } } : {}) });
          }
        } else {
          this.events.push({ type: "output", kind: frame.kind, execId: frame.execId, data: frame.payload });
        }
      }
      this.wake();
    });
    socket.on("close", () => {
      this.closed = true;
      this.wake();
    });
    socket.on("error", () => {});
  }

  send(message: unknown): void {
    this.socket.write(encodeFrame(FrameKind.Json, 0, Buffer.from(JSON.stringify(message))));
  }

  messages(): ShimToDaemon[] {
    return this.events.flatMap((e) => (e.type === "message" ? [e.message] : []));
  }

  /** Resolves with the first non-undefined result of `probe`, re-run as events arrive. */
  waitFor<T>(probe: () => T | undefined, what: string, timeoutMs = 10_000): Promise<T> {
    return new Promise((resolve, reject) => {
      const check = (): boolean => {
        if (this.problems.length > 0) {
          done();
          reject(new Error(this.problems.join("\n")));
          return true;
        }
        const value = probe();
        if (value === undefined) return false;
        done();
        resolve(value);
        return true;
      };
      const timer = setTimeout(() => {
        done();
        reject(new Error(`timed out after ${timeoutMs} ms waiting for ${what}`));
      }, timeoutMs);
      const done = (): void => {
        clearTimeout(timer);
        this.wakers.delete(waker);
      };
      const waker = (): void => void check();
      if (!check()) this.wakers.add(waker);
    });
  }

  message<K extends ShimToDaemon["type"]>(
    type: K,
    execId?: number,
    timeoutMs?: number,
  ): Promise<Extract<ShimToDaemon, { type: K }>> {
    return this.waitFor(
      () =>
        this.messages().find(
          (m): m is Extract<ShimToDaemon, { type: K }> =>
            m.type === type && (execId === undefined || ("execId" in m && m.execId === execId)),
        ),
      `${type}${execId === undefined ? "" : ` for exec ${execId}`}`,
      timeoutMs,
    );
  }

  output(execId: number, kind: number): Buffer {
    return Buffer.concat(
      this.events.flatMap((e) => (e.type === "output" && e.execId === execId && e.kind === kind ? [e.data] : [])),
    );
  }

  private wake(): void {
    for (const w of [...this.wakers]) w();
  }
}

class FakeDaemon {
  readonly connections: Conn[] = [];
  private readonly server: net.Server;
  private readonly wakers = new Set<() => void>();
  autoWelcome = true;

  constructor(readonly socketPath: string) {
    this.server = net.createServer((socket) => {
      this.connections.push(new Conn(socket, this.autoWelcome));
      for (const w of [...this.wakers]) w();
    });
  }

  listen(): Promise<void> {
    return new Promise((resolve) => this.server.listen(this.socketPath, resolve));
  }

  /** The n-th connection (0-based), once it exists. */
  connection(n: number, timeoutMs = 10_000): Promise<Conn> {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.wakers.delete(check);
        reject(new Error(`timed out waiting for shim connection #${n + 1}`));
      }, timeoutMs);
      const check = (): void => {
        const conn = this.connections[n];
        if (!conn) return;
        clearTimeout(timer);
        this.wakers.delete(check);
        resolve(conn);
      };
      this.wakers.add(check);
      check();
    });
  }

  close(): Promise<void> {
    for (const c of this.connections) c.socket.destroy();
    return new Promise((resolve) => this.server.close(() => resolve()));
  }
}

/* ------------------------------- the shim -------------------------------- */

interface ShimProcess {
  proc: ChildProcess;
  daemon: FakeDaemon;
  stderr: () => string;
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
}

let tempDir = "";
const shims: ShimProcess[] = [];

function launchShim(socketPath: string, token: string | undefined): Omit<ShimProcess, "daemon"> {
  const env: NodeJS.ProcessEnv = { PATH: process.env.PATH, SANDBOXD_CONTROL_SOCKET: socketPath };
  // a cgroup v2 directory of its own, as the daemon mounts one in a phase container
  env.SANDBOXD_CGROUP_DIR = withCgroups ? makeCgroupDir() : join(tempDir, "no-cgroups");
  if (token !== undefined) env.SANDBOXD_SHIM_TOKEN = token;
  const proc = spawn(process.execPath, [bundle], { env, stdio: ["ignore", "ignore", "pipe"] });
  let stderr = "";
  proc.stderr!.on("data", (d: Buffer) => (stderr += d.toString()));
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) =>
    proc.once("exit", (code, signal) => resolve({ code, signal })),
  );
  return { proc, stderr: () => stderr, exited };
}

async function startShim(opts: { autoWelcome?: boolean; listenFirst?: boolean } = {}): Promise<ShimProcess> {
  const daemon = new FakeDaemon(join(tempDir, `control-${shims.length}.sock`));
  daemon.autoWelcome = opts.autoWelcome ?? true;
  if (opts.listenFirst ?? true) await daemon.listen();
  const shim = { ...launchShim(daemon.socketPath, TOKEN), daemon };
  shims.push(shim);
  return shim;
}

let nextExecId = 1;
// Distinctive `sleep` durations, so /proc checks cannot confuse our processes
// with anyone else's (and leaked ones can be found and cleaned up).
const markerBase = 40_000 + (process.pid % 1000) * 100;
let nextMarker = 0;
const markers: string[] = [];
function marker(): string {
  const m = String(markerBase + nextMarker++);
  markers.push(m);
  return m;
}

interface ExecResult {
  execId: number;
  started?: Extract<ShimToDaemon, { type: "started" }>;
  exit?: Extract<ShimToDaemon, { type: "exit" }>;
  spawnError?: Extract<ShimToDaemon, { type: "spawn_error" }>;
  stdout: Buffer;
  stderr: Buffer;
}

function sendExec(conn: Conn, fields: Partial<ExecMessage> & Pick<ExecMessage, "argv">): number {
  const execId = nextExecId++;
  const message: ExecMessage = {
    type: "exec",
    execId,
    cwd: "/",
    env: { PATH: "/usr/local/bin:/usr/bin:/bin" },
    timeoutMs: 30_000,
    killGraceMs: 500,
    uid: NOBODY,
    gid: NOBODY,
    ...fields,
  };
  conn.send(message);
  return execId;
}

async function finished(conn: Conn, execId: number, timeoutMs = 15_000): Promise<ExecResult> {
  await conn.waitFor(
    () => conn.messages().find((m) => (m.type === "exit" || m.type === "spawn_error") && m.execId === execId),
    `exit of exec ${execId}`,
    timeoutMs,
  );
  const mine = conn.messages().filter((m) => "execId" in m && m.execId === execId);
  return {
    execId,
    started: mine.find((m) => m.type === "started") as ExecResult["started"],
    exit: mine.find((m) => m.type === "exit") as ExecResult["exit"],
    spawnError: mine.find((m) => m.type === "spawn_error") as ExecResult["spawnError"],
    stdout: conn.output(execId, FrameKind.Stdout),
    stderr: conn.output(execId, FrameKind.Stderr),
  };
}

async function run(conn: Conn, fields: Partial<ExecMessage> & Pick<ExecMessage, "argv">): Promise<ExecResult> {
  return finished(conn, sendExec(conn, fields));
}

/**
 * Whether the tests' commands are started by the forker (src/shim/forker.ts):
 * then the fake daemon's welcome names the tests' user as the phase owner,
 * and the shim starts its forker before any command.
 */
let viaForker = false;
/** Whether the shim gets a cgroup v2 directory for per-command cgroups (src/shim/cgroups.ts). */
let withCgroups = false;

/** The host's cgroup v2 mount (/sys/fs/cgroup/unified on these hybrid machines). */
function cgroup2Root(): string {
  const line = readFileSync("/proc/self/mounts", "utf8").split("\n").find((l) => l.split(" ")[2] === "cgroup2");
  if (!line) throw new Error("no cgroup v2 hierarchy mounted on this host: per-command cgroups cannot be tested");
  return line.split(" ")[1]!;
}
const cgroupDirs: string[] = [];
function makeCgroupDir(): string {
  const dir = join(cgroup2Root(), `sandboxd-shim-test-${process.pid}-${cgroupDirs.length}`);
  mkdirSync(dir);
  cgroupDirs.push(dir);
  return dir;
}
/** Kills what is left in a test cgroup tree and removes it, children first. */
function removeCgroupDir(dir: string): void {
  if (!existsSync(dir)) return;
  for (const e of readdirSync(dir, { withFileTypes: true })) {
    if (!e.isDirectory()) continue;
    removeCgroupDir(join(dir, e.name));
  }
  try {
    writeFileSync(join(dir, "cgroup.kill"), "1");
  } catch {
    // the root of the test tree may be busy being emptied
  }
  for (let i = 0; i < 100; i++) {
    try {
      rmdirSync(dir);
      return;
    } catch {
      execFileSync("sleep", ["0.02"]);
    }
  }
}

async function welcomed(shim: ShimProcess, n = 0): Promise<Conn> {
  const conn = await shim.daemon.connection(n);
  await conn.message("hello");
  return conn;
}

/* ------------------------------ /proc checks ------------------------------ */

/** Live (non-zombie) processes of `uid` whose argv, joined by spaces, is exactly `command`. */
function liveProcesses(uid: number, command: string): number[] {
  const pids: number[] = [];
  for (const name of readdirSync("/proc")) {
    if (!/^\d+$/.test(name)) continue;
    try {
      const status = readFileSync(`/proc/${name}/status`, "utf8");
      const state = /^State:\s+(\S)/m.exec(status)?.[1];
      const realUid = Number(/^Uid:\s+(\d+)/m.exec(status)?.[1]);
      const argv = readFileSync(`/proc/${name}/cmdline`, "utf8").split("\0").slice(0, -1);
      if (state !== "Z" && realUid === uid && argv.join(" ") === command) pids.push(Number(name));
    } catch {
      // exited while we looked
    }
  }
  return pids;
}

/** Polls briefly (SIGKILL delivery is asynchronous); a leaked process lives far longer. */
async function expectGone(needle: string, withinMs = 2_000): Promise<void> {
  const deadline = Date.now() + withinMs;
  let pids = liveProcesses(NOBODY, needle);
  while (pids.length > 0 && Date.now() < deadline) {
    await new Promise((r) => setTimeout(r, 50));
    pids = liveProcesses(NOBODY, needle);
  }
  expect(pids, `processes matching "${needle}" still alive`).toEqual([]);
}

async function expectAlive(needle: string, count: number): Promise<void> {
  const deadline = Date.now() + 5_000;
  while (liveProcesses(NOBODY, needle).length < count && Date.now() < deadline) {
    await new Promise((r) => setTimeout(r, 25));
  }
  expect(liveProcesses(NOBODY, needle)).toHaveLength(count);
}

function logLines(shim: ShimProcess): Record<string, unknown>[] {
  return shim
    .stderr()
    .split("\n")
    .filter((l) => l.length > 0)
    .map((l) => JSON.parse(l) as Record<string, unknown>);
}

/** From one command, against the pids given: signal, ptrace, /proc/<pid>/mem, process_vm_writev. */
const ATTACK = String.raw`
import ctypes, json, os, signal, sys
libc = ctypes.CDLL(None, use_errno=True)
class IOV(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]
out = {}
for arg in sys.argv[1:]:
    pid = int(arg)
    r = {}
    try:
        os.kill(pid, signal.SIGSTOP)
        r["kill"] = "sent"
        os.kill(pid, signal.SIGCONT)
    except OSError as e:
        r["kill"] = e.errno
    libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
    r["ptrace"] = "attached" if libc.ptrace(16, pid, None, None) == 0 else ctypes.get_errno()  # PTRACE_ATTACH
    try:
        open("/proc/%d/mem" % pid, "r+b").close()
        r["mem"] = "opened"
    except OSError as e:
        r["mem"] = e.errno
    buf = ctypes.create_string_buffer(8)
    local = IOV(ctypes.cast(buf, ctypes.c_void_p), 8)
    remote = IOV(0x400000, 8)
    libc.syscall.restype = ctypes.c_long
    libc.syscall.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]
    n = libc.syscall(311, pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)  # process_vm_writev
    r["vm_write"] = "wrote" if n >= 0 else ctypes.get_errno()
    out[arg] = r
print(json.dumps(out))
`;

/* --------------------------------- tests --------------------------------- */

describe("shim process (real bundle, fake daemon)", { timeout: 30_000 }, () => {
  beforeAll(() => {
    // Fails, never skips: a run without root would otherwise pass while testing nothing.
    if (!isRoot) throw new Error("the shim tests must run as root (the shim switches every command to the owner's uid); run them as root");
    ensureBundle();
    tempDir = mkdtempSync(join(tmpdir(), "sandboxd-shim-test-"));
  });

  afterEach(async () => {
    for (const shim of shims.splice(0)) {
      if (shim.proc.exitCode === null && shim.proc.signalCode === null) {
        shim.proc.kill("SIGTERM"); // the shim kills its commands on SIGTERM
        await shim.exited;
      }
      await shim.daemon.close();
    }
  });

  afterAll(() => {
    // Safety net only: a leak would already have failed its test.
    for (const m of markers) for (const pid of liveProcesses(NOBODY, `sleep ${m}`)) process.kill(pid, "SIGKILL");
    for (const dir of cgroupDirs) removeCgroupDir(dir);
    if (tempDir) rmSync(tempDir, { recursive: true, force: true });
  });

  describe.each([
    { via: "node", cgroups: false },
    { via: "forker", cgroups: false },
    { via: "node", cgroups: true },
    { via: "forker", cgroups: true },
  ])("commands started by $via, per-command cgroups: $cgroups", ({ via, cgroups }) => {
  beforeAll(() => {
    viaForker = via === "forker";
    withCgroups = cgroups;
  });

  it("starts commands the way it says: by the forker once it runs, else by node itself", async () => {
    const shim = await startShim();
    const conn = await welcomed(shim);
    const r = await run(conn, { argv: ["sh", "-c", "echo $PPID; cat /proc/$PPID/comm"] });
    expect(r.exit?.exitCode).toBe(0);
    const [parent, comm] = r.stdout.toString().trim().split("\n");
    expect(comm).toBe(via === "forker" ? "python3" : "node");
    if (via === "forker") {
      // the very first command already waited for the forker
      expect(logLines(shim).some((l) => l.msg === "forker ready")).toBe(true);
      // the forker cannot be read or traced by the user it runs as (the agent's)
      const forkerPid = Number(parent);
      const probe = await run(conn, {
        argv: ["sh", "-c", `cat /proc/${forkerPid}/environ >/dev/null 2>&1 && echo readable || echo denied; ls /tmp/.sandboxd-forker-* >/dev/null 2>&1 && echo listed || echo unlisted`],
      });
      expect(probe.stdout.toString().split("\n").filter(Boolean)).toEqual(["denied", "unlisted"]);
    }
  });

  if (via === "forker") it("hands each command's output over its private channel: there is no socket for others to crowd or reach", async () => {
    const shim = await startShim();
    const conn = await welcomed(shim);
    const r = await run(conn, { argv: ["sh", "-c", "echo out; echo err >&2"] });
    expect(r.exit?.exitCode).toBe(0);
    expect(r.stdout.toString()).toBe("out\n");
    expect(r.stderr.toString()).toBe("err\n");
    // no listening socket of the forker's anywhere (the streams are socketpairs passed over Node's IPC channel)
    const unix = readFileSync("/proc/net/unix", "utf8");
    expect(unix).not.toContain("sandboxd-forker");
    expect(readdirSync("/tmp").filter((f) => f.startsWith(".sandboxd-forker-"))).toEqual([]);
  });

  it("50 concurrent commands: every result is exactly what its command did", async () => {
    const shim = await startShim();
    const conn = await welcomed(shim);
    expect((await run(conn, { argv: ["true"] })).exit?.exitCode).toBe(0); // the forker (if any) is up
    const ids = Array.from({ length: 50 }, (_, i) =>
      sendExec(conn, {
        argv: ["sh", "-c", `sleep 0.0${i % 10}; echo out-${i}; echo err-${i} >&2; exit ${i % 7}`],
        timeoutMs: 20_000,
      }),
    );
    const results = await Promise.all(ids.map((id) => finished(conn, id, 25_000)));
    const wrong = results.flatMap((r, i) => {
      const want = { exitCode: i % 7, signal: null, timedOut: false, stdout: `out-${i}\n`, stderr: `err-${i}\n` };
      const got = {
        exitCode: r.exit?.exitCode,
        signal: r.exit?.signal,
        timedOut: r.exit?.timedOut,
        stdout: r.stdout.toString(),
        stderr: r.stderr.toString(),
      };
      return JSON.stringify(got) === JSON.stringify(want) ? [] : [{ i, want, got, spawnError: r.spawnError }];
    });
    expect(wrong).toEqual([]);
    // nothing gave up on the forker under the burst
    expect(logLines(shim).filter((l) => /forker/.test(String(l.msg)) && l.level === "warn")).toEqual([]);
    if (via === "forker") expect(results.every((r) => r.started !== undefined)).toBe(true);
  });

  // (frozen from outside the shim's own cgroups, so only where the shim has none)
  if (via === "forker" && !cgroups) it("a forker that is slow (frozen, not stopped) is waited for, not given up", async () => {
    const shim = await startShim();
    const conn = await welcomed(shim);
    const first = await run(conn, { argv: ["sh", "-c", "echo $PPID"] });
    const forkerPid = first.stdout.toString().trim();
    // a cgroup v2 freeze leaves it sleeping (S), as a forker starved of CPU would look, unlike SIGSTOP (T)
    const slow = makeCgroupDir();
    writeFileSync(join(slow, "cgroup.procs"), forkerPid);
    writeFileSync(join(slow, "cgroup.freeze"), "1");
    const id = sendExec(conn, { argv: ["sh", "-c", "echo late; exit 5"] });
    try {
      await new Promise((r) => setTimeout(r, 6_000)); // past the 5 s after which the forker used to be given up
      expect(readFileSync(`/proc/${forkerPid}/stat`, "utf8").split(") ")[1]?.[0]).toBe("S");
      expect(conn.messages().some((m) => "execId" in m && m.execId === id)).toBe(false);
    } finally {
      writeFileSync(join(slow, "cgroup.freeze"), "0");
    }
    const r = await finished(conn, id);
    expect(r.exit).toMatchObject({ exitCode: 5, signal: null, timedOut: false });
    expect(r.stdout.toString()).toBe("late\n");
    expect(logLines(shim).some((l) => l.msg === "the forker is slow to answer; waiting")).toBe(true);
    expect(logLines(shim).some((l) => /replacing|stopped or gone/.test(String(l.msg)))).toBe(false);
    // the same forker serves on
    const after = await run(conn, { argv: ["sh", "-c", "echo $PPID"] });
    expect(after.stdout.toString().trim()).toBe(forkerPid);
  });

  if (via === "forker") it("a forker that dies while idle is replaced before the next command, which the new one starts", async () => {
    const shim = await startShim();
    const conn = await welcomed(shim);
    const first = await run(conn, { argv: ["sh", "-c", "echo $PPID"] });
    const oldForker = Number(first.stdout.toString().trim());
    process.kill(oldForker, "SIGKILL"); // as a fault would (the agent cannot: see the Landlock test)
    for (let i = 0; i < 200 && !logLines(shim).some((l) => l.msg === "forker exited"); i++) await new Promise((r) => setTimeout(r, 25));
    const next = await run(conn, { argv: ["sh", "-c", "echo $PPID; cat /proc/$PPID/comm"] });
    const [parent, comm] = next.stdout.toString().trim().split("\n");
    expect(next.exit?.exitCode).toBe(0);
    expect(comm).toBe("python3");
    expect(Number(parent)).not.toBe(oldForker);
    expect(logLines(shim).some((l) => l.msg === "replacing the forker")).toBe(true);
  });

  if (via === "forker") it("a command whose forker dies is reported killed and its processes are gone; the next command still runs", async () => {
    const shim = await startShim();
    const conn = await welcomed(shim);
    const m = marker();
    const id = sendExec(conn, { argv: ["sh", "-c", `echo $PPID; sleep ${m}`] });
    await conn.waitFor(() => (conn.output(id, FrameKind.Stdout).length > 0 ? true : undefined), "the forker's pid");
    await expectAlive(`sleep ${m}`, 1);
    process.kill(Number(conn.output(id, FrameKind.Stdout).toString().trim()), "SIGKILL");
    const r = await finished(conn, id);
    expect(r.exit).toMatchObject({ exitCode: null, signal: "SIGKILL" }); // its status died with the forker
    await expectGone(`sleep ${m}`);
    const next = await run(conn, { argv: ["echo", "after"] });
    expect(next.stdout.toString()).toBe("after\n");
  });

  if (cgroups) it("kills what a command left behind even after a double fork (out of its session, its parent gone)", async () => {
    const shim = await startShim();
    const conn = await welcomed(shim);
    const m = marker();
    // the subshell starts a new session for sleep and exits at once: sleep is re-parented
    // to init with no link back to the command, which the process-table walk cannot see
    const r = await run(conn, { argv: ["sh", "-c", `(setsid sleep ${m} >/dev/null 2>&1 &); sleep 0.2; exit 0`] });
    expect(r.exit).toMatchObject({ exitCode: 0, timedOut: false });
    await expectGone(`sleep ${m}`);
    expect(logLines(shim).some((l) => l.msg === "killed leftover processes")).toBe(true);
    // and its cgroup is gone with it
    const dir = logLines(shim).find((l) => l.msg === "per-command cgroups")?.root as string;
    expect(readdirSync(dir).filter((f) => f.startsWith("cmd-"))).toEqual([]);
  });

  if (cgroups && via === "forker") it("a cgroup readied ahead (prepare): the command is born in it alone, the forker back in the supervisor's; unused, it is undone; taken by another id, the forker moves", async () => {
    const shim = await startShim();
    const conn = await welcomed(shim);
    expect((await run(conn, { argv: ["true"] })).exit?.exitCode).toBe(0); // the forker is up
    const dir = logLines(shim).find((l) => l.msg === "per-command cgroups")?.root as string;
    // the cgroup tree is polled: the shim sends no message when it readies or undoes one
    const poll = async (what: string, ok: () => boolean, timeoutMs = 10_000) => {
      for (const deadline = Date.now() + timeoutMs; !ok(); await new Promise((r) => setTimeout(r, 20))) {
        if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
      }
    };
    const procs = (d: string) => readFileSync(join(dir, d, "cgroup.procs"), "utf8").split("\n").filter(Boolean).map(Number);
    const forkerPid = Number((await run(conn, { argv: ["sh", "-c", "echo $PPID"] })).stdout.toString().trim());
    expect(procs("supervisor")).toContain(forkerPid);

    // readied for the next id: the forker waits in it, nothing else does
    const id = nextExecId;
    conn.send({ type: "prepare", execId: id });
    await poll("the readied cgroup", () => existsSync(join(dir, `cmd-${id}`)) && procs(`cmd-${id}`).includes(forkerPid));
    expect(procs(`cmd-${id}`)).toEqual([forkerPid]);
    const m = marker();
    const running = sendExec(conn, { argv: ["sh", "-c", `echo $$; exec sleep ${m}`] });
    expect(running).toBe(id);
    await conn.waitFor(() => (conn.output(id, FrameKind.Stdout).length > 0 ? true : undefined), "the command's pid");
    const cmdPid = Number(conn.output(id, FrameKind.Stdout).toString().trim());
    // born in its cgroup, which the forker has left
    await poll("the forker leaving", () => !procs(`cmd-${id}`).includes(forkerPid));
    expect(procs(`cmd-${id}`)).toEqual([cmdPid]);
    expect(procs("supervisor")).toContain(forkerPid);
    conn.send({ type: "signal", execId: id, signal: "SIGKILL" });
    expect((await finished(conn, id)).exit?.signal).toBe("SIGKILL");
    await expectGone(`sleep ${m}`);
    await poll("the command's cgroup removed", () => !existsSync(join(dir, `cmd-${id}`)));

    // readied, and no exec comes: undone (the forker home, the cgroup gone, nothing killed)
    const unused = nextExecId + 100;
    conn.send({ type: "prepare", execId: unused });
    await poll("the second readied cgroup", () => existsSync(join(dir, `cmd-${unused}`)));
    await poll("the unused cgroup undone", () => !existsSync(join(dir, `cmd-${unused}`)), 5_000);
    expect(procs("supervisor")).toContain(forkerPid);

    // readied for one id, taken by another exec first: that one is born in its own cgroup, alone
    const other = nextExecId + 200;
    conn.send({ type: "prepare", execId: other });
    await poll("the third readied cgroup", () => existsSync(join(dir, `cmd-${other}`)));
    const m2 = marker();
    const first = sendExec(conn, { argv: ["sh", "-c", `echo $$; exec sleep ${m2}`] });
    await conn.waitFor(() => (conn.output(first, FrameKind.Stdout).length > 0 ? true : undefined), "the other command's pid");
    const firstPid = Number(conn.output(first, FrameKind.Stdout).toString().trim());
    await poll("the forker leaving the other cgroup", () => !procs(`cmd-${first}`).includes(forkerPid));
    expect(procs(`cmd-${first}`)).toEqual([firstPid]);
    expect(existsSync(join(dir, `cmd-${other}`))).toBe(false);
    conn.send({ type: "signal", execId: first, signal: "SIGKILL" });
    await finished(conn, first);
    await expectGone(`sleep ${m2}`);
    // the forker lived through all of it, and starts the next command
    const after = await run(conn, { argv: ["sh", "-c", "echo $PPID"] });
    expect(Number(after.stdout.toString().trim())).toBe(forkerPid);
    expect(logLines(shim).filter((l) => /forker/.test(String(l.msg)) && l.level === "warn")).toEqual([]);
  });

  if (cgroups && via === "forker") it("a readied cgroup (prepare) under faults: taken by a command of another user (Node), with its forker killed meanwhile, taken after its undo, or across a reconnect — each command is born in it alone and the forker is never in it when it is killed", async () => {
    const shim = await startShim();
    let conn = await welcomed(shim);
    expect((await run(conn, { argv: ["true"] })).exit?.exitCode).toBe(0); // the forker is up
    const dir = logLines(shim).find((l) => l.msg === "per-command cgroups")?.root as string;
    const poll = async (what: string, ok: () => boolean, timeoutMs = 10_000) => {
      for (const deadline = Date.now() + timeoutMs; !ok(); await new Promise((r) => setTimeout(r, 10))) {
        if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
      }
    };
    const procs = (d: string) => (existsSync(join(dir, d)) ? readFileSync(join(dir, d, "cgroup.procs"), "utf8").split("\n").filter(Boolean).map(Number) : []);
    const pidOf = async (c: Conn, id: number) => {
      await c.waitFor(() => (c.output(id, FrameKind.Stdout).toString().includes("\n") ? true : undefined), `the pid of exec ${id}`);
      return c.output(id, FrameKind.Stdout).toString().trim().split(" ").map(Number);
    };
    const procState = (pid: number) => (existsSync(`/proc/${pid}/stat`) ? readFileSync(`/proc/${pid}/stat`, "utf8").split(") ")[1]?.[0] ?? null : null);
    const readied = async (c: Conn, forkerPid: number): Promise<number> => {
      const id = nextExecId;
      c.send({ type: "prepare", execId: id });
      await poll(`cmd-${id} readied`, () => procs(`cmd-${id}`).includes(forkerPid));
      expect(procs(`cmd-${id}`)).toEqual([forkerPid]);
      return id;
    };
    let forkerPid = Number((await run(conn, { argv: ["sh", "-c", "echo $PPID"] })).stdout.toString().trim());

    // 1. taken by a command of another user: the Node path, the forker out of it first
    const other = await readied(conn, forkerPid);
    const m1 = marker();
    expect(sendExec(conn, { argv: ["sh", "-c", `echo $$; exec sleep ${m1}`], uid: NOBODY - 1, gid: NOBODY - 1 })).toBe(other);
    const [nodePid] = await pidOf(conn, other);
    expect(procs(`cmd-${other}`)).toEqual([nodePid]);
    expect(procs("supervisor")).toContain(forkerPid);
    conn.send({ type: "signal", execId: other, signal: "SIGKILL" });
    expect((await finished(conn, other)).exit?.signal).toBe("SIGKILL");
    await poll(`cmd-${other} removed`, () => !existsSync(join(dir, `cmd-${other}`)));
    expect(procState(forkerPid)).toMatch(/^[RS]$/); // not killed with it

    // 2. its forker killed while it waits in the readied cgroup (a fault): the command is still born there alone, by the new forker
    const orphaned = await readied(conn, forkerPid);
    process.kill(forkerPid, "SIGKILL");
    await poll("the forker's exit seen", () => logLines(shim).some((l) => l.msg === "forker exited"));
    const m2 = marker();
    expect(sendExec(conn, { argv: ["sh", "-c", `echo $$ $PPID; exec sleep ${m2}`] })).toBe(orphaned);
    const [bornPid, newForker] = await pidOf(conn, orphaned);
    expect(newForker).not.toBe(forkerPid);
    await poll("the new forker home", () => procs("supervisor").includes(newForker!));
    expect(procs(`cmd-${orphaned}`)).toEqual([bornPid]);
    forkerPid = newForker!;
    conn.send({ type: "signal", execId: orphaned, signal: "SIGKILL" });
    await finished(conn, orphaned);
    await expectGone(`sleep ${m2}`);
    expect(procState(forkerPid)).toMatch(/^[RS]$/);

    // 3. its exec comes after the undo (2 s): a cgroup of its own again, the forker home
    const late = nextExecId;
    conn.send({ type: "prepare", execId: late });
    await poll(`cmd-${late} readied`, () => procs(`cmd-${late}`).includes(forkerPid));
    await poll(`cmd-${late} undone`, () => !existsSync(join(dir, `cmd-${late}`)), 5_000);
    const m3 = marker();
    expect(sendExec(conn, { argv: ["sh", "-c", `echo $$; exec sleep ${m3}`] })).toBe(late);
    const [latePid] = await pidOf(conn, late);
    expect(procs(`cmd-${late}`)).toEqual([latePid]);
    expect(procs("supervisor")).toContain(forkerPid);
    conn.send({ type: "signal", execId: late, signal: "SIGKILL" });
    await finished(conn, late);
    await expectGone(`sleep ${m3}`);

    // 4. readied, then the link drops: the exec of that id on the next connection is born there alone
    const across = await readied(conn, forkerPid);
    conn.socket.destroy();
    conn = await welcomed(shim, 1);
    const m4 = marker();
    expect(sendExec(conn, { argv: ["sh", "-c", `echo $$ $PPID; exec sleep ${m4}`] })).toBe(across);
    const [acrossPid, acrossForker] = await pidOf(conn, across);
    expect(acrossForker).toBe(forkerPid);
    await poll("the forker home", () => procs("supervisor").includes(forkerPid));
    expect(procs(`cmd-${across}`)).toEqual([acrossPid]);
    conn.send({ type: "signal", execId: across, signal: "SIGKILL" });
    await finished(conn, across);
    await expectGone(`sleep ${m4}`);
    // the forker that started the last three lives on, and starts the next command
    const after = await run(conn, { argv: ["sh", "-c", "echo $PPID"] });
    expect(Number(after.stdout.toString().trim())).toBe(forkerPid);
    expect(readdirSync(dir).filter((f) => f.startsWith("cmd-"))).toEqual([]);
  });

  it("one command cannot signal, ptrace or write the memory of another's processes, nor of its starter (the forker, or the shim)", async () => {
    const shim = await startShim();
    const conn = await welcomed(shim);
    const victim = sendExec(conn, { argv: ["sh", "-c", "echo $$ $PPID; sleep 1.5; echo survived"] });
    await conn.waitFor(() => (conn.output(victim, FrameKind.Stdout).length > 0 ? true : undefined), "the victim's pid");
    const [victimPid, forkerPid] = conn.output(victim, FrameKind.Stdout).toString().trim().split(" ");
    const attack = await run(conn, { argv: ["python3", "-I", "-c", ATTACK, victimPid!, forkerPid!] });
    expect(attack.stderr.toString()).toBe("");
    const out = JSON.parse(attack.stdout.toString()) as Record<string, Record<string, unknown>>;
    for (const target of [victimPid!, forkerPid!]) {
      expect(out[target], `attack on ${target}`).toEqual({ kill: 1, ptrace: 1, mem: 13, vm_write: 1 }); // EPERM, EPERM, EACCES, EPERM
    }
    const v = await finished(conn, victim);
    expect(v.exit).toMatchObject({ exitCode: 0, signal: null, timedOut: false });
    expect(v.stdout.toString()).toBe(`${victimPid} ${forkerPid}\nsurvived\n`);
    // processes of one command still reach each other
    const own = await run(conn, { argv: ["sh", "-c", "sleep 5 & kill $!; wait $!; echo $?"] });
    expect(own.stdout.toString()).toBe("143\n");
  });

  // (registered only where it applies: a skipped test would count for nothing)
  if (via === "forker") it("a stopped forker cannot hold an exit back: the exec ends, reported as killed", async () => {
    const shim = await startShim();
    const conn = await welcomed(shim);
    const first = await run(conn, { argv: ["sh", "-c", "echo $PPID"] });
    const forkerPid = Number(first.stdout.toString().trim());
    expect(readFileSync(`/proc/${forkerPid}/comm`, "utf8").trim()).toBe("python3");
    const id = sendExec(conn, { argv: ["sh", "-c", "sleep 0.5; exit 7"] });
    await conn.message("started", id);
    process.kill(forkerPid, "SIGSTOP"); // as the agent could: same uid
    try {
      const r = await finished(conn, id, 10_000);
      // the status is lost with the forker (only a tracer may read a zombie's): reported as killed
      expect(r.exit).toMatchObject({ exitCode: null, signal: "SIGKILL" });
      expect(logLines(shim).some((l) => String(l.msg).startsWith("the forker is stopped and did not report an exit"))).toBe(true);
    } finally {
      process.kill(forkerPid, "SIGCONT");
    }
  });

  it("exits 2 with a clear message when the token is missing", async () => {
    const shim = launchShim(join(tempDir, "unused.sock"), undefined);
    const { code } = await shim.exited;
    expect(code).toBe(2);
    expect(shim.stderr()).toContain("SANDBOXD_SHIM_TOKEN is not set");
  });

  it("says hello with the token, and children never see it", async () => {
    const shim = await startShim();
    const conn = await shim.daemon.connection(0);
    const hello = await conn.message("hello");
    expect(hello).toMatchObject({ protocol: 1, token: TOKEN, pid: shim.proc.pid, running: [] });
    expect(hello.node).toMatch(/^v\d+\./);

    const result = await run(conn, { argv: ["env"], env: { ONLY_THIS: "yes" } });
    expect(result.exit).toMatchObject({ exitCode: 0, signal: null, timedOut: false });
    // env exactly as given: nothing inherited from the shim, token included
    expect(result.stdout.toString()).toBe("ONLY_THIS=yes\n");

    // logs are JSON lines and never carry the token or env values
    const lines = logLines(shim);
    expect(lines.length).toBeGreaterThan(0);
    for (const line of lines) expect(line).toMatchObject({ ts: expect.any(String), level: expect.any(String) });
    expect(shim.stderr()).not.toContain(TOKEN);
    expect(shim.stderr()).not.toContain("ONLY_THIS");
  });

  it("waits for the daemon to listen, then connects", async () => {
    const shim = await startShim({ listenFirst: false });
    await new Promise((r) => setTimeout(r, 350)); // a few failed dials
    await shim.daemon.listen();
    const conn = await welcomed(shim);
    const result = await run(conn, { argv: ["true"] });
    expect(result.exit?.exitCode).toBe(0);
  });

  it("streams stdout and stderr separately and reports the exit after them", async () => {
    const shim = await startShim();
    const conn = await welcomed(shim);
    const result = await run(conn, {
      argv: ["sh", "-c", "echo out1; echo err1 >&2; echo out2; echo err2 >&2"],
    });
    expect(result.started?.pid).toBeGreaterThan(1);
    expect(result.stdout.toString()).toBe("out1\nout2\n");
    expect(result.stderr.toString()).toBe("err1\nerr2\n");
    expect(result.exit).toMatchObject({ exitCode: 0, signal: null, timedOut: false });
    expect(result.exit?.durationMs).toBeGreaterThanOrEqual(0);

    const ofThisExec = conn.events.filter((e) =>
      e.type === "output" ? e.execId === result.execId : "execId" in e.message && e.message.execId === result.execId,
    );
    expect(ofThisExec[0]).toMatchObject({ type: "message", message: { type: "started" } });
    expect(ofThisExec.at(-1)).toMatchObject({ type: "message", message: { type: "exit" } });
  });

  it("writes an exec's stdin bytes to the command, then EOF; without them stdin is /dev/null", async () => {
    const shim = await startShim();
    const conn = await welcomed(shim);
    const bytes = Buffer.concat([Buffer.from([0, 255, 10]), Buffer.alloc(300_000, 97)]);
    const fed = await run(conn, { argv: ["sh", "-c", "wc -c; echo end"], stdin: bytes.toString("base64") });
    expect(fed.stdout.toString()).toBe(`${bytes.length}\nend\n`);
    expect(fed.exit).toMatchObject({ exitCode: 0 });
    const none = await run(conn, { argv: ["sh", "-c", "wc -c"] });
    expect(none.stdout.toString()).toBe("0\n");
    // a command that does not read its stdin still ends normally
    const ignored = await run(conn, { argv: ["sh", "-c", "exit 0"], stdin: bytes.toString("base64") });
    expect(ignored.exit).toMatchObject({ exitCode: 0 });
  });

  it("reports a non-zero exit code", async () => {
    const shim = await startShim();
    const conn = await welcomed(shim);
    const result = await run(conn, { argv: ["sh", "-c", "exit 3"] });
    expect(result.exit).toMatchObject({ exitCode: 3, signal: null, timedOut: false });
  });

  it("runs the command as the requested uid and gid, with no supplementary groups", async () => {
    const shim = await startShim();
    const conn = await welcomed(shim);
    const result = await run(conn, { argv: ["sh", "-c", "id -u; id -g; id -G"] });
    expect(result.stdout.toString()).toBe(`${NOBODY}\n${NOBODY}\n${NOBODY}\n`);
  });

  it("reports spawn failures as spawn_error and nothing else", async () => {
    const shim = await startShim();
    const conn = await welcomed(shim);

    const missing = await run(conn, { argv: ["/no/such/program"] });
    expect(missing.spawnError).toMatchObject({ code: "ENOENT" });
    const noCwd = await run(conn, { argv: ["true"], cwd: "/no/such/dir" });
    expect(noCwd.spawnError?.code).toBe("ENOENT");
    expect(noCwd.spawnError?.message).toContain("/no/such/dir does not exist");
    const notExecutable = await run(conn, { argv: ["/etc/passwd"] });
    expect(notExecutable.spawnError).toMatchObject({ code: "EACCES" });

    // the shim is still serving, and sent nothing else for the failed ids
    const ok = await run(conn, { argv: ["true"] });
    expect(ok.exit?.exitCode).toBe(0);
    for (const r of [missing, noCwd, notExecutable]) {
      expect(conn.messages().filter((m) => "execId" in m && m.execId === r.execId)).toHaveLength(1);
      expect(r.stdout.length + r.stderr.length).toBe(0);
    }
  });

  it("on timeout, SIGTERMs then kills the whole group", async () => {
    const shim = await startShim();
    const conn = await welcomed(shim);
    const m = marker();
    const execId = sendExec(conn, {
      argv: ["sh", "-c", `sleep ${m} & sleep ${m} & wait`],
      timeoutMs: 500,
      killGraceMs: 300,
    });
    await conn.message("started", execId);
    await expectAlive(`sleep ${m}`, 2);
    const result = await finished(conn, execId);
    expect(result.exit).toMatchObject({ timedOut: true, exitCode: null, signal: "SIGTERM" });
    expect(result.exit?.durationMs).toBeGreaterThanOrEqual(500);
    expect(result.exit?.durationMs).toBeLessThan(5_000);
    await expectGone(`sleep ${m}`);
  });

  it("SIGKILLs a command that ignores SIGTERM once the grace period ends", async () => {
    const shim = await startShim();
    const conn = await welcomed(shim);
    const result = await run(conn, {
      argv: ["sh", "-c", "trap '' TERM; echo ready; while :; do sleep 0.05; done"],
      timeoutMs: 300,
      killGraceMs: 300,
    });
    expect(result.stdout.toString()).toBe("ready\n");
    expect(result.exit).toMatchObject({ timedOut: true, exitCode: null, signal: "SIGKILL" });
    expect(result.exit?.durationMs).toBeGreaterThanOrEqual(600);
  });

  it("kills a background process that outlives its leader", async () => {
    const shim = await startShim();
    const conn = await welcomed(shim);
    const m = marker();
    const result = await run(conn, { argv: ["sh", "-c", `sleep ${m} & echo hi`] });
    expect(result.stdout.toString()).toBe("hi\n");
    expect(result.exit).toMatchObject({ exitCode: 0, timedOut: false });
    // The sleep holds stdout open; the exit is prompt because it was killed,
    // not because the shim gave up waiting for EOF.
    expect(result.exit?.durationMs).toBeLessThan(1_500);
    await expectGone(`sleep ${m}`);
  });

  it("kills processes that left the session while their parent lived", async () => {
    const shim = await startShim();
    const conn = await welcomed(shim);
    const m = marker();
    // The inner sh stays in the group; its child escapes group and session
    // with setsid. Only the ppid walk from a group member finds it.
    const execId = sendExec(conn, {
      argv: ["sh", "-c", `sh -c 'setsid sleep ${m} >/dev/null 2>&1 & wait' & sleep 0.3; exit 0`],
    });
    const result = await finished(conn, execId);
    expect(result.exit?.exitCode).toBe(0);
    await expectGone(`sleep ${m}`);
  });

  it("forwards a signal from the daemon to the process group", async () => {
    const shim = await startShim();
    const conn = await welcomed(shim);
    const m = marker();
    const execId = sendExec(conn, { argv: ["sleep", m] });
    await conn.message("started", execId);
    conn.send({ type: "signal", execId, signal: "SIGINT" });
    const result = await finished(conn, execId);
    expect(result.exit).toMatchObject({ exitCode: null, signal: "SIGINT", timedOut: false });
    await expectGone(`sleep ${m}`);
  });

  it("delivers 20 MB of output completely, even when the daemon stalls reading", async () => {
    const shim = await startShim();
    const conn = await welcomed(shim);
    const argv = ["head", "-c", "20000000", "/dev/zero"];
    let stalled = false;
    let writersDuringStall = -1;
    conn.socket.on("data", () => {
      if (stalled) return;
      stalled = true; // stop reading for a while: the shim must pause, not buffer without bound
      conn.socket.pause();
      setTimeout(() => (writersDuringStall = liveProcesses(NOBODY, argv.join(" ")).length), 400);
      setTimeout(() => conn.socket.resume(), 500);
    });
    const result = await run(conn, { argv });
    // Unthrottled, head finishes in a few ms; still running mid-stall means it
    // was blocked on its full pipe, i.e. the shim paused reading it.
    expect(writersDuringStall).toBe(1);
    expect(result.exit?.exitCode).toBe(0);
    expect(result.stdout.length).toBe(20_000_000);
    expect(result.stdout.every((b) => b === 0)).toBe(true);
    expect(logLines(shim).some((l) => l.level === "error")).toBe(false);
  });

  it("ignores invalid messages and keeps serving", async () => {
    const shim = await startShim();
    const conn = await welcomed(shim);
    conn.send({ type: "exec", execId: 900, argv: ["true"], bogus: true });
    conn.socket.write(encodeFrame(FrameKind.Json, 0, Buffer.from("{not json")));
    conn.send({ type: "signal", execId: 901, signal: "SIGSTOP" });
    const result = await run(conn, { argv: ["echo", "still here"] });
    expect(result.stdout.toString()).toBe("still here\n");
    expect(conn.messages().some((m) => "execId" in m && (m.execId === 900 || m.execId === 901))).toBe(false);
    const ignored = logLines(shim).filter((l) => String(l.msg).startsWith("ignoring"));
    expect(ignored.length).toBeGreaterThanOrEqual(3);
  });

  it("ignores commands sent before welcome", async () => {
    const shim = await startShim({ autoWelcome: false });
    const conn = await welcomed(shim);
    const early = sendExec(conn, { argv: ["true"] });
    conn.send({ type: "welcome", phaseId: "late" });
    const result = await run(conn, { argv: ["true"] });
    expect(result.exit?.exitCode).toBe(0);
    expect(conn.messages().some((m) => "execId" in m && m.execId === early)).toBe(false);
  });

  it("kills running commands when the daemon disconnects, then reconnects and says hello again", async () => {
    const shim = await startShim();
    const first = await welcomed(shim);
    const m = marker();
    const execId = sendExec(first, { argv: ["sh", "-c", `sleep ${m} & sleep ${m}`] });
    await first.message("started", execId);
    await expectAlive(`sleep ${m}`, 2);

    first.socket.destroy(); // the daemon crashed
    await expectGone(`sleep ${m}`);

    const second = await welcomed(shim, 1);
    const hello = await second.message("hello");
    expect(hello).toMatchObject({ token: TOKEN, running: [] });
    const result = await run(second, { argv: ["echo", "again"] });
    expect(result.stdout.toString()).toBe("again\n");
    // nothing about the killed exec leaks onto the new connection
    expect(second.messages().some((msg) => "execId" in msg && msg.execId === execId)).toBe(false);
  });

  it("on shutdown, kills everything and exits 0", async () => {
    const shim = await startShim();
    const conn = await welcomed(shim);
    const m = marker();
    const execId = sendExec(conn, { argv: ["sleep", m] });
    await conn.message("started", execId);
    conn.send({ type: "shutdown" });
    expect(await shim.exited).toEqual({ code: 0, signal: null });
    await expectGone(`sleep ${m}`);
  });

  it("on SIGTERM, kills its commands before exiting", async () => {
    const shim = await startShim();
    const conn = await welcomed(shim);
    const m = marker();
    const execId = sendExec(conn, { argv: ["sleep", m] });
    await conn.message("started", execId);
    shim.proc.kill("SIGTERM");
    expect((await shim.exited).code).toBe(143);
    await expectGone(`sleep ${m}`);
  });
});
});
