#!/usr/bin/env node
/**
 * The database gateway's throughput beside a direct connection, in one run:
 * `pgbench -S` (select-only) with 1 and 8 clients, simple and extended
 * protocol, straight to PostgreSQL and through `handleClient`
 * (dist/db/gateway.js) and through a plain relay, interleaved (the order
 * rotates every round); and the added latency of a tunnelled Redis round trip.
 *
 *   node bench/gateway.mjs           prints a table, then the JSON document
 *                                    (also written to bench/results/gateway.json)
 *
 * Setup: a throwaway PostgreSQL cluster (initdb in a temp dir, as the
 * `postgres` system user when root, like test/helpers/postgres.ts;
 * fsync=off), `pgbench -i -s 1` as the superuser, a login role for the
 * gateway with SELECT on the pgbench tables. The gateway runs in its own Node
 * process (this file with --serve), as in the daemon: a TCP server on
 * 127.0.0.1 handing each connection to handleClient with mode "test" and a
 * cheap in-memory `record`. Direct runs use the same role over TCP.
 *
 * Target: gateway TPS ≥ 0.75 × direct TPS at 8 clients (each protocol).
 * Reference in every round: a plain Node relay (pipe both ways, no protocol),
 * so the gateway's cost can be told from the cost of any user-space hop on
 * this machine. Each run also reports the CPU it cost per transaction (the
 * whole machine's, and the proxy process's own) and the proxy's involuntary
 * context switches.
 * Info rows (8 clients, extended) with durable record sinks: a file appended
 * and fdatasync'ed per record call; the same file with group commit
 * (recordMany); the daemon's own PhaseRecorder (hash-chained journal + build
 * log). When the target is missed, the gateway process is run once more with
 * --cpu-prof and its self time is summarised.
 *
 * Redis (BENCH_GW_ONLY=redis to run it alone): redis-benchmark -P 1 -c 1
 * (PING_MBULK, GET, SET; BENCH_REDIS_N requests each, default 20000) against
 * a redis-server on the host: straight, from a plain container on the host
 * network, and from inside a phase through the tunnel and the RESP filter.
 * Needs redis-server and redis-benchmark (bench/all.sh installs them as root
 * via scripts/ensure-test-tools.sh; this file installs nothing and says when
 * they are missing), root and the Docker image.
 *
 * Everything started (cluster, gateway processes, pgbench, redis-server, the
 * daemon and its phase) is stopped at the end, on failure, on SIGINT/SIGTERM
 * and by a watchdog (BENCH_GW_TIMEOUT_S, default 900). BENCH_GW_SECONDS
 * (default 10) sets pgbench -T; BENCH_GW_ROUNDS (default 2) the rounds;
 * BENCH_GW_ONLY=pg,redis the parts; BENCH_GW_INFO=0 skips the info rows;
 * BENCH_GW_CLIENTS=8 (default 1,8) the client counts;
 * BENCH_GW_BEFORE=<dist/ of an earlier build> adds that build's gateway as a
 * fourth side of every round (a change measured against what it replaced:
 * target ≥ 0.95×). Exit 1 if the target is missed or the
 * bench failed.
 */
import { execFile, execFileSync, spawn } from "node:child_process";
import { randomBytes } from "node:crypto";
import fs from "node:fs";
import { chown, mkdtemp, readdir, readFile, rm, writeFile } from "node:fs/promises";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";
import { promisify } from "node:util";
import { Cleanup, procContextSwitches, procCpuSeconds, systemBusySeconds } from "./lib.mjs";

const ROOT = fileURLToPath(new URL("..", import.meta.url));
const GATEWAY_JS = path.join(ROOT, "dist", "db", "gateway.js");
const run = promisify(execFile);
const say = (s) => process.stderr.write(`bench/gateway: ${s}\n`);

const SECONDS = Number(process.env.BENCH_GW_SECONDS ?? 10);
const ROUNDS = Number(process.env.BENCH_GW_ROUNDS ?? 2);
const TIMEOUT_S = Number(process.env.BENCH_GW_TIMEOUT_S ?? 900);
const TARGET = 0.75;
const BEFORE_DIST = process.env.BENCH_GW_BEFORE ? path.resolve(process.env.BENCH_GW_BEFORE) : undefined;
const BEFORE_TARGET = 0.95; // a change to the gateway keeps ≥ 95 % of the throughput of the build it replaces
const GATEWAY_ROLE = "sandboxd_gw";
const SUPERUSER = "sbx_super";
const DB = "bench";

/* ============================ gateway server ============================ */
// node bench/gateway.mjs --serve  (config in BENCH_GW_SERVE as JSON)
// prints "LISTEN <port>" on stdout; exits 0 on SIGTERM (so --cpu-prof is written)

