/**
 * Service tunnels, daemon side: one TunnelServer per phase, listening on
 * `<runDir>/tunnel.sock` (0600 in the 0700 run dir: only the shim reaches it).
 *
 * Each connection carries one tunnelled TCP connection from inside the
 * sandbox. It starts with a header line `{"token","service","port"}\n` (at
 * most 1 KiB, within 5 s); the token is compared in constant time and the
 * service must be one this phase may use. The decision is recorded
 * (`net.connect`, awaited: on disk before anything is dialled), then the
 * daemon connects upstream and pipes. PostgreSQL-protocol services go to the
 * SQL gateway when one is wired in (`gateway` option); without it, only the
 * isolated test database is piped raw and everything else speaking the
 * PostgreSQL protocol is refused — a raw pipe would bypass statement checks.
 * On close `net.close` records bytes each way and the duration.
 *
 * bytesOut = bytes from the sandbox to the upstream; bytesIn = bytes from
 * the upstream into the sandbox.
 */
import { chmod, unlink } from "node:fs/promises";
import net from "node:net";
import { timingSafeEqual } from "node:crypto";
import type { Logger } from "pino";
import { actionLine, timestamp } from "../audit/format.js";
import type { PhaseRecorder } from "../phases/recorder.js";
import type { PhaseMode } from "../phases/types.js";
import { TUNNEL_HEADER_MAX, tunnelHeaderSchema } from "../shim/protocol.js";
import type { Clock } from "../util/clock.js";
import { handleProxyClient } from "./proxy.js";
import { TokenBucket } from "./rate.js";
import { handleRedisClient } from "./redis.js";
import { openRedisUpstream, RedisUnreachable } from "./redis-upstream.js";
import { NETWORK_CLAUSE, type PhaseServices, type ResolvedService } from "./services.js";

const HEADER_TIMEOUT_MS = 5_000;
const UPSTREAM_CONNECT_TIMEOUT_MS = 10_000;
/** concurrent tunnelled connections per phase */
const MAX_CONNECTIONS = 128;
/**
 * New connections per phase: a token bucket (burst, refill per second). Each
 * connection costs two durable records; a loop of connects must not fill the
 * audit disk (which would fail the daemon closed for every phase). Connections
 * over the rate are dropped unrecorded one by one and recorded as one summary
 * per second (`net.rate-limit`).
 */
const RATE_BURST = 200;
const RATE_PER_SECOND = 50;

/**
 * Takes over a PostgreSQL-protocol connection (the SQL gateway,
 * src/db/gateway.ts handleClient); resolves when the connection is over.
 * The socket is paused; the hand-off resumes it once it listens.
 */
export interface GatewayHandoff {
  (client: net.Socket, service: ResolvedService): Promise<void>;
}

export interface TunnelServerOptions {
  socketPath: string;
  token: string;
  phaseId: string;
  mode: PhaseMode;
  /** a getter: the phase's services as resolved at start (or re-adoption) */
  services: () => PhaseServices;
  rec: PhaseRecorder;
  clock: Clock;
  log: Logger;
  /** the SQL gateway (src/db/gateway.ts) once it exists; null: raw pipe to the test database only */
  gateway?: GatewayHandoff | null;
}

/** Counts of one Redis connection, in its net.close record. */
interface RedisCounts {
  commands: number;
  reads: number;
  writes: number;
  refused: number;
}

interface Refusal {
  service: string;
  port: number | null;
  reason: string;
  rule: string;
  clause: string;
}

export class TunnelServer {
  private server: net.Server | null = null;
  /** every open socket (tunnel and upstream), destroyed on close() */
  private readonly sockets = new Set<net.Socket>();
  /** tunnel connections from the shim */
  private readonly tunnels = new Set<net.Socket>();
  private closed = false;
  private readonly bucket: TokenBucket;
  private dropped = 0;
  private dropTimer: NodeJS.Timeout | null = null;

  constructor(private readonly opts: TunnelServerOptions) {
    this.bucket = new TokenBucket(RATE_BURST, RATE_PER_SECOND, () => opts.clock.monotonicMs());
  }

