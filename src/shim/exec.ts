/**
 * One command run by the shim: spawn, stream output, enforce the timeout, and
 * make sure nothing it started outlives it before `exit` is reported.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { realpathSync, statSync } from "node:fs";
import net from "node:net";
import { PassThrough, type Readable } from "node:stream";
import { FrameKind, SHIM_PATHS, type ExecMessage, type ShimToDaemon } from "./protocol.js";
import { errorFields, log } from "./log.js";
import type { CommandCgroup, CommandCgroups } from "./cgroups.js";
import { Forker, ForkerUnavailable, SpawnFailure, isDeadState, procState } from "./forker.js";
import { LANDLOCK_EXEC_PY } from "./landlock.js";
import { outputPool, readPooled } from "./read-pool.js";
import { findExecProcesses, readProcTable, signalExecProcesses, signalGroup, signalPid, type ProcStat } from "./procs.js";

/** setTimeout fires at once for delays above 2^31-1 ms; clamp (about 24.8 days). */
const MAX_TIMER_MS = 0x7fffffff;
/** exitSchema caps durationMs at one day. */
const MAX_DURATION_MS = 86_400_000;
/**
 * After the leader exits and its processes are killed, the output pipes should
 * reach EOF quickly. If one stays open with nothing arriving for this long, a
 * process we could not find still holds its write end (see procs.ts).
 */
const OUTPUT_IDLE_CAP_MS = 2_000;
/**
 * Once every known writer is dead, only what sits in the pipe buffers can
 * still arrive (a pipe holds at most /proc/sys/fs/pipe-max-size, 1 MiB by
 * default). More than this after the leader's exit means an escaped process is
 * still writing, and waiting for EOF could take forever.
 */
const POST_EXIT_OUTPUT_BUDGET = 4 * 1024 * 1024;

export type OutputKind = typeof FrameKind.Stdout | typeof FrameKind.Stderr;

/**
 * Pauses every exec's stdout/stderr while the control socket is backpressured,
 * so a fast writer cannot grow the shim's memory without bound; the children
 * then block on their full pipes, which is the backpressure they should feel.
 */
export class OutputGate {
  /** each stream, with whether its exec's own client holds it paused (see RunningExec.setClientPaused) */
  private readonly streams = new Map<Readable, () => boolean>();
  private pausedNow = false;

  get paused(): boolean {
    return this.pausedNow;
  }

  add(stream: Readable, heldByClient: () => boolean = () => false): void {
    this.streams.set(stream, heldByClient);
    stream.once("close", () => this.streams.delete(stream));
    if (this.pausedNow) stream.pause();
  }

  pause(): void {
    if (this.pausedNow) return;
    this.pausedNow = true;
    for (const s of this.streams.keys()) s.pause();
  }

  resume(): void {
    if (!this.pausedNow) return;
    this.pausedNow = false;
    for (const [s, held] of this.streams) if (!held()) s.resume();
  }
}

/** What an exec needs from the control connection. */
export interface ExecLink {
  send(message: ShimToDaemon): void;
  sendOutput(kind: OutputKind, execId: number, chunk: Buffer): void;
  readonly gate: OutputGate;
  /** starts commands cheaply when it is running (see forker.ts); otherwise Node's spawn */
  readonly forker?: Forker;
  /** one cgroup per command, when the daemon provided them (see cgroups.ts) */
  readonly cgroups?: CommandCgroups | null;
}

type LeaderExit = { code: number | null; signal: NodeJS.Signals | null };

/** How often a forker-started leader is looked up in /proc (see lostBehindForker). */
const REAP_CHECK_MS = 500;

export class RunningExec {
  readonly execId: number;
  /** Resolves once `exit` or `spawn_error` has been handed to the link. */
  readonly done: Promise<void>;
  private resolveDone!: () => void;
  private pid: number | undefined;
  private leaderExited = false;
  private timedOut = false;
  private readonly timers: NodeJS.Timeout[] = [];
  private readonly startedAt = performance.now();
  private lastOutputAt = Date.now();
  private postExitBudget = POST_EXIT_OUTPUT_BUDGET;
  private readonly streams: Readable[] = [];
  /**
   * Processes of this exec seen while the leader was alive. After the leader
   * exits, children that left its session have no link back to it; these
   * let the final cleanup find them anyway.
   */
  private known: ProcStat[] = [];
  /** a signal asked for while the forker was still starting the command */
  private signalOnStart: NodeJS.Signals | null = null;
  /** everything the command starts is born here and killed with it (null: the process-table walk only) */
  private cgroup: CommandCgroup | null = null;
  /** this exec's streaming client cannot take more (a `flow` message): its pipes wait, nobody else's */
  private clientPaused = false;

