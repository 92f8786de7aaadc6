/**
 * A streaming exec's frames (`?stream=frames`, docs/API.md) read straight off
 * the daemon's unix socket: one HTTP/1.1 request, the response's head and
 * chunked body parsed here, its bytes read into pooled buffers
 * (../shim/read-pool.ts) and split into frames as views of them. No
 * node:http (the CLI's start-up loads less), no allocation per read (a
 * 200 MiB stream made Node's reader allocate 3,200 buffers of 64 KiB and
 * collect them with full mark-compacts), reads of 256 KiB.
 *
 * The daemon answers an error before the stream starts as an ordinary JSON
 * response: that becomes a SandboxdError, as ApiClient's would. Only node:net
 * and small modules: the CLI's hot path imports it.
 */
import net from "node:net";
import { SandboxdError } from "../errors.js";
import { FrameReader } from "../frames.js";
import { ReadPool, readPooled } from "../shim/read-pool.js";
import { errorFromBody, unreachable } from "./errors.js";

/** the CLI's and the clients' read buffers (a process reads one stream at a time, mostly) */
export const clientPool = new ReadPool(256 * 1024, 4);

/**
 * A frame's payload is lent for the call: a view of a pooled read buffer.
 * Keep it longer with clientPool.retain/release, or copy it. Return a
 * promise to stop reading until it settles (backpressure: the daemon then
 * holds the command's output).
 */
export type FrameHandler = (kind: number, payload: Buffer) => void | Promise<void>;

/** The head of an HTTP/1.1 response (RFC 9112 §4–6), just what this reader needs. */
interface Head {
  status: number;
  chunked: boolean;
  /** -1: not given (the body runs until the connection ends) */
  length: number;
}

const MAX_HEAD = 64 * 1024;

function parseHead(text: string): Head {
  const lines = text.split("\r\n");
  const m = /^HTTP\/1\.[01] (\d{3})/.exec(lines[0] ?? "");
  if (!m) throw new SandboxdError("SBX_ERR_INTERNAL", `the daemon answered something that is not HTTP/1.1: ${JSON.stringify((lines[0] ?? "").slice(0, 80))}`);
  let chunked = false;
  let length = -1;
  for (const line of lines.slice(1)) {
    const colon = line.indexOf(":");
    if (colon <= 0) continue;
    const name = line.slice(0, colon).trim().toLowerCase();
    const value = line.slice(colon + 1).trim().toLowerCase();
    if (name === "transfer-encoding") chunked = value.split(",").map((s) => s.trim()).includes("chunked");
    else if (name === "content-length") length = Number(value);
  }
  return { status: Number(m[1]), chunked, length };
}

/**
 * The body's bytes, de-chunked, as views of what was read (a chunk's data
 * is never copied). One object, one state: where in the chunked framing
 * the next byte falls.
 */
class ChunkedBody {
  /** "size": reading a chunk-size line; "data": `left` bytes of data; "crlf": the CRLF after data; "trailer": after the last chunk; "done" */
  private state: "size" | "data" | "crlf" | "trailer" | "done" = "size";
  private line = "";
  private left = 0;

  get done(): boolean {
    return this.state === "done";
  }

  /** feeds `buf`; `out` gets each piece of data */
  push(buf: Buffer, out: (piece: Buffer) => void): void {
    let i = 0;
    while (i < buf.length && this.state !== "done") {
      if (this.state === "data") {
        const n = Math.min(this.left, buf.length - i);
        out(buf.subarray(i, i + n));
        i += n;
        this.left -= n;
        if (this.left === 0) this.state = "crlf";
        continue;
      }
      // the line-oriented states: a byte at a time up to LF (lines are short)
      const nl = buf.indexOf(0x0a, i);
      const end = nl < 0 ? buf.length : nl;
      this.line += buf.toString("latin1", i, end);
      if (this.line.length > 1024) throw new SandboxdError("SBX_ERR_INTERNAL", "the exec stream's chunked framing is broken (a line over 1 KiB)");
      i = end;
      if (nl < 0) break;
      i += 1; // the LF
      const line = this.line.replace(/\r$/, "");
      this.line = "";
      if (this.state === "crlf") {
        if (line !== "") throw new SandboxdError("SBX_ERR_INTERNAL", "the exec stream's chunked framing is broken (no CRLF after a chunk)");
        this.state = "size";
      } else if (this.state === "size") {
        const size = parseInt(line.split(";")[0]!.trim(), 16);
        if (!Number.isFinite(size) || size < 0) throw new SandboxdError("SBX_ERR_INTERNAL", `the exec stream's chunked framing is broken (chunk size ${JSON.stringify(line.slice(0, 20))})`);
        if (size === 0) this.state = "trailer";
        else {
          this.left = size;
          this.state = "data";
        }
      } else if (line === "") this.state = "done"; // trailer: fields until an empty line
    }
  }
}

