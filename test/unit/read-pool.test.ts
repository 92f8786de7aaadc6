import { randomBytes } from "node:crypto";
import { mkdtempSync, rmSync } from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { FrameDecoder, FrameKind, encodeFrame, type Frame } from "../../src/shim/protocol.js";
import { ReadPool, readPooled } from "../../src/shim/read-pool.js";

describe("ReadPool", () => {
  it("hands a buffer out again only after its last holder let go", () => {
    const pool = new ReadPool(1024, 4);
    const a = pool.take();
    pool.retain(a.subarray(10, 20)); // a writer keeps a view
    pool.release(a); // the reader is done
    expect(pool.idle).toBe(0);
    const b = pool.take();
    expect(b.buffer).not.toBe(a.buffer);
    pool.release(a.subarray(10, 20)); // the write completed
    expect(pool.idle).toBe(1);
    expect(pool.take().buffer).toBe(a.buffer);
    pool.release(b);
  });

  it("ignores buffers it did not hand out, and a release too many", () => {
    const pool = new ReadPool(64, 4);
    const other = Buffer.alloc(64);
    pool.retain(other);
    pool.release(other);
    expect(pool.idle).toBe(0);
    const a = pool.take();
    pool.release(a);
    pool.release(a);
    expect(pool.idle).toBe(1);
  });

  it("keeps at most `keep` idle buffers", () => {
    const pool = new ReadPool(64, 2);
    const taken = [pool.take(), pool.take(), pool.take()];
    for (const b of taken) pool.release(b);
    expect(pool.idle).toBe(2);
  });
});

describe("FrameDecoder({ borrowed })", () => {
  it("frames come out whole although every chunk's memory is overwritten after its push", () => {
    const payload = randomBytes(300_000);
    const frames: Frame[] = [
      { kind: FrameKind.Json, execId: 0, payload: Buffer.from(JSON.stringify({ type: "started", execId: 1, pid: 9 })) },
      { kind: FrameKind.Stdout, execId: 1, payload },
      { kind: FrameKind.Json, execId: 0, payload: Buffer.from(JSON.stringify({ type: "exit", execId: 1, exitCode: 0, signal: null, timedOut: false, durationMs: 1 })) },
    ];
    const wire = Buffer.concat(frames.map((f) => encodeFrame(f.kind, f.execId, f.payload)));
    for (const size of [1, 3, 7, 9, 10, 4096, 65_536]) {
      const decoder = new FrameDecoder({ streamData: true, borrowed: true });
      const lent = Buffer.alloc(size); // one buffer for every read, as a pooled reader uses it
      const json: string[] = [];
      const out: Buffer[] = [];
      for (let pos = 0; pos < wire.length; pos += size) {
        const n = wire.copy(lent, 0, pos, pos + size);
        for (const f of decoder.push(lent.subarray(0, n))) {
          if (f.kind === FrameKind.Json) json.push(f.payload.toString("utf8"));
          else out.push(Buffer.from(f.payload)); // kept past the call: copied, as a holder must
        }
        lent.fill(0xee); // the next read overwrites it
      }
      expect(json.map((j) => JSON.parse(j).type)).toEqual(["started", "exit"]);
      expect(Buffer.concat(out).equals(payload)).toBe(true);
    }
  });
});

