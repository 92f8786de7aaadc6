/**
 * The daemon process: settings, single-instance check, reconcile, serve the
 * API on the unix socket, stop cleanly on SIGTERM/SIGINT.
 */
import { randomBytes } from "node:crypto";
import { chmod, mkdir, readFile, unlink, writeFile } from "node:fs/promises";
import net from "node:net";
import path from "node:path";
import pino, { type Logger } from "pino";
import { buildApp } from "./api/app.js";
import { AuditJournal } from "./audit/journal.js";
import { LogSecrets, redactingWriter } from "./audit/redact.js";
import { initShellParser, loadPolicy } from "./policy/index.js";
import { ApprovalQueue } from "./approvals/queue.js";
import type { Settings } from "./config/settings.js";
import { SandboxdError } from "./errors.js";
import { PhaseManager } from "./phases/manager.js";
import { DockerRuntime } from "./runtime/docker.js";
import type { ContainerRuntime } from "./runtime/types.js";
import { randomIds, systemClock } from "./util/clock.js";
import { VERSION } from "./version.js";

export interface RunningDaemon {
  close(): Promise<void>;
  /** re-read the policy file; false (and the old policy kept) when it is broken */
  reload(): Promise<boolean>;
  manager: PhaseManager;
  log: Logger;
}

/** Is something answering on this unix socket? */
function socketAlive(socketPath: string): Promise<boolean> {
  return new Promise((resolve) => {
    const s = net.connect(socketPath);
    s.once("connect", () => {
      s.destroy();
      resolve(true);
    });
    s.once("error", () => resolve(false));
  });
}

/** Stable per state dir, so a restarted daemon recognises its own containers. */
async function instanceId(stateDir: string): Promise<string> {
  const file = path.join(stateDir, "instance");
  try {
    const id = (await readFile(file, "utf8")).trim();
    if (/^[0-9a-f]{16}$/.test(id)) return id;
  } catch {
    /* first start */
  }
  const id = randomBytes(8).toString("hex");
  await writeFile(file, id + "\n", { mode: 0o600 });
  return id;
}

export async function startDaemon(
  settings: Settings,
  deps: { runtime?: ContainerRuntime; log?: Logger; logDestination?: { write(line: string): unknown } } = {},
): Promise<RunningDaemon> {
  // Every line of the daemon's log passes the secrets of every live phase
  // (phases register theirs): an error text from a command or a database can
  // carry a .env value into a log line.
  const logSecrets = new LogSecrets();
  const log =
    deps.log ??
    pino(
      { level: settings.logLevel, base: { pid: process.pid } },
      redactingWriter(logSecrets, deps.logDestination ?? pino.destination({ dest: 1, sync: true })),
    );
  await mkdir(settings.stateDir, { recursive: true, mode: 0o700 });
  await mkdir(path.dirname(settings.socket), { recursive: true, mode: 0o700 });

  if (await socketAlive(settings.socket)) {
    throw new SandboxdError("SBX_ERR_DAEMON_RUNNING", `a sandboxd daemon is already serving ${settings.socket}`);
  }
  // Nothing answers: whatever is at the path is a stale socket from a dead daemon.
  await unlink(settings.socket).then(
    () => log.warn({ socket: settings.socket }, "removed a stale socket"),
    () => undefined,
  );

  const runtime = deps.runtime ?? new DockerRuntime();
  await runtime.ping();
  const instance = await instanceId(settings.stateDir);
  // The policy is loaded and validated whole before anything is served; a broken one stops the start.
  await initShellParser();
  let policy = await loadPolicy(settings.policyFile);
  const journal = await AuditJournal.open(settings.stateDir, { clock: systemClock });
  const approvals = await ApprovalQueue.open(settings.stateDir, systemClock);
  const manager = new PhaseManager({
    approvals,
    journal,
    policy: () => policy,
    runtime,
    stateDir: settings.stateDir,
    instance,
    image: settings.image,
    log,
    clock: systemClock,
    ids: randomIds,
    shimConnectTimeoutMs: settings.shimConnectTimeoutMs,
    extraAllow: settings.extraAllow,
    serviceOverrides: settings.serviceOverrides,
    buildLogLocation: settings.buildLog,
    logSecrets,
  });
  const report = await manager.reconcile();
  for (const id of report.readopted) log.info({ phase: id }, "re-adopted running phase");
  for (const r of report.reaped) log.info({ phase: r.id, reason: r.reason }, "cleaned up phase container");
  for (const id of report.lost) log.warn({ phase: id }, "phase's container was gone; marked failed");

  const app = buildApp({
    manager,
    approvals,
    stateDir: settings.stateDir,
    logger: log,
    info: { version: VERSION, instance, pid: process.pid, stateDir: settings.stateDir, socket: settings.socket },
  });
  // The socket is created 0600 (umask) and chmod'ed again: no window where another user can connect.
  const oldMask = process.umask(0o177);
  try {
    await app.listen({ path: settings.socket });
  } finally {
    process.umask(oldMask);
  }
  await chmod(settings.socket, 0o600);
  log.info({ socket: settings.socket, stateDir: settings.stateDir, instance, version: VERSION }, "sandboxd listening");

  /** SIGHUP: re-read the policy; a broken file changes nothing (it never half-applies). */
  const reload = async (): Promise<boolean> => {
    try {
      const next = await loadPolicy(settings.policyFile);
      policy = next;
      await journal.append({ type: "policy.reload", file: settings.policyFile });
      log.info({ policy: settings.policyFile }, "policy reloaded");
      return true;
    } catch (err) {
      log.error({ policy: settings.policyFile, err: (err as Error).message }, "policy reload refused; the previous policy stays in force");
      return false;
    }
  };

  let closing: Promise<void> | null = null;
  const close = () =>
    (closing ??= (async () => {
      log.info("shutting down: stopping phases");
      await manager.shutdown();
      await app.close();
      await journal.close().catch((e: Error) => log.error({ err: e.message }, "closing the audit journal failed"));
      await unlink(settings.socket).catch(() => undefined);
      log.info("stopped");
    })());
  return { close, reload, manager, log };
}
