/**
 * The layer's privileged host steps (mount, move, lazy unmount, read-only
 * binds, whiteouts, xattrs) without a process per step.
 *
 * Node has no binding for mount(2), umount2(2), mknod(2) or getxattr(2), and
 * on a shared 2-core host each process start-up (`sh`, `mount`, `umount`,
 * `getfattr`) costs 10–70 ms: an accepted iteration used to start about seven
 * (docs/WORKSPACE.md "Costs"). Instead the daemon starts one small Python
 * process once (on first use; `python3 -I -S`, standard library only: ctypes
 * for the system calls) and sends it requests over a pipe, one JSON line
 * each, one answer each. It runs as the daemon (root), reads only what the
 * daemon writes to its stdin, and exits when that pipe closes (the daemon
 * ended).
 *
 * A request is a list of steps run in order, stopping at the first that
 * fails (as `sh -e` did). A host without a usable python3 (it never says
 * "ready") gets the same steps as a shell script of mount(8)/umount(8)/
 * mknod(1) commands instead (`stepsToShell`), as before: slower, same
 * result. Once the helper has answered, it is never replaced by the shell
 * mid-way: a helper that dies later fails the request in flight (its steps
 * may have half run, like a shell killed mid-script), and the next request
 * starts a new helper.
 */
import { spawn, type ChildProcessWithoutNullStreams } from "node:child_process";
import { SandboxdError } from "../errors.js";

export type HostStep =
  /** mount -t overlay overlay -o OPTIONS TARGET */
  | { op: "overlay"; target: string; options: string }
  /** mount --bind SOURCE TARGET (not recursive) */
  | { op: "bind"; source: string; target: string }
  /** mount -o remount,bind,ro TARGET (nosuid, nodev, noexec kept as they are) */
  | { op: "remount-ro"; target: string }
  /** mount --move SOURCE TARGET */
  | { op: "move"; source: string; target: string }
  /** umount -l TARGET */
  | { op: "umount-lazy"; target: string }
  /** mknod PATH c 0 0: an overlayfs whiteout */
  | { op: "whiteout"; path: string }
  /** unless TARGET is a mount point already: mount --bind TARGET TARGET; mount --make-shared|--make-private TARGET */
  | { op: "mount-point"; target: string; propagation: "shared" | "private" };

/** The helper: reads a JSON request per line, answers a JSON line with the same id. */
const HELPER_PY = String.raw`
import ctypes, errno, json, os, stat, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p)
libc.umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_MOVE = 1, 2, 4, 8, 32, 4096, 8192
MS_PRIVATE, MS_SHARED = 1 << 18, 1 << 20
MNT_DETACH = 2
def enc(s):
    return None if s is None else os.fsencode(s)
def check(rc, what):
    if rc != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), what)
def mount(src, tgt, fstype, flags, data):
    check(libc.mount(enc(src), enc(tgt), enc(fstype), flags, enc(data)), tgt)
def is_mount_point(target):
    # mountinfo's field 5, with space, tab, newline and backslash octal-escaped
    want = target.replace("\\", "\\134").replace(" ", "\\040").replace("\t", "\\011").replace("\n", "\\012")
    with open("/proc/self/mountinfo") as f:
        return any(line.split(" ")[4] == want for line in f)
def step(s):
    op = s["op"]
    if op == "overlay":
        mount("overlay", s["target"], "overlay", 0, s["options"])
    elif op == "bind":
        mount(s["source"], s["target"], None, MS_BIND, None)
    elif op == "remount-ro":
        # a bind remount sets every per-mount flag: keep the ones the mount has (as mount(8) does)
        keep = os.statvfs(s["target"]).f_flag & (MS_NOSUID | MS_NODEV | MS_NOEXEC)
        mount(None, s["target"], None, MS_REMOUNT | MS_BIND | MS_RDONLY | keep, None)
    elif op == "move":
        mount(s["source"], s["target"], None, MS_MOVE, None)
    elif op == "umount-lazy":
        check(libc.umount2(enc(s["target"]), MNT_DETACH), s["target"])
    elif op == "whiteout":
        os.mknod(s["path"], stat.S_IFCHR | 0o600, os.makedev(0, 0))
    elif op == "mount-point":
        if not is_mount_point(s["target"]):
            mount(s["target"], s["target"], None, MS_BIND, None)
            mount(None, s["target"], None, MS_SHARED if s["propagation"] == "shared" else MS_PRIVATE, None)
    else:
        raise ValueError("unknown step " + repr(op))
def xattr(p, name):
    try:
        return os.getxattr(p, name, follow_symlinks=False).decode("latin-1")
    except OSError as e:
        if e.errno == errno.ENODATA:
            return None
        raise
out = sys.stdout
out.write('{"ready":true}\n')
out.flush()
for line in sys.stdin:
    req = json.loads(line)
    res = {"id": req["id"], "ok": True}
    i = -1
    try:
        if req["op"] == "steps":
            for i, s in enumerate(req["steps"]):
                step(s)
        elif req["op"] == "xattr":
            res["values"] = [xattr(p, req["name"]) for p in req["paths"]]
        else:
            raise ValueError("unknown request " + repr(req["op"]))
    except Exception as e:
        res = {"id": req["id"], "ok": False, "step": i, "error": str(e)}
    out.write(json.dumps(res) + "\n")
    out.flush()
`;