describe("readPooled", () => {
  let dir: string;
  afterEach(() => rmSync(dir, { recursive: true, force: true }));

  /** a server on a unix socket; `onConn` gets each accepted socket */
  async function server(opts: net.ServerOpts, onConn: (s: net.Socket) => void): Promise<{ path: string; srv: net.Server }> {
    dir = mkdtempSync(path.join(os.tmpdir(), "readpool-"));
    const p = path.join(dir, "s.sock");
    const srv = net.createServer(opts, onConn);
    await new Promise<void>((r) => srv.listen(p, r));
    return { path: p, srv };
  }

  it("delivers every byte in order, from reused buffers, while writers hold views past the read", async () => {
    const data = randomBytes(8 * 1024 * 1024);
    const pool = new ReadPool(256 * 1024, 4);
    const got: Buffer[] = [];
    const pending: Array<Promise<void>> = [];
    let reads = 0;
    const seen = new Set<ArrayBufferLike>();
    const done = new Promise<void>((resolve, reject) => {
      void server({ pauseOnConnect: true }, (accepted) => {
        const sock = readPooled(accepted, pool, (chunk) => {
          reads++;
          seen.add(chunk.buffer);
          // a holder that keeps the view until "its write completes", a tick later
          pool.retain(chunk);
          pending.push(
            new Promise((r) =>
              setImmediate(() => {
                got.push(Buffer.from(chunk));
                pool.release(chunk);
                r();
              }),
            ),
          );
        });
        if (!sock) return reject(new Error("not taken over"));
        sock.on("end", () => void Promise.all(pending).then(() => resolve()));
        sock.on("error", reject);
      }).then(({ path: p, srv }) => {
        const c = net.connect(p, () => c.end(data));
        void done.finally(() => srv.close());
      });
    });
    await done;
    expect(Buffer.concat(got).equals(data)).toBe(true);
    // reads of up to 256 KiB, from a handful of buffers (none allocated per read)
    expect(reads).toBeLessThan(data.length / 65_536);
    expect(seen.size).toBeLessThan(reads);
  });

  it("hands on first what the socket had read already, and pauses and resumes", async () => {
    const first = Buffer.from("early bytes;");
    const rest = randomBytes(1024 * 1024);
    const pool = new ReadPool(64 * 1024, 4);
    const got: Buffer[] = [];
    let client!: net.Socket;
    const done = new Promise<void>((resolve, reject) => {
      void server({}, (accepted) => {
        // reading already (no pauseOnConnect): wait until the first bytes sit in its buffer
        accepted.pause();
        const poll = setInterval(() => {
          if (accepted.readableLength < first.length) return;
          clearInterval(poll);
          const sock = readPooled(accepted, pool, (c) => void got.push(Buffer.from(c)));
          if (!sock) return reject(new Error("not taken over"));
          expect(Buffer.concat(got).toString()).toBe(first.toString());
          sock.pause();
          client.end(rest);
          setTimeout(() => {
            const before = Buffer.concat(got).length;
            expect(before).toBe(first.length); // paused: nothing read
            sock.resume();
          }, 50);
          sock.on("end", resolve);
          sock.on("error", reject);
        }, 5);
      }).then(({ path: p, srv }) => {
        client = net.connect(p, () => client.write(first));
        void done.finally(() => srv.close());
      });
    });
    await done;
    expect(Buffer.concat(got).equals(Buffer.concat([first, rest]))).toBe(true);
  });

  it("a socket's unfilled buffer goes back at its close: 50 short connections in a row share the pool's buffers", async () => {
    const pool = new ReadPool(64 * 1024, 4);
    const seen = new Set<ArrayBufferLike>();
    const closed: Array<Promise<void>> = [];
    const texts: string[] = [];
    const { path: p, srv } = await server({ pauseOnConnect: true }, (accepted) => {
      let text = "";
      const sock = readPooled(accepted, pool, (c) => {
        seen.add(c.buffer);
        text += c.toString();
      });
      closed.push(new Promise((resolve) => sock!.once("close", () => (texts.push(text), resolve()))));
    });
    for (let i = 0; i < 50; i++) {
      // a command's output of a few bytes, or none, then its end
      await new Promise<void>((resolve, reject) => {
        const c = net.connect(p, () => c.end(i % 2 ? `out ${i}` : ""));
        c.on("close", () => resolve());
        c.on("error", reject);
      });
      await closed[i];
    }
    await new Promise<void>((resolve) => srv.close(() => resolve()));
    expect(texts).toEqual(Array.from({ length: 50 }, (_, i) => (i % 2 ? `out ${i}` : "")));
    // each connection held one buffer it never filled (and the odd ones one they did): all came back
    expect(seen.size).toBeLessThanOrEqual(2);
    expect(pool.idle).toBeGreaterThanOrEqual(1);
    expect(pool.idle).toBeLessThanOrEqual(2);
  });

  it("writes still work on the socket it returns, and the server's close is not held up by the old one", async () => {
    const pool = new ReadPool(1024, 2);
    const { path: p, srv } = await server({ pauseOnConnect: true }, (accepted) => {
      const sock = readPooled(accepted, pool, (c) => {
        if (c.toString() === "ping") sock!.end("pong");
      });
    });
    const answer = await new Promise<string>((resolve, reject) => {
      const c = net.connect(p, () => c.write("ping"));
      let text = "";
      c.on("data", (d) => (text += d.toString()));
      c.on("end", () => resolve(text));
      c.on("error", reject);
    });
    expect(answer).toBe("pong");
    await new Promise<void>((resolve) => srv.close(() => resolve()));
  });
});
