/**
 * pip's allow-list HTTPS proxy, on the `pip-proxy` tunnel (SKILLS.md Network
 * Boundaries: "Exception: Package downloads via pip from PyPI only").
 *
 * One tunnelled connection carries one request head (at most MAX_HEAD_BYTES,
 * within HEAD_TIMEOUT_MS). Only `CONNECT name:port` is served: TLS passes
 * through untouched, so the proxy never sees or holds a certificate, and
 * plain-HTTP requests (absolute-form GET) are answered 405 — an index reached
 * over http:// would need --trusted-host, which policy asks about anyway.
 *
 * The decision, in this order, before anything is dialled:
 *  1. the name must be listed in the policy's network.packageIndex.hosts,
 *     exactly (ASCII case-insensitive; a trailing dot or an IP literal is
 *     refused, never normalised into a match), on the listed port;
 *  2. the daemon resolves the NAME itself (never an address the sandbox
 *     supplies) and refuses if ANY address it gets is private, loopback,
 *     link-local, unique-local, CGNAT, unspecified, multicast or reserved
 *     (IPv4-mapped, NAT64 and 6to4 forms are judged by the IPv4 inside) —
 *     so a name that resolves partly inward cannot be used to reach in;
 *  3. a host the operator pinned (`pin: {address, port}`, a local mirror) is
 *     dialled at the pin without resolving and without the address check:
 *     the operator chose that address for that name only.
 * Every decision is recorded (awaited) before it is acted on: `net.proxy`
 * with the host, port and address dialled, or with the reason it was refused.
 * A refusal is answered `403` with the reason in the status line (pip and
 * urllib show it as "Tunnel connection failed: 403 …") and the body.
 *
 * Hand-rolled head reader rather than node:http's 'connect' event: the
 * connection arrives as an already-accepted tunnel socket (not on a listening
 * http.Server), and a bounded, strict reader of one head is smaller than
 * feeding a socket into an http.Server and undoing its keep-alive handling.
 */
import { promises as dns } from "node:dns";
import net from "node:net";
import type { Duplex } from "node:stream";
import { actionLine, timestamp } from "../audit/format.js";
import type { PackageIndexHost, PackageIndexPolicy } from "../policy/schema.js";

export const MAX_HEAD_BYTES = 8 * 1024;
export const HEAD_TIMEOUT_MS = 10_000;
const LOOKUP_TIMEOUT_MS = 5_000;
const CONNECT_TIMEOUT_MS = 10_000;
/** A connection whose other side never closes is torn down this long after one side ended. */
const HALF_CLOSED_BACKSTOP_MS = 30_000;

/** Rules recorded with refusals that are not about the allow-list itself. */
export const RULE_REQUEST = "net.proxy.request";
export const RULE_ADDRESS = "net.proxy.address";
export const RULE_UNRESOLVED = "net.proxy.unresolved";

/* ------------------------------ request head ----------------------------- */

export interface RequestHead {
  method: string;
  target: string;
  headers: Array<[string, string]>;
}

/** A request the proxy will not serve, with the status to answer. */
export class ProxyRequestError extends Error {
  constructor(
    readonly status: number,
    message: string,
  ) {
    super(message);
  }
}

