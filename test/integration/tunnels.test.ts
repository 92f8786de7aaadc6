/**
 * Service tunnels end to end: a real daemon, a real phase container
 * (--network none) and a real upstream on the host's loopback. Code in the
 * sandbox connects to 127.0.0.1:<port> as on a laptop; the shim tunnels the
 * connection through the run dir to the daemon, which records it and dials
 * the upstream. Everything else fails fast.
 *
 * Upstreams: a TCP echo server behind REDIS_URL (raw pipe), and a throwaway
 * PostgreSQL cluster (test/helpers/postgres.ts) behind DATABASE_URL(_TEST),
 * reached through the SQL gateway (src/db/gateway.ts).
 */
import { chown, readdir, readFile, readlink, writeFile } from "node:fs/promises";
import net from "node:net";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { ExecResult } from "../../src/phases/manager.js";
import type { PhaseView } from "../../src/phases/types.js";
import { startPostgres, type TestPostgres } from "../helpers/postgres.js";
import { startRedis, type TestRedis } from "../helpers/redis.js";
import { ApiClient } from "../../src/cli/client.js";
import {
  OWNER,
  ROOT,
  containersOf,
  docker,
  makeProject,
  removeDir,
  requireEngineAndImage,
  spawnDaemon,
  startTestDaemon,
  policyWithRawServices,
  tempDir,
  waitExit,
  writeScript,
  type TestDaemon,
  auditEvents,
} from "../helpers/sandbox.js";

let t: TestDaemon;
let rawPolicy: string;
let echo: net.Server;
let echoPort = 0;
let echoBytes = 0;
const cleanup: string[] = [];
const SECRET = "tUnn3l-pr0d-Passw0rd-77";

beforeAll(async () => {
  await requireEngineAndImage();
  echo = net.createServer((s) => {
    s.on("data", (c: Buffer) => (echoBytes += c.length));
    s.pipe(s);
    s.on("error", () => undefined);
  });
  await new Promise<void>((r) => echo.listen(0, "127.0.0.1", r));
  echoPort = (echo.address() as net.AddressInfo).port;
  // Redis and QuestDB HTTP are opt-in raw services: this daemon's policy lists them.
  rawPolicy = await policyWithRawServices();
  cleanup.push(path.dirname(rawPolicy));
  t = await startTestDaemon({ policy: rawPolicy });
});

afterAll(async () => {
  await t?.close();
  await new Promise((r) => echo?.close(r));
  for (const d of cleanup) await removeDir(d);
});

async function exec(phase: PhaseView, argv: string[]): Promise<ExecResult> {
  return (await t.api.request<{ result: ExecResult }>("POST", `/v1/phases/${phase.id}/exec`, { argv })).result;
}

async function journal(): Promise<Array<Record<string, unknown>>> {
  return auditEvents(t.stateDir);
}

const PROBE = (secret: string, echoPortOnHost: number) => `
import json, os, socket, time

def connect(port, retry_s=0.0):
    deadline = time.monotonic() + retry_s
    while True:
        t0 = time.monotonic()
        try:
            return socket.create_connection(("127.0.0.1", port), timeout=5), None, time.monotonic() - t0
        except OSError as e:
            if time.monotonic() < deadline:
                time.sleep(0.05)
                continue
            return None, e.errno, time.monotonic() - t0

out = {}
# 1. A raw tunnel (QuestDB's HTTP port): echo round trip of 200 KB
s, err, _ = connect(9000, retry_s=5)
payload = bytes(range(256)) * 800
got = b""
if s:
    s.sendall(payload)
    while len(got) < len(payload):
        c = s.recv(65536)
        if not c:
            break
        got += c
    s.close()
out["echo_ok"] = got == payload
out["echo_err"] = err
out["sent"] = len(payload)

# 2. a port with no tunnel: refused at once
s, err, dt = connect(5433)
out["p5433_errno"] = err
out["p5433_secs"] = dt

# 3. the host's own port is not reachable: no interface but loopback
s, err, dt = connect(${echoPortOnHost})
out["host_port_errno"] = err
try:
    socket.create_connection(("10.0.0.1", 80), timeout=2)
    out["external"] = "connected"
except OSError as e:
    out["external"] = e.errno

# 4. PostgreSQL in test mode without DATABASE_URL_TEST: nothing listens, refused like a closed port
s, err, dt = connect(5432)
out["pg_errno"] = err
out["pg_secs"] = dt

out["env"] = {k: os.environ.get(k) for k in ("DATABASE_URL", "DATABASE_URL_TEST", "REDIS_URL", "QUESTDB_URL", "QUESTDB_URL_TEST")}
out["secret_in_env"] = any("${secret}" in v for v in os.environ.values())
print(json.dumps(out))
`;

