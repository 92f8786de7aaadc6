/**
 * sandboxd-shim: the supervisor inside every phase container.
 *
 * Started by tini (PID 1), it dials the daemon's control socket, introduces
 * itself with the phase token, and runs the commands the daemon sends (see
 * protocol.ts). The container has no network and a read-only root; the shim
 * runs as uid 0 with only SETUID, SETGID and KILL, which is exactly enough to
 * start each command as the project owner and to kill what it leaves behind.
 *
 * Bundled by scripts/bundle.mjs into one CommonJS file for the image's
 * Node 18, so only Node built-ins and zod may be imported here.
 */
import net from "node:net";
import path from "node:path";
import { errorFields, log } from "./log.js";
import { OutputGate, RunningExec, type ExecLink, type OutputKind } from "./exec.js";
import { CommandCgroups } from "./cgroups.js";
import { Forker } from "./forker.js";
import { TunnelListeners } from "./tunnels.js";
import { outputPool } from "./read-pool.js";
import {
  FrameDecoder,
  FrameKind,
  MAX_FRAME_PAYLOAD,
  PROTOCOL_VERSION,
  SHIM_ENV,
  SHIM_PATHS,
  daemonToShimSchema,
  encodeHeader,
  encodeMessage,
  type DaemonToShim,
  type Frame,
  type ShimToDaemon,
} from "./protocol.js";

const CONNECT_RETRY_MS = 100;
/** output waiting to be written to the daemon beyond this pauses every command's output */
const CONTROL_BACKLOG_BYTES = 1024 * 1024;
const CONNECT_LOG_EVERY_MS = 5_000;
/** A peer that accepts but never welcomes us is not a working daemon; redial. */
const WELCOME_TIMEOUT_MS = 10_000;
/**
 * After a disconnect, give the killed execs this long to be reaped before
 * redialling, so the next hello normally reports `running: []`.
 */
const DISCONNECT_REAP_CAP_MS = 3_000;

class Shim implements ExecLink {
  readonly gate = new OutputGate();
  private readonly execs = new Map<number, RunningExec>();
  private socket: net.Socket | null = null;
  private welcomed = false;
  /** a welcome came on some connection since the shim began */
  private everWelcomed = false;
  /** a command has been asked for since the shim began */
  private anyExec = false;
  private readonly tunnels: TunnelListeners;
  /** starts commands without forking the shim (see forker.ts) */
  readonly forker: Forker;
  /** one cgroup per command, killed when it ends (see cgroups.ts) */
  readonly cgroups: CommandCgroups | null;

  constructor(
    private readonly socketPath: string,
    private readonly token: string,
    tunnelSocketPath: string,
    cgroupDir: string,
    /** a warm pool's shim: its welcome comes when a phase claims the container, however long that takes */
    private readonly pooled: boolean,
  ) {
    this.tunnels = new TunnelListeners(tunnelSocketPath, token);
    this.cgroups = CommandCgroups.open(cgroupDir);
    this.forker = new Forker(this.cgroups);
  }

  /** Serves connection after connection; only shutdown or a signal ends the process. */
  async run(): Promise<never> {
    for (;;) {
      const socket = await this.connect();
      await this.serve(socket);
      if (this.execs.size > 0) {
        // A command must not outlive its supervisor's link.
        log("warn", "control connection lost, killing running commands", { count: this.execs.size });
        this.killAll();
        await Promise.race([
          Promise.all([...this.execs.values()].map((e) => e.done)),
          new Promise((resolve) => setTimeout(resolve, DISCONNECT_REAP_CAP_MS)),
        ]);
      } else {
        log("warn", "control connection lost");
      }
    }
  }

  /** Dials until the daemon listens: it may not be up yet, or be restarting after a crash. */
  private connect(): Promise<net.Socket> {
    return new Promise((resolve) => {
      const since = Date.now();
      let lastLog = 0;
      const attempt = (): void => {
        const socket = net.createConnection({ path: this.socketPath });
        const onError = (err: Error): void => {
          socket.destroy();
          if (Date.now() - lastLog >= CONNECT_LOG_EVERY_MS) {
            lastLog = Date.now();
            log("info", "waiting for the daemon's control socket", {
              socket: this.socketPath,
              waitedMs: lastLog - since,
              ...errorFields(err),
            });
          }
          setTimeout(attempt, CONNECT_RETRY_MS);
        };
        socket.once("error", onError);
        socket.once("connect", () => {
          socket.off("error", onError);
          resolve(socket);
        });
      };
      attempt();
    });
  }