  private constructor(
    private readonly msg: ExecMessage,
    private readonly link: ExecLink,
  ) {
    this.execId = msg.execId;
    this.done = new Promise((resolve) => (this.resolveDone = resolve));
  }

  static start(msg: ExecMessage, link: ExecLink): RunningExec {
    const exec = new RunningExec(msg, link);
    exec.spawn();
    return exec;
  }

  /** True from `started` until the leader has exited. */
  get running(): boolean {
    return this.pid !== undefined && !this.leaderExited;
  }

  /** Forwards a daemon-requested signal to the whole process group. */
  signal(signal: NodeJS.Signals): void {
    if (this.pid === undefined && !this.leaderExited) {
      this.signalOnStart = this.signalOnStart === "SIGKILL" ? "SIGKILL" : signal;
      return;
    }
    if (!this.running || this.pid === undefined) return;
    log("info", "signal", { execId: this.execId, signal });
    // The signal goes to the group, as a terminal's would; the snapshot is for
    // the cleanup after the leader exits (see `known`).
    this.known = [...this.known, ...findExecProcesses(readProcTable(), this.pid)];
    signalGroup(this.pid, signal);
  }

  /**
   * Per-exec flow control: while this exec's client is slow, only its own
   * pipes stop being read (its command then blocks on write); the channel,
   * and every other command's output and exit, go on.
   */
  setClientPaused(paused: boolean): void {
    if (this.clientPaused === paused) return;
    this.clientPaused = paused;
    for (const s of this.streams) {
      if (paused) s.pause();
      else if (!this.link.gate.paused) s.resume();
    }
  }

  /** SIGKILLs everything the exec started (disconnect, shutdown, shim exit). */
  kill(): void {
    if (this.pid === undefined && !this.leaderExited) {
      this.signalOnStart = "SIGKILL"; // still starting: killed as soon as it has a pid
      return;
    }
    // After the leader has exited, cleanup has already run, and its pid may in
    // principle be reused by an unrelated process; do not signal it again.
    if (!this.running || this.pid === undefined) return;
    this.cgroup?.kill();
    signalExecProcesses(this.pid, "SIGKILL", this.known);
  }

  private spawn(): void {
    const { msg } = this;
    if (msg.argv[0] === undefined) return this.spawnFailed("EINVAL", "argv is empty");
    // The daemon checked the cwd in the phase's view; a directory swapped for a
    // link since then must not take the command out of the workspace.
    const escaped = escapesWorkspace(msg.cwd);
    if (escaped) return this.spawnFailed("EXDEV", escaped);
    const cgroups = this.link.cgroups;
    if (cgroups) {
      try {
        this.cgroup = cgroups.create(msg.execId);
      } catch (err) {
        // the command still runs; its leftovers are found by the process table
        log("warn", "no cgroup for this command", { execId: this.execId, ...errorFields(err) });
      }
    }
    const forker = this.link.forker;
    if (!forker) return this.spawnWithNode();
    forker.spawn({ id: msg.execId, argv: msg.argv, env: msg.env, cwd: msg.cwd, uid: msg.uid, gid: msg.gid, cgroup: this.cgroup, stdin: msg.stdin !== undefined }).then(
      (c) => {
        this.feedStdin(c.stdin ?? null);
        this.started(c.pid, c.stdout, c.stderr, Promise.race([c.exited, this.lostBehindForker(c.pid, c.forkerPid)]));
      },
      (err: Error) => {
        if (err instanceof SpawnFailure) {
          // worded as Node's spawn words it
          this.spawnFailed(err.code, this.explainSpawnError(err.code, `spawn ${msg.argv[0]} ${err.code} (${err.message})`));
        } else if (err instanceof ForkerUnavailable) {
          // nothing was started; a cgroup readied with the forker in it is left to the command alone
          if (this.cgroup) forker.leave(this.cgroup);
          this.spawnWithNode();
        } else {
          // the forker failed midway: the command may have started, so it is not started again
          this.spawnFailed("ESPAWN", `the command could not be started: ${err.message}`);
        }
      },
    );
  }