describe("service tunnels", () => {
  it("tunnels a listed service to its upstream, refuses everything else, and records each connection", async () => {
    const project = await makeProject();
    cleanup.push(project);
    await writeFile(
      path.join(project, ".env"),
      [
        `DATABASE_URL=postgresql://trader:${SECRET}@127.0.0.1:1/trading`,
        `REDIS_URL=redis://:${SECRET}@127.0.0.1:1/2`,
        // test mode: the test QuestDB (the echo server), never QUESTDB_URL (production, a dead port here)
        `QUESTDB_URL=http://admin:${SECRET}@127.0.0.1:1`,
        `QUESTDB_URL_TEST=http://admin:${SECRET}@127.0.0.1:${echoPort}`,
        "",
      ].join("\n"),
    );
    await chown(path.join(project, ".env"), OWNER.uid, OWNER.gid);
    const { phase } = await t.api.request<{ phase: PhaseView }>("POST", "/v1/phases", { project, phase: "net", mode: "test" });
    const script = await writeScript(project, PROBE(SECRET, echoPort));
    const r = await exec(phase, ["python3", script]);
    expect(r.stderr).toBe("");
    expect(r.exitCode).toBe(0);
    const out = JSON.parse(r.stdout) as Record<string, unknown>;

    expect(out.echo_err).toBeNull();
    expect(out.echo_ok).toBe(true);
    expect(echoBytes).toBe(out.sent);
    expect(out.p5433_errno).toBe(111); // ECONNREFUSED
    expect(out.p5433_secs as number).toBeLessThan(0.5);
    expect(out.host_port_errno).toBe(111);
    expect(out.external).toBe(111); // ECONNREFUSED at once: redirected to a port nothing can listen on (net.unlisted-destination)
    expect(out.pg_errno).toBe(111); // not configured for this mode: nothing listens (ECONNREFUSED), at once
    expect(out.pg_secs as number).toBeLessThan(0.5);
    expect(out.env).toEqual({
      DATABASE_URL: "postgresql://sandbox@127.0.0.1:5432/trading",
      DATABASE_URL_TEST: null,
      // test mode without REDIS_URL_TEST: Redis is refused, and the variable names the tunnel, never production
      REDIS_URL: "redis://127.0.0.1:6379/0",
      QUESTDB_URL: "http://127.0.0.1:9000",
      QUESTDB_URL_TEST: "http://127.0.0.1:9000",
    });
    expect(out.secret_in_env).toBe(false);

    // net.close is written when both sides have closed: give it a moment
    let records: Array<Record<string, unknown>> = [];
    for (let i = 0; i < 50; i++) {
      records = (await journal()).filter((e) => e.phase === phase.id && String(e.type).startsWith("net."));
      if (records.some((e) => e.type === "net.close")) break;
      await new Promise((res) => setTimeout(res, 100));
    }
    const redisConnect = records.find((e) => e.type === "net.connect" && e.service === "questdb-http");
    expect(redisConnect).toMatchObject({ decision: "allow", rule: "net.service.questdb-http", port: 9000 });
    expect(String(redisConnect!.clause)).toMatch(/^SKILLS\.md /);
    const close = records.find((e) => e.type === "net.close" && e.service === "questdb-http");
    expect(close).toMatchObject({ bytesIn: out.sent, bytesOut: out.sent, error: null });
    expect(typeof close!.durationMs).toBe("number");
    // recorded by the conntrack watch with the service's own rule and reason
    let pg: Record<string, unknown> | undefined;
    for (let i = 0; i < 50 && !pg; i++) {
      pg = (await journal()).find((e) => e.phase === phase.id && e.type === "net.connect" && e.service === "postgres");
      if (!pg) await new Promise((res) => setTimeout(res, 100));
    }
    expect(pg).toMatchObject({ decision: "forbid", rule: "db.test-database-only", address: "127.0.0.1", port: 5432 });
    expect(String(pg!.reason)).toMatch(/nothing listens for it.*DATABASE_URL_TEST is not set/);
    // the refusal comes before the connection would have been made
    expect(records.indexOf(redisConnect!)).toBeLessThan(records.indexOf(close!));

    await t.api.request("DELETE", `/v1/phases/${phase.id}`);
    const logText = await readFile(phase.buildLog, "utf8");
    expect(logText).toMatch(/\[NET\] \[CONNECT\] \[questdb-http 127\.0\.0\.1:9000\] \[ALLOW net\.service\.questdb-http/);
    expect(logText).toMatch(/\[NET\] \[CLOSE\] \[questdb-http 127\.0\.0\.1:9000\] \[in=204800 out=204800 /);
    expect(logText).toMatch(/\[NET\] \[CONNECT\] \[postgres 127\.0\.0\.1:5432\] \[FORBID db\.test-database-only/);
    const all = (await readFile(path.join(t.stateDir, "audit.jsonl"), "utf8")) + logText;
    expect(all).not.toContain(SECRET);
  });

  it("keeps the tunnel socket private to the run dir (0600) and gone after the phase", async () => {
    const project = await makeProject();
    cleanup.push(project);
    const { phase } = await t.api.request<{ phase: PhaseView }>("POST", "/v1/phases", { project, phase: "net2", mode: "backtest" });
    const { stat } = await import("node:fs/promises");
    const sock = path.join(t.stateDir, "phases", phase.id, "run", "tunnel.sock");
    expect((await stat(sock)).mode & 0o777).toBe(0o600);
    // a wrong token is refused and recorded
    const c = net.createConnection({ path: sock });
    await new Promise<void>((res) => c.once("connect", () => res()));
    c.write(JSON.stringify({ token: "0".repeat(64), service: "redis", port: 6379 }) + "\n");
    await new Promise<void>((res) => c.once("close", () => res()));
    let refused: Record<string, unknown> | undefined;
    for (let i = 0; i < 50 && !refused; i++) {
      refused = (await journal()).find((e) => e.phase === phase.id && e.type === "net.connect" && e.rule === "net.tunnel-auth");
      if (!refused) await new Promise((res) => setTimeout(res, 100));
    }
    expect(refused).toMatchObject({ decision: "forbid", reason: "tunnel header carried a wrong token" });
    await t.api.request("DELETE", `/v1/phases/${phase.id}`);
    await expect(stat(sock)).rejects.toThrow();
  });
});

const PG_PROBE = `
import json, os, subprocess
import psycopg2
out = {"env": os.environ.get("DATABASE_URL_TEST"), "env_prod": os.environ.get("DATABASE_URL")}
p = subprocess.run(["psql", os.environ["DATABASE_URL_TEST"] if os.environ.get("SANDBOXD_MODE") != "paper" else os.environ["DATABASE_URL"],
                    "-XAt", "-c", "select count(*) from orders"], capture_output=True, text=True, timeout=30)
out["psql"] = {"code": p.returncode, "out": p.stdout.strip(), "err": p.stderr.strip()}
conn = psycopg2.connect(os.environ["DATABASE_URL"])
conn.autocommit = True
cur = conn.cursor()
cur.execute("select current_database()")
out["db"] = cur.fetchone()[0]
try:
    cur.execute("insert into orders (symbol, side, qty, price, status) values ('X', 'buy', 1, 1, 'new')")
    out["insert"] = "ok %d" % cur.rowcount
except Exception as e:
    out["insert"] = "refused: %s" % str(e).splitlines()[0]
conn.close()
print(json.dumps(out))
`;

describe("PostgreSQL through the tunnel and the SQL gateway", () => {
  let db: TestPostgres;
  beforeAll(async () => {
    db = await startPostgres();
  });
  afterAll(async () => {
    await db?.stop();
  });

  async function pgProject(): Promise<string> {
    const project = await makeProject();
    cleanup.push(project);
    const gw = `${db.gateway.user}:${encodeURIComponent(db.gateway.password)}@127.0.0.1:${db.port}`;
    await writeFile(path.join(project, ".env"), `DATABASE_URL=postgresql://${gw}/trading\nDATABASE_URL_TEST=postgresql://${gw}/trading_test\n`);
    await chown(path.join(project, ".env"), OWNER.uid, OWNER.gid);
    return project;
  }

  it("test mode: psql \"$DATABASE_URL_TEST\" counts the test database's orders; writes go to the test database", async () => {
    const project = await pgProject();
    const expected = (await db.psql("select count(*) from orders", "trading_test")).trim();
    const prodBefore = (await db.psql("select count(*) from orders", "trading")).trim();
    const { phase } = await t.api.request<{ phase: PhaseView }>("POST", "/v1/phases", { project, phase: "pg", mode: "test" });
    const r = await exec(phase, ["python3", await writeScript(project, PG_PROBE)]);
    expect(r.stderr).toBe("");
    const out = JSON.parse(r.stdout) as Record<string, any>;
    expect(out.env).toBe("postgresql://sandbox@127.0.0.1:5432/trading_test");
    expect(out.env_prod).toBe("postgresql://sandbox@127.0.0.1:5432/trading_test");
    expect(out.psql).toEqual({ code: 0, out: expected, err: "" });
    expect(out.db).toBe("trading_test");
    expect(out.insert).toBe("ok 1");
    expect((await db.psql("select count(*) from orders", "trading_test")).trim()).toBe(String(Number(expected) + 1));
    expect((await db.psql("select count(*) from orders", "trading")).trim()).toBe(prodBefore);
    await t.api.request("DELETE", `/v1/phases/${phase.id}`);
    const log = await readFile(phase.buildLog, "utf8");
    expect(log).toMatch(/\[NET\] \[CONNECT\] \[postgres 127\.0\.0\.1:5432\] \[ALLOW net\.service\.postgres .* via gateway\]/);
    expect(log).toMatch(/DB_QUERY \[PostgreSQL\]: select count\(\*\) from orders/);
    expect(log).toMatch(/\[NET\] \[CLOSE\] \[postgres 127\.0\.0\.1:5432\] \[in=\d+ out=\d+ /);
    expect(log).not.toContain(db.gateway.password);
  });

  it("SKILLS.md §3 maximum query timeout: a 40 s pg_sleep (lifted by the daemon's policy for this test) is cancelled at 30 s", async () => {
    // default.yaml, with pg_sleep lifted from the gateway's denied functions
    const base = await readFile(path.join(ROOT, "policies", "default.yaml"), "utf8");
    const lifted = base.replace(/(functions: \[pg_read_file[^\]]*\])/, "$1\n    allow: [pg_sleep]");
    expect(lifted).not.toBe(base);
    const dir = await tempDir("sleep-policy");
    cleanup.push(dir);
    await writeFile(path.join(dir, "policy.yaml"), lifted);
    const sleepy = await startTestDaemon({ policy: path.join(dir, "policy.yaml") });
    try {
      const project = await pgProject();
      const { phase } = await sleepy.api.request<{ phase: PhaseView }>("POST", "/v1/phases", { project, phase: "sleep", mode: "test" });
      const script = await writeScript(
        project,
        [
          "import json, os, time, psycopg2",
          "conn = psycopg2.connect(os.environ['DATABASE_URL_TEST'])",
          "conn.autocommit = True",
          "cur = conn.cursor()",
          "t0 = time.monotonic()",
          "try:",
          "    cur.execute('select pg_sleep(40)')",
          "    out = {'result': 'completed'}",
          "except psycopg2.Error as e:",
          "    out = {'result': 'error', 'sqlstate': e.pgcode, 'message': str(e).splitlines()[0]}",
          "out['secs'] = time.monotonic() - t0",
          "cur.execute('select 1')",
          "out['after'] = cur.fetchone()[0]",
          "print(json.dumps(out))",
        ].join("\n"),
      );
      const r = (await sleepy.api.request<{ result: ExecResult }>("POST", `/v1/phases/${phase.id}/exec`, { argv: ["python3", script] })).result;
      expect(r.stderr).toBe("");
      const out = JSON.parse(r.stdout) as { result: string; sqlstate: string; message: string; secs: number; after: number };
      expect(out).toMatchObject({ result: "error", sqlstate: "57014", after: 1 }); // query_canceled; the connection stays usable
      expect(out.message).toMatch(/statement timeout/);
      expect(out.secs).toBeGreaterThanOrEqual(29.5);
      expect(out.secs).toBeLessThan(33);
      // SKILLS.md Database Errors, max 1 attempt: the phase escalates when the script that met the error ends
      expect(r.escalation?.category).toBe("database");
      await sleepy.api.request("DELETE", `/v1/phases/${phase.id}`);
      const log = await readFile(phase.buildLog, "utf8");
      expect(log).toMatch(/DB_QUERY \[PostgreSQL\]: select pg_sleep\(40\)/);
      expect(log).toMatch(/DB_ERROR: .*statement timeout/);
    } finally {
      await sleepy.close();
    }
  }, 120_000);

  it("QuestDB's PostgreSQL wire (8812) goes through the gateway's QuestDB gate (PostgreSQL stands in for QuestDB)", async () => {
    const project = await makeProject();
    cleanup.push(project);
    const gw = `${db.gateway.user}:${encodeURIComponent(db.gateway.password)}@127.0.0.1:${db.port}`;
    await writeFile(path.join(project, ".env"), `QUESTDB_URL_TEST=postgresql://${gw}/trading_test\n`);
    await chown(path.join(project, ".env"), OWNER.uid, OWNER.gid);
    const expected = (await db.psql("select count(*) from orders", "trading_test")).trim();
    const { phase } = await t.api.request<{ phase: PhaseView }>("POST", "/v1/phases", { project, phase: "qdb", mode: "test" });
    const script = await writeScript(
      project,
      [
        "import json, os, psycopg2",
        "conn = psycopg2.connect(os.environ['QUESTDB_URL_TEST'])",
        "conn.autocommit = True",
        "cur = conn.cursor()",
        "cur.execute('select count(*) from orders')",
        "print(json.dumps({'url': os.environ['QUESTDB_URL_TEST'], 'count': cur.fetchone()[0]}))",
      ].join("\n"),
    );
    const r = await exec(phase, ["python3", script]);
    expect(r.stderr).toBe("");
    expect(JSON.parse(r.stdout)).toEqual({ url: "postgresql://sandboxd_gw@127.0.0.1:8812/trading_test", count: Number(expected) });
    await t.api.request("DELETE", `/v1/phases/${phase.id}`);
    const log = await readFile(phase.buildLog, "utf8");
    expect(log).toMatch(/\[NET\] \[CONNECT\] \[questdb-pg 127\.0\.0\.1:8812\] \[ALLOW net\.service\.questdb-pg .* via gateway\]/);
    expect(log).toMatch(/DB_QUERY \[QuestDB\]: select count\(\*\) from orders/);
  });

  it("paper mode: production, read-only outside paper_ tables", async () => {
    const project = await pgProject();
    const expected = (await db.psql("select count(*) from orders", "trading")).trim();
    const { phase } = await t.api.request<{ phase: PhaseView }>("POST", "/v1/phases", { project, phase: "pg", mode: "paper" });
    const r = await exec(phase, ["python3", await writeScript(project, PG_PROBE)]);
    expect(r.stderr).toBe("");
    const out = JSON.parse(r.stdout) as Record<string, any>;
    expect(out.env_prod).toBe("postgresql://sandbox@127.0.0.1:5432/trading");
    expect(out.psql).toEqual({ code: 0, out: expected, err: "" });
    expect(out.db).toBe("trading");
    expect(out.insert).toMatch(/^refused: /);
    expect((await db.psql("select count(*) from orders", "trading")).trim()).toBe(expected);
    await t.api.request("DELETE", `/v1/phases/${phase.id}`);
  });
});

/** conntrack processes in the network namespace of `pid` (the daemon's watch of that phase). */
async function conntrackWatchers(pid: number): Promise<number> {
  const ns = await readlink(`/proc/${pid}/ns/net`);
  let n = 0;
  for (const p of await readdir("/proc")) {
    if (!/^\d+$/.test(p)) continue;
    try {
      if ((await readFile(`/proc/${p}/comm`, "utf8")).trim() === "conntrack" && (await readlink(`/proc/${p}/ns/net`)) === ns) n++;
    } catch {
      // gone meanwhile
    }
  }
  return n;
}

describe("tunnels across a daemon crash", () => {
  it("a re-adopted phase gets its tunnels back: new tunnel socket, listeners kept by the shim", async () => {
    const stateDir = await tempDir("tun-crash");
    const socket = path.join(stateDir, "sandboxd.sock");
    let daemon = await spawnDaemon(stateDir, socket, { policy: rawPolicy });
    const api = new ApiClient(socket);
    const project = await makeProject();
    cleanup.push(project);
    try {
      // a raw tunnel (QuestDB's HTTP port) to the echo server
      await writeFile(path.join(project, ".env"), `QUESTDB_URL_TEST=http://127.0.0.1:${echoPort}\n`);
      await chown(path.join(project, ".env"), OWNER.uid, OWNER.gid);
      const { phase } = await api.request<{ phase: PhaseView }>("POST", "/v1/phases", { project, phase: "crash", mode: "backtest" });
      const script = await writeScript(
        project,
        [
          "import socket",
          "s = socket.create_connection(('127.0.0.1', 9000), timeout=5)",
          "s.sendall(b'PING\\r\\n')",
          "got = b''",
          "while len(got) < 6:",
          "    c = s.recv(100)",
          "    if not c: break",
          "    got += c",
          "print(got.decode().strip())",
        ].join("\n"),
      );
      const run = async () => (await api.request<{ result: ExecResult }>("POST", `/v1/phases/${phase.id}/exec`, { argv: ["python3", script] })).result;
      expect((await run()).stdout).toBe("PING\n");

      const containerPid = (await docker.getContainer((await containersOf(stateDir))[0]!.Id).inspect()).State.Pid;
      expect(await conntrackWatchers(containerPid)).toBe(1);
      daemon.child.kill("SIGKILL");
      await waitExit(daemon.child);
      // the killed daemon's conntrack watch died with it
      for (let i = 0; i < 20 && (await conntrackWatchers(containerPid)) > 0; i++) await new Promise((r) => setTimeout(r, 50));
      expect(await conntrackWatchers(containerPid)).toBe(0);
      daemon = await spawnDaemon(stateDir, socket, { policy: rawPolicy });
      expect(daemon.output()).toMatch(/re-adopted/);
      expect(await conntrackWatchers(containerPid)).toBe(1);
      const after = await run();
      expect(after.stderr).toBe("");
      expect(after.stdout).toBe("PING\n");
      // the re-adopted phase's refused connections are still recorded (a new conntrack watch)
      const stray = await writeScript(project, "import socket\ntry:\n    socket.create_connection(('10.1.2.3', 4321), timeout=5)\nexcept ConnectionRefusedError:\n    print('refused')");
      expect((await api.request<{ result: ExecResult }>("POST", `/v1/phases/${phase.id}/exec`, { argv: ["python3", stray] })).result.stdout).toBe("refused\n");
      let text = "";
      for (let i = 0; i < 50 && !text.includes('"address":"10.1.2.3"'); i++) {
        await new Promise((r) => setTimeout(r, 100));
        text = await readFile(path.join(stateDir, "audit.jsonl"), "utf8");
      }
      const mine = text.split("\n").filter((l) => l.includes(phase.id));
      expect(mine.filter((l) => l.includes('"type":"net.connect"') && l.includes('"service":"questdb-http"'))).toHaveLength(2);
      expect(mine.filter((l) => l.includes('"type":"net.confine"') && l.includes('"recorded":true'))).toHaveLength(2); // start, re-adoption
      expect(mine.some((l) => l.includes('"rule":"net.unlisted-destination"') && l.includes('"address":"10.1.2.3"') && l.includes('"port":4321'))).toBe(true);
      await api.request("DELETE", `/v1/phases/${phase.id}`);
    } finally {
      if (daemon.child.exitCode === null) {
        daemon.child.kill("SIGTERM");
        await waitExit(daemon.child).catch(() => undefined);
      }
      for (const c of await containersOf(stateDir).catch(() => [])) await docker.getContainer(c.Id).remove({ force: true }).catch(() => undefined);
      await removeDir(stateDir);
    }
  });
});

describe("Redis through the tunnel, against a real redis-server", () => {
  const RESP = `
import json, socket, sys, time
def cmd(*args):
    out = b"*%d\\r\\n" % len(args)
    for a in args:
        a = a.encode()
        out += b"$%d\\r\\n%s\\r\\n" % (len(a), a)
    return out
def reply(f):
    line = f.readline()
    if line[:1] == b"$":
        n = int(line[1:])
        return line.decode() + (f.read(n + 2).decode() if n >= 0 else "")
    return line.decode()
deadline = time.monotonic() + 5
while True:
    try:
        s = socket.create_connection(("127.0.0.1", 6379), timeout=5)
        break
    except OSError:
        if time.monotonic() > deadline: raise
        time.sleep(0.05)
f = s.makefile("rb")
cmds = json.loads(sys.argv[1])
s.sendall(b"".join(cmd(*c) for c in cmds))
print(json.dumps([reply(f) for _ in cmds]))
`;

  /** A phase whose Redis for its mode (REDIS_URL_TEST outside paper mode) is `redis`; `cmds` pipelined from inside it over one connection; the replies in order. */
  async function sendFromSandbox(redis: TestRedis, mode: "test" | "paper", cmds: string[][]): Promise<{ phase: PhaseView; replies: string[] }> {
    const project = await makeProject();
    cleanup.push(project);
    await writeFile(path.join(project, ".env"), `${mode === "paper" ? "REDIS_URL" : "REDIS_URL_TEST"}=redis://127.0.0.1:${redis.port}/0\n`);
    await chown(path.join(project, ".env"), OWNER.uid, OWNER.gid);
    const { phase } = await t.api.request<{ phase: PhaseView }>("POST", "/v1/phases", { project, phase: `redis-${mode}`, mode });
    const script = await writeScript(project, RESP);
    const r = (await t.api.request<{ result: ExecResult }>("POST", `/v1/phases/${phase.id}/exec`, { argv: ["python3", script, JSON.stringify(cmds)] })).result;
    expect(r.stderr).toBe("");
    return { phase, replies: JSON.parse(r.stdout) as string[] };
  }

  it("test mode: reads and writes work, FLUSHALL and CONFIG are refused, and the data survives (checked with redis-cli)", async () => {
    const redis = await startRedis();
    try {
      await redis.cli("SET", "keep", "me");
      const { phase, replies } = await sendFromSandbox(redis, "test", [
        ["SET", "a", "1"], ["FLUSHALL"], ["CONFIG", "SET", "maxmemory", "1"], ["FLUSHDB"], ["GET", "a"], ["GET", "keep"], ["DBSIZE"],
      ]);
      expect(replies[0]).toBe("+OK\r\n");
      expect(replies[1]).toMatch(/^-ERR sandboxd refused FLUSHALL \(rule redis\.denied/);
      expect(replies[2]).toMatch(/^-ERR sandboxd refused CONFIG/);
      expect(replies[3]).toMatch(/^-ERR sandboxd refused FLUSHDB/);
      expect(replies.slice(4)).toEqual(["$1\r\n1\r\n", "$2\r\nme\r\n", ":2\r\n"]);
      // from outside: nothing was flushed, the setting is unchanged
      expect(await redis.cli("DBSIZE")).toBe("2");
      expect(await redis.cli("GET", "keep")).toBe("me");
      expect(await redis.cli("CONFIG", "GET", "maxmemory")).toBe("maxmemory\n0");
      // each refusal is on record, with the command and the rule
      let refusal: Record<string, unknown> | undefined;
      for (let i = 0; i < 50 && !refusal; i++) {
        refusal = (await journal()).find((e) => e.phase === phase.id && e.type === "redis.refused" && e.command === "FLUSHALL");
        if (!refusal) await new Promise((res) => setTimeout(res, 100));
      }
      expect(refusal).toMatchObject({ command: "FLUSHALL", rule: "redis.denied", service: "redis", port: 6379 });
      await t.api.request("DELETE", `/v1/phases/${phase.id}`);
    } finally {
      await redis.stop();
    }
  });

  it("paper mode: reads work, writes are refused, the key is unchanged", async () => {
    const redis = await startRedis();
    try {
      await redis.cli("SET", "price", "100");
      const { phase, replies } = await sendFromSandbox(redis, "paper", [["GET", "price"], ["SET", "price", "1"], ["DEL", "price"], ["INCR", "price"], ["GET", "price"]]);
      expect(replies[0]).toBe("$3\r\n100\r\n");
      for (const i of [1, 2, 3]) expect(replies[i]).toMatch(/^-ERR sandboxd refused /);
      expect(replies[4]).toBe("$3\r\n100\r\n");
      expect(await redis.cli("GET", "price")).toBe("100");
      await t.api.request("DELETE", `/v1/phases/${phase.id}`);
    } finally {
      await redis.stop();
    }
  });

  it("a backtest phase without REDIS_URL_TEST is refused (nothing listens) and recorded with the reason; production Redis is untouched", async () => {
    const redis = await startRedis();
    try {
      await redis.cli("SET", "price", "100");
      const project = await makeProject();
      cleanup.push(project);
      // production only: a backtest must not fall back to it
      await writeFile(path.join(project, ".env"), `REDIS_URL=redis://127.0.0.1:${redis.port}/0\n`);
      await chown(path.join(project, ".env"), OWNER.uid, OWNER.gid);
      const { phase } = await t.api.request<{ phase: PhaseView }>("POST", "/v1/phases", { project, phase: "redis-bt", mode: "backtest" });
      const script = await writeScript(
        project,
        "import os, subprocess\nfor argv in (['SET', 'price', '1'], ['DEL', 'price']):\n    p = subprocess.run(['redis-cli', '-u', os.environ['REDIS_URL']] + argv, capture_output=True, text=True)\n    print((p.stdout + p.stderr).strip())",
      );
      const r = (await t.api.request<{ result: ExecResult }>("POST", `/v1/phases/${phase.id}/exec`, { argv: ["python3", script] })).result;
      const lines = r.stdout.trim().split("\n");
      expect(lines).toHaveLength(2);
      for (const l of lines) expect(l).toMatch(/Could not connect to Redis at 127\.0\.0\.1:6379: Connection refused/);
      expect(await redis.cli("GET", "price")).toBe("100");
      expect(await redis.cli("DBSIZE")).toBe("1");
      let refused: Array<Record<string, unknown>> = [];
      for (let i = 0; i < 50 && refused.length < 2; i++) {
        refused = (await journal()).filter((e) => e.phase === phase.id && e.type === "net.connect" && e.service === "redis");
        if (refused.length < 2) await new Promise((res) => setTimeout(res, 100));
      }
      // one per attempt (redis-cli may try more than once)
      expect(refused.length).toBeGreaterThanOrEqual(2);
      for (const e of refused) {
        expect(e).toMatchObject({ decision: "forbid", rule: "redis.test-instance-only", address: "127.0.0.1", port: 6379 });
        expect(String(e.reason)).toMatch(/nothing listens for it.*REDIS_URL_TEST is not set.*REDIS_URL, production, is never used/);
      }
      await t.api.request("DELETE", `/v1/phases/${phase.id}`);
    } finally {
      await redis.stop();
    }
  });
});
