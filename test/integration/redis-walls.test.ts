/**
 * The Redis walls, attacked from inside real sandboxes against real
 * redis-servers that want a login (an ACL user with a password, as an
 * operator runs them): production (`SANDBOXD_SERVICE_REDIS_URL`, database 2)
 * and the test instance (`SANDBOXD_SERVICE_REDIS_URL_TEST`, database 1).
 * The passwords live only in the daemon's environment.
 *
 * Each attack is refused, the data is unchanged as redis-cli sees it from
 * outside, and the refusal is on record; test-mode writes land in the test
 * instance only and are recorded with their keys; the sandbox holds no
 * password anywhere it can read; and when Redis is down or refuses the
 * daemon's login, redis-cli in the sandbox prints the daemon's RESP error.
 */
import { execFile } from "node:child_process";
import { readFile } from "node:fs/promises";
import path from "node:path";
import { promisify } from "node:util";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { ExecResult } from "../../src/phases/manager.js";
import type { PhaseView } from "../../src/phases/types.js";
import { startRedis, type TestRedis } from "../helpers/redis.js";
import { makeProject, removeDir, requireEngineAndImage, startTestDaemon, writeScript, type TestDaemon, auditEvents } from "../helpers/sandbox.js";

const run = promisify(execFile);
const PROD_PW = "Pr0d-redis-Secr3t-9174";
const TEST_PW = "T3st-redis-Secr3t-4288";
let prod: TestRedis;
let testRedis: TestRedis;
let t: TestDaemon;
const cleanup: string[] = [];

beforeAll(async () => {
  await requireEngineAndImage();
  prod = await startRedis({ auth: { user: "sandboxd", password: PROD_PW } });
  testRedis = await startRedis({ auth: { user: "sandboxd_test", password: TEST_PW } });
  t = await startTestDaemon({
    env: {
      SANDBOXD_SERVICE_REDIS_URL: `redis://sandboxd:${PROD_PW}@127.0.0.1:${prod.port}/2`,
      SANDBOXD_SERVICE_REDIS_URL_TEST: `redis://sandboxd_test:${TEST_PW}@127.0.0.1:${testRedis.port}/1`,
    },
  });
}, 120_000);

afterAll(async () => {
  await t?.close();
  await prod?.stop();
  await testRedis?.stop();
  for (const d of cleanup) await removeDir(d);
});

async function journal(): Promise<Array<Record<string, unknown>>> {
  return auditEvents(t.stateDir);
}

/** Waits until `pick` finds records of the phase (net.close is written after both sides closed). */
async function recordsOf(phase: PhaseView, done: (rs: Array<Record<string, unknown>>) => boolean): Promise<Array<Record<string, unknown>>> {
  let rs: Array<Record<string, unknown>> = [];
  for (let i = 0; i < 100; i++) {
    rs = (await journal()).filter((e) => e.phase === phase.id);
    if (done(rs)) return rs;
    await new Promise((r) => setTimeout(r, 100));
  }
  return rs;
}

/**
 * Inside the sandbox: `pipeline` sent raw over one connection to the tunnel
 * (an element {hex} is sent as those bytes), replies read in order; then each
 * `cli` argv run as `redis-cli -u $REDIS_URL …`.
 */
