/**
 * The forker: a small long-lived process that starts commands for the shim.
 *
 * Node starts a child with fork(), and on these machines a fork costs about
 * 5 ms whatever the process (page tables under virtualisation), most of an
 * `exec true` round trip; vfork (posix_spawn) costs a tenth of a millisecond.
 * Node has no vfork. Python's subprocess does, as long as the child needs no
 * uid, gid or group change — so the forker runs as the phase owner from the
 * start: the shim starts it (python3 -I -S, from the image) with the uid and
 * gid of the phase owner, and from then on commands for that user are
 * started by the forker with Popen: new session, the requested cwd, stdin
 * from /dev/null, default SIGPIPE/SIGXFSZ, no inherited descriptors, exactly
 * the environment the daemon sent. Other users' commands, and every command
 * while no forker can run, are started by Node as before.
 *
 * The forker is not dumpable, so the agent's processes cannot ptrace it or
 * read its memory, and each command runs in a Landlock domain of its own
 * (scoped for signals), so no command can trace or signal the forker, the
 * shim or another command (see `confine` below). A command's stdout and
 * stderr are socketpairs the forker makes: one end becomes the command's fd
 * 1 or 2, the other is handed to the shim over Node's IPC channel
 * (SCM_RIGHTS on a socketpair only the two of them hold). Nothing listens
 * anywhere for them, so nothing can crowd them out. Requests and replies are
 * JSON lines on the forker's stdin and stdout.
 *
 * Requests go one at a time (the next when the previous is answered): with
 * per-command cgroups (cgroups.ts) the shim moves the forker into the
 * command's cgroup before the request and back after the answer, so the
 * command is born in its cgroup. A slow forker is waited for; only one that
 * is stopped (/proc state T), a zombie or gone counts as dead. A dead forker
 * is replaced (see `spawn`) only when no process of the owner's uid is alive,
 * so nothing could attach to the new one while it is still dumpable;
 * otherwise the command is started by Node.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { readdirSync, readFileSync, writeFileSync } from "node:fs";
import { constants } from "node:os";
import type net from "node:net";
import type { CommandCgroup, CommandCgroups } from "./cgroups.js";
import { COMMAND_OOM_SCORE_ADJ, LANDLOCK_EXEC_FD_PY, LANDLOCK_PY } from "./landlock.js";
import { errorFields, log } from "./log.js";

/**
 * The forker's OOM bias, set by the shim (uid 0: the non-dumpable forker's
 * /proc files are root's, so the forker cannot write its own). A command is
 * born with its parent's value, so the forker holds COMMAND_OOM_SCORE_ADJ
 * from the request to its answer (a millisecond) and 0 otherwise: the
 * command starts raised, with no window in which it could grow unraised
 * (written into the child after the fork, it races the child's exec, whose
 * new image is not dumpable at first, so its /proc file is root's). When
 * this write fails, the request says `raise` and the forker starts the
 * command through the wrapper that raises itself (LANDLOCK_EXEC_FD_PY).
 * Going back down to 0 needs no privilege: 0 is the floor the forker
 * inherited.
 */
function setOomScoreAdj(pid: number, value: number): boolean {
  try {
    writeFileSync(`/proc/${pid}/oom_score_adj`, String(value));
    return true;
  } catch (err) {
    log("warn", "could not set the forker's oom_score_adj", { pid, value, ...errorFields(err) });
    return false;
  }
}