  /**
   * Node's spawn, through a small Python wrapper that puts the command in a
   * Landlock domain of its own before it execs it (see landlock.ts): Node has
   * no hook between fork and exec. It costs a Python start (about 20 ms);
   * this path is for commands of another user and for a shim with no forker.
   * The wrapper reports a failed exec on fd 3, worded as Node's spawn would.
   */
  private spawnWithNode(): void {
    const { msg } = this;
    let child: ChildProcess;
    const cgroups = this.link.cgroups;
    try {
      // The child is born in the shim's cgroup: the shim is in the command's for the (synchronous) fork.
      if (this.cgroup && cgroups) this.cgroup.place(process.pid);
      // by its full path: spawn resolves a bare name on msg.env's PATH, which holds the package disk the agent writes
      child = spawn("/usr/bin/python3", ["-I", "-S", "-c", LANDLOCK_EXEC_PY, ...msg.argv], {
        cwd: msg.cwd,
        env: msg.env, // exactly as given: nothing of the shim's environment is inherited
        uid: msg.uid,
        gid: msg.gid,
        // New session and process group, so the whole command can be signalled
        // at once (Docker has no exec-kill API, which is why the shim does it).
        detached: true,
        stdio: [msg.stdin !== undefined ? "pipe" : "ignore", "pipe", "pipe", "pipe"],
      });
    } catch (err) {
      // Node throws for some errors (EPERM from setuid, bad arguments) and
      // emits 'error' for others (ENOENT, EACCES): both are a spawn_error.
      const { code, error } = errorFields(err);
      return this.spawnFailed(code ?? "ESPAWN", error);
    } finally {
      if (this.cgroup && cgroups) cgroups.home(process.pid);
    }
    if (child.pid === undefined) {
      child.stdout?.destroy();
      child.stderr?.destroy();
      (child.stdio[3] as Readable | null)?.destroy();
      child.once("error", (err) => {
        const { code, error } = errorFields(err);
        this.spawnFailed(code ?? "ESPAWN", this.explainSpawnError(code, error));
      });
      return;
    }
    this.feedStdin(child.stdin);
    // A live child can still emit 'error' (e.g. a failed child.kill()); without a
    // listener that would crash the shim.
    child.on("error", (err) => log("warn", "child process error", { execId: this.execId, ...errorFields(err) }));
    const exited = new Promise<LeaderExit>((resolve) => child.once("exit", (code, signal) => resolve({ code, signal })));
    const pid = child.pid;
    // Read from now on: Node drops (resumes) a child's stdio that nobody reads
    // when the child exits, and a short command can exit before its exec is
    // confirmed below. Destroying our end destroys the pipe.
    const hold = (source: Readable): Readable => {
      const held = source.pipe(new PassThrough());
      held.once("close", () => source.destroy());
      return held;
    };
    const stdout = hold(child.stdout!);
    const stderr = hold(child.stderr!);
    const errPipe = child.stdio[3] as Readable;
    let report = "";
    errPipe.setEncoding("utf8");
    errPipe.on("data", (s: string) => (report = (report + s).slice(0, 4096)));
    errPipe.on("error", () => undefined);
    errPipe.once("close", () => {
      if (report === "") {
        // closed by a successful exec: the command runs
        this.started(pid, stdout, stderr, exited);
        return;
      }
      stdout.destroy();
      stderr.destroy();
      const space = report.indexOf(" ");
      const code = space > 0 ? report.slice(0, space) : "ESPAWN";
      const detail = space > 0 ? report.slice(space + 1) : report;
      // worded as Node's spawn words it
      this.spawnFailed(code, this.explainSpawnError(code, `spawn ${msg.argv[0]} ${code} (${detail})`));
    });
  }