async function serve() {
  const cfg = JSON.parse(process.env.BENCH_GW_SERVE);
  const { handleClient } = await import(pathToFileURL(cfg.gatewayJs ?? GATEWAY_JS).href);
  let records = 0;
  let record;
  let recordMany;
  if (cfg.relay) {
    // the reference: a plain Node relay, no protocol at all (pipe both ways)
    const server = net.createServer((socket) => {
      socket.setNoDelay(true);
      const up = net.connect({ host: cfg.upstream.host, port: cfg.upstream.port });
      up.setNoDelay(true);
      socket.pipe(up).on("error", () => socket.destroy());
      up.pipe(socket).on("error", () => up.destroy());
      socket.on("error", () => up.destroy());
      up.on("error", () => socket.destroy());
    });
    server.listen(0, "127.0.0.1", () => process.stdout.write(`LISTEN ${server.address().port}\n`));
    process.on("SIGTERM", () => process.exit(0));
    return;
  }
  if (cfg.sink === "recorder") {
    // the daemon's own sink: PhaseRecorder over the hash-chained journal (group commit) and build_audit.log
    const dist = (p) => pathToFileURL(path.join(ROOT, "dist", p)).href;
    const { AuditJournal } = await import(dist("audit/journal.js"));
    const { BuildLog } = await import(dist("audit/buildlog.js"));
    const { Redactor } = await import(dist("audit/redact.js"));
    const { PhaseRecorder } = await import(dist("phases/recorder.js"));
    const { systemClock } = await import(dist("util/clock.js"));
    fs.mkdirSync(cfg.recordDir, { recursive: true });
    const journal = await AuditJournal.open(cfg.recordDir, { clock: systemClock });
    const build = new BuildLog(path.join(cfg.recordDir, "build_audit.log"));
    const rec = new PhaseRecorder("bench", journal, build, new Redactor([]));
    record = async (event, lines) => {
      records++;
      await rec.record(event, lines);
    };
    recordMany = async (entries) => {
      records += entries.length;
      await rec.recordMany(entries);
    };
  } else if (cfg.recordFile) {
    const fd = fs.openSync(cfg.recordFile, fs.constants.O_WRONLY | fs.constants.O_APPEND | fs.constants.O_CREAT, 0o600);
    let tail = Promise.resolve();
    record = (event, lines) => {
      records++;
      const buf = Buffer.from(lines.join("\n") + "\n");
      const next = tail.then(
        () =>
          new Promise((resolve, reject) =>
            fs.write(fd, buf, 0, buf.length, null, (err) => (err ? reject(err) : fs.fdatasync(fd, (e) => (e ? reject(e) : resolve()))))),
      );
      tail = next.catch(() => undefined);
      return next;
    };
    if (cfg.sink === "file-group") {
      // the same file with group commit: every batch that arrives while a write + fdatasync is in
      // flight (other connections' chunks) goes out together in the next one
      record = undefined;
      let next;
      let busy = false;
      const flush = () => {
        if (!next || busy) return;
        const group = next;
        next = undefined;
        busy = true;
        const buf = Buffer.from(group.lines.join("\n") + "\n");
        fs.write(fd, buf, 0, buf.length, null, (err) => {
          const done = (e) => {
            busy = false;
            if (e) group.reject(e);
            else group.resolve();
            flush();
          };
          if (err) return done(err);
          fs.fdatasync(fd, done);
        });
      };
      recordMany = (entries) => {
        records += entries.length;
        if (!next) {
          next = { lines: [] };
          next.done = new Promise((resolve, reject) => Object.assign(next, { resolve, reject }));
          if (!busy) queueMicrotask(flush);
        }
        for (const e of entries) next.lines.push(...e.lines);
        return next.done;
      };
    }
  } else {
    // a cheap sink: count, keep nothing
    record = async () => {
      records++;
    };
  }
  const server = net.createServer((socket) => {
    void handleClient(socket, {
      engine: "postgres",
      mode: "test",
      upstream: cfg.upstream,
      record: record ?? ((event, lines) => recordMany([{ event, lines }])),
      ...(recordMany ? { recordMany } : {}),
    });
  });
  server.listen(0, "127.0.0.1", () => process.stdout.write(`LISTEN ${server.address().port}\n`));
  process.on("SIGTERM", () => {
    process.stdout.write(`RECORDS ${records}\n`);
    process.exit(0);
  });
}

/* ================================ bench ================================= */

const cleanup = new Cleanup();
const results = {
  benchmark: "gateway",
  started: new Date().toISOString(),
  host: { cpus: os.cpus().length, node: process.version },
  seconds: SECONDS,
  rounds: ROUNDS,
  target: { ratio8: TARGET },
  configs: [],
  info: [],
  redis: null,
  profile: null,
};

function findBin(name) {
  try {
    return execFileSync("which", [name], { encoding: "utf8" }).trim();
  } catch {
    for (const v of ["17", "16", "15", "14"]) {
      const p = `/usr/lib/postgresql/${v}/bin/${name}`;
      if (fs.existsSync(p)) return p;
    }
    return null;
  }
}
function pgBin(name) {
  // server programs (initdb, pg_ctl) are not on PATH on Debian
  for (const v of ["17", "16", "15", "14"]) {
    const p = `/usr/lib/postgresql/${v}/bin/${name}`;
    if (fs.existsSync(p)) return p;
  }
  return findBin(name) ?? name;
}

