/**
 * A throwaway redis-server for tests: started on a free loopback port with no
 * persistence, in its own temp dir; stopped (and the dir removed) by stop().
 * `npm test` installs the Debian package when it is missing
 * (scripts/ensure-test-tools.sh).
 */
import { execFile, spawn, type ChildProcess } from "node:child_process";
import net from "node:net";
import { promisify } from "node:util";
import { removeDir, tempDir } from "./sandbox.js";

const run = promisify(execFile);

export interface TestRedis {
  port: number;
  /** the ACL user the daemon logs in as (when started with `auth`) */
  user: string | null;
  password: string | null;
  /** redis-cli against it, from the host; trimmed stdout */
  cli(...args: string[]): Promise<string>;
  stop(): Promise<void>;
}

async function freePort(): Promise<number> {
  const s = net.createServer();
  await new Promise<void>((r) => s.listen(0, "127.0.0.1", r));
  const port = (s.address() as net.AddressInfo).port;
  await new Promise((r) => s.close(r));
  return port;
}

/**
 * `auth`: the server wants a login, as an operator runs it — the `default`
 * user gets an admin password (used by cli()), and an ACL user `user` with
 * `password` may run everything (so only the filter stands between a sandbox
 * and the server's dangerous commands; a real operator would narrow it).
 */
export async function startRedis(opts: { auth?: { user: string; password: string } } = {}): Promise<TestRedis> {
  const dir = await tempDir("redis");
  const port = await freePort();
  const admin = opts.auth ? `admin-${Math.random().toString(36).slice(2)}-pw` : null;
  const authArgs = opts.auth ? ["--requirepass", admin!, "--user", opts.auth.user, "on", `>${opts.auth.password}`, "~*", "&*", "+@all"] : [];
  const child: ChildProcess = spawn(
    "redis-server",
    ["--port", String(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", dir, "--daemonize", "no", "--loglevel", "warning", ...authArgs],
    { stdio: ["ignore", "ignore", "pipe"] },
  );
  let stderr = "";
  child.stderr!.on("data", (b: Buffer) => (stderr += b.toString()));
  const spawnFailed = new Promise<never>((_, reject) => child.once("error", reject));
  const login = admin ? ["-a", admin, "--no-auth-warning"] : [];
  const cli = async (...args: string[]) => (await run("redis-cli", ["-p", String(port), ...login, ...args])).stdout.trim();
  const deadline = Date.now() + 10_000;
  for (;;) {
    const ok = await Promise.race([cli("PING").then((o) => o === "PONG", () => false), spawnFailed]);
    if (ok) break;
    if (child.exitCode !== null || Date.now() > deadline) {
      child.kill("SIGKILL");
      await removeDir(dir);
      throw new Error(`redis-server did not start on port ${port}: ${stderr.trim() || `exit ${child.exitCode}`}`);
    }
    await new Promise((r) => setTimeout(r, 50));
  }
  return {
    port,
    user: opts.auth?.user ?? null,
    password: opts.auth?.password ?? null,
    cli,
    stop: async () => {
      if (child.exitCode === null && child.signalCode === null) {
        const exited = new Promise((r) => child.once("exit", r));
        child.kill("SIGTERM");
        await exited;
      }
      await removeDir(dir);
    },
  };
}