/** Python 3, `python3 -I -S -c`. */
const FORKER_PY = String.raw`
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
# First of all, not dumpable: the agent's processes run as this same uid and
# must not ptrace the forker (or read its memory). The shim starts no command
# of this uid until the forker says "ready", which it does only after this.
if libc.prctl(4, 0, 0, 0, 0) != 0:  # PR_SET_DUMPABLE
    raise SystemExit("prctl(PR_SET_DUMPABLE) failed")
import errno, json, os, select, signal, socket, subprocess, sys, threading
IPC = socket.socket(fileno=int(os.environ.get("NODE_CHANNEL_FD", "3")))
out = sys.stdout.buffer

${LANDLOCK_PY}
EXEC_WRAPPER = ${JSON.stringify(LANDLOCK_EXEC_FD_PY)}
def reply(o):
    out.write(json.dumps(o).encode() + b"\n")
    out.flush()
def hand_over(i, kind, s):
    # Node's IPC protocol for a handle: one JSON line with the fd attached
    data = (json.dumps({"cmd": "NODE_HANDLE", "type": "net.Socket", "msg": {"id": i, "kind": kind}}) + "\n").encode()
    n = socket.send_fds(IPC, [data], [s.fileno()])
    if n < len(data):
        IPC.sendall(data[n:])
wr, ww = os.pipe()
os.set_blocking(wr, False)
os.set_blocking(ww, False)
signal.set_wakeup_fd(ww)
signal.signal(signal.SIGCHLD, lambda s, f: None)
children = {}
def reap():
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        entry = children.pop(pid, None)
        if entry is None:
            continue
        i, p = entry
        p.returncode = status  # reaped here; the Popen object must not wait for it again
        if os.WIFSIGNALED(status):
            reply({"type": "exit", "id": i, "code": None, "signal": os.WTERMSIG(status)})
        else:
            reply({"type": "exit", "id": i, "code": os.WEXITSTATUS(status), "signal": None})
# The Landlock ruleset is kept from one command to the next (each command still gets a domain of its
# own: confine). A rule holds a folder as it was opened, so the kept ruleset goes after any mount or
# unmount in this mount namespace (the phase's view mounted over /workspace): /proc/self/mountinfo
# marks an exceptional condition for select() on each change since the last look.
MOUNTS = os.open("/proc/self/mountinfo", os.O_RDONLY | os.O_CLOEXEC)
kept = None
def kept_ruleset():
    global kept
    if kept is not None and not select.select([], [], [MOUNTS], 0)[2]:
        return kept
    if kept is not None:
        os.close(kept)
        kept = None
    kept = ruleset()
    return kept
def start(req, result):
    null = ew = None
    try:
        argv, fds = req["argv"], ()
        if req.get("raise"):
            # born unraised: the shim could not give the forker the commands' OOM bias for the fork. The
            # command starts through the wrapper, which raises itself, then confines itself and execs it: no
            # process of the command is ever below the bias. (Raised from here after the fork, it raced the
            # exec, whose new image is root's in /proc at first: under load, commands stayed at 0.)
            er, ew = os.pipe()
            result["err"] = er
            argv, fds = [sys.executable, "-I", "-S", "-c", EXEC_WRAPPER, str(ew)] + argv, (ew,)
        elif LANDLOCK:
            confine(result["rules"])
        if result["c0"] is None:
            # stdin: a /dev/null of its own. One opened once for all would be one open file description
            # shared by every command: its flags (fcntl F_SETFL) set by one command, seen by all the others.
            null = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        # no uid or gid change here (the forker already runs as the owner), so
        # _posixsubprocess may use vfork: well under a millisecond
        result["p"] = subprocess.Popen(argv, env=req["env"], cwd=req["cwd"], pass_fds=fds,
                                       stdin=result["c0"].fileno() if result["c0"] is not None else null,
                                       stdout=result["c1"].fileno(), stderr=result["c2"].fileno(),
                                       start_new_session=True, restore_signals=True, close_fds=True)
    except BaseException as e:
        result["e"] = e
        er = result.pop("err", None)
        if er is not None:
            os.close(er)
    finally:
        if null is not None:
            os.close(null)
        if ew is not None:
            os.close(ew)
def wrapper_failure(result):
    """The wrapper's word on its exec (None: the command runs), once its error pipe closes."""
    er = result.pop("err", None)
    if er is None:
        return None
    msg = b""
    try:
        while True:
            chunk = os.read(er, 4096)
            if not chunk:
                break
            msg += chunk
    finally:
        os.close(er)
    return msg.decode(errors="replace") if msg else None
def run(req):
    i = req["id"]
    p0 = c0 = None
    try:
        p1, c1 = socket.socketpair()
        p2, c2 = socket.socketpair()
        if req.get("stdin"):
            # the shim writes the exec's stdin bytes into p0, then shuts it down (EOF)
            p0, c0 = socket.socketpair()
    except OSError as e:
        reply({"type": "error", "id": i, "code": "ESOCK", "message": "output socketpair: %s" % e})
        return
    result = {"c0": c0, "c1": c1, "c2": c2, "rules": None}
    if LANDLOCK:
        try:
            result["rules"] = kept_ruleset()
        except OSError as e:
            for s in (p1, c1, p2, c2, p0, c0):
                if s is not None:
                    s.close()
            reply({"type": "error", "id": i, "code": errno.errorcode.get(e.errno, "ESPAWN") if e.errno else "ESPAWN", "message": "landlock ruleset: %s" % e})
            return
    try:
        t = threading.Thread(target=start, args=(req, result))
        t.start()
        t.join()
    except RuntimeError as e:
        # no thread to be had (the container's pids limit, a fork bomb in another command):
        # this command is not started, and the forker lives on for the others
        result["e"] = OSError(errno.EAGAIN, "no thread to start it (%s)" % e)
    c1.close()
    c2.close()
    if c0 is not None:
        c0.close()
    e = result.get("e")
    if e is not None:
        p1.close()
        p2.close()
        if p0 is not None:
            p0.close()
        if isinstance(e, OSError) and e.errno:
            reply({"type": "error", "id": i, "code": errno.errorcode.get(e.errno, "ESPAWN"), "message": e.strerror or str(e)})
        else:
            reply({"type": "error", "id": i, "code": "ESPAWN", "message": str(e)})
        return
    p = result["p"]
    failed = wrapper_failure(result)
    if failed is not None:
        # the wrapper could not exec the command (ENOENT …): it exits 127, reaped and ignored
        p1.close()
        p2.close()
        if p0 is not None:
            p0.close()
        code, _, message = failed.partition(" ")
        reply({"type": "error", "id": i, "code": code or "ESPAWN", "message": message or failed})
        return
    children[p.pid] = (i, p)
    try:
        if p0 is not None:
            hand_over(i, 0, p0)
        hand_over(i, 1, p1)
        hand_over(i, 2, p2)
    except OSError as e:
        # started, but its output cannot reach the shim: it goes (its exit is reaped and ignored)
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except OSError:
            pass
        reply({"type": "error", "id": i, "code": errno.errorcode.get(e.errno, "ESPAWN"), "message": "output hand-over: %s" % e})
        return
    finally:
        p1.close()
        p2.close()
        if p0 is not None:
            p0.close()
    reply({"type": "started", "id": i, "pid": p.pid})
reply({"type": "ready", "landlock": _abi})
buf = b""
def drain():
    global buf
    while b"\n" in buf:
        line, buf = buf.split(b"\n", 1)
        req = json.loads(line)
        try:
            run(req)
        except Exception as e:
            # whatever failed (memory, in a starved container) fails this command, not the forker
            reply({"type": "error", "id": req["id"], "code": "ESPAWN", "message": "the forker could not start it: %s" % e})
        reap()
while True:
    try:
        ready, _, _ = select.select([0, wr, IPC], [], [])
    except InterruptedError:
        continue
    if wr in ready:
        try:
            os.read(wr, 4096)
        except BlockingIOError:
            pass
    if IPC in ready:
        # Node acknowledges each handle (NODE_HANDLE_ACK): read and dropped
        if not IPC.recv(65536):
            break
    reap()
    if 0 in ready:
        c = os.read(0, 1 << 20)
        if not c:
            break
        buf += c
        drain()
`;