  /**
   * Writes the exec's stdin bytes and closes the command's stdin (EOF). A
   * command that exits without reading them makes the write fail (EPIPE):
   * that is the command's choice, not an error of the shim.
   */
  private feedStdin(stream: NodeJS.WritableStream | null): void {
    if (!stream) return;
    (stream as NodeJS.WritableStream & { on(e: "error", f: () => void): unknown }).on("error", () => undefined);
    stream.end(Buffer.from(this.msg.stdin ?? "", "base64"));
  }

  /** The command runs (started by the forker or by Node): report it, stream it, time it. */
  private started(pid: number, stdout: Readable, stderr: Readable, exited: Promise<LeaderExit>): void {
    const { msg } = this;
    this.pid = pid;
    log("debug", "exec started", {
      execId: this.execId,
      pid,
      argv0: msg.argv[0],
      argc: msg.argv.length,
      cwd: msg.cwd,
      uid: msg.uid,
      gid: msg.gid,
    });
    this.link.send({ type: "started", execId: this.execId, pid });
    this.pipeOutput(stdout, FrameKind.Stdout);
    this.pipeOutput(stderr, FrameKind.Stderr);
    void exited.then(({ code, signal }) => this.onLeaderExit(code, signal));
    this.armTimeout(pid);
    if (this.signalOnStart === "SIGKILL") this.kill();
    else if (this.signalOnStart) this.signal(this.signalOnStart);
  }

  /**
   * The forker reports exits; a forker the agent stopped (SIGSTOP, same uid)
   * reports nothing, and its dead children stay zombies. So /proc is checked
   * too: a leader that is a zombie (or gone) while the forker is stopped (or
   * gone), on two checks in a row, has exited. Its status cannot be read
   * (the kernel shows a zombie's exit code only to a process that may trace
   * it), so it is reported as lost: killed, like commands whose forker died.
   * A forker that is merely slow is waited for.
   */
  private lostBehindForker(pid: number, forkerPid: number): Promise<LeaderExit> {
    return new Promise((resolve) => {
      let strikes = 0;
      const timer = setInterval(() => {
        if (this.leaderExited) return void clearInterval(timer);
        const leader = procState(pid);
        const leaderDone = leader === null || leader === "Z";
        const forkerStuck = isDeadState(procState(forkerPid));
        if (!(leaderDone && forkerStuck)) {
          strikes = 0;
          return;
        }
        if (++strikes < 2) return;
        clearInterval(timer);
        log("warn", "the forker is stopped and did not report an exit; status lost, reported as killed", { execId: this.execId, pid });
        resolve({ code: null, signal: "SIGKILL" });
      }, REAP_CHECK_MS);
      timer.unref();
    });
  }

  /** ENOENT is also what a missing cwd produces; say which it was. */
  private explainSpawnError(code: string | undefined, message: string): string {
    if (code !== "ENOENT") return message;
    try {
      statSync(this.msg.cwd);
    } catch {
      return `${message} (cwd ${this.msg.cwd} does not exist)`;
    }
    return message;
  }

  private spawnFailed(code: string, message: string): void {
    log("warn", "spawn failed", { execId: this.execId, argv0: this.msg.argv[0], code, error: message });
    // the forker may have started it before failing: whatever is there goes
    void this.cgroup?.end();
    this.link.send({
      type: "spawn_error",
      execId: this.execId,
      code: code.slice(0, 32),
      message: message.slice(0, 4096),
    });
    this.resolveDone();
  }

  private pipeOutput(source: Readable, kind: OutputKind): void {
    const onData = (chunk: Buffer): void => {
      this.lastOutputAt = Date.now();
      if (this.leaderExited) {
        this.postExitBudget -= chunk.length;
        if (this.postExitBudget < 0) {
          log("warn", "output still flowing after the command exited; an escaped process holds the pipe, closing it", {
            execId: this.execId,
          });
          this.closeOutput();
          return;
        }
      }
      this.link.sendOutput(kind, this.execId, chunk);
    };
    // The forker's sockets are read into pooled buffers (read-pool.ts): no allocation per read,
    // reads of 256 KiB; the link retains what it still has to write. Node's pipes: as they come.
    const pooled = source instanceof net.Socket ? readPooled(source, outputPool, onData) : null;
    const stream = pooled ?? source;
    if (!pooled) stream.on("data", onData);
    this.streams.push(stream);
    stream.on("error", (err) => log("warn", "output stream error", { execId: this.execId, ...errorFields(err) }));
    this.link.gate.add(stream, () => this.clientPaused);
    // The forker's output sockets arrive explicitly paused, which a 'data' listener does not undo.
    if (this.clientPaused) stream.pause();
    else if (!this.link.gate.paused) stream.resume();
  }

