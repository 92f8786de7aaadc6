/**
 * The forker: a small long-lived process that starts commands for the shim.
 *
 * Node starts a child with fork(), and on these machines a fork costs about
 * 5 ms whatever the process (page tables under virtualisation), most of an
 * `exec true` round trip; vfork (posix_spawn) costs a tenth of a millisecond.
 * Node has no vfork. Python's subprocess does, as long as the child needs no
 * uid, gid or group change — so the forker runs as the phase owner from the
 * start: the shim starts it (python3 -I -S, from the image) with the uid and
 * gid of the first command, and from then on commands for that user are
 * started by the forker with Popen: new session, the requested cwd, stdin
 * from /dev/null, default SIGPIPE/SIGXFSZ, no inherited descriptors, exactly
 * the environment the daemon sent. Other users' commands, and every command
 * while the forker is not running (not started yet, or it died: the agent
 * runs as the same uid and can kill it), are started by Node as before.
 *
 * The forker is not dumpable, so the agent's processes cannot ptrace it or
 * read its memory. The command's stdout and stderr are unix stream sockets
 * to the shim: the forker connects two to the shim's output socket, with a
 * 37-byte header (exec id, stream, token), before it starts the command,
 * which takes them as fds 1 and 2. The socket is in a root-owned 0711
 * directory under /tmp (its path still shows in /proc/net/unix); a
 * connection without the token within 2 s is dropped, and a flood of them
 * only pushes out older unauthenticated ones. The forker reaps its children and
 * reports each exit. Requests and replies are JSON lines on the forker's
 * stdin and stdout, which only the shim holds.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { randomBytes, timingSafeEqual } from "node:crypto";
import { chmodSync, mkdtempSync, rmSync } from "node:fs";
import { constants } from "node:os";
import net from "node:net";
import { errorFields, log } from "./log.js";

/** Python 3, `python3 -I -S -c`. */
const FORKER_PY = String.raw`
import ctypes
# First of all, not dumpable: the agent's processes run as this same uid and
# must not ptrace the forker (or read its memory). The shim starts no command
# of this uid until the forker says "ready", which it does only after this.
if ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0) != 0:  # PR_SET_DUMPABLE
    raise SystemExit("prctl(PR_SET_DUMPABLE) failed")
import errno, json, os, select, signal, socket, struct, subprocess, sys
buf = b""
while b"\n" not in buf:
    c = os.read(0, 65536)
    if not c:
        sys.exit(0)
    buf += c
first, buf = buf.split(b"\n", 1)
init = json.loads(first)
SOCK, TOKEN = init["sock"], bytes.fromhex(init["token"])
out = sys.stdout.buffer
def reply(o):
    out.write(json.dumps(o).encode() + b"\n")
    out.flush()
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
def connect(i, kind):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(SOCK)
    s.sendall(struct.pack(">IB", i, kind) + TOKEN)
    return s
def run(req):
    i = req["id"]
    try:
        s1 = connect(i, 1)
        s2 = connect(i, 2)
    except OSError as e:
        reply({"type": "error", "id": i, "code": "ESOCK", "message": "output socket: %s" % e})
        return
    try:
        # no uid or gid change here (the forker already runs as the owner), so
        # _posixsubprocess may use vfork: well under a millisecond
        p = subprocess.Popen(req["argv"], env=req["env"], cwd=req["cwd"], stdin=subprocess.DEVNULL,
                             stdout=s1.fileno(), stderr=s2.fileno(), start_new_session=True,
                             restore_signals=True, close_fds=True)
    except OSError as e:
        code = errno.errorcode.get(e.errno, "ESPAWN") if e.errno else "ESPAWN"
        reply({"type": "error", "id": i, "code": code, "message": e.strerror or str(e)})
        return
    except BaseException as e:
        reply({"type": "error", "id": i, "code": "ESPAWN", "message": str(e)})
        return
    finally:
        s1.close()
        s2.close()
    children[p.pid] = (i, p)
    reply({"type": "started", "id": i, "pid": p.pid})
reply({"type": "ready"})
def drain():
    global buf
    while b"\n" in buf:
        line, buf = buf.split(b"\n", 1)
        run(json.loads(line))
        reap()
drain()
while True:
    try:
        ready, _, _ = select.select([0, wr], [], [])
    except InterruptedError:
        continue
    if wr in ready:
        try:
            os.read(wr, 4096)
        except BlockingIOError:
            pass
    reap()
    if 0 in ready:
        c = os.read(0, 1 << 20)
        if not c:
            break
        buf += c
        drain()
`;

const HEADER_BYTES = 4 + 1 + 32;
const HEADER_TIMEOUT_MS = 2_000;
const MAX_UNAUTHENTICATED = 32;
/** how long commands of the owner wait for a starting forker before it is given up for good */
const READY_TIMEOUT_MS = 5_000;
/** a request the forker has not answered in this long means it is stuck: commands go back to Node */
const ANSWER_TIMEOUT_MS = 5_000;

export interface ForkRequest {
  id: number;
  argv: string[];
  env: Record<string, string>;
  cwd: string;
  uid: number;
  gid: number;
}