/** how long commands of the owner wait for a starting forker before it is given up */
const READY_TIMEOUT_MS = 5_000;
/** how often an unanswered request makes the shim look at the forker's state (slow is not dead) */
const ANSWER_CHECK_MS = 2_000;
/** a forker replaced this many times is not replaced again: commands go to Node */
const MAX_STARTS = 4;

export interface ForkRequest {
  id: number;
  argv: string[];
  env: Record<string, string>;
  cwd: string;
  uid: number;
  gid: number;
  /** the command's own cgroup: the forker is moved into it for the fork */
  cgroup?: CommandCgroup | null;
  /** the command's stdin is a socket handed to the shim (else /dev/null) */
  stdin?: boolean;
}

type Exit = { code: number | null; signal: NodeJS.Signals | null };

export interface ForkedCommand {
  pid: number;
  /** the forker's pid (its state tells a stopped forker from a slow one) */
  forkerPid: number;
  stdout: net.Socket;
  stderr: net.Socket;
  /** the write end of the command's stdin, when the request asked for one */
  stdin?: net.Socket;
  /** the command's exit, as the forker reaped it */
  exited: Promise<Exit>;
}

/** Nothing was started: the caller may start the command another way. */
export class ForkerUnavailable extends Error {}

/** The command could not be started (errno code, as Node's spawn would report it). */
export class SpawnFailure extends Error {
  constructor(
    readonly code: string,
    message: string,
  ) {
    super(message);
  }
}

