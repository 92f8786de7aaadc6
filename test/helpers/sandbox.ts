/**
 * Test helpers: throwaway projects, a real daemon on a real socket, the real
 * CLI. Nothing here fakes Docker: a test that needs the engine or the image
 * and finds neither fails with a message saying how to set them up.
 */
import { execFile, spawn, type ChildProcess } from "node:child_process";
import { chown, mkdir, mkdtemp, readFile, rename, rm, writeFile } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { promisify } from "node:util";
import { fileURLToPath } from "node:url";
import Docker from "dockerode";
import pino from "pino";
import { ApiClient } from "../../src/cli/client.js";
import { DEFAULT_IMAGE, resolveSettings } from "../../src/config/settings.js";
import { mountsAt } from "../../src/workspace/layer.js";

/**
 * The sandbox image the tests run: SANDBOXD_IMAGE when set (so two checkouts on
 * one engine each test their own shim), else the default tag.
 */
export const TEST_IMAGE = process.env.SANDBOXD_IMAGE || DEFAULT_IMAGE;
/**
 * The warm pool of the tests' daemons: off unless SANDBOXD_POOL_SIZE says
 * otherwise (`SANDBOXD_POOL_SIZE=2 npm test` runs the suite with phases
 * claimed from a pool). Off by default because many tests take "the"
 * container of their daemon, count its containers, or cut a cold start at
 * its steps; test/integration/pool.test.ts and test/e2e/pool-restart.test.ts
 * set their own size.
 */
export const TEST_POOL_SIZE = process.env.SANDBOXD_POOL_SIZE ?? "0";
/**
 * The policy the tests' daemons run when a test names none: policies/default.yaml
 * with smaller disk budgets. The default reserves (fallocate) 2 GiB per phase
 * for its layer and 1 GiB per project for its packages; a suite file that keeps
 * ten phases running reserved 30 GiB, and the suite ran the machine's disk full.
 * A test about the default's own sizes passes DEFAULT_POLICY.
 */
export const DEFAULT_POLICY = fileURLToPath(new URL("../../policies/default.yaml", import.meta.url));
let smallDiskPolicy: Promise<string> | undefined;
export function testPolicy(): Promise<string> {
  smallDiskPolicy ??= (async () => {
    const base = await readFile(DEFAULT_POLICY, "utf8");
    const text = base.replace(/^( {4}layerBytes:) 2GiB/m, "$1 384MiB").replace(/^( {4}packagesBytes:) 1GiB/m, "$1 256MiB");
    if (text === base || !text.includes("layerBytes: 384MiB") || !text.includes("packagesBytes: 256MiB")) {
      throw new Error("test helpers: policies/default.yaml's disk budgets moved; update testPolicy()");
    }
    const dir = fileURLToPath(new URL("../../.state", import.meta.url));
    await mkdir(dir, { recursive: true });
    const file = path.join(dir, "test-policy-small-disk.yaml");
    // written whole, then renamed: other workers may read it meanwhile
    const tmp = `${file}.${process.pid}`;
    await writeFile(tmp, text);
    await rename(tmp, file);
    return file;
  })();
  return smallDiskPolicy;
}
/** What the tests pass as the daemon's environment: the image choice and the pool's size. */
export const TEST_ENV: NodeJS.ProcessEnv = {
  ...(process.env.SANDBOXD_IMAGE ? { SANDBOXD_IMAGE: process.env.SANDBOXD_IMAGE } : {}),
  SANDBOXD_POOL_SIZE: TEST_POOL_SIZE,
};
import { startDaemon, type RunningDaemon } from "../../src/daemon.js";