export interface ForkedCommand {
  pid: number;
  /** the forker's pid (its state tells a stopped forker from a slow one) */
  forkerPid: number;
  stdout: net.Socket;
  stderr: net.Socket;
  /** the command's exit, as the forker reaped it */
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
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
  started?: number;
  /** the exit came before the hand-over */
  ended?: boolean;
  stdout?: net.Socket;
  stderr?: net.Socket;
  resolve(c: ForkedCommand): void;
  reject(e: Error): void;
  timer: NodeJS.Timeout;
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  onExit(e: { code: number | null; signal: NodeJS.Signals | null }): void;
}

const SIGNAL_NAMES = new Map<number, NodeJS.Signals>(
  Object.entries(constants.signals).map(([name, n]) => [n as number, name as NodeJS.Signals]),
);

export class Forker {
  private child: ChildProcess | null = null;
  private server: net.Server | null = null;
  private readonly token = randomBytes(32);
  private readonly pending = new Map<number, Pending>();
  /** exits of commands already handed over, by id */
  private readonly running = new Map<number, (e: { code: number | null; signal: NodeJS.Signals | null }) => void>();
  private ready = false;
  /** once stopped or dead, never started again: a new forker would be dumpable while the agent's processes run */
  private dead = false;
  /** resolves true once ready, false if it failed first */
  private readiness: Promise<boolean> | null = null;
  private settleReadiness: (ok: boolean) => void = () => undefined;
  /** output-socket connections that have not sent their header yet, oldest first */
  private readonly waiting = new Set<net.Socket>();
  private buf = "";

  private uid: number | null = null;
  private dir: string | null = null;
  private gid: number | null = null;

  /** True once the forker answered; until then (and after it died) callers spawn with Node. */
  get usable(): boolean {
    return this.ready && this.child !== null;
  }

  /**
   * Starts the output socket and the forker process, running as `uid:gid`;
   * failures leave the forker unusable, never throw. The socket must be
   * reachable by that uid, which is also the agent's (its path shows in
   * /proc/net/unix); every connection must carry the token, which only the
   * forker (not dumpable) holds.
   */
  startFor(uid: number, gid: number): void {
    if (this.readiness || this.dead) return;
    this.uid = uid;
    this.gid = gid;
    this.readiness = new Promise<boolean>((resolve) => (this.settleReadiness = resolve));
    const giveUp = setTimeout(() => {
      if (this.ready) return;
      log("warn", "forker not ready in time; commands are started by node", { timeoutMs: READY_TIMEOUT_MS });
      this.stop();
    }, READY_TIMEOUT_MS);
    void this.readiness.then(() => clearTimeout(giveUp));
    let socketPath: string;
    try {
      const dir = mkdtempSync("/tmp/.sandboxd-forker-");
      this.dir = dir;
      chmodSync(dir, 0o711);
      socketPath = `${dir}/${randomBytes(16).toString("hex")}.sock`;
    } catch (err) {
      log("warn", "no place for the forker's output socket; commands are started by node", errorFields(err));
      return;
    }
    const server = net.createServer({ pauseOnConnect: true }, (sock) => this.onOutput(sock));
    server.on("error", (err) => {
      log("warn", "forker output socket failed; commands are started by node", errorFields(err));
      this.stop();
    });
    server.listen(socketPath, () => {
      let child: ChildProcess;
      try {
        chmodSync(socketPath, 0o666);
        child = spawn("python3", ["-I", "-S", "-c", FORKER_PY], {
          cwd: "/",
          env: { PATH: "/usr/bin:/bin", LANG: "C.UTF-8" },
          uid,
          gid,
          stdio: ["pipe", "pipe", "inherit"],
        });
      } catch (err) {
        log("warn", "forker did not start; commands are started by node", errorFields(err));
        return;
      }
      this.child = child;
      child.on("error", (err) => log("warn", "forker error", errorFields(err)));
      child.stdin!.on("error", () => undefined);
      child.stdin!.write(JSON.stringify({ sock: socketPath, token: this.token.toString("hex") }) + "\n");
      child.stdout!.setEncoding("utf8");
      child.stdout!.on("data", (s: string) => this.onReplies(s));
      child.once("exit", (code, signal) => {
        if (this.child !== child) return; // stopped already
        log("warn", "forker exited; commands are started by node", { code, signal });
        this.child = null;
        this.stop();
      });
    });
    this.server = server;
  }

  stop(): void {
    this.dead = true;
    this.ready = false;
    this.settleReadiness(false);
    this.child?.kill("SIGKILL");
    this.child = null;
    this.server?.close();
    this.server = null;
    if (this.dir) rmSync(this.dir, { recursive: true, force: true });
    this.dir = null;
    this.failAll(new Error("the forker was stopped"));
  }