const REQUEST_TIMEOUT_MS = 30_000;

function q(s: string): string {
  return `'${s.replace(/'/g, `'\\''`)}'`;
}

/** The same steps as a shell script (`sh -ec`), for a host where the helper cannot run. */
export function stepsToShell(steps: readonly HostStep[]): string {
  return steps
    .map((s) => {
      switch (s.op) {
        case "overlay":
          return `mount -t overlay overlay -o ${q(s.options)} ${q(s.target)}`;
        case "bind":
          return `mount --bind ${q(s.source)} ${q(s.target)}`;
        case "remount-ro":
          return `mount -o remount,bind,ro ${q(s.target)}`;
        case "move":
          return `mount --move ${q(s.source)} ${q(s.target)}`;
        case "umount-lazy":
          return `umount -l ${q(s.target)}`;
        case "whiteout":
          return `mknod ${q(s.path)} c 0 0`;
        case "mount-point":
          return `if ! mountpoint -q ${q(s.target)}; then mount --bind ${q(s.target)} ${q(s.target)}; mount --make-${s.propagation} ${q(s.target)}; fi`;
      }
    })
    .join("\n");
}

interface Waiter {
  resolve(v: { values?: (string | null)[] }): void;
  reject(e: Error): void;
  timer: NodeJS.Timeout;
}

/** Why the helper cannot be used at all (no python3, no ctypes): the caller takes the shell instead. */
export class HelperUnavailable extends Error {}

export class HostHelper {
  private child: ChildProcessWithoutNullStreams | null = null;
  private ready: Promise<void> | null = null;
  private waiting = new Map<number, Waiter>();
  private nextId = 1;
  private buf = "";
  /** requests started and not yet answered (including those waiting for the helper to come up) */
  private busy = 0;
  /** the helper never came up on this host: every later request goes to the shell at once */
  private unavailable: Error | null = null;

  constructor(private readonly python: string = process.env.SANDBOXD_HOST_PYTHON ?? "python3") {}

  /** the helper's process id while it runs */
  get pid(): number | undefined {
    return this.child?.pid;
  }

  /** Runs the steps in order; the first failure stops them and is thrown. */
  async run(steps: readonly HostStep[]): Promise<void> {
    if (steps.length === 0) return;
    await this.request({ op: "steps", steps });
  }

  /** Each path's extended attribute `name` (not following a link), null where it is absent. */
  async xattrs(paths: readonly string[], name: string): Promise<(string | null)[]> {
    if (paths.length === 0) return [];
    return (await this.request({ op: "xattr", name, paths })).values ?? [];
  }

  private start(): Promise<void> {
    if (this.unavailable) return Promise.reject(new HelperUnavailable(this.unavailable.message));
    if (this.ready) return this.ready;
    const child = spawn(this.python, ["-I", "-S", "-u", "-c", HELPER_PY], { cwd: "/", stdio: ["pipe", "pipe", "pipe"] });
    this.child = child;
    let stderr = "";
    child.stderr.setEncoding("utf8");
    child.stderr.on("data", (d: string) => (stderr = (stderr + d).slice(-4000)));
    child.stdout.setEncoding("utf8");
    // a helper gone mid-write: its exit fails the requests in flight
    child.stdin.on("error", () => undefined);
    this.ready = new Promise<void>((resolve, reject) => {
      let up = false;
      const fail = (why: string) => {
        if (this.child === child) {
          this.child = null;
          this.ready = null;
        }
        const err = new Error(`host helper (${this.python}) ${why}${stderr.trim() ? `: ${stderr.trim()}` : ""}`);
        if (!up) {
          this.unavailable = err;
          reject(new HelperUnavailable(err.message));
        }
        for (const [id, w] of this.waiting) {
          clearTimeout(w.timer);
          this.waiting.delete(id);
          w.reject(new SandboxdError("SBX_ERR_WORKSPACE", `workspace layer: ${err.message}; the request may have been carried out in part`));
        }
      };
      child.on("error", (e) => fail(`could not start: ${e.message}`));
      child.on("exit", (code, sig) => fail(`exited (${sig ?? code})`));
      child.stdout.on("data", (d: string) => {
        this.buf += d;
        let nl: number;
        while ((nl = this.buf.indexOf("\n")) >= 0) {
          const line = this.buf.slice(0, nl);
          this.buf = this.buf.slice(nl + 1);
          let msg: { ready?: boolean; id?: number; ok?: boolean; error?: string; step?: number; values?: (string | null)[] };
          try {
            msg = JSON.parse(line) as typeof msg;
          } catch {
            continue;
          }
          if (msg.ready) {
            up = true;
            resolve();
            continue;
          }
          const w = this.waiting.get(msg.id ?? -1);
          if (!w) continue;
          this.waiting.delete(msg.id!);
          clearTimeout(w.timer);
          if (msg.ok) w.resolve(msg);
          else w.reject(new Error(msg.error ?? "failed"));
        }
      });
    });
    this.hold();
    return this.ready;
  }

  /** The helper keeps the daemon alive only while a request waits for it (an idle helper does not hold a process open). */
  private hold(): void {
    const c = this.child;
    if (!c) return;
    const streams = [c.stdout, c.stderr, c.stdin] as unknown as Array<{ ref(): void; unref(): void }>;
    if (this.busy === 0) {
      c.unref();
      for (const s of streams) s.unref();
    } else {
      c.ref();
      for (const s of streams) s.ref();
    }
  }

  private async request(body: Record<string, unknown>): Promise<{ values?: (string | null)[] }> {
    this.busy++;
    try {
      return await this.send(body);
    } finally {
      this.busy--;
      this.hold();
    }
  }

  private async send(body: Record<string, unknown>): Promise<{ values?: (string | null)[] }> {
    await this.start();
    const child = this.child;
    if (!child) throw new SandboxdError("SBX_ERR_WORKSPACE", "workspace layer: the host helper ended before the request");
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.waiting.delete(id);
        reject(new SandboxdError("SBX_ERR_WORKSPACE", `workspace layer: the host helper did not answer in ${REQUEST_TIMEOUT_MS / 1000} s`));
        child.kill("SIGKILL");
      }, REQUEST_TIMEOUT_MS);
      this.waiting.set(id, { resolve, reject, timer });
      child.stdin.write(JSON.stringify({ id, ...body }) + "\n");
    });
  }
}

let shared: HostHelper | null = null;

/** The daemon's one helper (started on first use). */
export function hostHelper(): HostHelper {
  shared ??= new HostHelper();
  return shared;
}