const DRIVER = `
import json, os, socket, subprocess, sys, time
spec = json.loads(sys.argv[1])
def enc(a):
    return bytes.fromhex(a["hex"]) if isinstance(a, dict) else a.encode()
def cmd(args):
    out = b"*%d\\r\\n" % len(args)
    for a in args:
        a = enc(a)
        out += b"$%d\\r\\n%s\\r\\n" % (len(a), a)
    return out
def reply(f):
    line = f.readline()
    t = line[:1]
    if t in (b"$", b"=", b"!"):
        n = int(line[1:])
        return line.decode("latin1") + (f.read(n + 2).decode("latin1") if n >= 0 else "")
    if t in (b"*", b"%", b"~", b">"):
        n = int(line[1:]) * (2 if t == b"%" else 1)
        return line.decode("latin1") + "".join(reply(f) for _ in range(max(n, 0)))
    return line.decode("latin1")
out = {"env": {k: os.environ.get(k) for k in ("REDIS_URL", "REDIS_URL_TEST")}}
if spec.get("pipeline"):
    deadline = time.monotonic() + 5
    while True:
        try:
            s = socket.create_connection(("127.0.0.1", 6379), timeout=10)
            break
        except OSError:
            if time.monotonic() > deadline: raise
            time.sleep(0.05)
    f = s.makefile("rb")
    s.sendall(b"".join(cmd(c) for c in spec["pipeline"]))
    out["replies"] = [reply(f) for _ in spec["pipeline"]]
    s.close()
out["cli"] = []
for argv in spec.get("cli", []):
    p = subprocess.run(["redis-cli", "-u", os.environ["REDIS_URL"]] + argv, capture_output=True, text=True, timeout=30)
    out["cli"].append({"code": p.returncode, "out": p.stdout.strip(), "err": p.stderr.strip()})
print(json.dumps(out))
`;

interface DriverOut {
  env: Record<string, string | null>;
  replies: string[];
  cli: Array<{ code: number; out: string; err: string }>;
}

async function phaseIn(mode: "paper" | "test" | "backtest"): Promise<{ phase: PhaseView; project: string }> {
  const project = await makeProject();
  cleanup.push(project);
  const { phase } = await t.api.request<{ phase: PhaseView }>("POST", "/v1/phases", { project, phase: `redis-${mode}`, mode });
  return { phase, project };
}

async function drive(phase: PhaseView, project: string, spec: { pipeline?: Array<Array<string | { hex: string }>>; cli?: string[][] }): Promise<DriverOut> {
  const script = await writeScript(project, DRIVER);
  const r = (await t.api.request<{ result: ExecResult }>("POST", `/v1/phases/${phase.id}/exec`, { argv: ["python3", script, JSON.stringify(spec)] })).result;
  expect(r.stderr).toBe("");
  return JSON.parse(r.stdout) as DriverOut;
}

const refusedBy = (rule: string, command: string) => new RegExp(`^-ERR sandboxd refused ${command.replace(/ /g, " ")} \\(rule ${rule.replace(".", "\\.")}, SKILLS\\.md [^)]*\\): .+\r\n$`);

