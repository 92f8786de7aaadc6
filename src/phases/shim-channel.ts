/**
 * Daemon side of a phase's control channel.
 *
 * The daemon listens on `<runDir>/control.sock`; the shim connects from inside
 * the container. A connection is only trusted after its first frame is a valid
 * `hello` carrying the phase's token (compared in constant time). Everything
 * the shim sends is validated as untrusted input; a malformed frame ends the
 * connection. When the shim reconnects (after a daemon restart, or a dropped
 * link) the new authenticated connection replaces the old one.
 *
 * Invariants:
 * - with a shim that has "execflow", a consumer's pause is its exec's alone
 *   (a `flow` message; the link is never paused): a consumer holding a pause
 *   has its exec paused in the shim, and release resumes it whether or not
 *   the daemon still tracks the exec; with an older shim, the link is paused
 *   exactly while at least one consumer holds a pause. Either way holds are
 *   keyed by consumer: a consumer holds at most one, and releasing twice or
 *   never having held is harmless, so a consumer that goes away can release
 *   what it held and nothing else;
 * - an exec's handlers are called until its exit, its spawn error, its loss
 *   or `forget(execId)`, and never after;
 * - `close()` ends every connection at once (a paused link included) and
 *   rejects whoever waits for the shim;
 * - a pooled channel (a warm pool's container, src/phases/pool.ts) sends
 *   nothing to its shim until `claim`: no welcome, so no forker, no owner,
 *   no command; `claim` names the phase once, then it is a phase's channel
 *   like any other.
 */
import { chmod } from "node:fs/promises";
import net from "node:net";
import { timingSafeEqual } from "node:crypto";
import type { Logger } from "pino";
import {
  FrameDecoder,
  FrameKind,
  HEADER_BYTES,
  MAX_FRAME_PAYLOAD,
  encodeMessage,
  shimToDaemonSchema,
  type DaemonToShim,
  type ExecMessage,
  type ExitMessage,
} from "../shim/protocol.js";
import { SandboxdError } from "../errors.js";
import { removeIfPresent } from "../util/fs.js";
import { outputPool, readPooled } from "../shim/read-pool.js";

export interface ExecHandlers {
  onStarted(pid: number): void;
  /**
   * A piece of output, lent for the call: a view of a pooled read buffer
   * that the next read reuses. Keep it longer only after
   * `outputPool.retain(chunk)` (and release it), or as a copy.
   */
  onStdout(chunk: Buffer): void;
  onStderr(chunk: Buffer): void;
  onExit(exit: ExitMessage): void;
  onSpawnError(code: string, message: string): void;
  /** the link to the shim broke before the exec finished */
  onLost(err: SandboxdError): void;
}

const HELLO_TIMEOUT_MS = 5_000;

export class ShimChannel {
  private server: net.Server | null = null;
  private active: net.Socket | null = null;
  private readonly execs = new Map<number, ExecHandlers>();
  private nextExecId = 1;
  private readyWaiters: Array<{ resolve(): void; reject(e: Error): void }> = [];
  /** consumers holding a pause, with the exec each takes output from when known (see the invariants above) */
  private readonly holders = new Map<object, number | undefined>();
  /** the connected shim pauses one exec at a time (feature "execflow") */
  private execFlow = false;
  /** every connection, authenticated or not, so close() can end them all */
  private readonly sockets = new Set<net.Socket>();
  private closed = false;
  private services: Array<{ name: string; port: number }> | null = null;
  /** what the connected shim said it understands beyond protocol 1 (its hello's features) */
  private features: readonly string[] = [];

  /** pooled and not yet claimed: the welcome is held back (see the invariants above) */
  private held: boolean;

  constructor(
    private readonly socketPath: string,
    private readonly token: string,
    private phaseId: string,
    private readonly log: Logger,
    /** the phase owner, for whom the shim starts its forker */
    private owner?: { uid: number; gid: number },
    /** called when an authenticated shim's link closes (not when close() ends it) */
    private onDisconnect?: () => void,
    opts: { pooled?: boolean } = {},
  ) {
    this.held = opts.pooled === true;
  }

