/**
 * Daemon side of a phase's control channel.
 *
 * The daemon listens on `<runDir>/control.sock`; the shim connects from inside
 * the container. A connection is only trusted after its first frame is a valid
 * `hello` carrying the phase's token (compared in constant time). Everything
 * the shim sends is validated as untrusted input; a malformed frame ends the
 * connection. When the shim reconnects (after a daemon restart, or a dropped
 * link) the new authenticated connection replaces the old one.
 */
import { chmod, unlink } from "node:fs/promises";
import net from "node:net";
import { timingSafeEqual } from "node:crypto";
import type { Logger } from "pino";
import {
  FrameDecoder,
  FrameKind,
  encodeMessage,
  shimToDaemonSchema,
  type DaemonToShim,
  type ExecMessage,
  type ExitMessage,
} from "../shim/protocol.js";
import { SandboxdError } from "../errors.js";

export interface ExecHandlers {
  onStarted(pid: number): void;
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
  private readyWaiters: Array<() => void> = [];
  private pausedBy = 0;
  private services: Array<{ name: string; port: number }> | null = null;

  constructor(
    private readonly socketPath: string,
    private readonly token: string,
    private readonly phaseId: string,
    private readonly log: Logger,
    /** the phase owner, for whom the shim starts its forker */
    private readonly owner?: { uid: number; gid: number },
  ) {}

  async listen(): Promise<void> {
    await unlink(this.socketPath).catch(() => undefined);
    const server = net.createServer((sock) => this.onConnection(sock));
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

  get runningExecs(): number {
    return this.execs.size;
  }

  /** Resolves when an authenticated shim is connected; rejects after timeoutMs. */
  waitReady(timeoutMs: number): Promise<void> {
    if (this.active) return Promise.resolve();
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.readyWaiters = this.readyWaiters.filter((w) => w !== done);
        reject(
          new SandboxdError("SBX_ERR_SHIM_TIMEOUT", `the shim of phase ${this.phaseId} did not connect within ${timeoutMs} ms`),
        );
      }, timeoutMs);
      const done = () => {
        clearTimeout(timer);
        resolve();
      };
      this.readyWaiters.push(done);
    });
  }

  /**
   * The service tunnels the shim should listen for (127.0.0.1:<port>). Sent
   * now if the shim is connected, and again after every (re)connect.
   */
  setServices(services: Array<{ name: string; port: number }>): void {
    this.services = services;
    if (this.active) this.send({ type: "listen", services });
  }

  exec(msg: Omit<ExecMessage, "type" | "execId">, handlers: ExecHandlers): number {
    const sock = this.active;
    if (!sock) {
      throw new SandboxdError("SBX_ERR_SHIM_LOST", `the shim of phase ${this.phaseId} is not connected`);
    }
    const execId = this.nextExecId++;
    this.execs.set(execId, handlers);
    this.send({ type: "exec", execId, ...msg });
    return execId;
  }

  signal(execId: number, signal: "SIGTERM" | "SIGKILL" | "SIGINT"): void {
    if (this.active && this.execs.has(execId)) this.send({ type: "signal", execId, signal });
  }

  /**
   * Flow control for streaming consumers: while any consumer holds a pause,
   * the daemon stops reading from the shim, and the shim (whose writes then
   * back up) pauses its children's pipes.
   */
  pause(): void {
    this.pausedBy++;
    if (this.pausedBy === 1) this.active?.pause();
  }

  resume(): void {
    if (this.pausedBy === 0) return;
    this.pausedBy--;
    if (this.pausedBy === 0) this.active?.resume();
  }

  async close(opts: { shutdownShim: boolean }): Promise<void> {
    if (opts.shutdownShim && this.active) this.send({ type: "shutdown" });
    this.failAll(new SandboxdError("SBX_ERR_PHASE_NOT_RUNNING", `phase ${this.phaseId} stopped while the command ran`));
    this.active?.end();
    this.active = null;
    const server = this.server;
    this.server = null;
    if (server) await new Promise<void>((resolve) => server.close(() => resolve()));
    await unlink(this.socketPath).catch(() => undefined);
  }

  private send(message: DaemonToShim): void {
    this.active?.write(encodeMessage(message));
  }

  private onConnection(sock: net.Socket): void {
    const decoder = new FrameDecoder();
    let authenticated = false;
    const helloTimer = setTimeout(() => {
      this.log.warn({ phase: this.phaseId }, "control connection sent no hello in time; dropped");
      sock.destroy();
    }, HELLO_TIMEOUT_MS);

    const drop = (why: string) => {
      this.log.warn({ phase: this.phaseId, why }, "control connection dropped");
      sock.destroy();
    };

    sock.on("data", (chunk: Buffer) => {
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
    });
    sock.on("error", (err) => this.log.debug({ phase: this.phaseId, err: err.message }, "control socket error"));
    sock.on("close", () => {
      clearTimeout(helloTimer);
      if (this.active === sock) {
        this.active = null;
        this.log.warn({ phase: this.phaseId }, "shim disconnected");
        this.failAll(
          new SandboxdError("SBX_ERR_SHIM_LOST", `the shim of phase ${this.phaseId} disconnected while the command ran`),
        );
      }
    });
  }

  private adopt(sock: net.Socket, pid: number, features: readonly string[]): void {
    const previous = this.active;
    this.active = sock;
    if (previous) {
      previous.destroy();
      this.failAll(new SandboxdError("SBX_ERR_SHIM_LOST", `the shim of phase ${this.phaseId} reconnected; running commands were ended`));
    }
    if (this.pausedBy > 0) sock.pause();
    // a shim from before "owner" would refuse the whole welcome
    const owner = this.owner && features.includes("owner") ? { owner: this.owner } : {};
    this.send({ type: "welcome", phaseId: this.phaseId, ...owner });
    if (this.services) this.send({ type: "listen", services: this.services });
    this.log.info({ phase: this.phaseId, shimPid: pid }, "shim connected");
    const waiters = this.readyWaiters;
    this.readyWaiters = [];
    for (const w of waiters) w();
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
