/**
 * The daemon's own Redis connection for one tunnelled client: dial, then log
 * in (AUTH with the ACL user and password of the mode's URL) and SELECT the
 * URL's database, before a single byte of the client is forwarded. The
 * sandbox never holds the password; the filter refuses AUTH and HELLO … AUTH
 * from it, and SELECT of any other database (src/net/redis-commands.ts).
 *
 * Every failure (refused, timed out, login or SELECT refused) rejects with
 * RedisUnreachable, whose message the tunnel sends to the client as a RESP
 * error (`-ERR sandboxd: Redis at host:port unreachable: …`).
 */
import net from "node:net";
import { ReplyCounter } from "./redis.js";

export interface RedisLogin {
  host: string;
  port: number;
  /** ACL user; null: the password alone (`AUTH <password>`, the `default` user) */
  user: string | null;
  /** null: no AUTH is sent */
  password: string | null;
  /** database index; 0 is not selected explicitly */
  db: number;
}

export class RedisUnreachable extends Error {}

function command(...args: string[]): Buffer {
  const parts = [`*${args.length}\r\n`];
  for (const a of args) parts.push(`$${Buffer.byteLength(a)}\r\n${a}\r\n`);
  return Buffer.from(parts.join(""));
}

/** A connected, logged-in socket (paused), or RedisUnreachable. */
export function openRedisUpstream(login: RedisLogin, timeoutMs: number, onSocket?: (s: net.Socket) => void): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    const sock = net.connect({ host: login.host, port: login.port });
    onSocket?.(sock);
    const steps: Array<{ what: string; bytes: Buffer }> = [];
    if (login.password !== null) {
      const auth = login.user !== null ? command("AUTH", login.user, login.password) : command("AUTH", login.password);
      steps.push({ what: `login${login.user !== null ? ` as ${login.user}` : ""}`, bytes: auth });
    }
    if (login.db !== 0) steps.push({ what: `SELECT ${login.db}`, bytes: command("SELECT", String(login.db)) });
    const counter = new ReplyCounter();
    let got = Buffer.alloc(0);
    let answered = 0;
    let settled = false;
    const timer = setTimeout(() => fail(`no answer within ${timeoutMs} ms`), timeoutMs);
    const fail = (why: string) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      sock.destroy();
      reject(new RedisUnreachable(why));
    };
    const done = () => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      sock.off("data", onData);
      sock.pause();
      resolve(sock);
    };
    const onData = (chunk: Buffer) => {
      got = Buffer.concat([got, chunk]);
      let n: number;
      try {
        n = counter.feed(chunk);
      } catch (e) {
        return fail(`unparsable answer: ${(e as Error).message}`);
      }
      // each answer is one line (+OK or -ERR …): check them in order
      for (let i = 0; i < n; i++) {
        const nl = got.indexOf(0x0a);
        const line = got.subarray(0, nl + 1).toString("utf8").replace(/\r?\n$/, "");
        got = got.subarray(nl + 1);
        const step = steps[answered++]!;
        if (!line.startsWith("+")) return fail(`${step.what} failed: ${line.replace(/^-/, "").slice(0, 200)}`);
      }
      if (answered >= steps.length) done();
    };
    sock.once("connect", () => {
      if (steps.length === 0) return done();
      sock.on("data", onData);
      sock.write(Buffer.concat(steps.map((s) => s.bytes)));
    });
    sock.on("error", (e: Error) => fail(e.message));
    sock.once("close", () => fail("the server closed the connection"));
  });
}