  /**
   * A warm pool's channel becomes the phase's: its id, its owner and its
   * loss handler, and the welcome goes to the connected shim now (to one
   * that connects later, at its hello, as for every phase).
   */
  claim(phaseId: string, owner: { uid: number; gid: number }, onDisconnect: () => void): void {
    if (!this.held) throw new Error(`channel of ${this.phaseId} is not a pooled one waiting for its claim`);
    this.held = false;
    this.phaseId = phaseId;
    this.owner = owner;
    this.onDisconnect = onDisconnect;
    if (this.active) this.welcome();
  }

  /** The connected shim said it waits for a claim's welcome (feature "pool"). */
  get pooledShim(): boolean {
    return this.active !== null && this.features.includes("pool");
  }

  async listen(): Promise<void> {
    await removeIfPresent(this.socketPath);
    // paused: the connection is handed to pooled reads (read-pool.ts) before its first byte is read
    const server = net.createServer({ pauseOnConnect: true }, (sock) => this.onConnection(sock));
    await new Promise<void>((resolve, reject) => {
      server.once("error", reject);
      server.listen(this.socketPath, () => {
        server.off("error", reject);
        resolve();
      });
    });
    // The run dir is 0700 root; the socket is 0600 too, as defence in depth.
    await chmod(this.socketPath, 0o600);
    this.server = server;
  }

  get connected(): boolean {
    return this.active !== null;
  }

  /** The connected shim understands `feature` (e.g. "stdin"): a container of an older image may not. */
  supports(feature: string): boolean {
    return this.active !== null && this.features.includes(feature);
  }

  get runningExecs(): number {
    return this.execs.size;
  }