interface Pending {
  req: ForkRequest;
  started?: number;
  /** the exit came before the hand-over */
  ended?: boolean;
  stdin?: net.Socket;
  stdout?: net.Socket;
  stderr?: net.Socket;
  resolve(c: ForkedCommand): void;
  reject(e: Error): void;
  exited: Promise<Exit>;
  onExit(e: Exit): void;
}

const SIGNAL_NAMES = new Map<number, NodeJS.Signals>(
  Object.entries(constants.signals).map(([name, n]) => [n as number, name as NodeJS.Signals]),
);

/** One-letter state of a process from /proc (null: gone). */
export function procState(pid: number): string | null {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    return stat.slice(stat.lastIndexOf(")") + 2).split(" ")[0] ?? null;
  } catch {
    return null;
  }
}

/** A forker in this state will never answer: stopped (T, t), a zombie, or gone. */
export function isDeadState(state: string | null): boolean {
  return state === null || state === "Z" || state === "X" || state === "T" || state === "t";
}

/** Live (not zombie) processes whose real or effective uid is `uid`, other than `except`. */
function liveProcessesOf(uid: number, except: ReadonlySet<number>): number[] {
  const found: number[] = [];
  for (const name of readdirSync("/proc")) {
    if (!/^\d+$/.test(name) || except.has(Number(name))) continue;
    try {
      const status = readFileSync(`/proc/${name}/status`, "utf8");
      if (/^State:\s+[ZX]/m.test(status)) continue;
      const uids = /^Uid:\s+(\d+)\s+(\d+)/m.exec(status);
      if (uids && (Number(uids[1]) === uid || Number(uids[2]) === uid)) found.push(Number(name));
    } catch {
      // exited while we looked
    }
  }
  return found;
}

export class Forker {
  private child: ChildProcess | null = null;
  private readonly pending = new Map<number, Pending>();
  /** requests not yet sent: one is in flight at a time */
  private readonly queue: number[] = [];
  private inFlight: number | null = null;
  private answerTimer: NodeJS.Timeout | null = null;
  /** exits of commands already handed over, by id */
  private readonly running = new Map<number, (e: Exit) => void>();
  private ready = false;
  /** the current forker is gone (stopped, died, or never started) */
  private dead = false;
  /** set by stop(): never started again */
  private closed = false;
  private starts = 0;
  /** resolves true once ready, false if it failed first */
  private readiness: Promise<boolean> | null = null;
  private settleReadiness: (ok: boolean) => void = () => undefined;
  private buf = "";
  /** forkers this shim killed (a stopped one stays in /proc until reaped) */
  private readonly killed = new Set<number>();

  private uid: number | null = null;
  private gid: number | null = null;
  /**
   * The command cgroup the forker is in (null: the supervisor's). Every move
   * goes through here, so a command is forked only with its own cgroup here
   * (sendNext), and a move is skipped when the forker is there already: a
   * cgroup readied ahead (enter) costs nothing at the fork.
   */
  private placedIn: CommandCgroup | null = null;

  constructor(private readonly cgroups: CommandCgroups | null = null) {}

  /** CgroupTenant (cgroups.ts): into a readied cgroup, only when idle, ready and in the supervisor's. */
  enter(cgroup: CommandCgroup): boolean {
    const pid = this.child?.pid;
    if (!this.cgroups || !this.usable || pid === undefined || this.inFlight !== null || this.queue.length > 0 || this.placedIn !== null) return false;
    try {
      cgroup.place(pid);
    } catch (err) {
      log("warn", "could not ready a command's cgroup for the forker", { dir: cgroup.dir, ...errorFields(err) });
      return false;
    }
    this.placedIn = cgroup;
    return true;
  }

