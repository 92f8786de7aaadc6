/**
 * The daemon process: settings, single-instance check, reconcile, serve the
 * API on the unix socket, stop cleanly on SIGTERM/SIGINT.
 */
import { createHash, randomBytes } from "node:crypto";
import { chmod, mkdir, readFile, unlink, writeFile } from "node:fs/promises";
import net from "node:net";
import { hostname } from "node:os";
import path from "node:path";
import pino, { type Logger } from "pino";
import { buildApp } from "./api/app.js";
import { prepareExport } from "./audit/bundle.js";
import { ANCHOR_FILE, AuditJournal, parseAnchor } from "./audit/journal.js";
import { loadOrCreateSigningKey } from "./audit/signing.js";
import { verifyJournal, type Checkpoint } from "./audit/verify.js";
import { LogSecrets, redactingWriter } from "./audit/redact.js";
import { initShellParser, loadPolicy, parsePolicy } from "./policy/index.js";
import { parse as parseYaml } from "yaml";
import { GrantStore } from "./approvals/grants.js";
import { makeNotifier } from "./approvals/notify.js";
import { ApprovalQueue } from "./approvals/queue.js";
import type { Settings } from "./config/settings.js";
import { SandboxdError } from "./errors.js";
import { PhaseManager } from "./phases/manager.js";
import { DEFAULT_DRAIN_MS } from "./phases/detach.js";
import { DockerRuntime } from "./runtime/docker.js";
import { favorDynmods } from "./util/dynmods.js";
import type { ContainerRuntime } from "./runtime/types.js";
import { randomIds, systemClock } from "./util/clock.js";
import { VERSION } from "./version.js";
import { removeIfPresent } from "./util/fs.js";