export const ROOT = fileURLToPath(new URL("../..", import.meta.url));
export const CLI = path.join(ROOT, "dist", "cli", "main.js");
/** The same command line bundled (scripts/bundle.mjs): what bin/sandboxd, the `sandboxd` command, runs. */
export const CLI_BUNDLE = path.join(ROOT, "dist", "cli", "main.cjs");
/** The `sandboxd` command (package.json "bin"), as a user or harness runs it. */
export const CLI_COMMAND = path.join(ROOT, "bin", "sandboxd");
/** The PATH with the Node running the tests first: CLI_COMMAND runs the `node` on the PATH (CI runs the suites under Node 24 too). */
export const PATH_WITH_THIS_NODE = `${path.dirname(process.execPath)}:${process.env.PATH ?? ""}`;
/** `exec`'s native fast path (scripts/build-native.mjs), which CLI_COMMAND runs for the plain form. */
export const CLI_NATIVE = path.join(ROOT, "dist", "native", "sandboxd-exec");
/** The uid:gid that owns test projects (commands run as the project owner). */
export const OWNER = { uid: 1000, gid: 1000 };

export const docker = new Docker();

export async function requireEngineAndImage(): Promise<void> {
  try {
    await docker.ping();
  } catch (err) {
    throw new Error(`no Docker engine reachable (${(err as Error).message}); run \`npm test\`, which starts one`);
  }
  try {
    await docker.getImage(TEST_IMAGE).inspect();
  } catch {
    throw new Error(`sandbox image ${TEST_IMAGE} missing; run \`npm test\` (or \`sandboxd image build\`)`);
  }
}

export async function tempDir(prefix: string): Promise<string> {
  return mkdtemp(path.join(os.tmpdir(), `sbx-${prefix}-`));
}

/** A small Python project owned by OWNER, with one passing and one failing test. */
export async function makeProject(): Promise<string> {
  const dir = await tempDir("proj");
  await mkdir(path.join(dir, "tests"));
  await mkdir(path.join(dir, "services"));
  await writeFile(path.join(dir, "services", "__init__.py"), "");
  // a root conftest.py makes pytest put the project root on sys.path, as trading repos do
  await writeFile(path.join(dir, "conftest.py"), "");
  await writeFile(
    path.join(dir, "services", "calc.py"),
    '"""Tiny module under test."""\n\n\ndef add(a: int, b: int) -> int:\n    return a + b\n',
  );
  await writeFile(
    path.join(dir, "tests", "test_calc.py"),
    "from services.calc import add\n\n\ndef test_add():\n    assert add(2, 3) == 5\n",
  );
  await writeFile(
    path.join(dir, "tests", "test_broken.py"),
    "from services.calc import add\n\n\ndef test_broken():\n    assert add(2, 2) == 5\n",
  );
  await chownTree(dir);
  return dir;
}

async function chownTree(dir: string): Promise<void> {
  await promisify(execFile)("chown", ["-R", `${OWNER.uid}:${OWNER.gid}`, dir]);
  await chown(dir, OWNER.uid, OWNER.gid);
}

/**
 * policies/default.yaml plus the service it leaves out on purpose (QuestDB's
 * HTTP API, a raw pipe an operator may opt into), for the tunnel tests. The
 * network list is the file's last section, so the entry is appended to it.
 */
export async function policyWithRawServices(): Promise<string> {
  const base = await readFile(DEFAULT_POLICY, "utf8");
  const dir = await tempDir("policy");
  const file = path.join(dir, "with-raw-services.yaml");
  await writeFile(
    file,
    `${base.trimEnd()}\n` +
      "    - {id: net.service.questdb-http, name: questdb-http, port: 9000, justification: QuestDB HTTP (test opt-in)}\n",
  );
  return file;
}

let scriptCount = 0;

/**
 * Writes Python code into the project as a script owned by the project's owner
 * and returns its path relative to the project, for `python3 <path>`: the way
 * an agent runs code (the default policy sends inline `python -c` to a human).
 */
export async function writeScript(project: string, code: string): Promise<string> {
  const dir = path.join(project, "sbx_scripts");
  await mkdir(dir, { recursive: true });
  await chown(dir, OWNER.uid, OWNER.gid);
  const rel = path.join("sbx_scripts", `s${process.pid}_${++scriptCount}.py`);
  await writeFile(path.join(project, rel), code + "\n");
  await chown(path.join(project, rel), OWNER.uid, OWNER.gid);
  return rel;
}

export interface TestDaemon {
  daemon: RunningDaemon;
  api: ApiClient;
  stateDir: string;
  socket: string;
  close(): Promise<void>;
}