describe("Redis walls, from inside real sandboxes", () => {
  it("paper mode: every attack of the review is refused and recorded, production is unchanged, reads work", async () => {
    await prod.cli("-n", "2", "SET", "price", "100");
    await prod.cli("-n", "2", "SET", "other", "evil");
    // a valid DUMP payload of another key: RESTORE … REPLACE would really overwrite `price`
    const dumped = (await run("redis-cli", ["-p", String(prod.port), "--user", "sandboxd", "--pass", PROD_PW, "--no-auth-warning", "-n", "2", "--raw", "DUMP", "other"], { encoding: "buffer" })).stdout;
    const payload = dumped.subarray(0, dumped.length - 1).toString("hex");
    await prod.cli("CONFIG", "SET", "slowlog-log-slower-than", "0");
    await prod.cli("PING");
    const slowBefore = Number(await prod.cli("SLOWLOG", "LEN"));
    expect(slowBefore).toBeGreaterThan(0);

    const { phase, project } = await phaseIn("paper");
    const out = await drive(phase, project, {
      pipeline: [
        ["GET", "price"],
        ["RESTORE", "price", "0", { hex: payload }, "REPLACE"],
        ["CLIENT", "PAUSE", "2000", "ALL"],
        ["PUBLISH", "orders", "buy everything"],
        ["SLOWLOG", "RESET"],
        ["LATENCY", "RESET"],
        ["MEMORY", "PURGE"],
        ["SELECT", "5"],
        ["AUTH", "sandboxd", "a-guess"],
        ["HELLO", "3", "AUTH", "sandboxd", "a-guess"],
        ["SET", "price", "1"],
        ["MULTI"],
        ["GET", "price"],
        ["DEL", "price"],
        ["EXEC"],
        ["CONFIG", "SET", "maxmemory", "1"],
        ["GET", "price"],
        ["PING"],
        // what would stall production for every client (the trading engine's connections)
        ["KEYS", "*"],
        ["SCAN", "0", "COUNT", "100000"],
        ["SCAN", "0", "COUNT", "100"],
      ],
      cli: [["GET", "price"], ["FLUSHALL"], ["DBSIZE"]],
    });
    const r = out.replies;
    expect(r[0]).toBe("$3\r\n100\r\n");
    expect(r[1]).toMatch(refusedBy("redis.denied", "RESTORE"));
    expect(r[2]).toMatch(refusedBy("redis.denied", "CLIENT PAUSE"));
    expect(r[3]).toMatch(refusedBy("redis.read-only", "PUBLISH"));
    expect(r[4]).toMatch(refusedBy("redis.denied", "SLOWLOG RESET"));
    expect(r[5]).toMatch(refusedBy("redis.denied", "LATENCY RESET"));
    expect(r[6]).toMatch(refusedBy("redis.denied", "MEMORY PURGE"));
    expect(r[7]).toMatch(refusedBy("redis.select", "SELECT"));
    expect(r[8]).toMatch(refusedBy("redis.auth", "AUTH"));
    expect(r[9]).toMatch(refusedBy("redis.auth", "HELLO"));
    expect(r[10]).toMatch(refusedBy("redis.read-only", "SET"));
    // a refused command inside MULTI aborts the transaction, as a queueing error does in Redis
    expect(r.slice(11, 15)).toEqual(["+OK\r\n", "+QUEUED\r\n", expect.stringMatching(refusedBy("redis.read-only", "DEL")), "-EXECABORT Transaction discarded because of previous errors.\r\n"]);
    expect(r[15]).toMatch(refusedBy("redis.denied", "CONFIG SET"));
    expect(r.slice(16, 18)).toEqual(["$3\r\n100\r\n", "+PONG\r\n"]);
    expect(r[18]).toMatch(refusedBy("redis.stall", "KEYS"));
    expect(r[19]).toMatch(refusedBy("redis.stall", "SCAN"));
    expect(r[20]).toMatch(/^\*2\r\n\$1\r\n0\r\n\*2\r\n/);
    // redis-cli, with the URL it was given (its database, selected by redis-cli, is the phase's own)
    expect(out.cli[0]).toMatchObject({ code: 0, out: "100" });
    expect(out.cli[1]!.out + out.cli[1]!.err).toMatch(/sandboxd refused FLUSHALL \(rule redis\.denied/);
    expect(out.cli[2]).toMatchObject({ code: 0, out: "2" });
    // both names point at what the tunnel reaches in this mode, with no credentials
    expect(out.env).toEqual({ REDIS_URL: "redis://127.0.0.1:6379/2", REDIS_URL_TEST: "redis://127.0.0.1:6379/2" });

    // from outside: nothing changed, nothing is paused, the diagnostics are intact
    const t0 = Date.now();
    await prod.cli("-n", "2", "SET", "probe", "1");
    expect(Date.now() - t0).toBeLessThan(1500);
    await prod.cli("-n", "2", "DEL", "probe");
    expect(await prod.cli("-n", "2", "GET", "price")).toBe("100");
    expect(await prod.cli("-n", "2", "DBSIZE")).toBe("2");
    expect(await prod.cli("-n", "5", "DBSIZE")).toBe("0");
    expect(await prod.cli("CONFIG", "GET", "maxmemory")).toBe("maxmemory\n0");
    expect(Number(await prod.cli("SLOWLOG", "LEN"))).toBeGreaterThanOrEqual(slowBefore);
    await prod.cli("CONFIG", "SET", "slowlog-log-slower-than", "10000");

    // every refusal is on record, with its rule; the connection's reads are counted
    const rs = await recordsOf(phase, (x) => x.filter((e) => e.type === "net.close" && e.service === "redis").length >= 4);
    const refused = rs.filter((e) => e.type === "redis.refused").map((e) => [e.command, e.rule]);
    for (const want of [
      ["RESTORE", "redis.denied"], ["CLIENT PAUSE", "redis.denied"], ["PUBLISH", "redis.read-only"], ["SLOWLOG RESET", "redis.denied"],
      ["LATENCY RESET", "redis.denied"], ["MEMORY PURGE", "redis.denied"], ["SELECT", "redis.select"], ["AUTH", "redis.auth"],
      ["HELLO", "redis.auth"], ["SET", "redis.read-only"], ["DEL", "redis.read-only"], ["CONFIG SET", "redis.denied"], ["FLUSHALL", "redis.denied"],
      ["KEYS", "redis.stall"], ["SCAN", "redis.stall"],
    ]) expect(refused).toContainEqual(want);
    const close = rs.find((e) => e.type === "net.close" && e.service === "redis" && e.refused === 14);
    expect(close).toMatchObject({ reads: 4, writes: 0, error: null });
    // nothing was written, so nothing is recorded as a write
    expect(rs.filter((e) => e.type === "redis.write")).toEqual([]);
    const log = await readFile(phase.buildLog, "utf8");
    expect(log).toMatch(/\[NET\] \[REDIS\] \[CLIENT PAUSE\] \[FORBID redis\.denied/);
    await t.api.request("DELETE", `/v1/phases/${phase.id}`);
  });

  it("test mode: writes land in the test instance only (REDIS_URL_TEST, its database), each recorded with its keys", async () => {
    const { phase, project } = await phaseIn("test");
    const out = await drive(phase, project, {
      pipeline: [["SELECT", "5"], ["SET", "orders:42", "filled"], ["XADD", "fills", "*", "qty", "3"], ["PUBLISH", "orders", "x"], ["RESTORE", "k", "0", "x", "REPLACE"], ["FLUSHDB"], ["GET", "orders:42"]],
      cli: [["HSET", "position:AAPL", "qty", "10"], ["HGET", "position:AAPL", "qty"]],
    });
    expect(out.env).toEqual({ REDIS_URL: "redis://127.0.0.1:6379/1", REDIS_URL_TEST: "redis://127.0.0.1:6379/1" });
    const r = out.replies;
    expect(r[0]).toMatch(refusedBy("redis.select", "SELECT"));
    expect(r[1]).toBe("+OK\r\n");
    expect(r[2]).toMatch(/^\$\d+\r\n\d+-\d+\r\n$/);
    expect(r[3]).toBe(":0\r\n");
    expect(r[4]).toMatch(refusedBy("redis.denied", "RESTORE"));
    expect(r[5]).toMatch(refusedBy("redis.denied", "FLUSHDB"));
    expect(r[6]).toBe("$6\r\nfilled\r\n");
    expect(out.cli.map((c) => c.out)).toEqual(["1", "10"]);
    // from outside: in the test instance's database 1, nowhere else
    expect(await testRedis.cli("-n", "1", "GET", "orders:42")).toBe("filled");
    expect(await testRedis.cli("-n", "1", "HGET", "position:AAPL", "qty")).toBe("10");
    expect(await testRedis.cli("-n", "5", "DBSIZE")).toBe("0");
    expect(await testRedis.cli("-n", "0", "DBSIZE")).toBe("0");
    for (const db of ["0", "1", "2", "5"]) expect(await prod.cli("-n", db, "EXISTS", "orders:42", "fills", "position:AAPL")).toBe("0");

    // RESP3 (HELLO 3 without AUTH passes): replies stay in order around a refusal, the login is kept
    const resp3 = await drive(phase, project, {
      pipeline: [
        ["HELLO", "3"], ["HGETALL", "position:AAPL"], ["FLUSHALL"], ["ACL", "WHOAMI"], ["CLIENT", "INFO"], ["PING"],
        // a sandbox cannot pass for the trading engine in CLIENT LIST: the names it sets are prefixed
        ["CLIENT", "SETNAME", "trading-engine"], ["CLIENT", "GETNAME"], ["HELLO", "3", "SETNAME", "engine2"], ["CLIENT", "GETNAME"],
      ],
    });
    expect(resp3.replies[0]).toMatch(/^%\d+\r\n/);
    expect(resp3.replies[1]).toBe("%1\r\n$3\r\nqty\r\n$2\r\n10\r\n");
    expect(resp3.replies[2]).toMatch(refusedBy("redis.denied", "FLUSHALL"));
    expect(resp3.replies[3]).toMatch(refusedBy("redis.denied", "ACL WHOAMI"));
    expect(resp3.replies[4]).toMatch(/ db=1 .* user=sandboxd_test .* resp=3/);
    expect(resp3.replies[5]).toBe("+PONG\r\n");
    // the daemon names its connection after the phase
    expect(resp3.replies[4]).toContain(` name=sandboxd-${phase.id} `);
    expect(resp3.replies[6]).toBe("+OK\r\n");
    expect(resp3.replies[7]).toBe("$23\r\nsandboxd-trading-engine\r\n");
    expect(resp3.replies[8]).toMatch(/^%\d+\r\n/);
    expect(resp3.replies[9]).toBe("$16\r\nsandboxd-engine2\r\n");

    const rs = await recordsOf(phase, (x) => x.filter((e) => e.type === "net.close" && e.service === "redis").length >= 4);
    const writes = rs.filter((e) => e.type === "redis.write").map((e) => [e.command, e.keys]);
    expect(writes).toEqual([["SET", ["orders:42"]], ["XADD", ["fills"]], ["PUBLISH", ["orders"]], ["HSET", ["position:AAPL"]]]);
    expect(rs.find((e) => e.type === "redis.write")).toMatchObject({ rule: "redis.write", mode: "test", service: "redis" });
    // the value is never recorded (the command line that ran the script holds it; the Redis records do not)
    expect(JSON.stringify(rs.filter((e) => String(e.type).startsWith("redis.")))).not.toContain("filled");
    expect(rs.find((e) => e.type === "net.close" && e.service === "redis" && e.writes === 3)).toMatchObject({ reads: 1, refused: 3 });
    const log = await readFile(phase.buildLog, "utf8");
    expect(log).toMatch(/\[NET\] \[REDIS\] \[SET orders:42\] \[ALLOW redis\.write/);
    expect(log).toMatch(/\[NET\] \[CLOSE\] \[redis 127\.0\.0\.1:6379\] \[in=\d+ out=\d+ \d+ms reads=1 writes=3 refused=3\]/);
    await t.api.request("DELETE", `/v1/phases/${phase.id}`);
  });

  it("test mode: an argument the verdict depends on cannot hide past the arguments the filter reads (COPY … DB, INFO sections)", async () => {
    const { phase, project } = await phaseIn("test");
    await testRedis.cli("-n", "1", "SET", "orders:7", "live");
    // Redis accepts a repeated REPLACE: 70 of them push DB 5 beyond the 64 arguments the filter keeps
    const copyFar = ["COPY", "orders:7", "stolen", ...Array<string>(70).fill("REPLACE"), "DB", "5"];
    const infoFar = ["INFO", ...Array<string>(70).fill("default"), "commandstats"];
    const out = await drive(phase, project, { pipeline: [copyFar, infoFar, ["COPY", "orders:7", "copy7"], ["PING"]] });
    expect(out.replies[0]).toMatch(refusedBy("redis.unlisted", "COPY"));
    expect(out.replies[1]).toMatch(refusedBy("redis.unlisted", "INFO"));
    expect(out.replies[2]).toBe(":1\r\n");
    expect(out.replies[3]).toBe("+PONG\r\n");
    // from outside: nothing reached database 5; the plain COPY stayed in database 1
    expect(await testRedis.cli("-n", "5", "DBSIZE")).toBe("0");
    expect(await testRedis.cli("-n", "1", "GET", "copy7")).toBe("live");
    const rs = await recordsOf(phase, (x) => x.some((e) => e.type === "net.close" && e.service === "redis"));
    const refusals = rs.filter((e) => e.type === "redis.refused");
    expect(refusals.map((e) => [e.command, e.rule])).toEqual([["COPY", "redis.unlisted"], ["INFO", "redis.unlisted"]]);
    expect(String(refusals[0]!.reason)).toContain("more arguments (74) than the filter reads");
    await t.api.request("DELETE", `/v1/phases/${phase.id}`);
  });

  it("the sandbox holds no Redis password: not in its environment, not in any file it can read, not in the records", async () => {
    const { phase, project } = await phaseIn("backtest");
    const scan = await writeScript(
      project,
      `
import os, sys
# reversed here, so this script is not itself a file holding them
needles = [${JSON.stringify([...PROD_PW].reverse().join(""))}[::-1].encode(), ${JSON.stringify([...TEST_PW].reverse().join(""))}[::-1].encode()]
hits = []
for k, v in os.environ.items():
    if any(n.decode() in v for n in needles): hits.append("env:" + k)
def check(p):
    try:
        with open(p, "rb") as f: data = f.read(4 << 20)
    except OSError:
        return
    if any(n in data for n in needles): hits.append(p)
for pid in os.listdir("/proc"):
    if pid.isdigit():
        for name in ("environ", "cmdline"): check("/proc/%s/%s" % (pid, name))
for top in ("/workspace", "/run", "/tmp", "/etc", "/home", "/root", "/opt", "/var"):
    for d, _, files in os.walk(top):
        for f in files: check(os.path.join(d, f))
print("hits:", hits)
`,
    );
    const r = (await t.api.request<{ result: ExecResult }>("POST", `/v1/phases/${phase.id}/exec`, { argv: ["python3", scan] })).result;
    expect(r.stdout).toBe("hits: []\n");
    // and it did not need one: the daemon logged in
    const out = await drive(phase, project, { cli: [["PING"], ["SET", "bt:run", "1"]] });
    expect(out.cli.map((c) => c.out)).toEqual(["PONG", "OK"]);
    expect(await testRedis.cli("-n", "1", "GET", "bt:run")).toBe("1");
    await t.api.request("DELETE", `/v1/phases/${phase.id}`);
    const all = (await readFile(path.join(t.stateDir, "audit.jsonl"), "utf8")) + (await readFile(phase.buildLog, "utf8"));
    expect(all).not.toContain(PROD_PW);
    expect(all).not.toContain(TEST_PW);
  });

  it("Redis refusing the daemon's login, then down: redis-cli in the sandbox prints the daemon's error, which is recorded", async () => {
    const { phase, project } = await phaseIn("test");
    await testRedis.cli("ACL", "SETUSER", "sandboxd_test", "resetpass", ">rotated-elsewhere");
    const wrong = await drive(phase, project, { cli: [["PING"]] });
    const where = `127.0.0.1:${testRedis.port}`;
    expect(wrong.cli[0]!.out + wrong.cli[0]!.err).toContain(`sandboxd: Redis at ${where} unreachable: login as sandboxd_test failed: WRONGPASS`);
    await testRedis.stop();
    const down = await drive(phase, project, { cli: [["PING"]] });
    expect(down.cli[0]!.out + down.cli[0]!.err).toMatch(new RegExp(`sandboxd: Redis at ${where.replace(/\./g, "\\.")} unreachable: connect ECONNREFUSED`));
    const rs = await recordsOf(phase, (x) => x.filter((e) => e.type === "redis.unreachable").length >= 2);
    const unreachable = rs.filter((e) => e.type === "redis.unreachable");
    expect(unreachable.map((e) => e.reason)).toEqual([expect.stringMatching(/^login as sandboxd_test failed: WRONGPASS/), expect.stringMatching(/^connect ECONNREFUSED/)]);
    expect(unreachable[0]).toMatchObject({ upstream: where, service: "redis", mode: "test" });
    await t.api.request("DELETE", `/v1/phases/${phase.id}`);
  });
});