const TOKEN = /^[!#$%&'*+.^_`|~0-9A-Za-z-]+$/;

/** The end of the head in `buf` (index just past the blank line), or -1. Bare LF line ends are accepted. */
export function headEnd(buf: Buffer): number {
  for (let i = buf.indexOf(0x0a); i >= 0; i = buf.indexOf(0x0a, i + 1)) {
    if (buf[i + 1] === 0x0a) return i + 2;
    if (buf[i + 1] === 0x0d && buf[i + 2] === 0x0a) return i + 3;
  }
  return -1;
}

/** Parses a request head (request line and header fields; the closing blank line may be included). */
export function parseRequestHead(text: string): RequestHead {
  if (/[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]/.test(text)) throw new ProxyRequestError(400, "the request head contains control characters");
  const lines = text.replace(/(\r?\n)+$/, "").split(/\r?\n/);
  const m = /^(\S+) (\S+) HTTP\/1\.[01]$/.exec(lines[0] ?? "");
  if (!m || !TOKEN.test(m[1]!)) throw new ProxyRequestError(400, "malformed request line (expected `CONNECT host:port HTTP/1.1`)");
  const headers: Array<[string, string]> = [];
  for (const line of lines.slice(1)) {
    const colon = line.indexOf(":");
    const name = colon > 0 ? line.slice(0, colon) : "";
    if (!TOKEN.test(name)) throw new ProxyRequestError(400, "malformed header field");
    headers.push([name.toLowerCase(), line.slice(colon + 1).trim()]);
  }
  return { method: m[1]!, target: m[2]!, headers };
}

export interface Authority {
  /** lower-cased; brackets removed from an IPv6 literal */
  host: string;
  port: number;
  /** 4 or 6 for an IP literal, 0 for a name */
  ip: 0 | 4 | 6;
}

/** The `host:port` of a CONNECT request (authority-form; the port is required). */
export function parseAuthority(target: string): Authority {
  const m = /^(\[[^\]\s]+\]|[^\s:/?#@[\]]+):(\d{1,5})$/.exec(target);
  const port = m ? Number(m[2]) : 0;
  if (!m || port < 1 || port > 65535) throw new ProxyRequestError(400, "CONNECT needs host:port (e.g. CONNECT pypi.org:443)");
  const bracketed = m[1]!.startsWith("[");
  const host = (bracketed ? m[1]!.slice(1, -1) : m[1]!).toLowerCase();
  const ip = net.isIP(host.replace(/%.*$/, ""));
  if (bracketed && ip !== 6) throw new ProxyRequestError(400, "brackets hold an IPv6 address only");
  return { host, port, ip: ip as 0 | 4 | 6 };
}

/* ------------------------------- decisions ------------------------------- */

export interface Refusal {
  status: number;
  rule: string;
  reason: string;
}

/** The listed host a CONNECT may reach, or why not. No resolving here. */
export function matchHost(index: Readonly<PackageIndexPolicy>, a: Authority): { host: PackageIndexHost } | { refusal: Refusal } {
  const refuse = (reason: string, rule = index.id) => ({ refusal: { status: 403, rule, reason } });
  const shown = display(a.host);
  if (a.ip !== 0) {
    return refuse(`${shown} is an IP address; the proxy connects only to host names listed in policy network.packageIndex (it resolves them itself)`);
  }
  if (a.host.endsWith(".")) return refuse(`${shown} ends with a dot; name the host exactly as policy network.packageIndex lists it`);
  const host = index.hosts.find((h) => h.name === a.host);
  if (!host) {
    return refuse(`${shown} is not a package index in policy network.packageIndex (${index.hosts.map((h) => h.name).join(", ")}); ask the operator to list it`);
  }
  if (host.port !== a.port) return refuse(`port ${a.port} is not allowed for ${host.name} (policy network.packageIndex allows ${host.port})`);
  return { host };
}

/** Why an address is not a public unicast one (e.g. "loopback (127.0.0.0/8)"), or null when it is. Unparsable → "not an IP address". */
export function classifyAddress(address: string): string | null {
  const bare = address.replace(/%.*$/, "");
  const v4 = parseIPv4(bare);
  if (v4) return classify4(v4, "");
  const v6 = parseIPv6(bare);
  return v6 ? classify6(v6) : "not an IP address";
}

const V4_SPECIAL: ReadonlyArray<[number[], number, string]> = [
  [[0, 0, 0, 0], 8, "unspecified, this network (0.0.0.0/8)"],
  [[10, 0, 0, 0], 8, "private (10.0.0.0/8)"],
  [[100, 64, 0, 0], 10, "shared address space, CGNAT (100.64.0.0/10)"],
  [[127, 0, 0, 0], 8, "loopback (127.0.0.0/8)"],
  [[169, 254, 0, 0], 16, "link-local (169.254.0.0/16)"],
  [[172, 16, 0, 0], 12, "private (172.16.0.0/12)"],
  [[192, 0, 0, 0], 24, "IETF protocol assignments (192.0.0.0/24)"],
  [[192, 0, 2, 0], 24, "documentation (192.0.2.0/24)"],
  [[192, 88, 99, 0], 24, "6to4 relay anycast (192.88.99.0/24)"],
  [[192, 168, 0, 0], 16, "private (192.168.0.0/16)"],
  [[198, 18, 0, 0], 15, "benchmarking (198.18.0.0/15)"],
  [[198, 51, 100, 0], 24, "documentation (198.51.100.0/24)"],
  [[203, 0, 113, 0], 24, "documentation (203.0.113.0/24)"],
  [[224, 0, 0, 0], 4, "multicast (224.0.0.0/4)"],
  [[240, 0, 0, 0], 4, "reserved or broadcast (240.0.0.0/4)"],
];

/** [prefix bytes, bits, reason]; reason null: judge the IPv4 address in bytes 12–15 (or 2–5 for 6to4) */
const V6_SPECIAL: ReadonlyArray<[number[], number, string | null]> = [
  [[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff], 96, null], // IPv4-mapped ::ffff:0:0/96
  [[0, 0x64, 0xff, 0x9b, 0, 0, 0, 0, 0, 0, 0, 0], 96, null], // NAT64 64:ff9b::/96
  [[0, 0x64, 0xff, 0x9b, 0, 1], 48, "local-use NAT64 (64:ff9b:1::/48)"],
  [[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], 96, "IPv4-compatible, deprecated (::/96)"],
  [[1, 0, 0, 0, 0, 0, 0, 0], 64, "discard-only (100::/64)"],
  [[0x20, 0x01, 0x0d, 0xb8], 32, "documentation (2001:db8::/32)"],
  [[0x20, 0x01, 0], 23, "IETF protocol assignments, Teredo included (2001::/23)"],
  [[0xfc], 7, "unique-local (fc00::/7)"],
  [[0xfe, 0x80], 10, "link-local (fe80::/10)"],
  [[0xfe, 0xc0], 10, "site-local, deprecated (fec0::/10)"],
  [[0xff], 8, "multicast (ff00::/8)"],
];

function inPrefix(bytes: readonly number[], prefix: readonly number[], bits: number): boolean {
  for (let i = 0; i * 8 < bits; i++) {
    const take = Math.min(8, bits - i * 8);
    const mask = (0xff << (8 - take)) & 0xff;
    if (((bytes[i] ?? 0) & mask) !== ((prefix[i] ?? 0) & mask)) return false;
  }
  return true;
}

function classify4(b: readonly number[], via: string): string | null {
  for (const [prefix, bits, reason] of V4_SPECIAL) if (inPrefix(b, prefix, bits)) return via ? `${reason}, ${via}` : reason;
  return null;
}

function classify6(b: readonly number[]): string | null {
  if (b.every((x) => x === 0)) return "unspecified (::)";
  if (b.slice(0, 15).every((x) => x === 0) && b[15] === 1) return "loopback (::1)";
  if (inPrefix(b, [0x20, 0x02], 16)) return classify4(b.slice(2, 6), "inside a 6to4 address (2002::/16)");
  for (const [prefix, bits, reason] of V6_SPECIAL) {
    if (!inPrefix(b, prefix, bits)) continue;
    return reason ?? classify4(b.slice(12, 16), "inside an IPv6 address");
  }
  return null;
}

function parseIPv4(s: string): number[] | null {
  if (net.isIPv4(s) === false) return null;
  return s.split(".").map(Number);
}

/** 16 bytes of a valid IPv6 address (embedded dotted IPv4 included), or null. */
function parseIPv6(s: string): number[] | null {
  if (!net.isIPv6(s)) return null;
  let text = s;
  const dotted = /(\d+\.\d+\.\d+\.\d+)$/.exec(text);
  if (dotted) {
    const [a, b, c, d] = dotted[1]!.split(".").map(Number) as [number, number, number, number];
    text = text.slice(0, -dotted[1]!.length) + `${((a << 8) | b).toString(16)}:${((c << 8) | d).toString(16)}`;
  }
  const [head, tail] = text.split("::") as [string, string | undefined];
  const h = head ? head.split(":") : [];
  const t = tail === undefined ? [] : tail ? tail.split(":") : [];
  const groups = tail === undefined ? h : [...h, ...Array<string>(8 - h.length - t.length).fill("0"), ...t];
  if (groups.length !== 8) return null;
  return groups.flatMap((g) => {
    const n = parseInt(g, 16);
    return [n >> 8, n & 0xff];
  });
}

export interface Address {
  address: string;
  family: number;
}

export type Lookup = (name: string) => Promise<Address[]>;

export type Decision =
  | { allow: true; host: PackageIndexHost; addresses: Address[]; port: number; pinned: boolean }
  | { allow: false; refusal: Refusal };

/**
 * The whole decision for one CONNECT target, before anything is dialled:
 * listed name and port, then (unless pinned) the name resolved here and every
 * address it has checked.
 */
export async function decideConnect(index: Readonly<PackageIndexPolicy>, a: Authority, lookup: Lookup): Promise<Decision> {
  const m = matchHost(index, a);
  if ("refusal" in m) return { allow: false, refusal: m.refusal };
  const host = m.host;
  if (host.pin) {
    return { allow: true, host, addresses: [{ address: host.pin.address, family: net.isIP(host.pin.address) }], port: host.pin.port, pinned: true };
  }
  let addresses: Address[];
  try {
    addresses = await lookup(host.name);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code ?? (e as Error).message;
    return { allow: false, refusal: { status: 502, rule: RULE_UNRESOLVED, reason: `${host.name} did not resolve (${code})` } };
  }
  if (addresses.length === 0) return { allow: false, refusal: { status: 502, rule: RULE_UNRESOLVED, reason: `${host.name} resolved to no address` } };
  for (const { address } of addresses) {
    const why = classifyAddress(address);
    if (why) {
      return {
        allow: false,
        refusal: {
          status: 403,
          rule: RULE_ADDRESS,
          reason: `${host.name} resolves to ${address}, ${why}; the proxy reaches public addresses only (an operator can pin a mirror's address in policy network.packageIndex)`,
        },
      };
    }
  }
  return { allow: true, host, addresses, port: host.port, pinned: false };
}

/** dns.lookup with every address, in the resolver's order, bounded in time. */
export const systemLookup: Lookup = (name) =>
  new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(Object.assign(new Error("timeout"), { code: `no answer within ${LOOKUP_TIMEOUT_MS} ms` })), LOOKUP_TIMEOUT_MS);
    dns.lookup(name, { all: true, verbatim: true }).then(
      (r) => {
        clearTimeout(timer);
        resolve(r);
      },
      (e: unknown) => {
        clearTimeout(timer);
        reject(e as Error);
      },
    );
  });

