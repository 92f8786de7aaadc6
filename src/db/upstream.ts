/**
 * The gateway's own upstream connection: dialling (TCP, or a unix socket
 * directory as libpq does), logging in with the gateway's role (SCRAM-SHA-256
 * with the server signature verified, MD5, cleartext) and the session
 * settings it starts with; and CancelRequests to an upstream backend.
 *
 * The client's startup never reaches this module: every startup parameter
 * upstream is the gateway's choice (docs/DATABASE.md "The upstream session is
 * the gateway's").
 */
import { createHash, createHmac, pbkdf2Sync, randomBytes, timingSafeEqual } from "node:crypto";
import net from "node:net";
import { ByteReader, CANCEL_REQUEST, PROTOCOL_3, cstr, int32, message, parseFields, type TxStatus } from "./wire.js";

export interface GatewayUpstream {
  /** a host name or address; or, as in libpq, a directory (starts with `/`) holding the server's unix socket `.s.PGSQL.<port>` */
  host: string;
  port: number;
  user: string;
  password: string;
  database: string;
}

export const CONNECT_TIMEOUT_MS = 10_000;

export interface UpstreamKey {
  host: string;
  port: number;
  pid: number;
  secret: number;
}

/** the key each client was given → the upstream backend's key */
export const cancelKeys = new Map<string, UpstreamKey>();

/** TCP to host:port, or the unix socket `<dir>/.s.PGSQL.<port>` when host is a directory (libpq's convention) */
export function dial(host: string, port: number): net.Socket {
  return host.startsWith("/") ? net.connect({ path: `${host}/.s.PGSQL.${port}` }) : net.connect({ host, port });
}

export function sendCancel(key: UpstreamKey): void {
  const s = dial(key.host, key.port);
  s.on("error", () => undefined);
  s.setTimeout(CONNECT_TIMEOUT_MS, () => s.destroy());
  s.on("connect", () => {
    const b = Buffer.allocUnsafe(16);
    b.writeInt32BE(16, 0);
    b.writeInt32BE(CANCEL_REQUEST, 4);
    b.writeInt32BE(key.pid, 8);
    b.writeInt32BE(key.secret, 12);
    s.end(b);
  });
}

export interface Upstream {
  socket: net.Socket;
  pid: number;
  secret: number;
  /** raw ParameterStatus messages to replay to the client */
  parameterStatus: Buffer[];
  status: TxStatus;
  leftover: Buffer | undefined;
}

export class UpstreamError extends Error {
  constructor(
    message: string,
    readonly fields?: Map<string, string>,
  ) {
    super(message);
  }
}

function scramClientProof(password: string, clientFirstBare: string, serverFirst: string, clientNonce: string) {
  const attrs = new Map(serverFirst.split(",").map((kv) => [kv.slice(0, 1), kv.slice(2)] as const));
  const nonce = attrs.get("r");
  const salt = attrs.get("s");
  const iterations = Number(attrs.get("i"));
  if (!nonce || !salt || !Number.isInteger(iterations) || iterations < 1) throw new UpstreamError("bad SCRAM server-first-message");
  if (!nonce.startsWith(clientNonce) || nonce.length === clientNonce.length) throw new UpstreamError("SCRAM nonce mismatch");
  if (iterations > 1_000_000) throw new UpstreamError("SCRAM iteration count too large");
  // SASLprep is not applied: the gateway's password is generated ASCII
  const salted = pbkdf2Sync(password.normalize("NFKC"), Buffer.from(salt, "base64"), iterations, 32, "sha256");
  const clientKey = createHmac("sha256", salted).update("Client Key").digest();
  const storedKey = createHash("sha256").update(clientKey).digest();
  const withoutProof = `c=biws,r=${nonce}`;
  const authMessage = `${clientFirstBare},${serverFirst},${withoutProof}`;
  const signature = createHmac("sha256", storedKey).update(authMessage).digest();
  const proof = Buffer.alloc(clientKey.length);
  for (let i = 0; i < proof.length; i++) proof[i] = clientKey[i]! ^ signature[i]!;
  const serverKey = createHmac("sha256", salted).update("Server Key").digest();
  const serverSignature = createHmac("sha256", serverKey).update(authMessage).digest();
  return { final: `${withoutProof},p=${proof.toString("base64")}`, serverSignature };
}

