/**
 * A throwaway PostgreSQL cluster for tests: initdb in a temp folder, started on
 * a free 127.0.0.1 port with its unix socket in that folder, two databases
 * (`trading` = production, `trading_test` = the isolated test database) with
 * the trading tables and a few rows each, and the gateway's own login role.
 *
 * Works as root (CI): initdb refuses root, so the cluster runs as the
 * `postgres` system user, created (useradd --system) if missing. Not root:
 * runs as the current user.
 *
 * Auth: scram-sha-256 on TCP (127.0.0.1), trust on the unix socket (only the
 * test's `psql` uses it).
 */
import { execFile } from "node:child_process";
import { randomBytes } from "node:crypto";
import { chown, mkdtemp, rm, writeFile } from "node:fs/promises";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { promisify } from "node:util";

const run = promisify(execFile);

export interface TestPostgres {
  port: number;
  host: "127.0.0.1";
  /** the cluster's superuser (TCP password auth with `password`) */
  superuser: string;
  password: string;
  /** the gateway's own login role and its password */
  gateway: { user: string; password: string };
  /** the unix socket directory (trust auth) */
  socketDir: string;
  /** postgres://superuser:password@127.0.0.1:port/db */
  url(db: string): string;
  /** Runs SQL as the superuser over the unix socket with psql (-XAt, ON_ERROR_STOP); returns stdout. */
  psql(sql: string, db?: string): Promise<string>;
  stop(): Promise<void>;
}

export const GATEWAY_ROLE = "sandboxd_gw";
const SUPERUSER = "sbx_super";

async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.unref();
    srv.on("error", reject);
    srv.listen(0, "127.0.0.1", () => {
      const addr = srv.address();
      const port = typeof addr === "object" && addr ? addr.port : 0;
      srv.close(() => resolve(port));
    });
  });
}

interface RunAs {
  uid: number;
  gid: number;
  /** prefix argv to run a program as the cluster owner */
  prefix: string[];
}

async function clusterOwner(): Promise<RunAs> {
  if (process.getuid?.() !== 0) return { uid: process.getuid?.() ?? 0, gid: process.getgid?.() ?? 0, prefix: [] };
  const ids = async (): Promise<{ uid: number; gid: number } | undefined> => {
    try {
      const uid = Number((await run("id", ["-u", "postgres"])).stdout.trim());
      const gid = Number((await run("id", ["-g", "postgres"])).stdout.trim());
      return { uid, gid };
    } catch {
      return undefined;
    }
  };
  let who = await ids();
  if (!who) {
    try {
      await run("useradd", ["--system", "--user-group", "--no-create-home", "--shell", "/usr/sbin/nologin", "postgres"]);
    } catch (e) {
      // a concurrent test may have created it
      if (!(await ids())) throw new Error(`cannot create the postgres system user for initdb: ${(e as Error).message}`);
    }
    who = await ids();
    if (!who) throw new Error("the postgres system user is missing after useradd");
  }
  return { ...who, prefix: ["runuser", "-u", "postgres", "--"] };
}

const SCHEMA = `
CREATE TABLE orders (
  id serial PRIMARY KEY, symbol text NOT NULL, side text NOT NULL, qty numeric NOT NULL,
  price numeric NOT NULL, status text NOT NULL, created_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE fills (
  id serial PRIMARY KEY, order_id int NOT NULL REFERENCES orders(id), qty numeric NOT NULL,
  price numeric NOT NULL, "timestamp" timestamptz NOT NULL DEFAULT now());
CREATE TABLE signals (
  id serial PRIMARY KEY, symbol text NOT NULL, value numeric NOT NULL,
  processed boolean NOT NULL DEFAULT false, created_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE positions (
  id serial PRIMARY KEY, symbol text NOT NULL, qty numeric NOT NULL,
  opened_at timestamptz NOT NULL DEFAULT now(), closed_at timestamptz);
CREATE TABLE paper_orders (
  id serial PRIMARY KEY, symbol text NOT NULL, side text NOT NULL, qty numeric NOT NULL,
  price numeric NOT NULL, status text NOT NULL, created_at timestamptz NOT NULL DEFAULT now());
INSERT INTO orders (symbol, side, qty, price, status) VALUES
  ('BTC-USD', 'buy', 0.5, 42000, 'filled'), ('ETH-USD', 'sell', 2, 2500, 'pending'),
  ('BTC-USD', 'sell', 0.25, 43000, 'pending');
INSERT INTO fills (order_id, qty, price) VALUES (1, 0.5, 42000), (2, 1, 2501);
INSERT INTO signals (symbol, value, processed) VALUES
  ('BTC-USD', 0.7, true), ('ETH-USD', -0.2, false), ('SOL-USD', 0.1, false);
INSERT INTO positions (symbol, qty, closed_at) VALUES ('BTC-USD', 0.5, NULL), ('ETH-USD', -1, now());
INSERT INTO paper_orders (symbol, side, qty, price, status) VALUES ('BTC-USD', 'buy', 0.1, 42000, 'pending');
GRANT CONNECT ON DATABASE current_db_placeholder TO ${GATEWAY_ROLE};
GRANT USAGE ON SCHEMA public TO ${GATEWAY_ROLE};
GRANT SELECT ON ALL TABLES IN SCHEMA public TO ${GATEWAY_ROLE};
`;