/** The real daemon, in this process, serving a real unix socket. */
export async function startTestDaemon(opts: { policy?: string; env?: NodeJS.ProcessEnv; logLines?: string[] } = {}): Promise<TestDaemon> {
  const stateDir = await tempDir("state");
  const socket = path.join(stateDir, "sandboxd.sock");
  const removeState = async () => {
    await rm(stateDir, { recursive: true, force: true });
    await rm(testAuditKey(stateDir), { force: true });
    await rm(`${testAuditKey(stateDir)}.heads`, { recursive: true, force: true }); // its witness (src/audit/witness.ts)
  };
  let daemon: RunningDaemon;
  try {
    // env: the daemon's own environment on top of the tests' (SANDBOXD_SERVICE_* overrides …)
    const settings = resolveSettings({ socket, stateDir, policy: opts.policy ?? (await testPolicy()) }, { SANDBOXD_AUDIT_KEY: testAuditKey(stateDir), ...TEST_ENV, ...opts.env });
    // with logLines: the daemon's own log (its scrubbing destination included), one entry per line
    const lines = opts.logLines;
    daemon = await startDaemon(
      settings,
      lines ? { logDestination: { write: (l: string) => lines.push(l) } } : { log: pino({ level: process.env.SANDBOXD_TEST_LOG ?? "silent" }) },
    );
  } catch (err) {
    // settings refused or a start that failed (some tests expect it): nothing of it is left in /tmp
    await removeState();
    throw err;
  }
  return {
    daemon,
    api: new ApiClient(socket),
    stateDir,
    socket,
    close: async () => {
      await daemon.close();
      await removeState();
    },
  };
}

/**
 * The audit signing key of a test daemon: beside its state dir (never inside:
 * settings refuse that), so test daemons do not all share the machine's
 * default key under /etc/sandboxd. The daemon creates it on first start.
 */
export function testAuditKey(stateDir: string): string {
  return `${stateDir}-audit-signing.key`;
}

export interface CliResult {
  code: number | null;
  stdout: string;
  stderr: string;
}

/** Run the real CLI, the `sandboxd` command itself (bin/sandboxd: `exec`'s plain form natively, the rest on Node), and collect its output; `env` on top of the tests'. */
export function cli(args: string[], opts: { socket?: string; timeoutMs?: number; env?: NodeJS.ProcessEnv } = {}): Promise<CliResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(CLI_COMMAND, [...(opts.socket ? ["--socket", opts.socket] : []), ...args], {
      stdio: ["ignore", "pipe", "pipe"],
      env: { ...process.env, PATH: PATH_WITH_THIS_NODE, ...opts.env },
    });
    let stdout = "";
    let stderr = "";
    child.stdout.on("data", (c: Buffer) => (stdout += c.toString()));
    child.stderr.on("data", (c: Buffer) => (stderr += c.toString()));
    const timer = setTimeout(() => child.kill("SIGKILL"), opts.timeoutMs ?? 120_000);
    child.on("error", reject);
    child.on("close", (code) => {
      clearTimeout(timer);
      resolve({ code, stdout, stderr });
    });
  });
}

/** `sandboxd start` as its own process, resolved once the socket answers. */
export async function spawnDaemon(
  stateDir: string,
  socket: string,
  opts: { policy?: string; env?: NodeJS.ProcessEnv } = {},
): Promise<{ child: ChildProcess; output: () => string }> {
  const child = spawn(process.execPath, [CLI, "--socket", socket, "start", "--state-dir", stateDir, "--policy", opts.policy ?? (await testPolicy())], {
    stdio: ["ignore", "pipe", "pipe"],
    env: { ...process.env, SANDBOXD_LOG_LEVEL: "info", SANDBOXD_AUDIT_KEY: testAuditKey(stateDir), SANDBOXD_POOL_SIZE: TEST_POOL_SIZE, ...opts.env },
  });
  let out = "";
  child.stdout!.on("data", (c: Buffer) => (out += c.toString()));
  child.stderr!.on("data", (c: Buffer) => (out += c.toString()));
  const api = new ApiClient(socket);
  const deadline = Date.now() + 60_000;
  for (;;) {
    if (child.exitCode !== null) throw new Error(`daemon exited with ${child.exitCode}: ${out}`);
    try {
      await api.request("GET", "/v1/health");
      return { child, output: () => out };
    } catch {
      if (Date.now() > deadline) throw new Error(`daemon did not answer within 60 s: ${out}`);
      await new Promise((r) => setTimeout(r, 100));
    }
  }
}