/**
 * Logs in as the gateway's role with `settings` as startup parameters (the
 * session's GUCs), and returns once the server is ready for queries.
 */
export async function connectUpstream(upstream: GatewayUpstream, settings: Readonly<Record<string, string>>): Promise<Upstream> {
  const { host, port, user, password, database } = upstream;
  const socket = dial(host, port);
  socket.setNoDelay(true); // a no-op on a unix socket
  const reader = new ByteReader(socket);
  const timer = setTimeout(() => socket.destroy(new Error(`upstream ${host}:${port} did not answer within ${CONNECT_TIMEOUT_MS} ms`)), CONNECT_TIMEOUT_MS);
  try {
    // the gateway's settings first: `user` and `database` cannot be overridden by them
    const params: Record<string, string> = { ...settings, user, database };
    const body = Buffer.concat([int32(PROTOCOL_3), ...Object.entries(params).flatMap(([k, v]) => [cstr(k), cstr(v)]), Buffer.from([0])]);
    socket.write(Buffer.concat([int32(body.length + 4), body]));

    let scram: { clientNonce: string; clientFirstBare: string; serverSignature?: Buffer } | undefined;
    const up: Omit<Upstream, "leftover"> = { socket, pid: 0, secret: 0, parameterStatus: [], status: "I" };
    for (;;) {
      const { type, body: b } = await reader.message();
      if (type === "R") {
        const code = b.readInt32BE(0);
        if (code === 0) continue;
        if (code === 3) {
          socket.write(message("p", cstr(password)));
        } else if (code === 5) {
          const inner = createHash("md5").update(password + user).digest("hex");
          const outer = createHash("md5").update(inner).update(b.subarray(4, 8)).digest("hex");
          socket.write(message("p", cstr(`md5${outer}`)));
        } else if (code === 10) {
          const mechanisms = b.toString("utf8", 4).split("\u0000");
          if (!mechanisms.includes("SCRAM-SHA-256")) throw new UpstreamError(`upstream offers no supported SASL mechanism (${mechanisms.join(", ")})`);
          const clientNonce = randomBytes(18).toString("base64");
          const clientFirstBare = `n=*,r=${clientNonce}`;
          scram = { clientNonce, clientFirstBare };
          const first = Buffer.from(`n,,${clientFirstBare}`, "utf8");
          socket.write(message("p", cstr("SCRAM-SHA-256"), int32(first.length), first));
        } else if (code === 11) {
          if (!scram) throw new UpstreamError("SASLContinue without SASL");
          const r = scramClientProof(password, scram.clientFirstBare, b.toString("utf8", 4), scram.clientNonce);
          scram.serverSignature = r.serverSignature;
          socket.write(message("p", Buffer.from(r.final, "utf8")));
        } else if (code === 12) {
          const v = /(?:^|,)v=([^,]*)/.exec(b.toString("utf8", 4))?.[1];
          const got = v ? Buffer.from(v, "base64") : Buffer.alloc(0);
          if (!scram?.serverSignature || got.length !== scram.serverSignature.length || !timingSafeEqual(got, scram.serverSignature)) {
            throw new UpstreamError("upstream's SCRAM server signature does not verify");
          }
        } else {
          throw new UpstreamError(`upstream asks for an unsupported authentication method (${code})`);
        }
      } else if (type === "E") {
        const f = parseFields(b);
        throw new UpstreamError(f.get("M") ?? "upstream refused the connection", f);
      } else if (type === "S") {
        up.parameterStatus.push(message("S", b));
      } else if (type === "K") {
        up.pid = b.readInt32BE(0);
        up.secret = b.readInt32BE(4);
      } else if (type === "Z") {
        up.status = (String.fromCharCode(b[0] ?? 73) as Upstream["status"]) ?? "I";
        break;
      }
      // NoticeResponse, NegotiateProtocolVersion: ignored during startup
    }
    clearTimeout(timer);
    const leftover = reader.detach();
    return { ...up, leftover };
  } catch (e) {
    clearTimeout(timer);
    reader.detach();
    socket.destroy();
    throw e;
  }
}