  get connections(): number {
    return this.tunnels.size;
  }

  async listen(): Promise<void> {
    await unlink(this.opts.socketPath).catch(() => undefined);
    const server = net.createServer({ pauseOnConnect: true }, (sock) => this.onConnection(sock));
    await new Promise<void>((resolve, reject) => {
      server.once("error", reject);
      server.listen(this.opts.socketPath, () => {
        server.off("error", reject);
        resolve();
      });
    });
    await chmod(this.opts.socketPath, 0o600);
    this.server = server;
  }

  async close(): Promise<void> {
    this.closed = true;
    if (this.dropTimer) clearTimeout(this.dropTimer);
    this.flushDropped();
    const server = this.server;
    this.server = null;
    for (const s of this.sockets) s.destroy();
    if (server) await new Promise<void>((resolve) => server.close(() => resolve()));
    await unlink(this.opts.socketPath).catch(() => undefined);
  }

  private onConnection(sock: net.Socket): void {
    if (this.closed) return void sock.destroy();
    if (!this.bucket.take()) {
      sock.destroy();
      this.dropped++;
      this.dropTimer ??= setTimeout(() => this.flushDropped(), 1000);
      return;
    }
    this.sockets.add(sock);
    this.tunnels.add(sock);
    sock.once("close", () => {
      this.sockets.delete(sock);
      this.tunnels.delete(sock);
    });
    sock.on("error", (err) => this.opts.log.debug({ phase: this.opts.phaseId, err: err.message }, "tunnel socket error"));
    void this.readHeader(sock).then(
      (r) => this.decide(sock, r),
      (err: Error) => this.refuse(sock, { service: "?", port: null, reason: err.message, rule: "net.tunnel-header", clause: NETWORK_CLAUSE }),
    );
  }

  /** The header line and whatever followed it in the same reads. */
  private readHeader(sock: net.Socket): Promise<{ line: string; head: Buffer; headerBytes: number }> {
    return new Promise((resolve, reject) => {
      let buf = Buffer.alloc(0);
      const timer = setTimeout(() => done(new Error(`no tunnel header within ${HEADER_TIMEOUT_MS} ms`)), HEADER_TIMEOUT_MS);
      const onData = (chunk: Buffer) => {
        buf = Buffer.concat([buf, chunk]);
        const nl = buf.indexOf(0x0a);
        if (nl >= 0 && nl <= TUNNEL_HEADER_MAX) {
          done(null, { line: buf.subarray(0, nl).toString("utf8"), head: buf.subarray(nl + 1), headerBytes: nl + 1 });
        } else if (buf.length > TUNNEL_HEADER_MAX) {
          done(new Error(`tunnel header longer than ${TUNNEL_HEADER_MAX} bytes`));
        }
      };
      const onEnd = () => done(new Error("connection ended before the tunnel header"));
      const done = (err: Error | null, r?: { line: string; head: Buffer; headerBytes: number }) => {
        clearTimeout(timer);
        sock.off("data", onData);
        sock.off("end", onEnd);
        sock.off("close", onEnd);
        sock.pause();
        if (err) reject(err);
        else resolve(r!);
      };
      sock.on("data", onData);
      sock.once("end", onEnd);
      sock.once("close", onEnd);
      sock.resume();
    });
  }