const PRODUCTION_GRANTS = `
GRANT INSERT, UPDATE, DELETE, TRUNCATE ON paper_orders TO ${GATEWAY_ROLE};
GRANT USAGE, SELECT ON SEQUENCE paper_orders_id_seq TO ${GATEWAY_ROLE};
`;

const TEST_GRANTS = `
GRANT CREATE ON SCHEMA public TO ${GATEWAY_ROLE};
GRANT ALL ON ALL TABLES IN SCHEMA public TO ${GATEWAY_ROLE};
GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO ${GATEWAY_ROLE};
`;

export async function startPostgres(): Promise<TestPostgres> {
  const owner = await clusterOwner();
  const dir = await mkdtemp(path.join(os.tmpdir(), "sbx-pg-"));
  const data = path.join(dir, "data");
  const password = randomBytes(12).toString("hex");
  const gwPassword = randomBytes(12).toString("hex");
  const pwfile = path.join(dir, "pwfile");
  await writeFile(pwfile, `${password}\n`, { mode: 0o600 });
  await chown(dir, owner.uid, owner.gid);
  await chown(pwfile, owner.uid, owner.gid);

  const asOwner = (cmd: string, args: string[]) => {
    const [bin, ...rest] = [...owner.prefix, cmd, ...args];
    return run(bin!, rest, { cwd: dir, env: { ...process.env, LC_ALL: "C", LANG: "C" } });
  };

  let started = false;
  const stop = async (): Promise<void> => {
    if (started) {
      started = false;
      await asOwner("pg_ctl", ["-D", data, "-m", "immediate", "-w", "stop"]).catch(() => undefined);
    }
    await rm(dir, { recursive: true, force: true });
  };

  try {
    await asOwner("initdb", [
      "-D", data, "-U", SUPERUSER, `--pwfile=${pwfile}`, "--auth-local=trust", "--auth-host=scram-sha-256",
      "--encoding=UTF8", "--locale=C", "--no-sync",
    ]);
    let port = 0;
    // a free port can be taken between the probe and the start: retry a few times
    for (let attempt = 0; ; attempt++) {
      port = await freePort();
      try {
        await asOwner("pg_ctl", [
          "-D", data, "-w", "-t", "60", "-l", path.join(dir, "postgres.log"), "-o",
          `-p ${port} -k ${dir} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off`,
          "start",
        ]);
        started = true;
        break;
      } catch (e) {
        if (attempt >= 3) throw e;
      }
    }

    const psql = async (sql: string, db = "postgres"): Promise<string> => {
      const { stdout } = await run(
        "psql",
        ["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-h", dir, "-p", String(port), "-U", SUPERUSER, "-d", db, "-c", sql],
        { env: { ...process.env, PGCONNECT_TIMEOUT: "10" } },
      );
      return stdout;
    };

    await psql(`CREATE ROLE ${GATEWAY_ROLE} LOGIN PASSWORD '${gwPassword}'`);
    await psql("CREATE DATABASE trading");
    await psql("CREATE DATABASE trading_test");
    for (const db of ["trading", "trading_test"]) {
      await psql(SCHEMA.replace("current_db_placeholder", db) + (db === "trading" ? PRODUCTION_GRANTS : TEST_GRANTS), db);
    }

    return {
      port,
      host: "127.0.0.1",
      superuser: SUPERUSER,
      password,
      gateway: { user: GATEWAY_ROLE, password: gwPassword },
      socketDir: dir,
      url: (db: string) => `postgres://${SUPERUSER}:${password}@127.0.0.1:${port}/${db}`,
      psql,
      stop,
    };
  } catch (e) {
    let log = "";
    try {
      log = (await run("tail", ["-n", "30", path.join(dir, "postgres.log")])).stdout;
    } catch {
      /* no log */
    }
    await stop();
    throw new Error(`startPostgres failed: ${(e as Error).message}${log ? `\n--- postgres.log ---\n${log}` : ""}`);
  }
}