export interface RunningDaemon {
  /** stops the daemon; with keepPhases, a planned restart that leaves running phases for the next daemon (phases/detach.ts) */
  close(opts?: { keepPhases?: boolean; drainMs?: number }): Promise<void>;
  /** settles once the daemon has closed, however it was asked to (a signal, or POST /v1/daemon/stop) */
  closed: Promise<void>;
  /** re-read the policy file; false (and the old policy kept) when it is broken */
  reload(): Promise<boolean>;
  manager: PhaseManager;
  log: Logger;
  /** the operator console's base URL (no token) when one was asked for */
  consoleUrl: string | null;
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

/** The fingerprint of the key that signed the state dir's anchor, or null (no anchor, unsigned, unreadable: the journal's open judges it). */
async function anchorSignedBy(stateDir: string): Promise<string | null> {
  try {
    return parseAnchor(await readFile(path.join(stateDir, ANCHOR_FILE)), ANCHOR_FILE).signed?.key ?? null;
  } catch {
    return null;
  }
}

/**
 * A connection that has not sent its first request within this time is
 * closed. Each holds a file descriptor, and a client that opens connections
 * and never speaks would otherwise fill the fd table. Once a request has
 * come, the connection is no longer idle by this measure: a streaming exec
 * or a follow may stay silent for as long as its command or its trail does.
 * Between requests, Node's keepAliveTimeout (fastify: 72 s) closes it.
 * The request itself must arrive whole within the same time of its headers:
 * a client that sends headers and then trickles its body a byte at a time
 * would otherwise hold the connection forever (fastify turns Node's
 * requestTimeout off), and 8 MiB over a unix socket takes milliseconds.
 */
export const IDLE_CONNECTION_MS = 10_000;

export function closeIdleConnections(server: import("node:http").Server, idleMs: number): void {
  const silent = new WeakMap<import("node:net").Socket, NodeJS.Timeout>();
  server.on("connection", (sock: import("node:net").Socket) => {
    const timer = setTimeout(() => sock.destroy(), idleMs);
    timer.unref();
    silent.set(sock, timer);
    sock.once("close", () => clearTimeout(timer));
  });
  server.on("request", (req: import("node:http").IncomingMessage) => {
    const timer = silent.get(req.socket);
    if (timer) clearTimeout(timer);
    if (req.complete) return;
    const sock = req.socket;
    const receiving = setTimeout(() => {
      if (!req.complete) sock.destroy();
    }, idleMs);
    receiving.unref();
    // one connection carries many requests (keep-alive): the close listener goes with its request,
    // or each request would leave one (and its request) on the socket until it closes
    const stop = () => clearTimeout(receiving);
    sock.once("close", stop);
    req.once("end", () => {
      stop();
      sock.removeListener("close", stop);
    });
  });
  // a request whose headers never complete is cut by Node itself
  server.headersTimeout = idleMs;
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
  // read once: what is parsed is what is hashed into policy.load
  const policyText = await readFile(settings.policyFile, "utf8").catch(() => null);
  let policy = policyText === null ? await loadPolicy(settings.policyFile) : parsePolicy(policyText, settings.policyFile);
  // Every anchor is signed (docs/AUDIT.md "Signed anchors"); without a usable key the daemon does not start.
  const signer = await loadOrCreateSigningKey(settings.auditKey, await anchorSignedBy(settings.stateDir));
  if (signer.created) {
    log.warn(
      { keyFile: signer.keyFile, fingerprint: signer.fingerprint },
      "created the audit signing key: back it up, and give auditors its public key (`sandboxd audit key`)",
    );
  }
  const journal = await AuditJournal.open(settings.stateDir, { clock: systemClock, signer, witness: settings.auditWitness });
  await journal.append({
    type: "policy.load",
    file: settings.policyFile,
    sha256: createHash("sha256").update(policyText ?? "").digest("hex"),
    bytes: Buffer.byteLength(policyText ?? ""),
    rules: policy.shell.layers.reduce((n, l) => n + l.rules.length, 0),
  });
  const approvals = await ApprovalQueue.open(settings.stateDir, systemClock);
  const grants = await GrantStore.open(settings.stateDir, systemClock);
  const dynmods = await favorDynmods(settings.cgroupFavorDynmods);
  if (dynmods.state === "turned-on") log.info({ cgroup2: dynmods.root }, "turned favordynmods on for the cgroup v2 hierarchy: a command's cgroup move no longer waits a grace period after an idle moment (SANDBOXD_CGROUP_FAVORDYNMODS=0 leaves it)");
  else if (dynmods.state === "failed") log.warn({ cgroup2: dynmods.root, err: dynmods.error }, "could not turn favordynmods on: a command after an idle moment waits a kernel grace period (about 12 ms) for its cgroup");
  else if (dynmods.state === "off") log.info({ cgroup2: dynmods.root }, "SANDBOXD_CGROUP_FAVORDYNMODS=0: favordynmods left off; a command after an idle moment waits a kernel grace period for its cgroup");
  if (settings.benchNoFailFast) log.warn("SANDBOXD_BENCH_NO_FAILFAST=1: commands are not categorised or counted and memory is not watched (a benchmark's side-by-side run; never for agents)");
  const manager = new PhaseManager({
    approvals,
    grants,
    notify: makeNotifier({ command: settings.notifyCommand, url: settings.notifyUrl, log }),
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
    shimDebugLog: settings.logLevel === "debug" || settings.logLevel === "trace",
    extraAllow: settings.extraAllow,
    failFast: !settings.benchNoFailFast,
    serviceOverrides: settings.serviceOverrides,
    buildLogLocation: settings.buildLog,
    logSecrets,
    poolSize: settings.poolSize,
    poolMaxAgeSeconds: settings.poolMaxAgeSeconds,
    spareLayer: settings.spareLayer,
  });
  const report = await manager.reconcile();
  for (const id of report.readopted) log.info({ phase: id }, "re-adopted running phase");
  for (const r of report.reaped) log.info({ phase: r.id, reason: r.reason }, "cleaned up phase container");
  for (const id of report.lost) log.warn({ phase: id }, "phase's container was gone; marked failed");
  if (report.pool) log.info(report.pool, "removed the previous daemon's warm pool");
  manager.startPool();

  // the stop, in two steps: the phases (stopped, or detached for a planned
  // restart), then the servers and the journal; a refused detach changes nothing
  let phasesEnded: Promise<string[]> | null = null;
  const endPhases = (o: { keepPhases?: boolean; drainMs?: number | undefined }): Promise<string[]> => {
    phasesEnded ??= (async () => {
      if (!o.keepPhases) {
        log.info("shutting down: stopping phases");
        const ids = (await manager.list()).filter((p) => p.state === "running").map((p) => p.id);
        await manager.shutdown();
        return ids;
      }
      log.info({ drainMs: o.drainMs ?? DEFAULT_DRAIN_MS }, "planned restart: draining commands, keeping phases");
      return manager.detach(o.drainMs ?? DEFAULT_DRAIN_MS);
    })();
    const p = phasesEnded;
    p.catch(() => {
      if (phasesEnded === p) phasesEnded = null;
    });
    return p;
  };
  let closing: Promise<void> | null = null;
  let settleClosed!: () => void;
  const closed = new Promise<void>((r) => (settleClosed = r));
  const close = (o: { keepPhases?: boolean; drainMs?: number } = {}): Promise<void> =>
    (closing ??= (async () => {
      try {
        await endPhases(o);
      } catch (err) {
        closing = null;
        throw err;
      }
      await closeServers();
      settleClosed();
    })());

  const appOptions = {
    stop: {
      phases: (o: { keepPhases: boolean; drainMs: number | undefined }) => endPhases(o),
      close: () => close().catch((e: Error) => log.error({ err: e.message }, "shutdown failed")),
    },
    manager,
    approvals,
    audit: {
      key: { fingerprint: signer.fingerprint, publicKey: signer.publicKeyPem, keyFile: signer.keyFile },
      exportBundle: (o: { nonce?: string | undefined } = {}) =>
        prepareExport({ stateDir: settings.stateDir, journal, signer, nonce: o.nonce, source: { instance, stateDir: settings.stateDir, hostname: hostname(), version: VERSION } }),
      // The daemon knows more than the files: its own keys (pinned), and the last head it wrote and signed, which a
      // trail rolled back or swapped while it runs no longer reaches.
      verify: () => {
        const checkpoints: Checkpoint[] = [{ ...journal.durable, source: "the running daemon's last written record" }];
        const signed = journal.signedHead;
        if (signed) checkpoints.push({ seq: signed.seq, hash: signed.hash, source: "the running daemon's last signed head" });
        return verifyJournal(settings.stateDir, { pinned: [signer.fingerprint, ...signer.previous.keys()], checkpoints });
      },
    },
    stateDir: settings.stateDir,
    logger: log,
    info: { version: VERSION, instance, pid: process.pid, stateDir: settings.stateDir, socket: settings.socket },
  };
  const app = buildApp(appOptions);
  // The socket is created 0600 (umask) and chmod'ed again: no window where another user can connect.
  const oldMask = process.umask(0o177);
  try {
    await app.listen({ path: settings.socket });
  } finally {
    process.umask(oldMask);
  }
  closeIdleConnections(app.server, IDLE_CONNECTION_MS);
  await chmod(settings.socket, 0o600);
  log.info({ socket: settings.socket, stateDir: settings.stateDir, instance, version: VERSION }, "sandboxd listening");

  // The console (off by default) is imported only when asked for: a daemon without one never loads it.
  let consoleServer: { url: string; close(): Promise<void> } | null = null;
  if (settings.console) {
    try {
      const { startConsole } = await import("./console/server.js");
      const consoleApp = buildApp(appOptions);
      consoleServer = await startConsole(consoleApp, settings.console, log);
      closeIdleConnections(consoleApp.server, IDLE_CONNECTION_MS);
    } catch (err) {
      // A console that cannot listen stops the start, as a broken policy does; nothing is left serving.
      // Phases re-adopted above keep running, as after a crash: the next daemon adopts them again.
      await app.close();
      await journal.close().catch((e: Error) => log.error({ err: e.message }, "closing the audit journal failed"));
      // eslint-disable-next-line no-restricted-syntax -- the socket may already be gone; nothing to do then
      await unlink(settings.socket).catch(() => undefined);
      throw err;
    }
  }

  /**
   * SIGHUP: re-read the policy; a broken file changes nothing (it never
   * half-applies). Accepted or refused, the trail records which content it
   * was (SHA-256 and size of the bytes read, count of shell rules) before the
   * new policy applies.
   */
  const reload = async (): Promise<boolean> => {
    const file = settings.policyFile;
    let text: string | null = null;
    try {
      text = await readFile(file, "utf8");
    } catch {
      /* parsePolicy is not reached; loadPolicy's error below says why */
    }
    const content = text === null ? { sha256: null, bytes: null } : { sha256: createHash("sha256").update(text).digest("hex"), bytes: Buffer.byteLength(text) };
    let next: Awaited<ReturnType<typeof loadPolicy>>;
    try {
      next = text === null ? await loadPolicy(file) : parsePolicy(text, file);
    } catch (err) {
      const message = (err as Error).message;
      let rules: number | null = null;
      try {
        const raw = parseYaml(text ?? "") as { shell?: { rules?: unknown } } | null;
        rules = Array.isArray(raw?.shell?.rules) ? raw.shell.rules.length : null;
      } catch {
        /* not YAML: no count */
      }
      await journal
        .append({ type: "policy.reload_refused", file, ...content, rules, error: message.length > 4096 ? `${message.slice(0, 4096)}…` : message })
        .catch((e: Error) => log.error({ err: e.message }, "could not record the refused policy reload"));
      log.error({ policy: file, err: message }, "policy reload refused; the previous policy stays in force");
      return false;
    }
    const rules = next.shell.layers.reduce((n, l) => n + l.rules.length, 0);
    try {
      await journal.append({ type: "policy.reload", file, ...content, rules });
    } catch (err) {
      log.error({ policy: file, err: (err as Error).message }, "policy reload not recorded, so not applied; the previous policy stays in force");
      return false;
    }
    policy = next;
    log.info({ policy: file, sha256: content.sha256, rules }, "policy reloaded");
    return true;
  };

  // (called only once the servers exist: a stop comes through them, or after startDaemon returned)
  async function closeServers(): Promise<void> {
    await consoleServer?.close();
    await app.close();
    await journal.close().catch((e: Error) => log.error({ err: e.message }, "closing the audit journal failed"));
    await removeIfPresent(settings.socket).catch((e: Error) => log.warn({ socket: settings.socket, err: e.message }, "could not remove the socket"));
    log.info("stopped");
  }
  return { close, closed, reload, manager, log, consoleUrl: consoleServer?.url ?? null };
}