async function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.unref();
    srv.on("error", reject);
    srv.listen(0, "127.0.0.1", () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

async function clusterOwner() {
  if (process.getuid() !== 0) return { uid: process.getuid(), gid: process.getgid(), prefix: [] };
  const ids = () => {
    try {
      return {
        uid: Number(execFileSync("id", ["-u", "postgres"], { encoding: "utf8" })),
        gid: Number(execFileSync("id", ["-g", "postgres"], { encoding: "utf8" })),
      };
    } catch {
      return undefined;
    }
  };
  let who = ids();
  if (!who) {
    await run("useradd", ["--system", "--user-group", "--no-create-home", "--shell", "/usr/sbin/nologin", "postgres"]).catch(() => undefined);
    who = ids();
    if (!who) throw new Error("cannot create the postgres system user for initdb");
  }
  return { ...who, prefix: ["runuser", "-u", "postgres", "--"] };
}

async function startCluster(tmp) {
  const owner = await clusterOwner();
  const dir = path.join(tmp, "pg");
  fs.mkdirSync(dir);
  const data = path.join(dir, "data");
  const password = randomBytes(12).toString("hex");
  const gwPassword = randomBytes(12).toString("hex");
  const pwfile = path.join(dir, "pwfile");
  await writeFile(pwfile, `${password}\n`, { mode: 0o600 });
  await chown(tmp, owner.uid, owner.gid);
  await chown(dir, owner.uid, owner.gid);
  await chown(pwfile, owner.uid, owner.gid);
  const asOwner = (cmd, args) => {
    const [bin, ...rest] = [...owner.prefix, pgBin(cmd), ...args];
    return run(bin, rest, { cwd: dir, env: { ...process.env, LC_ALL: "C", LANG: "C" } });
  };
  await asOwner("initdb", [
    "-D", data, "-U", SUPERUSER, `--pwfile=${pwfile}`, "--auth-local=trust", "--auth-host=scram-sha-256",
    "--encoding=UTF8", "--locale=C", "--no-sync",
  ]);
  let port = 0;
  for (let attempt = 0; ; attempt++) {
    port = await freePort();
    try {
      await asOwner("pg_ctl", [
        "-D", data, "-w", "-t", "60", "-l", path.join(dir, "postgres.log"), "-o",
        `-p ${port} -k ${dir} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=50`,
        "start",
      ]);
      break;
    } catch (e) {
      if (attempt >= 3) throw e;
    }
  }
  cleanup.push("stop the PostgreSQL cluster", () => asOwner("pg_ctl", ["-D", data, "-m", "immediate", "-w", "stop"]));
  const psql = (sql, db = "postgres") =>
    run(findBin("psql") ?? pgBin("psql"), ["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-h", dir, "-p", String(port), "-U", SUPERUSER, "-d", db, "-c", sql]);
  await psql(`CREATE ROLE ${GATEWAY_ROLE} LOGIN PASSWORD '${gwPassword}'`);
  await psql(`CREATE DATABASE ${DB}`);
  return { port, socketDir: dir, psql, gateway: { user: GATEWAY_ROLE, password: gwPassword } };
}

/** The gateway in its own Node process; resolves with its port and a stop() that reports the records count. */
async function startGateway(tmp, upstream, { recordFile, recordDir, sink, relay, cpuProfDir, gatewayJs } = {}) {
  const args = [...(cpuProfDir ? ["--cpu-prof", `--cpu-prof-dir=${cpuProfDir}`] : []), fileURLToPath(import.meta.url), "--serve"];
  const child = spawn(process.execPath, args, {
    stdio: ["ignore", "pipe", "inherit"],
    env: { ...process.env, BENCH_GW_SERVE: JSON.stringify({ upstream, recordFile, recordDir, sink, relay, gatewayJs }) },
  });
  let out = "";
  child.stdout.on("data", (c) => (out += c));
  const exited = new Promise((resolve) => child.once("close", resolve));
  const release = cleanup.push("stop a gateway process", async () => {
    child.kill("SIGKILL");
    await exited;
  });
  const port = await new Promise((resolve, reject) => {
    const t = setTimeout(() => reject(new Error("the gateway process did not listen within 15 s")), 15_000);
    child.stdout.on("data", () => {
      const m = /LISTEN (\d+)/.exec(out);
      if (m) {
        clearTimeout(t);
        resolve(Number(m[1]));
      }
    });
    child.once("close", (code) => reject(new Error(`the gateway process exited (${code}) before listening`)));
  });
  return {
    port,
    pid: child.pid,
    async stop() {
      child.kill("SIGTERM");
      await Promise.race([exited, new Promise((r) => setTimeout(r, 10_000))]);
      if (child.exitCode === null) child.kill("SIGKILL");
      await exited;
      release();
      const m = /RECORDS (\d+)/.exec(out);
      return { records: m ? Number(m[1]) : null };
    },
  };
}

const running = new Set();
function pgbench(pgbenchBin, args, env) {
  return new Promise((resolve, reject) => {
    const child = spawn(pgbenchBin, args, { stdio: ["ignore", "pipe", "pipe"], env: { ...process.env, ...env } });
    running.add(child);
    let out = "";
    child.stdout.on("data", (c) => (out += c));
    child.stderr.on("data", (c) => (out += c));
    const t = setTimeout(() => child.kill("SIGKILL"), (SECONDS + 60) * 1000);
    child.once("close", (code) => {
      clearTimeout(t);
      running.delete(child);
      if (code !== 0) return reject(new Error(`pgbench ${args.join(" ")} exited ${code}:\n${out.slice(-2000)}`));
      resolve(out);
    });
  });
}
cleanup.push("kill pgbench", async () => {
  for (const c of running) c.kill("SIGKILL");
});

function parseTps(out) {
  const m = /tps = ([\d.]+) \(without initial connection time\)/.exec(out);
  if (!m) throw new Error(`no "tps = … (without initial connection time)" in pgbench output:\n${out.slice(-1500)}`);
  const lat = /latency average = ([\d.]+) ms/.exec(out);
  return { tps: Number(m[1]), latencyMs: lat ? Number(lat[1]) : null };
}

const median = (xs) => {
  const s = [...xs].sort((a, b) => a - b);
  const n = s.length;
  return n % 2 ? s[(n - 1) / 2] : (s[n / 2 - 1] + s[n / 2]) / 2;
};

/** Self time per function and per area from a .cpuprofile. */
function summariseProfile(prof) {
  const byId = new Map(prof.nodes.map((n) => [n.id, n]));
  const self = new Map();
  for (let i = 0; i < prof.samples.length; i++) {
    const id = prof.samples[i];
    self.set(id, (self.get(id) ?? 0) + (prof.timeDeltas[i] ?? 0));
  }
  let total = 0;
  const fns = new Map();
  const areas = new Map();
  for (const [id, us] of self) {
    const { callFrame: cf } = byId.get(id);
    const file = cf.url ? cf.url.replace(/^file:\/\//, "").replace(ROOT, "") : "";
    const name = `${cf.functionName || "(anonymous)"} ${file ? `${path.basename(file)}:${cf.lineNumber + 1}` : ""}`.trim();
    if (cf.functionName === "(idle)") continue;
    total += us;
    fns.set(name, (fns.get(name) ?? 0) + us);
    const area = cf.functionName === "(garbage collector)"
      ? "garbage collection"
      : cf.functionName === "(program)"
        ? "(program: native, not attributed)"
        : /dist\/db\/gateway\.js/.test(file)
          ? "gateway.js (framing, relay, records)"
          : /dist\/db\/classify\.js/.test(file)
            ? "classify.js (JS side of classification)"
            : /libpg-query|wasm/.test(file)
              ? "libpg-query (parser, wasm)"
              : /bench\/gateway\.mjs/.test(file)
                ? "bench record sink"
                : /^node:|^internal|^$/.test(cf.url) || cf.url.startsWith("node:")
                  ? cf.url === "" ? "native / runtime (no url)" : "Node core (net, streams, buffers)"
                  : path.basename(file);
    areas.set(area, (areas.get(area) ?? 0) + us);
  }
  const pct = (us) => Number(((100 * us) / total).toFixed(1));
  return {
    busyMs: Math.round(total / 1000),
    areas: [...areas].sort((a, b) => b[1] - a[1]).map(([area, us]) => ({ area, pct: pct(us) })),
    top: [...fns].sort((a, b) => b[1] - a[1]).slice(0, 20).map(([fn, us]) => ({ fn, pct: pct(us) })),
  };
}

async function main() {
  if (!fs.existsSync(GATEWAY_JS)) throw new Error(`${GATEWAY_JS} is missing: run npm run --silent build`);
  const srcM = Math.max(...fs.readdirSync(path.join(ROOT, "src", "db")).map((f) => fs.statSync(path.join(ROOT, "src", "db", f)).mtimeMs));
  if (fs.statSync(GATEWAY_JS).mtimeMs < srcM) {
    say("dist/db is older than src/db: npm run --silent build");
    execFileSync("npm", ["run", "--silent", "build"], { cwd: ROOT, stdio: ["ignore", "ignore", "inherit"] });
  }
  const only = (process.env.BENCH_GW_ONLY ?? "pg,redis").split(",").map((x) => x.trim());
  if (only.includes("pg")) await benchPg();
  else results.pass = true;
  if (only.includes("redis")) {
    const tmp = await mkdtemp(path.join(os.tmpdir(), "sbx-redis-bench-"));
    cleanup.push("remove the Redis bench's temp dir", () => rm(tmp, { recursive: true, force: true }));
    await benchRedis(tmp);
  }
}

async function benchPg() {
  const pgbenchBin = findBin("pgbench");
  if (!pgbenchBin) throw new Error("pgbench not found (PATH, /usr/lib/postgresql/*/bin)");
  results.pgbench = (await run(pgbenchBin, ["--version"])).stdout.trim();

  const tmp = await mkdtemp(path.join(os.tmpdir(), "sbx-gw-bench-"));
  cleanup.push("remove temp dir", () => rm(tmp, { recursive: true, force: true }));

  say("starting a throwaway PostgreSQL cluster");
  const pg = await startCluster(tmp);
  results.postgres = (await pg.psql("SHOW server_version")).stdout.trim();
  say("pgbench -i -s 1");
  await run(pgbenchBin, ["-i", "-s", "1", "-q", "-h", pg.socketDir, "-p", String(pg.port), "-U", SUPERUSER, DB]);
  await pg.psql(
    `GRANT CONNECT ON DATABASE ${DB} TO ${GATEWAY_ROLE}; GRANT USAGE ON SCHEMA public TO ${GATEWAY_ROLE};` +
      ` GRANT SELECT ON pgbench_accounts, pgbench_branches, pgbench_tellers, pgbench_history TO ${GATEWAY_ROLE};`,
    DB,
  );
  const upstream = { host: "127.0.0.1", port: pg.port, user: pg.gateway.user, password: pg.gateway.password, database: DB };

  const gw = await startGateway(tmp, upstream);
  const relay = await startGateway(tmp, upstream, { relay: true });
  // BENCH_GW_BEFORE=<a dist/ directory of an earlier build>: that build's gateway is a fourth side of
  // every round ("before"), so a change to the gateway is measured against what it replaced, same run
  const before = BEFORE_DIST ? await startGateway(tmp, upstream, { gatewayJs: path.join(BEFORE_DIST, "db", "gateway.js") }) : undefined;
  const env = { PGPASSWORD: pg.gateway.password, PGSSLMODE: "disable", PGCONNECT_TIMEOUT: "10" };
  const bench = (port, c, j, mode, seconds = SECONDS) =>
    pgbench(pgbenchBin, ["-n", "-S", "-T", String(seconds), "-c", String(c), "-j", String(j), "-M", mode, "-h", "127.0.0.1", "-p", String(port), "-U", GATEWAY_ROLE, DB], env).then(parseTps);

  // warm-up: every path, short (the gateway's first connection loads the SQL parser)
  say("warm-up");
  await bench(pg.port, 8, 2, "extended", 2);
  await bench(relay.port, 8, 2, "extended", 2);
  await bench(gw.port, 8, 2, "extended", 2);
  if (before) await bench(before.port, 8, 2, "extended", 2);

  /** one pgbench run through `via`, with the CPU it cost (machine, and the proxy process's own) */
  const measured = async (via, k, seconds = SECONDS) => {
    const proxy = via === "gateway" ? gw : via === "relay" ? relay : via === "before" ? before : via.proxy;
    const cpu0 = proxy ? procCpuSeconds(proxy.pid) : NaN;
    const cs0 = proxy ? procContextSwitches(proxy.pid) : undefined;
    const busy0 = systemBusySeconds();
    const s = await bench(via === "direct" ? pg.port : proxy.port, k.clients, k.threads, k.mode, seconds);
    const tx = s.tps * seconds;
    s.machineCpuUsPerTx = Math.round(((systemBusySeconds() - busy0) * 1e6) / tx);
    if (proxy) {
      const cs1 = procContextSwitches(proxy.pid);
      s.proxyCpuUsPerTxExact = ((procCpuSeconds(proxy.pid) - cpu0) * 1e6) / tx;
      s.proxyCpuUsPerTx = Math.round(s.proxyCpuUsPerTxExact);
      s.proxyInvoluntarySwitchesPerTx = Number(((cs1.involuntary - cs0.involuntary) / tx).toFixed(3));
    }
    return s;
  };

  const SIDES = before ? ["direct", "relay", "gateway", "before"] : ["direct", "relay", "gateway"];
  const configs = [];
  const clientCounts = (process.env.BENCH_GW_CLIENTS ?? "1,8").split(",").map(Number);
  for (const c of clientCounts) for (const mode of ["simple", "extended"]) configs.push({ clients: c, threads: c === 1 ? 1 : 2, mode });
  const samples = new Map(configs.map((k) => [k, { direct: [], relay: [], gateway: [], before: [] }]));
  for (let r = 0; r < ROUNDS; r++) {
    for (const k of configs) {
      // the order rotates every round, so no side always runs first
      for (let i = 0; i < SIDES.length; i++) {
        const side = SIDES[(i + r) % SIDES.length];
        const s = await measured(side, k);
        samples.get(k)[side].push(s);
        say(
          `round ${r + 1} ${side.padEnd(7)} -c ${k.clients} -j ${k.threads} -M ${k.mode}: ${s.tps.toFixed(0)} tps, machine ${s.machineCpuUsPerTx} µs CPU/tx` +
            (side !== "direct" ? `, ${side} process ${s.proxyCpuUsPerTx} µs CPU/tx, ${s.proxyInvoluntarySwitchesPerTx} involuntary switches/tx` : ""),
        );
      }
    }
  }
  const { records } = await gw.stop();
  await relay.stop();
  if (before) await before.stop();
  results.recordsMemorySink = records;
  if (before) results.before = { dist: BEFORE_DIST, target: BEFORE_TARGET };
  const med = (xs, f) => median(xs.map(f));
  for (const k of configs) {
    const s = samples.get(k);
    const direct = med(s.direct, (x) => x.tps);
    const gateway = med(s.gateway, (x) => x.tps);
    const rel = med(s.relay, (x) => x.tps);
    results.configs.push({
      ...k,
      directTps: Math.round(direct),
      relayTps: Math.round(rel),
      gatewayTps: Math.round(gateway),
      ratio: Number((gateway / direct).toFixed(3)),
      relayRatio: Number((rel / direct).toFixed(3)),
      directLatencyMs: med(s.direct, (x) => x.latencyMs),
      gatewayLatencyMs: med(s.gateway, (x) => x.latencyMs),
      addedLatencyUs: Math.round((med(s.gateway, (x) => x.latencyMs) - med(s.direct, (x) => x.latencyMs)) * 1000),
      samples: Object.fromEntries(SIDES.map((side) => [side, s[side].map((x) => Math.round(x.tps))])),
      machineCpuUsPerTx: Object.fromEntries(SIDES.map((side) => [side, med(s[side], (x) => x.machineCpuUsPerTx)])),
      processCpuUsPerTx: { relay: med(s.relay, (x) => x.proxyCpuUsPerTx), gateway: med(s.gateway, (x) => x.proxyCpuUsPerTx) },
      involuntarySwitchesPerTx: { relay: med(s.relay, (x) => x.proxyInvoluntarySwitchesPerTx), gateway: med(s.gateway, (x) => x.proxyInvoluntarySwitchesPerTx) },
      ...(before
        ? (() => {
            const b = med(s.before, (x) => x.tps);
            return {
              beforeTps: Math.round(b),
              ratioToBefore: Number((gateway / b).toFixed(3)),
              // paired per round: gateway ÷ before measured back to back, then the median
              pairedRatioToBefore: Number(median(s.gateway.map((g, i) => g.tps / s.before[i].tps)).toFixed(3)),
              beforeProcessCpuUsPerTx: med(s.before, (x) => x.proxyCpuUsPerTx),
              // the proxy process's own CPU per transaction, gateway ÷ before, paired per round: the
              // measure a loaded machine disturbs least (tps follows whoever else has the cores)
              cpuRatioToBefore: Number(median(s.gateway.map((g, i) => g.proxyCpuUsPerTxExact / s.before[i].proxyCpuUsPerTxExact)).toFixed(3)),
            };
          })()
        : {}),
      target: k.clients === 8 ? TARGET : null,
      pass: k.clients === 8 ? gateway / direct >= TARGET : null,
    });
  }

  if (process.env.BENCH_GW_INFO === "0") {
    results.pass = results.configs.filter((x) => x.clients === 8).every((x) => x.pass);
    return;
  }
  // info: durable record sinks, 8 clients, extended, against the direct median above
  const k8 = { clients: 8, threads: 2, mode: "extended" };
  const d8 = results.configs.find((x) => x.clients === 8 && x.mode === "extended").directTps;
  const sinks = [
    ["file", "record = append + fdatasync per record call, serialised (file under bench/results)"],
    ["file-group", "recordMany = the same file with group commit: one append + fdatasync for every chunk's batch waiting (all connections)"],
    ["recorder", "recordMany = PhaseRecorder: hash-chained audit journal (group commit, fdatasync) + build_audit.log (fdatasync), as in the daemon"],
  ];
  for (const [sink, what] of sinks) {
    say(`info: record sink ${sink}`);
    const recordFile = path.join(ROOT, "bench", "results", `.gateway-record-${process.pid}.log`);
    const recordDir = path.join(ROOT, "bench", "results", `.gateway-journal-${process.pid}`);
    cleanup.push("remove the record file", () => rm(recordFile, { force: true }));
    cleanup.push("remove the journal dir", () => rm(recordDir, { recursive: true, force: true }));
    const g2 = await startGateway(tmp, upstream, { recordFile, recordDir, sink });
    const g = await measured({ proxy: g2 }, k8);
    const { records: n } = await g2.stop();
    await rm(recordFile, { force: true });
    await rm(recordDir, { recursive: true, force: true });
    results.info.push({
      sink,
      what,
      ...k8,
      directTps: d8,
      gatewayTps: Math.round(g.tps),
      ratio: Number((g.tps / d8).toFixed(3)),
      records: n,
      gatewayCpuUsPerTx: g.proxyCpuUsPerTx,
    });
  }

  // info: the gateway's upstream over PostgreSQL's unix socket (GatewayUpstream.host = the socket
  // directory), against pgbench over the same unix socket and over TCP (above); 8 clients
  {
    const gu = await startGateway(tmp, { ...upstream, host: pg.socketDir, password: "" });
    const benchUnix = (c, j, mode) =>
      pgbench(pgbenchBin, ["-n", "-S", "-T", String(SECONDS), "-c", String(c), "-j", String(j), "-M", mode, "-h", pg.socketDir, "-p", String(pg.port), "-U", GATEWAY_ROLE, DB], env).then(parseTps);
    for (const mode of ["simple", "extended"]) {
      const k = { clients: 8, threads: 2, mode };
      const direct = [];
      const gateway = [];
      for (let r = 0; r < ROUNDS; r++) {
        for (const side of r % 2 ? ["gateway", "direct"] : ["direct", "gateway"]) {
          const s = side === "direct" ? await benchUnix(8, 2, mode) : await measured({ proxy: gu }, k);
          (side === "direct" ? direct : gateway).push(s.tps);
          say(`unix upstream round ${r + 1} ${side} -c 8 -M ${mode}: ${s.tps.toFixed(0)} tps`);
        }
      }
      const dTcp = results.configs.find((x) => x.clients === 8 && x.mode === mode).directTps;
      results.info.push({
        sink: "memory",
        what: "upstream over PostgreSQL's unix socket: pgbench → TCP → gateway → unix socket → PostgreSQL, against pgbench → unix socket → PostgreSQL (ratio) and → TCP (ratioVsTcp)",
        ...k,
        directTps: Math.round(median(direct)),
        gatewayTps: Math.round(median(gateway)),
        ratio: Number((median(gateway) / median(direct)).toFixed(3)),
        directTcpTps: dTcp,
        ratioVsTcp: Number((median(gateway) / dTcp).toFixed(3)),
        samples: { direct: direct.map(Math.round), gateway: gateway.map(Math.round) },
      });
    }
    await gu.stop();
  }

  results.pass = results.configs.filter((x) => x.clients === 8).every((x) => x.pass);

  if (!results.pass) {
    say("target missed: profiling the gateway process (--cpu-prof), 8 clients, extended");
    const profDir = path.join(tmp, "prof");
    fs.mkdirSync(profDir);
    const g3 = await startGateway(tmp, upstream, { cpuProfDir: profDir });
    const s = await bench(g3.port, 8, 2, "extended");
    await g3.stop();
    const file = (await readdir(profDir)).find((f) => f.endsWith(".cpuprofile"));
    if (file) results.profile = { tps: Math.round(s.tps), ...summariseProfile(JSON.parse(await readFile(path.join(profDir, file), "utf8"))) };
  }

}

/* ================================= Redis ================================ */

const REDIS_TESTS = "ping_mbulk,get,set";
const REDIS_N = Number(process.env.BENCH_REDIS_N ?? 20000);
const IMAGE = process.env.SANDBOXD_IMAGE || "sandboxd-sandbox:latest";
const OWNER = { uid: 1000, gid: 1000 };

/** redis-benchmark --csv → { TEST: { rps, avgMs, p50Ms, p95Ms, p99Ms } } */
function parseRedisCsv(text) {
  const out = {};
  for (const line of text.split("\n")) {
    const f = line.trim().replace(/^"|"$/g, "").split('","');
    if (f.length < 8 || f[0] === "test") continue;
    out[f[0]] = { rps: Number(f[1]), avgMs: Number(f[2]), p50Ms: Number(f[4]), p95Ms: Number(f[5]), p99Ms: Number(f[6]) };
  }
  if (!Object.keys(out).length) throw new Error(`no CSV rows in redis-benchmark output:\n${text.slice(-1500)}`);
  return out;
}
const redisArgs = (host, port) => ["-h", host, "-p", String(port), "-P", "1", "-c", "1", "-n", String(REDIS_N), "-t", REDIS_TESTS, "--csv"];

/** The daemon as its own process (as bench/run.mjs starts it), allowed to run redis-benchmark. */
async function startDaemon(tmp) {
  const stateDir = path.join(tmp, "state");
  const socket = path.join(tmp, "sandboxd.sock");
  const logFile = path.join(tmp, "daemon.log");
  const logFd = fs.openSync(logFile, "a");
  const child = spawn(process.execPath, [path.join(ROOT, "dist", "cli", "main.js"), "--socket", socket, "start", "--state-dir", stateDir], {
    stdio: ["ignore", logFd, logFd],
    env: {
      ...process.env,
      SANDBOXD_LOG_LEVEL: process.env.SANDBOXD_LOG_LEVEL || "info",
      SANDBOXD_IMAGE: IMAGE,
      // redis-benchmark is not on the SKILLS.md whitelist; the operator allows it for the bench
      SANDBOXD_EXTRA_ALLOW: "redis-benchmark",
    },
  });
  fs.closeSync(logFd);
  const exited = new Promise((resolve) => child.once("exit", resolve));
  const logTail = () => {
    try {
      return fs.readFileSync(logFile, "utf8").trimEnd().split("\n").slice(-20).join("\n");
    } catch {
      return "(no daemon log)";
    }
  };
  cleanup.push("stop the daemon (SIGTERM)", async () => {
    if (child.exitCode !== null || child.signalCode !== null) return;
    child.kill("SIGTERM");
    const r = await Promise.race([exited.then(() => true), new Promise((res) => setTimeout(() => res(false), 45_000))]);
    if (!r) {
      child.kill("SIGKILL");
      await exited;
    }
  });
  const { ApiClient } = await import(pathToFileURL(path.join(ROOT, "dist", "cli", "client.js")).href);
  const api = new ApiClient(socket);
  const deadline = Date.now() + 60_000;
  for (;;) {
    if (child.exitCode !== null) throw new Error(`daemon exited with ${child.exitCode}:\n${logTail()}`);
    try {
      await api.request("GET", "/v1/health");
      break;
    } catch {
      if (Date.now() > deadline) throw new Error(`daemon did not answer within 60 s:\n${logTail()}`);
      await new Promise((r) => setTimeout(r, 100));
    }
  }
  const instance = fs.readFileSync(path.join(stateDir, "instance"), "utf8").trim();
  return { api, instance, logTail, pid: child.pid };
}

/**
 * Added latency per Redis round trip through the tunnel: redis-benchmark
 * (-P 1 -c 1, PING_MBULK/GET/SET) straight to a redis-server on the host, in
 * a plain container on the host network (same binary as in the sandbox, no
 * tunnel), and inside a phase container through the shim's listener, the
 * run-dir socket, the daemon's tunnel server and the RESP command filter.
 * Interleaved, same run.
 */
async function benchRedis(tmp) {
  const rs = findBin("redis-server");
  const rb = findBin("redis-benchmark");
  if (!rs || !rb) {
    results.redis = {
      measured: false,
      note: "redis-server/redis-benchmark are not installed: not measured (bench/all.sh installs them as root with scripts/ensure-test-tools.sh; or apt-get install redis-server)",
    };
    return;
  }
  if (process.getuid() !== 0) {
    results.redis = { measured: false, note: "the tunnel leg needs root (a project owned by uid 1000 and the Docker engine): not measured" };
    return;
  }
  try {
    execFileSync("docker", ["image", "inspect", "--format", "{{.Id}}", IMAGE], { stdio: ["ignore", "pipe", "pipe"] });
  } catch {
    results.redis = { measured: false, note: `Docker engine unreachable or image ${IMAGE} missing (npm run bench sets both up): not measured` };
    return;
  }
  const port = await freePort();
  say(`redis: redis-server on 127.0.0.1:${port}`);
  const server = spawn(rs, ["--port", String(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--daemonize", "no", "--protected-mode", "no"], {
    stdio: ["ignore", "ignore", "inherit"],
  });
  const serverExited = new Promise((r) => server.once("close", r));
  cleanup.push("stop redis-server", async () => {
    server.kill("SIGKILL");
    await serverExited;
  });
  for (let i = 0; ; i++) {
    const ok = await new Promise((resolve) => {
      const s = net.connect({ host: "127.0.0.1", port }, () => {
        s.destroy();
        resolve(true);
      });
      s.on("error", () => resolve(false));
    });
    if (ok) break;
    if (i > 100) throw new Error("redis-server did not listen within 10 s");
    await new Promise((r) => setTimeout(r, 100));
  }

  const project = path.join(tmp, "redis-project");
  fs.mkdirSync(project);
  await writeFile(path.join(project, "README.md"), "sandboxd redis bench project\n");
  // a test-mode phase reaches REDIS_URL_TEST only (never production)
  await writeFile(path.join(project, ".env"), `REDIS_URL_TEST=redis://127.0.0.1:${port}/0\n`);
  for (const f of ["README.md", ".env", "."]) await chown(path.join(project, f), OWNER.uid, OWNER.gid);
  fs.chmodSync(tmp, 0o755);

  say("redis: starting the daemon and a phase");
  const d = await startDaemon(tmp);
  cleanup.push("remove the daemon's containers", async () => {
    const ids = execFileSync("docker", ["ps", "-aq", "--filter", `label=sandboxd.instance=${d.instance}`], { encoding: "utf8" }).split(/\s+/).filter(Boolean);
    if (ids.length) execFileSync("docker", ["rm", "-f", ...ids], { stdio: "ignore" });
  });
  const { phase } = await d.api.request("POST", "/v1/phases", { project, phase: "bench-redis", mode: "test" });
  cleanup.push("stop the redis phase", () => d.api.request("DELETE", `/v1/phases/${phase.id}`).catch(() => undefined));

  const direct = async () => parseRedisCsv((await run(rb, redisArgs("127.0.0.1", port), { maxBuffer: 1 << 20 })).stdout);
  const container = async () =>
    parseRedisCsv(
      (await run("docker", ["run", "--rm", "--network", "host", "--entrypoint", "redis-benchmark", IMAGE, ...redisArgs("127.0.0.1", port)], { maxBuffer: 1 << 20 })).stdout,
    );
  // the in-container shim (the child of the container's tini) is the tunnel's other user-space hop
  let shimPid = NaN;
  try {
    const init = execFileSync("docker", ["inspect", "--format", "{{.State.Pid}}", phase.containerId], { encoding: "utf8" }).trim();
    shimPid = Number(fs.readFileSync(`/proc/${init}/task/${init}/children`, "utf8").trim().split(/\s+/)[0]);
  } catch {
    /* not measured */
  }
  const tunnelCpu = [];
  const shimCpu = [];
  const tunnel = async () => {
    const cpu0 = procCpuSeconds(d.pid);
    const shim0 = procCpuSeconds(shimPid);
    const { result } = await d.api.request("POST", `/v1/phases/${phase.id}/exec`, { argv: ["redis-benchmark", ...redisArgs("127.0.0.1", 6379)], timeoutMs: 60_000 });
    if (result.exitCode !== 0) throw new Error(`redis-benchmark in the phase exited ${result.exitCode}: ${result.stderr}\n${d.logTail()}`);
    // the daemon's CPU per round trip (tunnel server + RESP filter; the exec itself is a few ms of it)
    tunnelCpu.push(((procCpuSeconds(d.pid) - cpu0) * 1e6) / (REDIS_N * REDIS_TESTS.split(",").length));
    shimCpu.push(((procCpuSeconds(shimPid) - shim0) * 1e6) / (REDIS_N * REDIS_TESTS.split(",").length));
    return parseRedisCsv(result.stdout);
  };
  say("redis: warm-up");
  await direct();
  await container();
  for (let i = 0; ; i++) {
    try {
      await tunnel();
      break;
    } catch (e) {
      if (i >= 5) throw e;
      await new Promise((r) => setTimeout(r, 500));
    }
  }
  const legs = { direct, container, tunnel };
  const samples = { direct: [], container: [], tunnel: [] };
  const names = Object.keys(legs);
  for (let r = 0; r < ROUNDS; r++) {
    for (let i = 0; i < names.length; i++) {
      const leg = names[(i + r) % names.length];
      const s = await legs[leg]();
      samples[leg].push(s);
      say(`redis round ${r + 1} ${leg.padEnd(9)}: ${Object.entries(s).map(([t, v]) => `${t} p50 ${v.p50Ms} ms`).join(", ")}`);
    }
  }
  const tests = Object.keys(samples.direct[0]);
  results.redis = {
    measured: true,
    redisBenchmark: execFileSync(rb, ["--version"], { encoding: "utf8" }).trim(),
    command: `redis-benchmark ${redisArgs("HOST", "PORT").join(" ")}`,
    n: REDIS_N,
    rounds: ROUNDS,
    daemonCpuUsPerRoundTrip: Math.round(median(tunnelCpu.slice(-ROUNDS))),
    shimCpuUsPerRoundTrip: Number.isFinite(median(shimCpu.slice(-ROUNDS))) ? Math.round(median(shimCpu.slice(-ROUNDS))) : null,
    tests: tests.map((t) => {
      const p50 = (leg) => median(samples[leg].map((x) => x[t].p50Ms));
      const rps = (leg) => Math.round(median(samples[leg].map((x) => x[t].rps)));
      return {
        test: t,
        p50Ms: { direct: p50("direct"), container: p50("container"), tunnel: p50("tunnel") },
        rps: { direct: rps("direct"), container: rps("container"), tunnel: rps("tunnel") },
        addedP50Us: { tunnelVsDirect: Math.round((p50("tunnel") - p50("direct")) * 1000), tunnelVsContainer: Math.round((p50("tunnel") - p50("container")) * 1000) },
        samples: Object.fromEntries(names.map((leg) => [leg, samples[leg].map((x) => x[t])])),
      };
    }),
  };
}

function printTable() {
  const lines = [];
  if (results.configs.length) lines.push(`pgbench -S, ${SECONDS} s, median of ${ROUNDS} interleaved rounds (${results.pgbench}; PostgreSQL ${results.postgres}; ${results.host.cpus} CPUs)`);
  if (results.configs.length) lines.push("clients  mode       direct tps  relay tps (ratio)  gateway tps  ratio  +latency µs  gateway µs CPU/tx  verdict");
  for (const x of results.configs) {
    lines.push(
      `${String(x.clients).padStart(7)}  ${x.mode.padEnd(9)}  ${String(x.directTps).padStart(10)}  ${`${x.relayTps} (${x.relayRatio.toFixed(2)})`.padStart(17)}  ${String(x.gatewayTps).padStart(11)}  ${x.ratio.toFixed(2).padStart(5)}  ${String(x.addedLatencyUs).padStart(11)}  ${String(x.processCpuUsPerTx.gateway).padStart(17)}  ${x.pass === null ? "" : x.pass ? `pass (≥ ${TARGET})` : `MISS (< ${TARGET})`}`,
    );
    if (x.beforeTps !== undefined) {
      lines.push(
        `         before: ${x.beforeTps} tps (${x.beforeProcessCpuUsPerTx} µs CPU/tx); gateway ÷ before: tps ${x.ratioToBefore.toFixed(3)} (medians), ${x.pairedRatioToBefore.toFixed(3)} (paired per round); process CPU per tx ${x.cpuRatioToBefore.toFixed(3)} (paired) — ${x.pairedRatioToBefore >= BEFORE_TARGET ? "tps within" : "tps NOT within"} ${Math.round((1 - BEFORE_TARGET) * 100)} %, ${x.cpuRatioToBefore <= 1 / BEFORE_TARGET ? "CPU within" : "CPU NOT within"} ${Math.round((1 - BEFORE_TARGET) * 100)} %`,
      );
    }
  }
  for (const x of results.info) {
    lines.push(
      `info: ${x.what}, -c ${x.clients} -M ${x.mode}: direct ${x.directTps}, gateway ${x.gatewayTps}, ratio ${x.ratio.toFixed(2)}` +
        (x.ratioVsTcp !== undefined ? ` (direct TCP ${x.directTcpTps}, ratio ${x.ratioVsTcp.toFixed(2)})` : ""),
    );
  }
  if (results.profile) {
    lines.push(`gateway profile (-c 8 -M extended, ${results.profile.tps} tps, ${results.profile.busyMs} ms busy), self time by area:`);
    for (const a of results.profile.areas) lines.push(`  ${String(a.pct).padStart(5)} %  ${a.area}`);
    lines.push("  top functions:");
    for (const f of results.profile.top.slice(0, 12)) lines.push(`  ${String(f.pct).padStart(5)} %  ${f.fn}`);
  }
  if (results.redis?.measured) {
    lines.push(`redis (${results.redis.command}, n ${results.redis.n}, median of ${results.redis.rounds}; CPU per tunnelled round trip: daemon ${results.redis.daemonCpuUsPerRoundTrip} µs, shim ${results.redis.shimCpuUsPerRoundTrip} µs): p50 ms direct / container (host net) / tunnel, added by the tunnel`);
    for (const t of results.redis.tests) {
      lines.push(`  ${t.test.padEnd(11)} ${t.p50Ms.direct} / ${t.p50Ms.container} / ${t.p50Ms.tunnel} ms, +${t.addedP50Us.tunnelVsDirect} µs vs direct, +${t.addedP50Us.tunnelVsContainer} µs vs container; rps ${t.rps.direct} / ${t.rps.container} / ${t.rps.tunnel}`);
    }
  } else lines.push(`redis: ${results.redis?.note ?? "not measured"}`);
  process.stdout.write(lines.join("\n") + "\n");
}

let finishing = false;
async function finish(code, why) {
  if (finishing) return;
  finishing = true;
  if (why) {
    results.error = why;
    say(why);
  }
  await cleanup.run();
  results.finished = new Date().toISOString();
  if (results.configs.length || results.redis) printTable();
  process.stdout.write(JSON.stringify(results, null, 2) + "\n");
  fs.mkdirSync(path.join(ROOT, "bench", "results"), { recursive: true });
  fs.writeFileSync(path.join(ROOT, "bench", "results", "gateway.json"), JSON.stringify(results, null, 2) + "\n");
  process.exit(code);
}

if (process.argv.includes("--serve")) {
  await serve();
} else {
  const watchdog = setTimeout(() => finish(1, `watchdog: the bench ran longer than ${TIMEOUT_S} s; stopped`), TIMEOUT_S * 1000);
  process.once("SIGINT", () => finish(130, "interrupted (SIGINT)"));
  process.once("SIGTERM", () => finish(143, "terminated (SIGTERM)"));
  main().then(
    () => {
      clearTimeout(watchdog);
      return finish(results.pass ? 0 : 1);
    },
    (err) => {
      clearTimeout(watchdog);
      return finish(1, `failed: ${err.stack ?? err.message}`);
    },
  );
}