  /** Runs one connection: hello, welcome, then messages until it closes. */
  private serve(socket: net.Socket): Promise<void> {
    return new Promise((resolve) => {
      this.socket = socket;
      this.welcomed = false;
      const decoder = new FrameDecoder();
      // pooled, until the first welcome: the daemon holds it back until a phase claims this container
      const waitsForClaim = this.pooled && !this.everWelcomed;
      const welcomeTimer = setTimeout(() => {
        if (waitsForClaim) return;
        log("warn", "no welcome from the daemon, redialling", { timeoutMs: WELCOME_TIMEOUT_MS });
        socket.destroy();
      }, WELCOME_TIMEOUT_MS);

      socket.on("data", (chunk: Buffer) => {
        let frames: Frame[];
        try {
          frames = decoder.push(chunk);
        } catch (err) {
          // The byte stream cannot be resynchronised after a framing error.
          log("error", "protocol error from the daemon, dropping the connection", errorFields(err));
          socket.destroy();
          return;
        }
        for (const frame of frames) {
          if (socket.destroyed) return;
          this.onFrame(frame, welcomeTimer);
        }
      });
      socket.on("drain", () => this.gate.resume());
      socket.on("error", (err) => log("warn", "control socket error", errorFields(err)));
      socket.on("close", () => {
        clearTimeout(welcomeTimer);
        this.socket = null;
        this.welcomed = false;
        // Output now goes nowhere; let it flow so the killed commands' pipes drain.
        this.gate.resume();
        resolve();
      });

      log("info", "connected to the daemon", { socket: this.socketPath });
      const running = [...this.execs.values()].filter((e) => e.running).map((e) => e.execId);
      this.send({
        type: "hello",
        protocol: PROTOCOL_VERSION,
        token: this.token,
        pid: process.pid,
        node: process.version,
        running,
        features: ["owner", "execflow", "stdin", "pool", "prepare"],
      });
    });
  }

  private onFrame(frame: Frame, welcomeTimer: NodeJS.Timeout): void {
    if (frame.kind !== FrameKind.Json) {
      log("warn", "ignoring an output frame from the daemon (a command's stdin comes in its exec message)", { kind: frame.kind });
      return;
    }
    let json: unknown;
    try {
      json = JSON.parse(frame.payload.toString("utf8"));
    } catch {
      log("warn", "ignoring a control message that is not JSON", { bytes: frame.payload.length });
      return;
    }
    const parsed = daemonToShimSchema.safeParse(json);
    if (!parsed.success) {
      // Paths and messages only: zod issues never carry the env values themselves.
      const issues = parsed.error.issues.map((i) => `${i.path.join(".") || "(root)"}: ${i.message}`);
      log("warn", "ignoring an invalid control message", { issues });
      return;
    }
    const message = parsed.data;
    if (message.type === "welcome") {
      if (this.welcomed) log("warn", "ignoring a second welcome");
      else {
        clearTimeout(welcomeTimer);
        this.welcomed = true;
        this.everWelcomed = true;
        log("info", "welcomed by the daemon", { phaseId: message.phaseId });
        // Only before any command has run: no process of the owner's uid may
        // exist while the forker is still dumpable (see forker.ts).
        if (message.owner && !this.anyExec) this.forker.startFor(message.owner.uid, message.owner.gid);
      }
      return;
    }
    if (!this.welcomed) {
      log("warn", "ignoring a message that arrived before welcome", { type: message.type });
      return;
    }
    this.dispatch(message);
  }