/* -------------------------------- handler -------------------------------- */

export interface ProxyOptions {
  index: Readonly<PackageIndexPolicy>;
  /** records one event (journal + build log), durable before it resolves */
  record(event: Record<string, unknown> & { type: string }, lines: string[]): Promise<void>;
  now?: () => Date;
  lookup?: Lookup;
  /** opens a TCP connection to an address (tests replace it) */
  dial?: (address: string, port: number) => net.Socket;
  /** each upstream socket, so its owner can destroy it on shutdown */
  onUpstream?: (sock: net.Socket) => void;
  headTimeoutMs?: number;
}

export interface ProxyResult {
  /** `host:port` the client asked for, when it sent a request */
  target: string | null;
  /** the address dialled, when allowed */
  address: string | null;
  /** why the connection ended abnormally (refusals included), for net.close */
  error: string | null;
}

/**
 * Serves one tunnelled connection (paused, possibly with bytes unshifted);
 * resolves when it is over (both sides closed).
 */
export async function handleProxyClient(client: net.Socket, opts: ProxyOptions): Promise<ProxyResult> {
  const now = opts.now ?? (() => new Date());
  const ts = () => timestamp(now());
  const result: ProxyResult = { target: null, address: null, error: null };
  const clientClosed = closedPromise(client);
  client.on("error", (e) => (result.error ??= `sandbox side: ${e.message}`));

  /** `request`: what was asked, as shown in the log ("CONNECT host:port", "GET http://…", "?") */
  const refuse = async (r: Refusal, request: string, host: string | null, port: number | null): Promise<ProxyResult> => {
    result.error = `${r.status} ${r.rule}: ${r.reason}`;
    try {
      await opts.record(
        { type: "net.proxy", decision: "forbid", host, port, request, rule: r.rule, clause: opts.index.clause, reason: r.reason, status: r.status },
        [actionLine(ts(), "NET", "PROXY", request, `FORBID ${r.rule} (${opts.index.clause}): ${r.reason}`)],
      );
    } catch (e) {
      // fail closed: no answer without a record
      result.error = `could not record a refusal: ${(e as Error).message}`;
      client.destroy();
      await clientClosed;
      return result;
    }
    answer(client, r.status, `sandboxd refused ${request}: ${r.reason} (rule ${r.rule})`);
    await clientClosed;
    return result;
  };

  let raw: { head: string; rest: Buffer } | null;
  try {
    raw = await readHead(client, opts.headTimeoutMs ?? HEAD_TIMEOUT_MS);
  } catch (e) {
    const err = e as ProxyRequestError;
    return refuse({ status: err.status, rule: RULE_REQUEST, reason: err.message }, "?", null, null);
  }
  if (!raw) {
    result.error = "closed before sending a request";
    client.destroy();
    await clientClosed;
    return result;
  }

  let authority: Authority;
  try {
    const head = parseRequestHead(raw.head);
    if (head.method !== "CONNECT") {
      const shown = display(`${head.method} ${head.target}`);
      result.target = shown;
      let url: URL | null = null;
      try {
        url = new URL(head.target);
      } catch {
        // origin-form or garbage: no host to record
      }
      return refuse(
        { status: 405, rule: RULE_REQUEST, reason: `only CONNECT is served (TLS to a package index in policy network.packageIndex); use https:// URLs` },
        shown,
        url?.hostname ? display(url.hostname) : null,
        url?.hostname ? Number(url.port || (url.protocol === "https:" ? 443 : 80)) : null,
      );
    }
    authority = parseAuthority(head.target);
  } catch (e) {
    if (!(e instanceof ProxyRequestError)) throw e;
    return refuse({ status: e.status, rule: RULE_REQUEST, reason: e.message }, display(raw.head.split(/\r?\n/)[0] ?? "?"), null, null);
  }
  const target = `${display(authority.host)}:${authority.port}`;
  result.target = target;

  const decision = await decideConnect(opts.index, authority, opts.lookup ?? systemLookup);
  if (!decision.allow) return refuse(decision.refusal, `CONNECT ${target}`, display(authority.host), authority.port);
  if (client.destroyed) {
    result.error = "the sandbox side closed while the name was resolved";
    return result;
  }

  const first = decision.addresses[0]!.address;
  try {
    await opts.record(
      {
        type: "net.proxy",
        decision: "allow",
        host: decision.host.name,
        port: authority.port,
        address: joinHostPort(first, decision.port),
        addresses: decision.addresses.map((x) => x.address),
        pinned: decision.pinned,
        rule: opts.index.id,
        clause: opts.index.clause,
      },
      [
        actionLine(
          ts(),
          "NET",
          "PROXY",
          `CONNECT ${target}`,
          `ALLOW ${opts.index.id} (${opts.index.clause}) → ${joinHostPort(first, decision.port)}${decision.pinned ? " (pinned by policy)" : ""}`,
        ),
      ],
    );
  } catch (e) {
    result.error = `could not record the connection: ${(e as Error).message}`;
    client.destroy();
    await clientClosed;
    return result;
  }

  // Dial the checked addresses in the resolver's order; never the name again (a second lookup could answer differently).
  const dial = opts.dial ?? ((address: string, port: number) => net.connect({ host: address, port }));
  let upstream: net.Socket | null = null;
  const failures: string[] = [];
  for (const { address } of decision.addresses) {
    if (client.destroyed) break;
    const attempt = await connectOnce(dial, address, decision.port, opts.onUpstream);
    if ("socket" in attempt) {
      upstream = attempt.socket;
      result.address = joinHostPort(address, decision.port);
      break;
    }
    failures.push(`${joinHostPort(address, decision.port)}: ${attempt.error}`);
  }
  if (!upstream) {
    result.error = client.destroyed ? "the sandbox side closed before the upstream answered" : `upstream: ${failures.join("; ")}`;
    if (!client.destroyed) answer(client, 502, `sandboxd could not reach ${decision.host.name}: ${failures.join("; ")}`);
    await clientClosed;
    return result;
  }
  if (client.destroyed) {
    upstream.destroy();
    result.error = "the sandbox side closed before the upstream answered";
    return result;
  }

  client.write("HTTP/1.1 200 Connection established\r\n\r\n");
  if (raw.rest.length > 0) upstream.write(raw.rest);
  return relay(client, upstream, result);
}

