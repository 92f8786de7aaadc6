/**
 * The control-channel protocol between the daemon and the in-container shim.
 *
 * One unix-socket connection per phase, opened by the shim to the daemon's
 * listener in the phase's run dir (`/run/sandboxd/control.sock` inside the
 * container). Binary framing, so command output is carried without base64 or
 * JSON escaping (streaming throughput is a stated target):
 *
 *   u32be payloadLength | u8 kind | u32be execId | payload
 *
 * kind 1 = JSON control message (execId 0), 2 = stdout bytes, 3 = stderr bytes.
 *
 * Both sides validate every JSON message with the zod schemas below: the
 * daemon treats the shim as untrusted input (it runs inside the sandbox).
 */
import { z } from "zod";

export const PROTOCOL_VERSION = 1;
export const HEADER_BYTES = 9;
/** Largest payload either side accepts; larger frames are a protocol error. */
export const MAX_FRAME_PAYLOAD = 1024 * 1024;

export const FrameKind = { Json: 1, Stdout: 2, Stderr: 3 } as const;
export type FrameKindValue = (typeof FrameKind)[keyof typeof FrameKind];

export interface Frame {
  kind: FrameKindValue;
  execId: number;
  payload: Buffer;
}

export function encodeFrame(kind: FrameKindValue, execId: number, payload: Buffer): Buffer {
  const header = Buffer.allocUnsafe(HEADER_BYTES);
  header.writeUInt32BE(payload.length, 0);
  header.writeUInt8(kind, 4);
  header.writeUInt32BE(execId >>> 0, 5);
  return Buffer.concat([header, payload], HEADER_BYTES + payload.length);
}

/** Header only, for callers that write header and payload separately (no copy). */
export function encodeHeader(kind: FrameKindValue, execId: number, payloadLength: number): Buffer {
  const header = Buffer.allocUnsafe(HEADER_BYTES);
  header.writeUInt32BE(payloadLength, 0);
  header.writeUInt8(kind, 4);
  header.writeUInt32BE(execId >>> 0, 5);
  return header;
}

export function encodeMessage(message: ShimToDaemon | DaemonToShim): Buffer {
  return encodeFrame(FrameKind.Json, 0, Buffer.from(JSON.stringify(message), "utf8"));
}

export class ProtocolError extends Error {
  override name = "ProtocolError";
}

/**
 * Incremental frame decoder. Keeps a list of pending chunks and only copies
 * when a frame straddles chunk boundaries.
 *
 * With `streamData`, stdout and stderr payloads are not gathered: each piece
 * is given as soon as it is read, as a view of the chunk it came in (never
 * copied), so one frame on the wire may come out as several frames of the
 * same kind and execId, in order. Output is a byte stream: its consumer does
 * not care where frames were cut, and the daemon so allocates nothing per
 * frame beyond the chunks the socket reads (every 64 KiB of garbage
 * brings the next full collection of the daemon's heap closer).
 */
export class FrameDecoder {
  private chunks: Buffer[] = [];
  private buffered = 0;
  /** streamData: bytes still to come of the data frame being read, its kind and exec */
  private dataLeft = 0;
  private dataKind: FrameKindValue = FrameKind.Stdout;
  private dataExec = 0;

  /**
   * `borrowed`: each chunk pushed is only lent for the call (a pooled read
   * buffer, read-pool.ts): the bytes of an unfinished frame are copied
   * before push returns, and the frames it returns are valid only until then.
   */
  constructor(private readonly opts: { streamData?: boolean; borrowed?: boolean } = {}) {}

  push(chunk: Buffer): Frame[] {
    this.chunks.push(chunk);
    this.buffered += chunk.length;
    const frames: Frame[] = [];
    for (;;) {
      if (this.dataLeft > 0) {
        this.pieces(frames);
        if (this.dataLeft > 0) break;
      }
      if (this.buffered < HEADER_BYTES) break;
      const head = this.peek(HEADER_BYTES);
      const length = head.readUInt32BE(0);
      const kind = head.readUInt8(4);
      const execId = head.readUInt32BE(5);
      if (length > MAX_FRAME_PAYLOAD) {
        throw new ProtocolError(`frame of ${length} bytes exceeds the ${MAX_FRAME_PAYLOAD}-byte limit`);
      }
      if (kind !== FrameKind.Json && kind !== FrameKind.Stdout && kind !== FrameKind.Stderr) {
        throw new ProtocolError(`unknown frame kind ${kind}`);
      }
      if (this.opts.streamData && kind !== FrameKind.Json) {
        this.take(HEADER_BYTES);
        this.dataLeft = length;
        this.dataKind = kind as FrameKindValue;
        this.dataExec = execId;
        continue;
      }
      if (this.buffered < HEADER_BYTES + length) break;
      this.take(HEADER_BYTES);
      const payload = this.take(length);
      frames.push({ kind: kind as FrameKindValue, execId, payload });
    }
    if (this.opts.borrowed && this.buffered > 0) this.chunks = [Buffer.concat(this.chunks, this.buffered)]; // a copy: the next read reuses them
    return frames;
  }