  /** CgroupTenant: out of `cgroup` (home) if it is there and not forking; true when it is not in it afterwards. */
  leave(cgroup: CommandCgroup): boolean {
    if (this.placedIn !== cgroup) return true;
    if (this.inFlight !== null) return false;
    return this.goHome();
  }

  /** Back to the supervisor's cgroup; a forker that cannot leave a command's cgroup is stopped (it would die with that command). */
  private goHome(): boolean {
    const pid = this.child?.pid;
    if (this.placedIn === null || !this.cgroups || pid === undefined) {
      this.placedIn = null;
      return true;
    }
    try {
      this.cgroups.home(pid);
      this.placedIn = null;
      return true;
    } catch (err) {
      log("warn", "could not move the forker out of a command's cgroup; stopping it", errorFields(err));
      this.die("could not leave a command's cgroup");
      return false;
    }
  }

  /** True once the forker answered; until then (and after it died) callers spawn with Node. */
  get usable(): boolean {
    return this.ready && this.child !== null && !this.dead;
  }

  /**
   * Starts the forker process, running as `uid:gid`; failures leave the
   * forker unusable, never throw. Called before any command of that user ran
   * (the welcome), and again by spawn() to replace a dead forker when no
   * process of that user is alive.
   */
  startFor(uid: number, gid: number): void {
    if (this.closed || (this.readiness && !this.dead)) return;
    this.uid = uid;
    this.gid = gid;
    this.dead = false;
    this.ready = false;
    this.starts++;
    const readiness = new Promise<boolean>((resolve) => (this.settleReadiness = resolve));
    this.readiness = readiness;
    const giveUp = setTimeout(() => {
      if (this.ready || this.readiness !== readiness) return;
      log("warn", "forker not ready in time; commands are started by node", { timeoutMs: READY_TIMEOUT_MS });
      this.die("not ready in time");
    }, READY_TIMEOUT_MS);
    void readiness.then(() => clearTimeout(giveUp));
    let child: ChildProcess;
    try {
      child = spawn("python3", ["-I", "-S", "-c", FORKER_PY], {
        cwd: "/",
        env: { PATH: "/usr/bin:/bin", LANG: "C.UTF-8" },
        uid,
        gid,
        // fd 3: Node's IPC channel, which carries the commands' output sockets
        stdio: ["pipe", "pipe", "inherit", "ipc"],
      });
    } catch (err) {
      log("warn", "forker did not start; commands are started by node", errorFields(err));
      this.die("did not start");
      return;
    }
    this.child = child;
    this.buf = "";
    child.on("error", (err) => log("warn", "forker error", errorFields(err)));
    child.stdin!.on("error", () => undefined);
    child.stdout!.setEncoding("utf8");
    child.stdout!.on("data", (s: string) => {
      if (this.child === child) this.onReplies(s);
    });
    child.on("message", (m: unknown, handle: unknown) => this.onHandle(child, m, handle));
    child.once("exit", (code, signal) => {
      if (this.child !== child) return; // replaced or stopped already
      log("warn", "forker exited", { code, signal });
      this.die(`exited (${signal ?? code})`);
    });
  }

  /** Ends the forker for good (shutdown): commands still waiting fail, later ones go to Node. */
  stop(): void {
    this.closed = true;
    this.die("stopped");
  }

  /**
   * Starts a command. Rejects with SpawnFailure when the program could not be
   * run (ENOENT …), with ForkerUnavailable when nothing was started (the
   * caller may start it with Node), and with another Error when the forker
   * failed midway (whether the command started is unknown: not to be retried).
   */
  async spawn(req: ForkRequest): Promise<ForkedCommand> {
    if (req.uid !== this.uid || req.gid !== this.gid) throw new ForkerUnavailable("the forker runs as another user, or not at all");
    if (this.dead && !this.closed) this.replace();
    // While the forker starts, commands of its user wait: none may run while it is still dumpable.
    if (!this.ready && this.readiness && !this.dead) await this.readiness;
    if (!this.usable) throw new ForkerUnavailable("the forker is not running");
    return new Promise((resolve, reject) => {
      let onExit!: Pending["onExit"];
      const exited = new Promise<Exit>((r) => (onExit = r));
      this.pending.set(req.id, { req, resolve, reject, exited, onExit });
      this.queue.push(req.id);
      this.sendNext();
    });
  }