/** One request head from the client; null when it closed without sending a byte. */
function readHead(client: net.Socket, timeoutMs: number): Promise<{ head: string; rest: Buffer } | null> {
  return new Promise((resolve, reject) => {
    let buf = Buffer.alloc(0);
    const timer = setTimeout(() => done(new ProxyRequestError(408, `no complete request head within ${timeoutMs} ms`)), timeoutMs);
    const onData = (chunk: Buffer) => {
      buf = Buffer.concat([buf, chunk]);
      const end = headEnd(buf);
      if (end >= 0 && end <= MAX_HEAD_BYTES) done(null, { head: buf.subarray(0, end).toString("latin1"), rest: buf.subarray(end) });
      else if (buf.length > MAX_HEAD_BYTES) done(new ProxyRequestError(431, `request head longer than ${MAX_HEAD_BYTES} bytes`));
    };
    const onEnd = () => (buf.length === 0 ? done(null, null) : done(new ProxyRequestError(400, "connection ended inside the request head")));
    const done = (err: Error | null, r?: { head: string; rest: Buffer } | null) => {
      clearTimeout(timer);
      client.off("data", onData);
      client.off("end", onEnd);
      client.off("close", onEnd);
      client.pause();
      if (err) reject(err);
      else resolve(r ?? null);
    };
    client.on("data", onData);
    client.once("end", onEnd);
    client.once("close", onEnd);
    client.resume();
  });
}