/**
 * POSTs `body` to `path` (a `?stream=frames` URL) on the daemon's socket and
 * hands each frame to `onFrame` as it arrives. Resolves when the response
 * has ended: `cut` is how many bytes of an unfinished frame (or of the
 * chunked framing) were left when the connection ended early (0 normally).
 * `signal` aborts it: the connection closes and it rejects (an AbortError).
 */
export function streamFrames(socketPath: string, path: string, body: unknown, onFrame: FrameHandler, signal?: AbortSignal): Promise<{ cut: number }> {
  return new Promise((resolve, reject) => {
    const payload = Buffer.from(JSON.stringify(body), "utf8");
    const raw = net.createConnection(socketPath);
    let sock: net.Socket = raw;
    let settled = false;
    /** the abort listener's removal, once it is added (a settled stream no longer listens) */
    let forgetSignal = () => {};
    const fail = (err: unknown) => {
      if (settled) return;
      settled = true;
      forgetSignal();
      sock.destroy();
      reject(err);
    };
    const finish = (cut: number) => {
      if (settled) return;
      settled = true;
      forgetSignal();
      sock.destroy();
      resolve({ cut });
    };
    const abort = () => fail(Object.assign(new Error("the exec stream was aborted"), { name: "AbortError", code: "ABORT_ERR" }));

    let head: Head | null = null;
    let headBytes: Buffer[] = [];
    let headLen = 0;
    const chunked = new ChunkedBody();
    const frames = new FrameReader({ borrowed: true, streamOutput: true });
    let bodySeen = 0;
    let errorBody: Buffer[] = [];
    /** a handler asked to wait: reading stops until it settles */
    let waiting: Promise<void> | null = null;

    const onBody = (piece: Buffer) => {
      if (head!.status >= 400) {
        errorBody.push(Buffer.from(piece));
        return;
      }
      for (const f of frames.push(piece)) {
        const w = onFrame(f.kind, f.payload);
        if (w && !waiting) waiting = w;
      }
    };
    const onChunk = (chunk: Buffer) => {
      if (settled) return;
      try {
        let rest = chunk;
        if (!head) {
          headBytes.push(Buffer.from(chunk));
          headLen += chunk.length;
          const all = Buffer.concat(headBytes, headLen);
          const end = all.indexOf("\r\n\r\n");
          if (end < 0) {
            if (headLen > MAX_HEAD) throw new SandboxdError("SBX_ERR_INTERNAL", "the daemon's response head is over 64 KiB");
            headBytes = [all];
            return;
          }
          head = parseHead(all.toString("latin1", 0, end));
          headBytes = [];
          rest = all.subarray(end + 4);
        }
        if (head.chunked) chunked.push(rest, onBody);
        else if (rest.length > 0) {
          const n = head.length >= 0 ? Math.min(rest.length, head.length - bodySeen) : rest.length;
          bodySeen += n;
          onBody(rest.subarray(0, n));
        }
        if (chunked.done || (!head.chunked && head.length >= 0 && bodySeen >= head.length)) return void end();
        if (waiting) {
          sock.pause();
          const w = waiting;
          void w.then(
            () => {
              if (waiting === w) waiting = null;
              if (!settled) sock.resume();
            },
            (e: unknown) => fail(e),
          );
        }
      } catch (err) {
        fail(err);
      }
    };
    const end = () => {
      if (!head) return fail(new SandboxdError("SBX_ERR_INTERNAL", "the daemon closed the connection without answering"));
      if (head.status >= 400) {
        let json: unknown = {};
        try {
          json = JSON.parse(Buffer.concat(errorBody).toString("utf8"));
        } catch {
          /* an empty body: the status says enough */
        }
        errorBody = [];
        return fail(errorFromBody(json, head.status));
      }
      const complete = head.chunked ? chunked.done : head.length < 0 || bodySeen >= head.length;
      finish(frames.pending + (complete ? 0 : 1));
    };

    raw.once("connect", () => {
      const pooled = readPooled(raw, clientPool, onChunk);
      if (pooled) sock = pooled;
      else raw.on("data", onChunk);
      sock.on("end", end);
      sock.on("close", () => {
        if (!settled) end();
      });
      sock.on("error", fail);
      sock.write(
        `POST ${path} HTTP/1.1\r\nHost: sandboxd\r\nContent-Type: application/json\r\nContent-Length: ${payload.length}\r\nConnection: close\r\n\r\n`,
      );
      sock.write(payload);
    });
    raw.once("error", (err: NodeJS.ErrnoException) => fail(unreachable(err, socketPath)));
    // the caller gives up: the connection closes (the daemon then ends the command) and this rejects
    if (signal) {
      if (signal.aborted) abort();
      else {
        signal.addEventListener("abort", abort, { once: true });
        forgetSignal = () => signal.removeEventListener("abort", abort);
      }
    }
  });
}