  /**
   * Starts a command. Rejects with SpawnFailure when the program could not be
   * run (ENOENT …), with ForkerUnavailable when nothing was started (the
   * caller may start it with Node), and with another Error when the forker
   * failed midway (whether the command started is unknown: not to be retried).
   */
  async spawn(req: ForkRequest): Promise<ForkedCommand> {
    if (req.uid !== this.uid || req.gid !== this.gid) throw new ForkerUnavailable("the forker runs as another user, or not at all");
    // While the forker starts, commands of its user wait: none may run while it is still dumpable.
    if (!this.ready && this.readiness && !this.dead) await this.readiness;
    const child = this.child;
    if (!this.usable || !child) throw new ForkerUnavailable("the forker is not running");
    return new Promise((resolve, reject) => {
      let onExit!: Pending["onExit"];
      const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((r) => (onExit = r));
      const timer = setTimeout(() => {
        // The forker is stuck: drop it, so this and later commands fall back to node.
        log("warn", "forker did not answer; stopping it", { id: req.id });
        this.stop();
      }, ANSWER_TIMEOUT_MS);
      this.pending.set(req.id, { resolve, reject, timer, exited, onExit });
      child.stdin!.write(JSON.stringify(req) + "\n");
    });
  }

  private onReplies(s: string): void {
    this.buf += s;
    let nl: number;
    while ((nl = this.buf.indexOf("\n")) >= 0) {
      const line = this.buf.slice(0, nl);
      this.buf = this.buf.slice(nl + 1);
      let m: { type: string; id?: number; pid?: number; code?: unknown; signal?: unknown; message?: string };
      try {
        m = JSON.parse(line) as typeof m;
      } catch {
        log("warn", "forker said something unreadable; stopping it", { line: line.slice(0, 200) });
        this.stop();
        return;
      }
      if (m.type === "ready") {
        if (this.dead) continue;
        this.ready = true;
        this.settleReadiness(true);
        log("info", "forker ready", { pid: this.child?.pid });
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
        this.complete(id);
      } else if (m.type === "error") {
        this.settle(id);
        p.stdout?.destroy();
        p.stderr?.destroy();
        const code = typeof m.code === "string" ? m.code : "ESPAWN";
        // ESOCK: failed before it forked
        if (code === "ESOCK") p.reject(new ForkerUnavailable(m.message ?? "output socket"));
        else p.reject(new SpawnFailure(code, m.message ?? code));
      }
    }
  }

  private onOutput(sock: net.Socket): void {
    sock.on("error", (err) => log("debug", "forker output socket error", errorFields(err)));
    // Over the cap, the oldest waiting connection goes, not the new one: the
    // forker sends its header with the connect, so its own always gets in.
    if (this.waiting.size >= MAX_UNAUTHENTICATED) this.waiting.values().next().value?.destroy();
    this.waiting.add(sock);
    const authenticated = () => {
      this.waiting.delete(sock);
      clearTimeout(deadline);
    };
    // the forker sends its header at once; anyone else gets a moment, not a slot
    const deadline = setTimeout(() => sock.destroy(), HEADER_TIMEOUT_MS);
    sock.once("close", authenticated);
    let head = Buffer.alloc(0);
    const onData = (chunk: Buffer) => {
      head = Buffer.concat([head, chunk]);
      if (head.length < HEADER_BYTES) return;
      authenticated();
      sock.off("data", onData);
      sock.pause();
      const rest = head.subarray(HEADER_BYTES);
      if (rest.length > 0) sock.unshift(rest);
      const id = head.readUInt32BE(0);
      const kind = head[4];
      const p = this.pending.get(id);
      if (!p || !timingSafeEqual(head.subarray(5, HEADER_BYTES), this.token) || (kind !== 1 && kind !== 2)) {
        sock.destroy();
        return;
      }
      if ((kind === 1 && p.stdout) || (kind === 2 && p.stderr)) {
        sock.destroy(); // the first stream of each kind stands
        return;
      }
      if (kind === 1) p.stdout = sock;
      else p.stderr = sock;
      this.complete(id);
    };
    sock.on("data", onData);
    sock.resume();
  }

  /** Hands the command over once it is started and both its streams are here. */
  private complete(id: number): void {
    const p = this.pending.get(id);
    if (!p || p.started === undefined || !p.stdout || !p.stderr) return;
    this.settle(id);
    if (!p.ended) this.running.set(id, (e) => p.onExit(e));
    p.resolve({ pid: p.started, forkerPid: this.child?.pid ?? 0, stdout: p.stdout, stderr: p.stderr, exited: p.exited });
  }

  private settle(id: number): void {
    const p = this.pending.get(id);
    if (!p) return;
    clearTimeout(p.timer);
    this.pending.delete(id);
  }

  private failAll(err: Error): void {
    for (const [id, p] of this.pending) {
      this.settle(id);
      p.stdout?.destroy();
      p.stderr?.destroy();
      // started but never handed over: nobody would track or kill it
      if (p.started !== undefined) {
        try {
          process.kill(-p.started, "SIGKILL");
        } catch {
          // gone already
        }
      }
      p.reject(err);
    }
    // commands already running lose their exit report; their output still ends
    for (const [, onExit] of this.running) onExit({ code: null, signal: "SIGKILL" });
    this.running.clear();
  }
}