  /**
   * A dead forker is replaced only while no process of its user is alive
   * (the new one is dumpable until its first statement), and not forever.
   */
  private replace(): void {
    if (this.uid === null || this.gid === null || this.starts >= MAX_STARTS) return;
    const alive = liveProcessesOf(this.uid, this.killed);
    if (alive.length > 0) {
      log("info", "forker not replaced while processes of its user run; this command is started by node", { count: alive.length });
      return;
    }
    log("info", "replacing the forker", { starts: this.starts });
    this.startFor(this.uid, this.gid);
  }

  /** Sends the next queued request once the previous one is answered. */
  private sendNext(): void {
    const child = this.child;
    if (this.inFlight !== null || !child || !this.usable) return;
    const id = this.queue.shift();
    if (id === undefined) return;
    const p = this.pending.get(id);
    if (!p) return this.sendNext();
    try {
      // the command is born in its cgroup: its parent is there when it forks (already, when readied ahead)
      const target = p.req.cgroup ?? null;
      if (target && this.placedIn !== target) {
        target.place(child.pid!);
        this.placedIn = target;
      } else if (!target && this.placedIn !== null && !this.goHome()) {
        // a command without a cgroup is never born in another command's: the forker was stopped, its requests went back
        return;
      }
    } catch (err) {
      this.pending.delete(id);
      p.reject(new ForkerUnavailable(`could not place the forker in the command's cgroup: ${(err as Error).message}`));
      return this.sendNext();
    }
    // ... and with the commands' OOM bias (landlock.ts COMMAND_OOM_SCORE_ADJ), which the forker takes for the fork
    const biased = setOomScoreAdj(child.pid!, COMMAND_OOM_SCORE_ADJ);
    this.inFlight = id;
    const { cgroup, ...wire } = p.req;
    // raise: the forker would give it no bias at birth; the command starts through the wrapper that raises itself
    child.stdin!.write(JSON.stringify({ ...wire, raise: !biased }) + "\n");
    this.armAnswerCheck(id);
  }

  /** The answer to the request in flight came: the forker leaves the command's cgroup, the next request goes. */
  private answered(id: number): void {
    if (this.inFlight !== id) return;
    this.inFlight = null;
    if (this.answerTimer) clearTimeout(this.answerTimer);
    this.answerTimer = null;
    if (this.child?.pid !== undefined) setOomScoreAdj(this.child.pid, 0);
    // it would be killed with that command: a forker that cannot leave is stopped (goHome)
    if (!this.goHome()) return;
    this.sendNext();
  }

  /**
   * No answer yet: look at the forker. Busy (running, sleeping, in I/O) is
   * waited for, however long; stopped, a zombie or gone is dead.
   */
  private armAnswerCheck(id: number): void {
    let warned = false;
    const check = (): void => {
      if (this.inFlight !== id || !this.child) return;
      const pid = this.child.pid!;
      const state = procState(pid);
      if (isDeadState(state)) {
        log("warn", "the forker is stopped or gone with a request unanswered; replacing it", { id, state });
        this.die(`unresponsive (state ${state ?? "gone"})`);
        return;
      }
      if (!warned) log("info", "the forker is slow to answer; waiting", { id, state });
      warned = true;
      this.answerTimer = setTimeout(check, ANSWER_CHECK_MS);
    };
    this.answerTimer = setTimeout(check, ANSWER_CHECK_MS);
  }

  private onHandle(child: ChildProcess, m: unknown, handle: unknown): void {
    const sock = handle as net.Socket | undefined;
    const msg = m as { id?: unknown; kind?: unknown } | null;
    const p = typeof msg?.id === "number" ? this.pending.get(msg.id) : undefined;
    if (this.child !== child || !sock || !p || (msg!.kind !== 0 && msg!.kind !== 1 && msg!.kind !== 2) || (msg!.kind === 0 && !p.req.stdin)) {
      sock?.destroy();
      return;
    }
    if ((msg!.kind === 0 && p.stdin) || (msg!.kind === 1 && p.stdout) || (msg!.kind === 2 && p.stderr)) {
      sock.destroy(); // the first stream of each kind stands
      return;
    }
    sock.pause();
    if (msg!.kind === 0) p.stdin = sock;
    else if (msg!.kind === 1) p.stdout = sock;
    else p.stderr = sock;
    this.complete(msg!.id as number);
  }