export function waitExit(child: ChildProcess, timeoutMs = 60_000): Promise<number | null> {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve(child.exitCode);
  return new Promise((resolve, reject) => {
    const t = setTimeout(() => reject(new Error("process did not exit in time")), timeoutMs);
    child.once("exit", (code) => {
      clearTimeout(t);
      resolve(code);
    });
  });
}

/** Containers labelled with this daemon instance. */
export async function containersOf(stateDir: string): Promise<Docker.ContainerInfo[]> {
  const instance = (await readFile(path.join(stateDir, "instance"), "utf8")).trim();
  return docker.listContainers({ all: true, filters: { label: [`sandboxd.instance=${instance}`] } });
}

export async function removeDir(dir: string): Promise<void> {
  await rm(dir, { recursive: true, force: true });
  await rm(testAuditKey(dir), { force: true });
  await rm(`${testAuditKey(dir)}.heads`, { recursive: true, force: true });
}

/**
 * Python lines for a test command: a classic daemon (fork, setsid, fork
 * again, the middle one exits; the grandchild sleeps 600 s with no stdio),
 * after which `os.read(r, 32)` gives the daemon's pid. Needs `os` and `time`
 * imported.
 */
export const DAEMONIZE_PY = `r, w = os.pipe()
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.close(r)
        os.write(w, str(os.getpid()).encode())
        os.close(w)
        for fd in (0, 1, 2):
            os.close(fd)
        time.sleep(600)
        os._exit(0)
    os._exit(0)
os.close(w)
os.wait()
`;

/** The daemon's audit records (audit.jsonl in `stateDir`), oldest first, each as its event (a record that wraps one is unwrapped). */
export async function auditEvents<T = Record<string, unknown>>(stateDir: string): Promise<T[]> {
  const text = await readFile(path.join(stateDir, "audit.jsonl"), "utf8");
  return text
    .split("\n")
    .filter(Boolean)
    .map((l) => JSON.parse(l) as Record<string, unknown>)
    .map((r) => ((r.event as Record<string, unknown> | undefined) ?? r) as T);
}

/** `f`'s first truthy answer, asked every `pollMs` until `timeoutMs`; else an error naming `what`. */
export async function until<T>(what: string, f: () => Promise<T | null | undefined | false>, timeoutMs = 30_000, pollMs = 50): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await f();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, pollMs));
  }
}

/** Mount points at or below `dir` in this process's mount table. */
export async function mountsBelow(dir: string): Promise<string[]> {
  const info = await readFile("/proc/self/mountinfo", "utf8");
  return info
    .split("\n")
    .map((l) => (l.split(" ")[4] ?? "").replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8))))
    .filter((mp) => mp === dir || mp.startsWith(dir + "/"));
}

/** The block device (major:minor) mounted at `at` in this process's mount table, or null. */
export async function deviceAt(at: string): Promise<string | null> {
  return mountsAt(await readFile("/proc/self/mountinfo", "utf8"), at).at(-1)?.dev ?? null;
}

/**
 * A test daemon, a project holding `code`'s Python scripts (their paths under
 * /workspace, by the same keys) and a running test-mode phase of it.
 */
export async function daemonWithPhase(
  code: Record<string, string>,
  phase: string,
): Promise<{ d: TestDaemon; project: string; phaseId: string; scripts: Record<string, string> }> {
  await requireEngineAndImage();
  const d = await startTestDaemon();
  const project = await makeProject();
  const scripts: Record<string, string> = {};
  for (const [k, v] of Object.entries(code)) scripts[k] = `/workspace/${await writeScript(project, v)}`;
  const { phase: started } = await d.api.request<{ phase: { id: string } }>("POST", "/v1/phases", { project, phase, mode: "test" });
  return { d, project, phaseId: started.id, scripts };
}
