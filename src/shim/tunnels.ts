/**
 * Service tunnels, shim side.
 *
 * The container has no network interface but loopback. For each service the
 * daemon names in a `listen` message, the shim listens on 127.0.0.1:<port>;
 * every accepted TCP connection gets its own new unix-socket connection to the
 * daemon's tunnel socket (in the phase's 0700 run dir), introduced by one
 * header line carrying the shim's token, the service and the port. After the
 * header, bytes are piped both ways unchanged (stream.pipe: backpressure on
 * both hops). When either side ends, the other is ended; an error on either
 * destroys both. The daemon decides, records and connects upstream.
 */
import net from "node:net";
import { errorFields, log } from "./log.js";
import type { ListenMessage, TunnelHeader } from "./protocol.js";

type Service = ListenMessage["services"][number];

/** A connection whose other side never closes is torn down this long after one side ended. */
const HALF_CLOSED_BACKSTOP_MS = 30_000;

export class TunnelListeners {
  /** keyed by port */
  private readonly servers = new Map<number, { name: string; server: net.Server }>();

  constructor(
    private readonly tunnelSocketPath: string,
    private readonly token: string,
  ) {}

  /** Make the listeners match `services`: unchanged ones stay, others are closed, new ones opened. */
  apply(services: readonly Service[]): void {
    const wanted = new Map(services.map((s) => [s.port, s.name]));
    for (const [port, entry] of this.servers) {
      if (wanted.get(port) !== entry.name) {
        entry.server.close();
        this.servers.delete(port);
        log("info", "tunnel listener closed", { service: entry.name, port });
      }
    }
    for (const [port, name] of wanted) {
      if (this.servers.has(port)) continue;
      const server = net.createServer({ pauseOnConnect: true }, (client) => this.onClient(client, name, port));
      server.on("error", (err) => {
        log("error", "tunnel listener failed", { service: name, port, ...errorFields(err) });
        if (this.servers.get(port)?.server === server) this.servers.delete(port);
      });
      server.listen({ host: "127.0.0.1", port }, () => log("info", "tunnel listening", { service: name, port }));
      this.servers.set(port, { name, server });
    }
  }

  closeAll(): void {
    for (const { server } of this.servers.values()) server.close();
    this.servers.clear();
  }

  private onClient(client: net.Socket, service: string, port: number): void {
    const upstream = net.createConnection({ path: this.tunnelSocketPath });
    client.on("error", (err) => log("debug", "tunnel client error", { service, ...errorFields(err) }));
    upstream.on("error", (err) => log("warn", "tunnel socket error", { service, ...errorFields(err) }));
    upstream.once("connect", () => {
      const header: TunnelHeader = { token: this.token, service, port };
      upstream.write(JSON.stringify(header) + "\n");
      client.pipe(upstream);
      upstream.pipe(client);
      client.resume();
    });
    link(client, upstream);
    link(upstream, client);
  }
}

/** When `a` closes, end `b` (flushing what it still has to write); destroy it if `a` failed. */
function link(a: net.Socket, b: net.Socket): void {
  a.once("close", (hadError) => {
    if (b.destroyed) return;
    if (hadError || b.connecting) b.destroy();
    else {
      b.end();
      setTimeout(() => b.destroy(), HALF_CLOSED_BACKSTOP_MS).unref();
    }
  });
}
