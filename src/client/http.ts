/**
 * HTTP over the daemon's unix socket: JSON requests and raw streaming
 * responses, errors turned back into SandboxdError. The typed client
 * (./index.ts), the CLI and the end-to-end tests are built on it.
 */
import http from "node:http";
import { SandboxdError } from "../errors.js";
import { errorFromBody, unreachable } from "./errors.js";

export { errorFromBody } from "./errors.js";

export class ApiClient {
  constructor(readonly socketPath: string) {}

  /** JSON request; throws SandboxdError (with the daemon's code and hint) on a non-2xx answer. */
  async request<T>(method: string, path: string, body?: unknown): Promise<T> {
    return jsonAnswer<T>(await this.raw(method, path, body));
  }

  /** A request whose body is bytes (PUT /v1/phases/:id/files/<path>); the answer is JSON. */
  async requestBytes<T>(method: string, path: string, bytes: Buffer): Promise<T> {
    return jsonAnswer<T>(await this.raw(method, path, { bytes, contentType: "application/octet-stream" }));
  }

  /** The raw response, for streaming routes; errors before the stream starts are thrown like request(). */
  async stream(method: string, path: string, body?: unknown): Promise<http.IncomingMessage> {
    const res = await this.raw(method, path, body);
    if ((res.statusCode ?? 500) >= 400) {
      const text = await readAll(res);
      let json: unknown = {};
      try {
        json = JSON.parse(text);
      } catch {
        /* fall through with an empty body */
      }
      throw errorFromBody(json, res.statusCode ?? 500);
    }
    return res;
  }

  private raw(method: string, path: string, body?: unknown): Promise<http.IncomingMessage> {
    return new Promise((resolve, reject) => {
      const raw = body as { bytes?: unknown; contentType?: string } | undefined;
      const isBytes = raw !== undefined && raw !== null && Buffer.isBuffer(raw.bytes) && typeof raw.contentType === "string";
      const payload = body === undefined ? undefined : isBytes ? (raw.bytes as Buffer) : Buffer.from(JSON.stringify(body));
      const contentType = isBytes ? raw.contentType! : "application/json";
      const req = http.request(
        {
          socketPath: this.socketPath,
          // no TLS server name to work out: the Agent's check of it compiles the IPv6 pattern, ms of a CLI process's start
          servername: "",
          method,
          path,
          headers: payload ? { "content-type": contentType, "content-length": payload.length } : {},
        } as http.RequestOptions,
        resolve,
      );
      req.on("error", (err: NodeJS.ErrnoException) => reject(unreachable(err, this.socketPath)));
      req.end(payload);
    });
  }
}

async function readAll(res: http.IncomingMessage): Promise<string> {
  const chunks: Buffer[] = [];
  for await (const c of res) chunks.push(c as Buffer);
  return Buffer.concat(chunks).toString("utf8");
}

/** A JSON answer's body; a non-2xx answer thrown as SandboxdError with the daemon's code and hint. */
async function jsonAnswer<T>(res: http.IncomingMessage): Promise<T> {
  const text = await readAll(res);
  let json: unknown;
  try {
    json = text ? JSON.parse(text) : {};
  } catch {
    throw new SandboxdError("SBX_ERR_INTERNAL", `daemon answered ${res.statusCode} with a body that is not JSON`);
  }
  if ((res.statusCode ?? 500) >= 400) throw errorFromBody(json, res.statusCode ?? 500);
  return json as T;
}