  /** streamData: what has arrived of the current data frame, as views of the chunks */
  private pieces(frames: Frame[]): void {
    while (this.dataLeft > 0 && this.chunks.length > 0) {
      const first = this.chunks[0]!;
      const n = Math.min(first.length, this.dataLeft);
      const payload = n === first.length ? first : first.subarray(0, n);
      if (n === first.length) this.chunks.shift();
      else this.chunks[0] = first.subarray(n);
      this.buffered -= n;
      this.dataLeft -= n;
      if (n > 0) frames.push({ kind: this.dataKind, execId: this.dataExec, payload });
    }
  }

  private peek(n: number): Buffer {
    const first = this.chunks[0]!;
    if (first.length >= n) return first.subarray(0, n);
    return Buffer.concat(this.chunks, this.buffered).subarray(0, n);
  }

  private take(n: number): Buffer {
    this.buffered -= n;
    if (n === 0) return Buffer.alloc(0);
    const first = this.chunks[0]!;
    if (first.length > n) {
      this.chunks[0] = first.subarray(n);
      return first.subarray(0, n);
    }
    if (first.length === n) {
      this.chunks.shift();
      return first;
    }
    const out = Buffer.allocUnsafe(n);
    let off = 0;
    while (off < n) {
      const c = this.chunks[0]!;
      const want = n - off;
      if (c.length <= want) {
        c.copy(out, off);
        off += c.length;
        this.chunks.shift();
      } else {
        c.copy(out, off, 0, want);
        this.chunks[0] = c.subarray(want);
        off += want;
      }
    }
    return out;
  }
}

/** At most this many bytes go to a command's stdin: with argv and environment they fit one frame (MAX_FRAME_PAYLOAD). */
export const MAX_STDIN_BYTES = 512 * 1024;
const MAX_STDIN_BASE64 = Math.ceil(MAX_STDIN_BYTES / 3) * 4;

const execIdSchema = z.number().int().min(1).max(0xffffffff);
const signalSchema = z.enum(["SIGTERM", "SIGKILL", "SIGINT", "SIGHUP"]);

/* ---------------------------- shim -> daemon ---------------------------- */

export const helloSchema = z
  .object({
    type: z.literal("hello"),
    protocol: z.literal(PROTOCOL_VERSION),
    token: z.string().min(16).max(256),
    pid: z.number().int(),
    node: z.string().max(64),
    /** execs the shim still tracks after a reconnect (normally none: it kills them on disconnect) */
    running: z.array(execIdSchema).max(10_000),
    /**
     * What this shim understands beyond protocol 1, so that a daemon can
     * still talk to the shims of containers started by an older version:
     * "owner" — a welcome may name the phase owner (forker.ts);
     * "execflow" — it pauses one exec's output on a `flow` message, so a
     * slow client of one command does not hold up the others;
     * "stdin" — an exec may carry bytes for the command's stdin;
     * "pool" — it waits for its welcome as long as it takes when started
     * pooled (SHIM_ENV.pooled): a warm pool's container is welcomed at its claim;
     * "prepare" — it readies the next exec's cgroup on a `prepare` message.
     */
    features: z.array(z.string().max(32)).max(32).optional(),
  })
  .strict();

export const startedSchema = z
  .object({ type: z.literal("started"), execId: execIdSchema, pid: z.number().int() })
  .strict();

export const exitSchema = z
  .object({
    type: z.literal("exit"),
    execId: execIdSchema,
    /** null when the process was ended by a signal */
    exitCode: z.number().int().min(0).max(255).nullable(),
    signal: z.string().max(16).nullable(),
    timedOut: z.boolean(),
    durationMs: z.number().nonnegative().max(86_400_000),
  })
  .strict();

export const spawnErrorSchema = z
  .object({
    type: z.literal("spawn_error"),
    execId: execIdSchema,
    /** errno code such as ENOENT or EACCES */
    code: z.string().max(32),
    message: z.string().max(4096),
  })
  .strict();

export const shimToDaemonSchema = z.discriminatedUnion("type", [
  helloSchema,
  startedSchema,
  exitSchema,
  spawnErrorSchema,
]);
export type ShimToDaemon = z.infer<typeof shimToDaemonSchema>;
export type ExitMessage = z.infer<typeof exitSchema>;

/* ---------------------------- daemon -> shim ---------------------------- */

/**
 * `owner`: the phase owner's uid and gid. On the first welcome, before any
 * command has run, the shim starts its forker as that user (forker.ts).
 */
export const welcomeSchema = z
  .object({
    type: z.literal("welcome"),
    phaseId: z.string(),
    owner: z.object({ uid: z.number().int().min(1), gid: z.number().int().min(0) }).strict().optional(),
  })
  .strict();