  private dispatch(message: Exclude<DaemonToShim, { type: "welcome" }>): void {
    switch (message.type) {
      case "exec": {
        this.anyExec = true;
        const { execId } = message;
        if (this.execs.has(execId)) {
          this.send({ type: "spawn_error", execId, code: "EEXIST", message: `execId ${execId} is already running` });
          return;
        }
        const exec = RunningExec.start(message, this);
        this.execs.set(execId, exec);
        void exec.done.then(() => this.execs.delete(execId));
        return;
      }
      case "signal": {
        const exec = this.execs.get(message.execId);
        if (exec) exec.signal(message.signal);
        else log("warn", "signal for an exec that is not running", { execId: message.execId });
        return;
      }
      case "flow":
        // an exec that ended meanwhile is not here: nothing to pause or resume
        this.execs.get(message.execId)?.setClientPaused(message.paused);
        return;
      case "listen":
        this.tunnels.apply(message.services);
        return;
      case "prepare":
        if (!this.execs.has(message.execId)) this.cgroups?.prepare(message.execId, this.forker);
        return;
      case "shutdown":
        log("info", "shutdown requested by the daemon");
        this.tunnels.closeAll();
        this.killAll();
        this.forker.stop();
        this.socket?.destroy();
        process.exit(0);
    }
  }

  /* ------------------------------- ExecLink ------------------------------- */

  send(message: ShimToDaemon): void {
    const socket = this.socket;
    if (!socket || socket.destroyed) return; // disconnected: the daemon that asked is gone
    if (!socket.write(encodeMessage(message))) this.gate.pause();
  }

  sendOutput(kind: OutputKind, execId: number, chunk: Buffer): void {
    const socket = this.socket;
    if (!socket || socket.destroyed) return;
    for (let off = 0; off < chunk.length; off += MAX_FRAME_PAYLOAD) {
      const payload = chunk.subarray(off, off + MAX_FRAME_PAYLOAD);
      // Header and payload as two writes inside cork/uncork: one writev, no copy.
      socket.cork();
      socket.write(encodeHeader(kind, execId, payload.length));
      // a view of a pooled read buffer (read-pool.ts): held until written
      outputPool.retain(payload);
      const flushed = socket.write(payload, () => outputPool.release(payload));
      socket.uncork();
      // A read (up to 256 KiB) is more than the socket's 16 KiB mark at once; the commands
      // stop only when a real backlog waits for the daemon (the shim's memory).
      if (!flushed && socket.writableLength >= CONTROL_BACKLOG_BYTES) this.gate.pause();
    }
  }

  /* ------------------------------------------------------------------------ */

  killAll(): void {
    for (const exec of this.execs.values()) exec.kill();
  }
}

function main(): void {
  const token = process.env[SHIM_ENV.token];
  const socketPath = process.env[SHIM_ENV.socket] || SHIM_PATHS.controlSocket;
  const cgroupDir = process.env[SHIM_ENV.cgroupDir] || SHIM_PATHS.commandCgroups;
  const pooled = process.env[SHIM_ENV.pooled] === "1";
  // Children get exactly the env the daemon sends, but drop these anyway so no
  // later code path can leak them.
  delete process.env[SHIM_ENV.token];
  delete process.env[SHIM_ENV.socket];
  delete process.env[SHIM_ENV.cgroupDir];
  delete process.env[SHIM_ENV.pooled];
  if (!token) {
    process.stderr.write(
      `sandboxd-shim: ${SHIM_ENV.token} is not set. The daemon passes the phase's token when it creates ` +
        `the container; the shim cannot authenticate without it.\n`,
    );
    process.exit(2);
  }

  // the tunnel socket sits beside the control socket, in the phase's run dir
  const shim = new Shim(socketPath, token, path.join(path.dirname(socketPath), path.basename(SHIM_PATHS.tunnelSocket)), cgroupDir, pooled);
  log("info", "shim starting", { pid: process.pid, node: process.version, socket: socketPath, pooled });

  // tini forwards `docker stop`'s SIGTERM to us; the commands run in their own
  // sessions and would not get it, so take them down before going.
  for (const [signal, number] of [
    ["SIGTERM", 15],
    ["SIGINT", 2],
  ] as const) {
    process.on(signal, () => {
      log("info", "signal received, killing all commands", { signal });
      shim.killAll();
      shim.forker.stop();
      process.exit(128 + number);
    });
  }
  process.on("uncaughtException", (err) => {
    log("error", "shim crashed, killing all commands", { ...errorFields(err), stack: err.stack });
    shim.killAll();
    shim.forker.stop();
    process.exit(1);
  });

  void shim.run();
}

main();