  /** Resolves when an authenticated shim is connected; rejects after timeoutMs, or when the channel is closed. */
  waitReady(timeoutMs: number): Promise<void> {
    if (this.active) return Promise.resolve();
    if (this.closed) return Promise.reject(this.closedError());
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.readyWaiters = this.readyWaiters.filter((w) => w !== waiter);
        reject(
          new SandboxdError("SBX_ERR_SHIM_TIMEOUT", `the shim of phase ${this.phaseId} did not connect within ${timeoutMs} ms`),
        );
      }, timeoutMs);
      const waiter = {
        resolve: () => {
          clearTimeout(timer);
          resolve();
        },
        reject: (e: Error) => {
          clearTimeout(timer);
          reject(e);
        },
      };
      this.readyWaiters.push(waiter);
    });
  }

  private closedError(): SandboxdError {
    return new SandboxdError("SBX_ERR_PHASE_NOT_RUNNING", `phase ${this.phaseId} was stopped before its shim connected`);
  }

  /**
   * The service tunnels the shim should listen for (127.0.0.1:<port>). Sent
   * now if the shim is connected, and again after every (re)connect.
   */
  setServices(services: Array<{ name: string; port: number }>): void {
    this.services = services;
    if (this.active && !this.held) this.send({ type: "listen", services });
  }

  exec(msg: Omit<ExecMessage, "type" | "execId">, handlers: ExecHandlers): number {
    const sock = this.active;
    // a pooled channel runs nothing before a phase claims it
    if (!sock || this.held) {
      throw new SandboxdError("SBX_ERR_SHIM_LOST", `the shim of phase ${this.phaseId} is not connected`);
    }
    const execId = this.nextExecId++;
    const frame = encodeMessage({ type: "exec", execId, ...msg });
    // The shim takes an oversized frame for a broken link and ends every command
    // of the phase; such a message is refused here, never sent (callers check first).
    if (frame.length - HEADER_BYTES > MAX_FRAME_PAYLOAD) {
      throw new SandboxdError("SBX_ERR_REQUEST_TOO_LARGE", `the exec message is ${frame.length - HEADER_BYTES} bytes; a frame holds at most ${MAX_FRAME_PAYLOAD}`);
    }
    this.execs.set(execId, handlers);
    sock.write(frame);
    return execId;
  }

  /**
   * The next exec is on its way (its verdict is being made durable): a shim
   * with "prepare" readies its cgroup meanwhile. Nothing runs on it; the
   * exec that takes the id uses it, and an unused one is undone by the shim.
   */
  prepare(): void {
    if (this.active && !this.held && this.features.includes("prepare")) this.send({ type: "prepare", execId: this.nextExecId });
  }

  signal(execId: number, signal: "SIGTERM" | "SIGKILL" | "SIGINT"): void {
    if (this.active && this.execs.has(execId)) this.send({ type: "signal", execId, signal });
  }

  /** The daemon gave up on this exec (it answered already): its handlers are never called again. */
  forget(execId: number): void {
    this.execs.delete(execId);
  }

  /**
   * Flow control for streaming consumers: while any consumer holds a pause,
   * the daemon stops reading from the shim, and the shim (whose writes then
   * back up) pauses its children's pipes. Keyed by consumer, so one that
   * goes away releases its own pause and cannot leave the link paused.
   */
  hold(consumer: object, execId?: number): void {
    if (this.closed) return;
    const had = this.holders.has(consumer);
    if (had && this.holders.get(consumer) === execId) return;
    this.holders.set(consumer, execId);
    if (this.execFlow) {
      // before its exec is sent a consumer has no output to hold back
      if (execId !== undefined) this.send({ type: "flow", execId, paused: true });
    } else if (!had && this.holders.size === 1) this.active?.pause();
  }

  release(consumer: object): void {
    if (!this.holders.has(consumer)) return;
    const execId = this.holders.get(consumer);
    this.holders.delete(consumer);
    if (this.execFlow) {
      // sent even for an exec the daemon gave up on: the shim must not keep its pipes paused
      if (execId !== undefined) this.send({ type: "flow", execId, paused: false });
    } else if (this.holders.size === 0) this.active?.resume();
  }

  get paused(): boolean {
    return this.holders.size > 0;
  }

  async close(opts: { shutdownShim: boolean }): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    if (opts.shutdownShim && this.active) this.send({ type: "shutdown" });
    this.failAll(new SandboxdError("SBX_ERR_PHASE_NOT_RUNNING", `phase ${this.phaseId} stopped while the command ran`));
    const waiters = this.readyWaiters;
    this.readyWaiters = [];
    for (const w of waiters) w.reject(this.closedError());
    this.holders.clear();
    const active = this.active;
    this.active = null;
    // The shutdown frame is flushed, then every link ends at once: a paused
    // link never reads the shim's FIN, so waiting for it could wait forever.
    for (const sock of this.sockets) {
      if (sock === active) sock.end(() => sock.destroy());
      else sock.destroy();
    }
    active?.resume();
    const server = this.server;
    this.server = null;
    if (server) {
      const forced = setTimeout(() => {
        for (const sock of this.sockets) sock.destroy();
      }, 1_000);
      await new Promise<void>((resolve) => server.close(() => resolve()));
      clearTimeout(forced);
    }
    await removeIfPresent(this.socketPath);
  }

  private send(message: DaemonToShim): void {
    this.active?.write(encodeMessage(message));
  }

  private onConnection(accepted: net.Socket): void {
    let sock = accepted;
    if (this.closed) {
      sock.destroy();
      return;
    }
    // Output passes through in the pieces it is read in, views of pooled read
    // buffers (no copy, no allocation per read or frame; read-pool.ts): a
    // handler that keeps a piece past its call retains it in outputPool or copies it.
    const decoder = new FrameDecoder({ streamData: true, borrowed: true });
    let authenticated = false;
    const helloTimer = setTimeout(() => {
      this.log.warn({ phase: this.phaseId }, "control connection sent no hello in time; dropped");
      sock.destroy();
    }, HELLO_TIMEOUT_MS);

    const drop = (why: string) => {
      this.log.warn({ phase: this.phaseId, why }, "control connection dropped");
      sock.destroy();
    };

    const onChunk = (chunk: Buffer) => {
      let frames;
      try {
        frames = decoder.push(chunk);
      } catch (err) {
        return drop((err as Error).message);
      }
      for (const frame of frames) {
        if (sock.destroyed) return;
        if (!authenticated) {
          if (frame.kind !== FrameKind.Json) return drop("first frame was not a hello");
          const msg = parseMessage(frame.payload);
          if (!msg || msg.type !== "hello") return drop("first message was not a valid hello");
          if (!tokenMatches(msg.token, this.token)) return drop("hello carried a wrong token");
          clearTimeout(helloTimer);
          authenticated = true;
          this.adopt(sock, msg.pid, msg.features ?? []);
          continue;
        }
        if (frame.kind === FrameKind.Stdout || frame.kind === FrameKind.Stderr) {
          const h = this.execs.get(frame.execId);
          if (!h) continue; // output of an exec we already gave up on
          if (frame.kind === FrameKind.Stdout) h.onStdout(frame.payload);
          else h.onStderr(frame.payload);
          continue;
        }
        const msg = parseMessage(frame.payload);
        if (!msg) return drop("invalid control message");
        this.onMessage(msg);
      }
    };
    const pooled = readPooled(sock, outputPool, onChunk);
    if (pooled) sock = pooled;
    else {
      sock.on("data", onChunk);
      sock.resume();
    }
    this.sockets.add(sock);
    sock.on("error", (err) => this.log.debug({ phase: this.phaseId, err: err.message }, "control socket error"));
    sock.on("close", () => {
      clearTimeout(helloTimer);
      this.sockets.delete(sock);
      if (this.active === sock) {
        this.active = null;
        this.log.warn({ phase: this.phaseId }, "shim disconnected");
        this.failAll(
          new SandboxdError("SBX_ERR_SHIM_LOST", `the shim of phase ${this.phaseId} disconnected while the command ran`),
        );
        this.onDisconnect?.();
      }
    });
  }

  private adopt(sock: net.Socket, pid: number, features: readonly string[]): void {
    const previous = this.active;
    this.active = sock;
    this.features = features;
    if (previous) {
      previous.destroy();
      this.failAll(new SandboxdError("SBX_ERR_SHIM_LOST", `the shim of phase ${this.phaseId} reconnected; running commands were ended`));
    }
    this.execFlow = features.includes("execflow");
    // the execs these holds were for ended with the previous link; an older shim is paused as before
    if (!this.execFlow && this.holders.size > 0) sock.pause();
    if (!this.held) this.welcome();
    this.log.info({ phase: this.phaseId, shimPid: pid, held: this.held }, "shim connected");
    const waiters = this.readyWaiters;
    this.readyWaiters = [];
    for (const w of waiters) w.resolve();
  }

  private welcome(): void {
    // a shim from before "owner" would refuse the whole welcome
    const owner = this.owner && this.features.includes("owner") ? { owner: this.owner } : {};
    this.send({ type: "welcome", phaseId: this.phaseId, ...owner });
    if (this.services) this.send({ type: "listen", services: this.services });
  }

  private onMessage(msg: NonNullable<ReturnType<typeof parseMessage>>): void {
    switch (msg.type) {
      case "hello":
        return; // a second hello on an authenticated link means nothing
      case "started":
        this.execs.get(msg.execId)?.onStarted(msg.pid);
        return;
      case "exit": {
        const h = this.execs.get(msg.execId);
        this.execs.delete(msg.execId);
        h?.onExit(msg);
        return;
      }
      case "spawn_error": {
        const h = this.execs.get(msg.execId);
        this.execs.delete(msg.execId);
        h?.onSpawnError(msg.code, msg.message);
        return;
      }
    }
  }

  private failAll(err: SandboxdError): void {
    const pending = [...this.execs.values()];
    this.execs.clear();
    for (const h of pending) h.onLost(err);
  }
}

function parseMessage(payload: Buffer) {
  let json: unknown;
  try {
    json = JSON.parse(payload.toString("utf8"));
  } catch {
    return null;
  }
  const parsed = shimToDaemonSchema.safeParse(json);
  return parsed.success ? parsed.data : null;
}

function tokenMatches(given: string, expected: string): boolean {
  const a = Buffer.from(given);
  const b = Buffer.from(expected);
  return a.length === b.length && timingSafeEqual(a, b);
}