  private async decide(sock: net.Socket, { line, head, headerBytes }: { line: string; head: Buffer; headerBytes: number }): Promise<void> {
    let json: unknown;
    try {
      json = JSON.parse(line);
    } catch {
      json = null;
    }
    const parsed = tunnelHeaderSchema.safeParse(json);
    if (!parsed.success) {
      return this.refuse(sock, { service: "?", port: null, reason: "malformed tunnel header", rule: "net.tunnel-header", clause: NETWORK_CLAUSE });
    }
    const { token, service: name, port } = parsed.data;
    if (!tokenMatches(token, this.opts.token)) {
      return this.refuse(sock, { service: name, port, reason: "tunnel header carried a wrong token", rule: "net.tunnel-auth", clause: NETWORK_CLAUSE });
    }
    const service = this.opts.services().services.find((s) => s.name === name && s.port === port);
    if (!service) {
      return this.refuse(sock, {
        service: name,
        port,
        reason: `${name} on port ${port} is not a service this phase may use`,
        rule: "net.unknown-service",
        clause: NETWORK_CLAUSE,
      });
    }
    const base = { service: name, port, rule: service.rule, clause: service.clause };
    // pip's proxy has no fixed upstream: it dials the allow-listed host each CONNECT names (src/net/proxy.ts)
    const proxyIndex = service.protocol === "http-proxy" ? (service.packageIndex ?? null) : null;
    if (!proxyIndex && (!service.upstream || service.refusal)) {
      const reason = service.refusal ?? `${name} has no upstream`;
      // a Redis client gets the reason as a RESP error (redis-cli and redis-py print it) rather than a bare close
      const reply = service.name === "redis" ? `-ERR sandboxd refused the connection (rule ${service.rule}, ${service.clause}): ${reason.replace(/[\r\n]/g, " ")}\r\n` : undefined;
      return this.refuse(sock, { ...base, reason }, reply);
    }
    const gateway = this.opts.gateway ?? null;
    if (service.protocol === "postgres" && !gateway && !(service.name === "postgres" && this.opts.mode !== "paper")) {
      return this.refuse(sock, {
        ...base,
        reason: `${name} is reachable only through the SQL gateway, which this daemon does not have yet`,
        rule: "db.gateway-required",
      });
    }
    if (this.tunnels.size > MAX_CONNECTIONS) {
      return this.refuse(sock, { ...base, reason: `more than ${MAX_CONNECTIONS} concurrent tunnelled connections` });
    }

    // Redis goes through the command filter (src/net/redis.ts), never a raw pipe
    const via = proxyIndex ? "http-proxy" : service.protocol === "postgres" && gateway ? "gateway" : service.name === "redis" ? "redis-filter" : "raw";
    const upstreamText = service.upstream ? `${service.upstream.host}:${service.upstream.port}` : "the CONNECT target, if allowed";
    try {
      await this.opts.rec.record(
        { type: "net.connect", service: name, port, decision: "allow", rule: service.rule, clause: service.clause, via, upstream: upstreamText },
        [actionLine(this.ts(), "NET", "CONNECT", `${name} 127.0.0.1:${port}`, `ALLOW ${service.rule} (${service.clause}) via ${via}`)],
      );
    } catch (err) {
      // Fail closed: nothing is connected that could not be recorded.
      this.opts.log.error({ phase: this.opts.phaseId, err: (err as Error).message }, "could not record a tunnel connection; refused");
      sock.destroy();
      return;
    }
    if (sock.destroyed || this.closed) {
      sock.destroy();
      // the allow is on record; so is the end
      await this.opts.rec
        .record({ type: "net.close", service: name, port, bytesIn: 0, bytesOut: 0, durationMs: 0, error: "closed before the upstream was dialled" }, [
          actionLine(this.ts(), "NET", "CLOSE", `${name} 127.0.0.1:${port}`, "in=0 out=0 0ms ERROR closed before the upstream was dialled"),
        ])
        .catch(() => undefined);
      return;
    }

    // bytes that came with the header belong to the tunnelled stream
    if (head.length > 0) sock.unshift(head);
    const started = this.opts.clock.monotonicMs();
    let redisCounts: RedisCounts | null = null;
    let proxyTarget: string | null = null;
    const closed = (error: string | null) => {
      const durationMs = Math.round(this.opts.clock.monotonicMs() - started);
      // counted on the tunnel socket: what the sandbox sent (less the header) and what it was sent
      const bytesOut = Math.max(0, sock.bytesRead - headerBytes);
      const bytesIn = sock.bytesWritten;
      void this.opts.rec
        .record(
          {
            type: "net.close",
            service: service.name,
            port: service.port,
            bytesIn,
            bytesOut,
            durationMs,
            error,
            ...(redisCounts ?? {}),
            ...(proxyIndex ? { target: proxyTarget } : {}),
          },
          [
            actionLine(
              this.ts(),
              "NET",
              "CLOSE",
              `${service.name} 127.0.0.1:${service.port}${proxyTarget ? ` CONNECT ${proxyTarget}` : ""}`,
              `in=${bytesIn} out=${bytesOut} ${durationMs}ms${redisCounts ? ` reads=${redisCounts.reads} writes=${redisCounts.writes} refused=${redisCounts.refused}` : ""}${error ? ` ERROR ${error}` : ""}`,
            ),
          ],
        )
        .catch((e: Error) => this.opts.log.error({ phase: this.opts.phaseId, err: e.message }, "could not record the end of a tunnel connection"));
    };
    if (via === "gateway") {
      const over = gateway!(sock, service);
      sock.resume();
      void over.then(
        () => (sock.destroyed ? closed(null) : sock.once("close", () => closed(null))),
        (e: Error) => {
          sock.destroy();
          closed(`gateway: ${e.message}`);
        },
      );
      return;
    }
    if (proxyIndex) {
      void handleProxyClient(sock, {
        index: proxyIndex,
        now: () => this.opts.clock.now(),
        record: async (event, lines) => {
          await this.opts.rec.record({ ...event, service: service.name }, lines);
        },
        onUpstream: (up) => {
          this.sockets.add(up);
          up.once("close", () => this.sockets.delete(up));
        },
      }).then(
        (r) => {
          proxyTarget = r.target;
          closed(r.error);
        },
        (e: Error) => {
          sock.destroy();
          closed(`proxy: ${e.message}`);
        },
      );
      return;
    }
    if (via === "redis-filter") return void this.relayRedis(sock, service, closed, (c) => (redisCounts = c));
    this.pipeRaw(sock, service, closed);
  }