  private armTimeout(pid: number): void {
    const { timeoutMs, killGraceMs } = this.msg;
    this.timers.push(
      setTimeout(() => {
        this.timedOut = true;
        log("info", "exec timed out, sending SIGTERM", { execId: this.execId, timeoutMs, killGraceMs });
        this.known = signalExecProcesses(pid, "SIGTERM");
        for (const p of this.cgroup?.pids() ?? []) signalPid(p, "SIGTERM");
        this.timers.push(
          setTimeout(() => {
            this.cgroup?.kill();
            this.known = signalExecProcesses(pid, "SIGKILL", this.known);
          }, Math.min(killGraceMs, MAX_TIMER_MS)),
        );
      }, Math.min(timeoutMs, MAX_TIMER_MS)),
    );
  }

  private async onLeaderExit(exitCode: number | null, signal: NodeJS.Signals | null): Promise<void> {
    if (this.leaderExited) return;
    this.leaderExited = true;
    for (const t of this.timers) clearTimeout(t);
    this.lastOutputAt = Date.now();
    // No background process may outlive its command. With a cgroup, everything
    // it started is in there, whatever it did to its session or parentage. A
    // declared background job (src/phases/jobs.ts) is a command of its own,
    // with its own cgroup, ended the same way. Without one, the process-table
    // walk and its known gap.
    const killed = this.cgroup ? await this.cgroup.end() : signalExecProcesses(this.pid!, "SIGKILL", this.known).length;
    if (killed > 0) log("info", "killed leftover processes", { execId: this.execId, count: killed });
    await this.outputClosed();
    const durationMs = Math.min(Math.round(performance.now() - this.startedAt), MAX_DURATION_MS);
    log("debug", "exec exited", { execId: this.execId, exitCode, signal, timedOut: this.timedOut, durationMs });
    // Sent after the streams closed, so after every output frame of this exec.
    this.link.send({ type: "exit", execId: this.execId, exitCode, signal, timedOut: this.timedOut, durationMs });
    this.resolveDone();
  }

  /** Waits for EOF on stdout and stderr, unless a leaked descriptor keeps one open. */
  private async outputClosed(): Promise<void> {
    const open = this.streams.filter((s) => !s.destroyed);
    const closed = Promise.all(open.map((s) => new Promise((resolve) => s.once("close", resolve))));
    const watchdog = setInterval(() => {
      // Time spent paused for backpressure is the daemon's (or this exec's client's), not a leak.
      if (this.link.gate.paused || this.clientPaused) this.lastOutputAt = Date.now();
      else if (Date.now() - this.lastOutputAt >= OUTPUT_IDLE_CAP_MS) {
        log("warn", "output pipe still open after the command exited; closing it", { execId: this.execId });
        this.closeOutput();
      }
    }, 250);
    await closed;
    clearInterval(watchdog);
  }

  private closeOutput(): void {
    for (const s of this.streams) s.destroy();
  }
}

/**
 * Why `cwd` is not acceptable: a directory named inside the workspace whose
 * real path (links resolved) is outside it. null: fine (or not in the
 * workspace at all, which only the shim's own tests use; a missing one is
 * reported by the spawn as ENOENT).
 */
export function escapesWorkspace(cwd: string): string | null {
  const ws = SHIM_PATHS.workspace;
  if (cwd !== ws && !cwd.startsWith(`${ws}/`)) return null;
  let real: string;
  try {
    real = realpathSync(cwd);
  } catch {
    return null;
  }
  return real === ws || real.startsWith(`${ws}/`) ? null : `cwd ${cwd} resolves to ${real}, outside ${ws}`;
}