export const execSchema = z
  .object({
    type: z.literal("exec"),
    execId: execIdSchema,
    argv: z.array(z.string()).min(1),
    cwd: z.string(),
    env: z.record(z.string()),
    timeoutMs: z.number().int().positive(),
    /** grace between SIGTERM and SIGKILL when the timeout fires */
    killGraceMs: z.number().int().nonnegative(),
    uid: z.number().int().nonnegative(),
    gid: z.number().int().nonnegative(),
    /**
     * Bytes for the command's stdin, base64 (the shim writes them, then
     * closes it); absent: stdin is /dev/null. Only to a shim whose hello
     * lists the "stdin" feature (an older shim's strict schema would drop
     * the whole message).
     */
    stdin: z.string().max(MAX_STDIN_BASE64).regex(/^[A-Za-z0-9+/]*={0,2}$/).optional(),
  })
  .strict();

export const signalMessageSchema = z
  .object({ type: z.literal("signal"), execId: execIdSchema, signal: signalSchema })
  .strict();

export const shutdownSchema = z.object({ type: z.literal("shutdown") }).strict();

/**
 * Per-exec flow control (feature "execflow"): the exec's streaming client
 * cannot take more (paused) or drained (not paused). The shim stops and
 * restarts reading that exec's pipes only; the others' output and exits
 * keep flowing on the channel.
 */
export const flowSchema = z.object({ type: z.literal("flow"), execId: execIdSchema, paused: z.boolean() }).strict();

/** a service name as policy and the tunnel header carry it (postgres, questdb-pg, redis …) */
export const serviceNameSchema = z.string().regex(/^[a-z][a-z0-9-]{0,31}$/);
export const tunnelPortSchema = z.number().int().min(1).max(65535);

/**
 * Sent after welcome (and again after every reconnect): the shim listens on
 * 127.0.0.1:<port> for each service, closing listeners not in the list, and
 * tunnels every accepted connection through SHIM_PATHS.tunnelSocket.
 */
export const listenSchema = z
  .object({
    type: z.literal("listen"),
    services: z.array(z.object({ name: serviceNameSchema, port: tunnelPortSchema }).strict()).max(64),
  })
  .strict();

/**
 * The one line a shim writes first on each connection to the tunnel socket;
 * raw bytes of the tunnelled connection follow. At most TUNNEL_HEADER_MAX bytes.
 */
export const tunnelHeaderSchema = z
  .object({ token: z.string().min(16).max(256), service: serviceNameSchema, port: tunnelPortSchema })
  .strict();
export type TunnelHeader = z.infer<typeof tunnelHeaderSchema>;
export const TUNNEL_HEADER_MAX = 1024;

/**
 * Feature "prepare": an exec whose verdict allows it is on its way (the
 * daemon is making the verdict durable). The shim makes that exec's cgroup
 * and puts the forker in it now, so the move's kernel wait (an RCU grace
 * period after a pause: 5–8 ms here) overlaps the daemon's writes instead of
 * delaying the fork. Nothing runs on it; unused, it is undone (cgroups.ts).
 */
export const prepareSchema = z.object({ type: z.literal("prepare"), execId: execIdSchema }).strict();

export const daemonToShimSchema = z.discriminatedUnion("type", [
  welcomeSchema,
  execSchema,
  signalMessageSchema,
  shutdownSchema,
  listenSchema,
  flowSchema,
  prepareSchema,
]);
export type DaemonToShim = z.infer<typeof daemonToShimSchema>;
export type ExecMessage = z.infer<typeof execSchema>;
export type ListenMessage = z.infer<typeof listenSchema>;

/** Paths and environment names shared by the image, the runtime and the shim. */
export const SHIM_PATHS = {
  /** where the phase's run dir is mounted inside the container */
  runDir: "/run/sandboxd",
  controlSocket: "/run/sandboxd/control.sock",
  /** one connection per tunnelled TCP connection (header line, then raw bytes) */
  tunnelSocket: "/run/sandboxd/tunnel.sock",
  /** the phase's cgroup v2 directory, read-write: one cgroup per command (shim/cgroups.ts) */
  commandCgroups: "/run/sandboxd-cgroup",
  workspace: "/workspace",
  /** where sandbox/Dockerfile installs the bundled shim */
  shimBundle: "/opt/sandboxd/shim.cjs",
} as const;

export const SHIM_ENV = {
  token: "SANDBOXD_SHIM_TOKEN",
  socket: "SANDBOXD_CONTROL_SOCKET",
  /** where the phase's cgroup v2 directory is mounted (default SHIM_PATHS.commandCgroups) */
  cgroupDir: "SANDBOXD_CGROUP_DIR",
  /**
   * "1" in a warm pool's container (src/phases/pool.ts): the daemon holds the
   * welcome back until a phase claims the container, so the shim waits for it
   * without redialling
   */
  pooled: "SANDBOXD_SHIM_POOLED",
  /** "debug": the shim also logs each exec's start and exit (the daemon's SANDBOXD_LOG_LEVEL debug or trace) */
  logLevel: "SANDBOXD_SHIM_LOG_LEVEL",
} as const;