function connectOnce(
  dial: (address: string, port: number) => net.Socket,
  address: string,
  port: number,
  onUpstream: ((s: net.Socket) => void) | undefined,
): Promise<{ socket: net.Socket } | { error: string }> {
  return new Promise((resolve) => {
    const sock = dial(address, port);
    onUpstream?.(sock);
    const timer = setTimeout(() => {
      sock.destroy();
      resolve({ error: `no answer within ${CONNECT_TIMEOUT_MS} ms` });
    }, CONNECT_TIMEOUT_MS);
    const onError = (e: Error) => {
      clearTimeout(timer);
      sock.destroy();
      resolve({ error: (e as NodeJS.ErrnoException).code ?? e.message });
    };
    sock.once("error", onError);
    sock.once("connect", () => {
      clearTimeout(timer);
      sock.off("error", onError);
      resolve({ socket: sock });
    });
  });
}

/** Bytes both ways until both sides are closed; an end on one side ends the other. */
function relay(client: net.Socket, upstream: net.Socket, result: ProxyResult): Promise<ProxyResult> {
  return new Promise((resolve) => {
    upstream.on("error", (e) => (result.error ??= `upstream: ${e.message}`));
    let closed = 0;
    const onClose = (other: Duplex, waitForPeer: boolean) => (hadError: boolean) => {
      if (!other.destroyed) {
        if (hadError) other.destroy();
        else {
          other.end();
          // The tunnel socket does not half-close: once the sandbox side is closed nothing can reach it any more,
          // so the upstream is let go as soon as what was sent to it is flushed (an HTTPS server may keep its half
          // open until its keep-alive timeout, and net.close would wait for it).
          if (!waitForPeer) {
            if (other.writableFinished) other.destroy();
            else other.once("finish", () => other.destroy());
          }
          setTimeout(() => other.destroy(), HALF_CLOSED_BACKSTOP_MS).unref();
        }
      }
      if (++closed === 2) resolve(result);
    };
    client.once("close", onClose(upstream, false));
    upstream.once("close", onClose(client, true));
    client.pipe(upstream);
    upstream.pipe(client);
    client.resume();
  });
}

/** A short plain-text answer, then the connection is ended. The reason goes in the status line too (clients show it). */
function answer(client: net.Socket, status: number, message: string): void {
  if (client.destroyed) return;
  client.resume(); // drain (and drop) anything sent after the head, so the other side's end is seen
  const phrase = message.replace(/[^\x20-\x7e]/g, "?").slice(0, 300);
  const body = `${message}\n`;
  client.end(
    `HTTP/1.1 ${status} ${phrase}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: ${Buffer.byteLength(body)}\r\nConnection: close\r\n\r\n${body}`,
  );
  setTimeout(() => client.destroy(), HALF_CLOSED_BACKSTOP_MS).unref();
}

function closedPromise(sock: net.Socket): Promise<void> {
  if (sock.destroyed && sock.closed) return Promise.resolve();
  return new Promise((resolve) => sock.once("close", () => resolve()));
}

/** A host as the sandbox sent it, safe to put in a record or a status line. */
function display(s: string): string {
  const clean = s.replace(/[^\x21-\x7e ]/g, "?");
  return clean.length > 255 ? `${clean.slice(0, 255)}…` : clean;
}

function joinHostPort(address: string, port: number): string {
  return net.isIPv6(address) ? `[${address}]:${port}` : `${address}:${port}`;
}