  private onReplies(s: string): void {
    this.buf += s;
    let nl: number;
    while ((nl = this.buf.indexOf("\n")) >= 0) {
      const line = this.buf.slice(0, nl);
      this.buf = this.buf.slice(nl + 1);
      let m: { type: string; id?: number; pid?: number; code?: unknown; signal?: unknown; message?: string; landlock?: unknown };
      try {
        m = JSON.parse(line) as typeof m;
      } catch {
        log("warn", "forker said something unreadable; stopping it", { line: line.slice(0, 200) });
        this.die("unreadable reply");
        return;
      }
      if (m.type === "ready") {
        if (this.dead) continue;
        this.ready = true;
        this.settleReadiness(true);
        log("info", "forker ready", { pid: this.child?.pid, landlockAbi: m.landlock });
        this.sendNext();
        continue;
      }
      const id = m.id ?? -1;
      if (m.type === "exit") {
        const exit = {
          code: typeof m.code === "number" ? m.code : null,
          signal: typeof m.signal === "number" ? (SIGNAL_NAMES.get(m.signal) ?? null) : null,
        };
        const p = this.pending.get(id);
        if (p) {
          // exited before both output sockets arrived
          p.ended = true;
          p.onExit(exit);
        }
        this.running.get(id)?.(exit);
        this.running.delete(id);
        continue;
      }
      const p = this.pending.get(id);
      if (!p) continue;
      if (m.type === "started" && typeof m.pid === "number") {
        p.started = m.pid;
        this.answered(id);
        this.complete(id);
      } else if (m.type === "error") {
        this.pending.delete(id);
        this.answered(id);
        p.stdin?.destroy();
        p.stdout?.destroy();
        p.stderr?.destroy();
        const code = typeof m.code === "string" ? m.code : "ESPAWN";
        // ESOCK: failed before it forked
        if (code === "ESOCK") p.reject(new ForkerUnavailable(m.message ?? "output socket"));
        else p.reject(new SpawnFailure(code, m.message ?? code));
      }
    }
  }

  /** Hands the command over once it is started and both its streams are here. */
  private complete(id: number): void {
    const p = this.pending.get(id);
    if (!p || p.started === undefined || !p.stdout || !p.stderr || (p.req.stdin && !p.stdin)) return;
    this.pending.delete(id);
    if (!p.ended) this.running.set(id, (e) => p.onExit(e));
    p.resolve({ pid: p.started, forkerPid: this.child?.pid ?? 0, stdout: p.stdout, stderr: p.stderr, ...(p.stdin ? { stdin: p.stdin } : {}), exited: p.exited });
  }

  /**
   * The current forker is gone for good: killed if it still exists, requests
   * not yet sent go back to the caller (nothing was started), the one in
   * flight fails (it may have started), running commands lose their exit
   * report (reported killed; the caller then kills what is left of them).
   */
  private die(why: string): void {
    const child = this.child;
    this.child = null;
    this.placedIn = null; // a new forker is born in the shim's cgroup, the supervisor's
    this.dead = true;
    this.ready = false;
    this.settleReadiness(false);
    if (this.answerTimer) clearTimeout(this.answerTimer);
    this.answerTimer = null;
    if (child?.pid !== undefined) {
      this.killed.add(child.pid);
      child.kill("SIGKILL");
      child.once("exit", () => this.killed.delete(child.pid!));
    }
    const inFlight = this.inFlight;
    this.inFlight = null;
    this.queue.length = 0;
    for (const [id, p] of this.pending) {
      this.pending.delete(id);
      p.stdin?.destroy();
      p.stdout?.destroy();
      p.stderr?.destroy();
      if (p.started !== undefined) {
        // started but never handed over: nobody would track or kill it
        try {
          process.kill(-p.started, "SIGKILL");
        } catch {
          // gone already
        }
        p.req.cgroup?.kill();
      }
      if (id === inFlight || p.started !== undefined) p.reject(new Error(`the forker ${why} before it reported the start`));
      else p.reject(new ForkerUnavailable(`the forker ${why}`));
    }
    for (const [, onExit] of this.running) onExit({ code: null, signal: "SIGKILL" });
    this.running.clear();
  }
}