  /**
   * Redis: the daemon's own logged-in connection (src/net/redis-upstream.ts),
   * then the command filter. When Redis cannot be reached or refuses the
   * login, the client gets a RESP error naming the cause, recorded first.
   */
  private async relayRedis(sock: net.Socket, service: ResolvedService, closed: (error: string | null) => void, counts: (c: RedisCounts) => void): Promise<void> {
    const where = `${service.upstream!.host}:${service.upstream!.port}`;
    const login = service.redis ?? { user: null, password: null, db: 0 };
    const record = async (event: Record<string, unknown>, lines: string[]) => {
      await this.opts.rec.record({ ...event, type: String(event.type), service: service.name, port: service.port }, lines);
    };
    let upstream: net.Socket;
    try {
      upstream = await openRedisUpstream({ host: service.upstream!.host, port: service.upstream!.port, ...login }, UPSTREAM_CONNECT_TIMEOUT_MS, (s) => {
        this.sockets.add(s);
        s.once("close", () => this.sockets.delete(s));
      });
    } catch (e) {
      const reason = e instanceof RedisUnreachable ? e.message : String(e);
      const text = `sandboxd: Redis at ${where} unreachable: ${reason}`;
      try {
        await record({ type: "redis.unreachable", upstream: where, reason, mode: this.opts.mode }, [
          actionLine(this.ts(), "NET", "REDIS", where, `ERROR unreachable: ${reason}`),
        ]);
        if (!sock.destroyed) sock.end(`-ERR ${text.replace(/[\r\n]/g, " ")}\r\n`);
      } catch {
        sock.destroy();
      }
      if (sock.destroyed) closed(text);
      else sock.once("close", () => closed(text));
      sock.resume(); // drain what the client sent meanwhile, so the end completes
      return;
    }
    if (sock.destroyed || this.closed) {
      upstream.destroy();
      closed("the sandbox side closed before the upstream was ready");
      return;
    }
    const r = await handleRedisClient(sock, upstream, {
      mode: this.opts.mode,
      db: login.db,
      now: () => this.opts.clock.now(),
      record,
      recordMany: (entries) =>
        this.opts.rec.recordMany(entries.map((e) => ({ event: { ...e.event, type: String(e.event.type), service: service.name, port: service.port }, lines: e.lines }))),
    });
    counts({ commands: r.commands, reads: r.reads, writes: r.writes, refused: r.refused });
    closed(r.error);
  }

  /** Dials the upstream and pipes both ways. */
  private pipeRaw(sock: net.Socket, service: ResolvedService, closed: (error: string | null) => void): void {
    const relay = (upstream: net.Socket) => {
      sock.pipe(upstream);
      upstream.pipe(sock);
      sock.resume();
    };
    const upstream = net.connect({ host: service.upstream!.host, port: service.upstream!.port });
    this.sockets.add(upstream);
    upstream.once("close", () => this.sockets.delete(upstream));
    let error: string | null = null;
    const connectTimer = setTimeout(() => {
      error = `upstream did not accept within ${UPSTREAM_CONNECT_TIMEOUT_MS} ms`;
      upstream.destroy();
    }, UPSTREAM_CONNECT_TIMEOUT_MS);
    upstream.once("connect", () => {
      clearTimeout(connectTimer);
      relay(upstream);
    });
    upstream.on("error", (err) => {
      error ??= `upstream: ${err.message}`;
    });
    sock.on("error", (err) => {
      error ??= `sandbox side: ${err.message}`;
    });
    let closedCount = 0;
    const onClose = (other: net.Socket) => (hadError: boolean) => {
      if (!other.destroyed) {
        if (hadError || other.connecting) other.destroy();
        else {
          other.end();
          setTimeout(() => other.destroy(), 30_000).unref();
        }
      }
      if (++closedCount < 2) return;
      clearTimeout(connectTimer);
      closed(error);
    };
    sock.once("close", onClose(upstream));
    upstream.once("close", onClose(sock));
  }

  /** `reply`: bytes the client gets (after the record) before the close, in its service's protocol; none by default. */
  private async refuse(sock: net.Socket, r: Refusal, reply?: string): Promise<void> {
    if (!reply) sock.destroy();
    if (this.closed && r.rule === "net.tunnel-header") return; // torn down by close(), not a refusal
    const recorded = await this.opts.rec
      .record(
        { type: "net.connect", service: r.service, port: r.port, decision: "forbid", rule: r.rule, clause: r.clause, reason: r.reason },
        [actionLine(this.ts(), "NET", "CONNECT", `${r.service} 127.0.0.1:${r.port ?? "?"}`, `FORBID ${r.rule} (${r.clause}): ${r.reason}`)],
      )
      .then(
        () => true,
        (e: Error) => {
          this.opts.log.error({ phase: this.opts.phaseId, err: e.message }, "could not record a refused tunnel connection");
          return false;
        },
      );
    if (reply) {
      if (recorded && !sock.destroyed) {
        sock.end(reply);
        sock.resume(); // read and drop what the client sent, so the close completes
        setTimeout(() => sock.destroy(), 5_000).unref();
      } else sock.destroy();
    }
    this.opts.log.info({ phase: this.opts.phaseId, service: r.service, reason: r.reason }, "tunnel connection refused");
  }

  private flushDropped(): void {
    this.dropTimer = null;
    const n = this.dropped;
    this.dropped = 0;
    if (n === 0) return;
    const reason = `${n} connection(s) dropped: more than ${RATE_PER_SECOND} new tunnelled connections per second (burst ${RATE_BURST})`;
    void this.opts.rec
      .record({ type: "net.connect", service: "*", port: null, decision: "forbid", rule: "net.rate-limit", clause: NETWORK_CLAUSE, reason, count: n }, [
        actionLine(this.ts(), "NET", "CONNECT", "* 127.0.0.1:*", `FORBID net.rate-limit: ${reason}`),
      ])
      .catch((e: Error) => this.opts.log.error({ phase: this.opts.phaseId, err: e.message }, "could not record dropped tunnel connections"));
  }

  private ts(): string {
    return timestamp(this.opts.clock.now());
  }
}

function tokenMatches(given: string, expected: string): boolean {
  const a = Buffer.from(given);
  const b = Buffer.from(expected);
  return a.length === b.length && timingSafeEqual(a, b);
}
