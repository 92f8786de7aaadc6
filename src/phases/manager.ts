/**
 * The phase registry and state machine: start, exec, stop, reconcile.
 *
 *   starting ──▶ running ──▶ stopping ──▶ stopped
 *       │            │
 *       └────────────┴──────▶ failed   (container or shim lost, start failed)
 *
 * Every container it creates carries the phase id and this daemon's instance
 * id as labels, so a restarted daemon finds them (reconcile) and nothing is
 * orphaned.
 */
import { createWriteStream } from "node:fs";
import { realpath, stat } from "node:fs/promises";
import path from "node:path";
import { pipeline } from "node:stream/promises";
import type { Logger } from "pino";
import { constants as fsc } from "node:fs";
import { open as openFile } from "node:fs/promises";
import dotenv from "dotenv";
import { BuildLogRegistry, type BuildLog } from "../audit/buildlog.js";
import { actionLine, escapeControl, quoteArgv, renderOutput, timestamp } from "../audit/format.js";
import type { AuditEvent, AuditJournal } from "../audit/journal.js";
import { LogSecrets, Redactor, findSecrets, secretsFromDotenv, variants } from "../audit/redact.js";
import { ApprovalQueue, type Approval } from "../approvals/queue.js";
import { SandboxdError } from "../errors.js";
import { PARSE_RULE_ID, combine, evaluateCommand, loadPolicy, type Policy, type Verdict } from "../policy/index.js";
import type { PhaseLimits } from "../policy/limits.js";
import { LABELS, type ContainerRuntime } from "../runtime/types.js";
import { SHIM_ENV, SHIM_PATHS, type ExitMessage } from "../shim/protocol.js";
import type { Clock, IdSource } from "../util/clock.js";
import { PhaseRecorder } from "./recorder.js";
import { ShimChannel } from "./shim-channel.js";
import { listenList, resolveServices, type PhaseServices } from "../net/services.js";
import { DEAD_PORT, StrayConnections } from "../net/stray.js";
import { confineNetwork, RefusalWatch } from "../runtime/netns.js";
import { TunnelServer, type GatewayHandoff } from "../net/tunnels.js";
import { handleClient } from "../db/gateway.js";
import { sqlRulesFor } from "../db/policy-rules.js";
import { PhaseStore } from "./store.js";
import type { PhaseMode, PhaseRecord, PhaseView } from "./types.js";

export interface ManagerOptions {
  runtime: ContainerRuntime;
  stateDir: string;
  instance: string;
  image: string;
  log: Logger;
  clock: Clock;
  ids: IdSource;
  shimConnectTimeoutMs?: number;
  /** operator's additions to the whitelist (settings.extraAllow) */
  extraAllow?: readonly string[];
  approvals: ApprovalQueue;
  /** the hash-chained audit.jsonl: every decision is recorded here before it is acted on */
  journal: AuditJournal;
  /** the daemon's policy; a getter, so a reload (SIGHUP) applies to the next decision */
  policy: () => Policy;
  /** where build_audit.log lives: the project root (default, mounted read-only in the sandbox) or the state dir */
  buildLogLocation?: "project" | "state";
  /** service URLs overriding the project's .env (settings.serviceOverrides) */
  serviceOverrides?: Readonly<Record<string, string>>;
  /** the daemon log's scrubber: each live phase's secrets are registered here */
  logSecrets?: LogSecrets;
}

export interface StartRequest {
  project: string;
  phase: string;
  mode: PhaseMode;
  /** a stricter policy file (host path) for this phase; it can only narrow the daemon's */
  policy?: string | undefined;
}

/** Exactly one of argv (preferred: no shell) or command (parsed and judged part by part). */
export interface ExecRequest {
  argv?: string[] | undefined;
  command?: string | undefined;
  timeoutMs?: number | undefined;
  reason?: string | undefined;
}

/** Receives output as it arrives: UTF-8 text with secrets already scrubbed. */
export interface ExecSink {
  stdout(text: string): void;
  stderr(text: string): void;
}

export interface ExecResult {
  phaseId: string;
  argv: string[] | null;
  command: string | null;
  exitCode: number | null;
  signal: string | null;
  timedOut: boolean;
  durationMs: number;
  stdout: string;
  stderr: string;
  stdoutBytes: number;
  stderrBytes: number;
  stdoutTruncated: boolean;
  stderrTruncated: boolean;
  outputCapBytes: number;
  rule: { id: string; clause: string };
}

export interface ReconcileReport {
  readopted: string[];
  reaped: Array<{ id: string; reason: string }>;
  lost: string[];
}

interface LivePhase {
  record: PhaseRecord;
  channel: ShimChannel | null;
  rec: PhaseRecorder;
  /** the phase's own stricter policy, if any (combined with the daemon's at each decision) */
  phasePolicy: Policy | null;
  /**
   * the project's .env, passed to every command (SKILLS.md Credential Handling: "Read: Environment variables from .env"),
   * with the service URLs replaced by their password-less tunnel URLs (src/net/services.ts)
   */
  dotenv: Record<string, string>;
  /* --- service tunnels (src/net) --- */
  services: PhaseServices;
  tunnels: TunnelServer | null;
  /** connections to destinations that are not services: refused by the kernel, recorded from the conntrack watch */
  stray: StrayConnections | null;
  watch: RefusalWatch | null;
}

/** Names a project's .env cannot set for commands: the sandbox's own plumbing. */
/** How long the conntrack watch may take to show it sees events (src/runtime/netns.ts). */
const WATCH_READY_MS = 5_000;
const RESERVED_ENV = /^(PATH|HOME|LANG|SANDBOXD_.*|LD_.*|PYTHONPATH|PYTHONHOME|PYTHONSTARTUP)$/;

/** Environment of every command (the shim gives commands nothing of its own). */
function commandEnv(record: PhaseRecord, fromDotenv: Record<string, string> = {}): Record<string, string> {
  const base: Record<string, string> = {};
  for (const [k, v] of Object.entries(fromDotenv)) if (!RESERVED_ENV.test(k)) base[k] = v;
  return {
    ...base,
    PATH: "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    HOME: "/tmp",
    LANG: "C.UTF-8",
    PYTHONUNBUFFERED: "1",
    // no __pycache__ churn in the operator's tree
    PYTHONDONTWRITEBYTECODE: "1",
    // `pip install NAME` (SKILLS.md §2) works: the image's Python is Debian's and
    // read-only, so pip installs into the user site under HOME (the phase's /tmp);
    // without this, PEP 668 refuses every install outside a venv
    PIP_BREAK_SYSTEM_PACKAGES: "1",
    SANDBOXD_PHASE: record.id,
    SANDBOXD_MODE: record.mode,
  };
}

/** Keeps the first `cap` UTF-8 bytes of a stream's (scrubbed) text; `total` counts the command's raw bytes. */
class CappedText {
  private parts: string[] = [];
  kept = 0;
  total = 0;
  truncated = false;
  constructor(private readonly cap: number) {}
  count(rawBytes: number): void {
    this.total += rawBytes;
  }
  push(text: string): void {
    if (text === "") return;
    const room = this.cap - this.kept;
    if (room <= 0) {
      this.truncated = true;
      return;
    }
    const bytes = Buffer.byteLength(text);
    if (bytes <= room) {
      this.parts.push(text);
      this.kept += bytes;
      return;
    }
    // cut at a character boundary within the room left
    const cut = Buffer.from(text).subarray(0, room).toString("utf8").replace(/\uFFFD$/, "");
    this.parts.push(cut);
    this.kept += Buffer.byteLength(cut);
    this.truncated = true;
  }
  text(limitBytes = this.cap): string {
    const all = this.parts.join("");
    if (limitBytes >= this.kept) return all;
    return Buffer.from(all).subarray(0, limitBytes).toString("utf8").replace(/\uFFFD$/, "");
  }
}

export class PhaseManager {
  private readonly phases = new Map<string, LivePhase>();
  private readonly store: PhaseStore;
  private shuttingDown = false;
  private readonly connectTimeoutMs: number;
  private readonly extraAllow: ReadonlySet<string>;
  private readonly buildLogs = new BuildLogRegistry();

  constructor(private readonly opts: ManagerOptions) {
    this.store = new PhaseStore(opts.stateDir);
    this.extraAllow = new Set(opts.extraAllow ?? []);
    this.connectTimeoutMs = opts.shimConnectTimeoutMs ?? 30_000;
  }

  /* ------------------------------- queries ------------------------------- */

  async list(): Promise<PhaseView[]> {
    const { records } = await this.store.loadAll();
    return records
      .map((r) => this.view(this.phases.get(r.id)?.record ?? r))
      .sort((a, b) => a.createdAt.localeCompare(b.createdAt));
  }

  async get(id: string): Promise<PhaseView> {
    const live = this.phases.get(id);
    if (live) return this.view(live.record);
    const { records } = await this.store.loadAll();
    const r = records.find((x) => x.id === id);
    if (!r) throw notFound(id);
    return this.view(r);
  }

  private view(record: PhaseRecord): PhaseView {
    return { ...record, runningExecs: this.phases.get(record.id)?.channel?.runningExecs ?? 0 };
  }

  /* -------------------------------- start -------------------------------- */

  async start(req: StartRequest): Promise<PhaseView> {
    this.assertServing();
    const project = await resolveProject(req.project);
    const owner = await stat(project);
    // A phase policy is read and validated before anything exists.
    const phasePolicy = req.policy ? await loadPolicy(req.policy) : null;
    if (!(await this.opts.runtime.imageExists(this.opts.image))) {
      throw new SandboxdError("SBX_ERR_IMAGE_MISSING", `the sandbox image ${this.opts.image} is not in the Docker engine`);
    }
    const { vars: env, text: envText } = await readDotenv(project, owner.uid);
    const id = this.opts.ids.phaseId();
    const token = this.opts.ids.token();
    const limits = this.policyFor(phasePolicy).limits[req.mode];
    const inProject = (this.opts.buildLogLocation ?? "project") === "project";
    const buildLog = inProject ? path.join(project, BUILD_LOG_NAME) : this.store.buildLogPath(id);
    // Opened (and checked) before anything else exists, so an unsafe path leaves nothing behind.
    const audit = inProject ? await this.buildLogs.acquire(buildLog, id, 0o644) : null;
    const record: PhaseRecord = {
      id,
      name: req.phase,
      project,
      mode: req.mode,
      state: "starting",
      instance: this.opts.instance,
      image: this.opts.image,
      containerId: null,
      containerName: `sandboxd-${id}`,
      uid: owner.uid,
      gid: owner.gid,
      createdAt: timestamp(this.opts.clock.now()),
      stoppedAt: null,
      policyFile: req.policy ?? null,
      buildLog,
      endReason: null,
    };
    await this.store.create(record, token);
    const services = resolveServices(req.mode, env, this.opts.serviceOverrides, this.policyFor(phasePolicy).network);
    const live: LivePhase = {
      record,
      channel: null,
      rec: this.recorder(record, audit ?? (await this.buildLogs.acquire(buildLog, id)), envText, env),
      phasePolicy,
      dotenv: { ...env, ...services.env },
      services,
      tunnels: null,
      stray: null,
      watch: null,
    };
    this.phases.set(id, live);
    try {
      live.channel = new ShimChannel(this.store.controlSocket(id), token, id, this.opts.log, { uid: record.uid, gid: record.gid });
      await live.channel.listen();
      await this.openTunnels(live, token);
      record.containerId = await this.opts.runtime.runPhaseContainer({
        name: record.containerName,
        image: this.opts.image,
        labels: {
          [LABELS.managed]: "1",
          [LABELS.phase]: id,
          [LABELS.instance]: this.opts.instance,
          [LABELS.mode]: req.mode,
          [LABELS.project]: project,
        },
        projectDir: project,
        runDir: this.store.runDir(id),
        // the agent reads its audit trail but can neither change nor replace it
        readOnlyFiles: inProject ? [{ host: buildLog, container: `${SHIM_PATHS.workspace}/${BUILD_LOG_NAME}` }] : [],
        env: { [SHIM_ENV.token]: token, [SHIM_ENV.socket]: SHIM_PATHS.controlSocket },
        memoryBytes: limits.memoryBytes,
        cpus: limits.cpus,
        pidsLimit: limits.pidsLimit,
        fileSizeBytes: limits.fileSizeBytes,
        tmpfsBytes: limits.tmpfsBytes,
        // SETUID/SETGID: drop to the project owner; KILL: signal that owner's
        // process groups; DAC_READ_SEARCH: libuv chdirs into /workspace before
        // it switches uid, and a 0700 project is closed to a capability-less
        // root. A non-root daemon owns the run dir, so the shim then also needs
        // DAC_OVERRIDE to reach its socket. Children keep none of these: they
        // always switch to a non-zero uid (root-owned projects are refused).
        capAdd: ["SETUID", "SETGID", "KILL", "DAC_READ_SEARCH", ...(process.getuid?.() === 0 ? [] : ["DAC_OVERRIDE"])],
      });
      // the namespace is set up while the shim starts; both before any command can run
      // (both settled before going on, so a failure's cleanup below sees, and stops, the watch)
      const [ready, confined] = await Promise.allSettled([live.channel.waitReady(this.connectTimeoutMs), this.confineNetwork(live)]);
      if (ready.status === "rejected") throw ready.reason;
      if (confined.status === "rejected") throw confined.reason;
      record.state = "running";
      await this.store.save(record);
      const ts = timestamp(this.opts.clock.now());
      await live.rec.record(
        {
          type: "phase.start",
          name: record.name,
          mode: record.mode,
          project,
          uid: record.uid,
          gid: record.gid,
          image: record.image,
          container: record.containerId,
          policyFile: record.policyFile,
        },
        [
          actionLine(ts, "PHASE", "START", `${record.name} (${id})`, `mode=${record.mode} project=${project}`),
          `[${ts}] PHASE_START: Phase ${record.name} (${id}) mode=${record.mode} uid=${record.uid}:${record.gid}${record.policyFile ? ` policy=${record.policyFile}` : ""}`,
        ],
      );
      this.opts.log.info({ phase: id, name: record.name, mode: record.mode, project }, "phase started");
      return this.view(record);
    } catch (err) {
      // A phase that failed to start leaves nothing behind.
      this.phases.delete(id);
      await live.channel?.close({ shutdownShim: false }).catch(() => undefined);
      await live.tunnels?.close().catch(() => undefined);
      live.watch?.stop();
      if (record.containerId) await this.opts.runtime.stopAndRemove(record.containerId, 0).catch(() => undefined);
      await this.buildLogs.release(buildLog, id).catch(() => undefined);
      await this.store.remove(id).catch(() => undefined);
      this.opts.log.error({ phase: id, err: (err as Error).message }, "phase start failed; cleaned up");
      this.opts.logSecrets?.remove(id);
      throw err;
    }
  }

  /**
   * The phase's service tunnels: a TunnelServer on <runDir>/tunnel.sock, and
   * the list of listeners the shim opens (sent after every welcome).
   */
  private async openTunnels(live: LivePhase, token: string): Promise<void> {
    const id = live.record.id;
    live.tunnels = new TunnelServer({
      socketPath: path.join(this.store.runDir(id), "tunnel.sock"),
      token,
      phaseId: id,
      mode: live.record.mode,
      services: () => live.services,
      rec: live.rec,
      clock: this.opts.clock,
      log: this.opts.log,
      gateway: this.gatewayFor(live),
    });
    await live.tunnels.listen();
    live.stray = new StrayConnections({
      phaseId: id,
      rec: live.rec,
      clock: this.opts.clock,
      log: this.opts.log,
      services: () => listenList(live.services),
    });
    live.channel?.setServices(listenList(live.services));
  }

  /**
   * Makes every TCP connection in the container to an address outside
   * loopback fail at once (not at routing) and be tracked, so that the
   * shim's conntrack watch reports it (src/runtime/netns.ts). Where that
   * cannot be done (a daemon that is not root, an engine on another host)
   * the sandbox is no less closed — the kernel still refuses every such
   * connection — but those refusals go unrecorded; the audit trail says so.
   */
  private async confineNetwork(live: LivePhase, opts: { readopt: boolean } = { readopt: false }): Promise<void> {
    const { record } = live;
    let error: string | null = null;
    try {
      const pid = await this.opts.runtime.containerPid(record.containerId!);
      const watch = new RefusalWatch(
        pid,
        DEAD_PORT,
        (c) => live.stray?.refused(c),
        (why) => void this.watchEnded(live, why),
        (what) => live.stray?.lost(what),
      );
      live.watch = watch;
      // The watch subscribes while the rules go in (after a restart the namespace
      // keeps its rules; only the watch is new). Its readiness probe is answered
      // once both are in place: conntrack runs in the namespace from the NAT table on.
      const rulesIn = opts.readopt ? Promise.resolve() : confineNetwork(pid, { deadPort: DEAD_PORT });
      rulesIn.catch(() => watch.stop()); // no rules, no events: stop waiting for them at once
      const [rules, ready] = await Promise.allSettled([rulesIn, watch.ready(WATCH_READY_MS)]);
      if (rules.status === "rejected" || ready.status === "rejected") {
        watch.stop();
        live.watch = null;
        throw (rules.status === "rejected" ? rules.reason : (ready as PromiseRejectedResult).reason) as Error;
      }
      if (this.phases.get(record.id) !== live || record.state === "stopping" || record.state === "stopped" || record.state === "failed") {
        // the phase ended while the watch was starting: nothing is left to watch
        watch.stop();
        live.watch = null;
        return;
      }
    } catch (err) {
      error = (err as Error).message;
      this.opts.log.warn({ phase: record.id, err: error }, "connections to anything but services will be refused but not recorded");
    }
    const ts = timestamp(this.opts.clock.now());
    await live.rec.record(
      { type: "net.confine", deadPort: DEAD_PORT, recorded: error === null, ...(opts.readopt ? { readopt: true } : {}), ...(error ? { error } : {}) },
      [
        actionLine(ts, "NET", "CONFINE", `${record.name} (${record.id})`, error === null
          ? `TCP to any address but loopback → 127.0.0.1:${DEAD_PORT}; every refused connection recorded`
          : `DEGRADED: connections to anything but services are refused by the kernel but not recorded: ${error}`),
      ],
    );
  }

  /** The conntrack watch of a running phase ended on its own: say so in its trail. */
  private async watchEnded(live: LivePhase, why: string): Promise<void> {
    live.watch = null;
    if (live.record.state !== "running") return;
    this.opts.log.warn({ phase: live.record.id, why }, "conntrack watch ended; refused connections go unrecorded");
    await live.rec
      .record({ type: "net.confine", deadPort: DEAD_PORT, recorded: false, error: why }, [
        actionLine(timestamp(this.opts.clock.now()), "NET", "CONFINE", `${live.record.name} (${live.record.id})`, `DEGRADED: the conntrack watch ended (${why}); refused connections are no longer recorded`),
      ])
      .catch(() => undefined);
  }

  /**
   * PostgreSQL-protocol tunnels end in the SQL gateway (src/db/gateway.ts):
   * it logs in upstream with the credentials of the URL chosen for the mode
   * (they stay in the daemon), judges every statement under the phase's
   * policy and records DB_QUERY / DB_RESULT / DB_ERROR.
   */
  private gatewayFor(live: LivePhase): GatewayHandoff {
    return async (client, service) => {
      const url = new URL(service.url!);
      await handleClient(client, {
        engine: service.name === "questdb-pg" ? "questdb" : "postgres",
        mode: live.record.mode,
        upstream: {
          host: service.upstream!.host,
          port: service.upstream!.port,
          user: decodeURIComponent(url.username),
          password: decodeURIComponent(url.password),
          database: service.database ?? "",
        },
        record: async (event, lines) => void (await live.rec.record(event, lines)),
        // a chunk's statements and results are made durable together (one group commit, one build-log append)
        recordMany: async (entries) => void (await live.rec.recordMany(entries)),
        redact: (text) => live.rec.redact(text),
        statementTimeoutMs: this.policyFor(live.phasePolicy).database.statementTimeoutMs.value,
        rules: sqlRulesFor(this.policyFor(live.phasePolicy).database),
        log: this.opts.log,
      });
    };
  }

  /** The effective policy: the daemon's, narrowed by the phase's own when it has one. */
  private policyFor(phasePolicy: Policy | null): Policy {
    const base = this.opts.policy();
    return phasePolicy ? combine(base, phasePolicy) : base;
  }

  private limitsOf(live: LivePhase): PhaseLimits {
    return this.policyFor(live.phasePolicy).limits[live.record.mode];
  }

  private recorder(record: PhaseRecord, log: BuildLog, envText: string, env: Record<string, string>): PhaseRecorder {
    // Every value the commands get that could be a secret is scrubbed from every record.
    const findings = [...secretsFromDotenv(envText), ...findSecrets(commandEnv(record, env), "env")];
    const secrets = new Set<string>();
    for (const f of findings) for (const v of variants(f.value)) secrets.add(v);
    const redactor = new Redactor(secrets, {
      onWarning: (m) => this.opts.log.warn({ phase: record.id }, m),
    });
    // the daemon's own log is scrubbed of them too, while the phase lives
    this.opts.logSecrets?.add(record.id, redactor);
    return new PhaseRecorder(record.id, this.opts.journal, log, redactor);
  }

  /* --------------------------------- exec -------------------------------- */

  async exec(id: string, req: ExecRequest, sink?: ExecSink, abort?: AbortSignal): Promise<ExecResult> {
    this.assertServing();
    const live = await this.running(id);
    const { record, rec } = live;
    const limits = this.limitsOf(live);
    const timeoutMs = req.timeoutMs ?? limits.defaultTimeoutMs;
    if (timeoutMs > limits.maxTimeoutMs) {
      throw new SandboxdError(
        "SBX_ERR_TIMEOUT_RANGE",
        `timeout ${timeoutMs} ms exceeds the ${limits.maxTimeoutMs} ms limit of a ${record.mode}-mode phase`,
      );
    }
    const input = req.argv ? { argv: req.argv } : { command: req.command ?? "" };
    let verdict: Verdict = evaluateCommand(this.policyFor(live.phasePolicy), input, { extraAllow: this.extraAllow });
    // What is shown in logs and errors: argv quoted, or the string as given; scrubbed, one line.
    const cmd = rec.redact(req.argv ? quoteArgv(req.argv) : (req.command ?? ""));
    const ts = () => timestamp(this.opts.clock.now());
    const key = { argv: req.argv, command: req.command };
    const what = { argv: req.argv ?? null, command: req.argv ? null : (req.command ?? null) };

    // An `ask` a human already approved for exactly this command runs once.
    let approval: Approval | null = null;
    if (verdict.decision === "ask") {
      approval = await this.opts.approvals.consume(id, key);
      if (approval) {
        verdict = { ...verdict, decision: "allow", reason: `approved by a human (${approval.id}${approval.note ? `: ${approval.note}` : ""})` };
      }
    }

    // The verdict is on disk, in both records, before anything runs.
    const reasonNote = req.reason ? ` reason=${JSON.stringify(req.reason)}` : "";
    const approvalNote = approval ? ` approval=${approval.id}` : "";
    await rec.record(
      {
        type: "exec.verdict",
        ...what,
        decision: verdict.decision,
        rule: verdict.ruleId,
        clause: verdict.clause,
        reason: verdict.reason,
        parts: verdict.parts.map((p) => ({ argv: p.argv, decision: p.decision, rule: p.ruleId })),
        approval: approval?.id ?? null,
        requestReason: req.reason ?? null,
        timeoutMs,
      },
      [
        `[${ts()}] SHELL_EXEC: ${escapeControl(cmd)}`,
        actionLine(ts(), "SHELL", "POLICY", cmd, `${verdict.decision.toUpperCase()} ${verdict.ruleId} (${verdict.clause})${approvalNote}${reasonNote}`),
      ],
    );
    if (verdict.decision === "ask") {
      const { approval: pending, created } = await this.opts.approvals.request(id, key, {
        ruleId: verdict.ruleId,
        clause: verdict.clause,
        policyReason: verdict.reason,
        requestReason: req.reason,
      });
      if (created) {
        await rec.record(
          { type: "approval.request", approval: pending.id, ...what, rule: verdict.ruleId, clause: verdict.clause, reason: verdict.reason },
          [actionLine(ts(), "APPROVAL", "REQUEST", cmd, `${pending.id} pending: ${verdict.reason}`)],
        );
        this.opts.log.info({ phase: id, approval: pending.id, command: cmd }, "approval requested");
      }
      throw policyError(verdict, cmd, rec, pending.id);
    }
    if (verdict.decision !== "allow") throw policyError(verdict, cmd, rec);

    const channel = live.channel;
    if (!channel?.connected) {
      throw new SandboxdError("SBX_ERR_SHIM_LOST", `the shim of phase ${id} is not connected`);
    }
    const out = new CappedText(limits.outputCapBytes);
    const err = new CappedText(limits.outputCapBytes);
    const outText = rec.outputStream();
    const errText = rec.outputStream();
    const started = this.opts.clock.monotonicMs();

    const outcome = await new Promise<{ exit?: ExitMessage; spawnError?: { code: string; message: string } }>(
      (resolve, reject) => {
        let execId = 0;
        // Backstop: the shim enforces the timeout; this catches a shim that stopped answering.
        const backstop = setTimeout(
          () => {
            channel.signal(execId, "SIGKILL");
            finish(() => reject(new SandboxdError("SBX_ERR_SHIM_LOST", `the shim of phase ${id} did not report the end of the command`)));
          },
          timeoutMs + limits.killGraceMs + 10_000,
        );
        const onAbort = () => channel.signal(execId, "SIGKILL");
        let done = false;
        const finish = (fn: () => void) => {
          if (done) return;
          done = true;
          clearTimeout(backstop);
          abort?.removeEventListener("abort", onAbort);
          fn();
        };
        execId = channel.exec(
          {
            argv: verdict.execArgv,
            cwd: SHIM_PATHS.workspace,
            env: commandEnv(record, live.dotenv),
            timeoutMs,
            killGraceMs: limits.killGraceMs,
            uid: record.uid,
            gid: record.gid,
          },
          {
            onStarted: () => undefined,
            onStdout: (c) => {
              out.count(c.length);
              const text = outText.push(c);
              out.push(text);
              if (text) sink?.stdout(text);
            },
            onStderr: (c) => {
              err.count(c.length);
              const text = errText.push(c);
              err.push(text);
              if (text) sink?.stderr(text);
            },
            onExit: (exit) => finish(() => resolve({ exit })),
            onSpawnError: (code, message) => finish(() => resolve({ spawnError: { code, message } })),
            onLost: (e) => finish(() => reject(e)),
          },
        );
        // A client that goes away (Ctrl-C on a streaming exec) ends its command.
        if (abort?.aborted) onAbort();
        else abort?.addEventListener("abort", onAbort, { once: true });
      },
    ).catch(async (e: unknown) => {
      await rec
        .record({ type: "exec.error", ...what, error: (e as Error).message }, [
          actionLine(ts(), "SHELL", "EXEC", cmd, `ERROR ${(e as Error).message}`),
        ])
        .catch(() => undefined);
      throw e;
    });
    // Whatever the redactors held back (a possible secret prefix) is flushed, scrubbed.
    for (const [buf, stream, toSink] of [
      [out, outText, sink?.stdout.bind(sink)],
      [err, errText, sink?.stderr.bind(sink)],
    ] as const) {
      const rest = stream.end();
      buf.push(rest);
      if (rest) toSink?.(rest);
    }

    const durationMs = Math.round(this.opts.clock.monotonicMs() - started);
    let exitCode: number | null;
    let signal: string | null = null;
    let timedOut = false;
    if (outcome.spawnError) {
      // Same convention as a shell: 127 not found, 126 not executable.
      exitCode = outcome.spawnError.code === "ENOENT" ? 127 : 126;
      err.push(rec.redact(`sandboxd: cannot run ${verdict.execArgv[0]}: ${outcome.spawnError.message}\n`));
    } else {
      const exit = outcome.exit!;
      exitCode = exit.exitCode;
      signal = exit.signal;
      timedOut = exit.timedOut;
    }

    const resultWord = timedOut
      ? `TIMEOUT after ${timeoutMs} ms`
      : exitCode === 0
        ? "PASS"
        : exitCode === null
          ? `KILLED ${signal}`
          : `FAIL exit ${exitCode}`;
    const auditCap = limits.auditOutputCapBytes;
    const auditOut = out.text(auditCap);
    const auditErr = err.text(auditCap);
    const notKept = (b: CappedText, kept: string) => Math.max(0, b.total - Buffer.byteLength(kept));
    await rec.record(
      {
        type: "exec.result",
        ...what,
        exitCode,
        signal,
        timedOut,
        durationMs,
        stdoutBytes: out.total,
        stderrBytes: err.total,
        stdout: auditOut,
        stderr: auditErr,
      },
      [
        `[${ts()}] RETURN_CODE: ${exitCode ?? `signal ${signal}`}${timedOut ? " (timeout)" : ""}`,
        ...renderOutput(ts(), "STDOUT", auditOut, notKept(out, auditOut)),
        ...renderOutput(ts(), "STDERR", auditErr, notKept(err, auditErr)),
        actionLine(ts(), "SHELL", "EXEC", cmd, resultWord),
      ],
    );

    return {
      phaseId: id,
      // scrubbed like every other copy: the caller may have passed a secret as an argument
      argv: what.argv?.map((a) => rec.redact(a)) ?? null,
      command: what.command === null ? null : rec.redact(what.command),
      exitCode,
      signal,
      timedOut,
      durationMs,
      stdout: out.text(),
      stderr: err.text(),
      stdoutBytes: out.total,
      stderrBytes: err.total,
      stdoutTruncated: out.truncated,
      stderrTruncated: err.truncated,
      outputCapBytes: limits.outputCapBytes,
      rule: { id: verdict.ruleId, clause: verdict.clause },
    };
  }

  /* ------------------------------ approvals ----------------------------- */

  async decideApproval(approvalId: string, decision: "approve" | "deny", note?: string): Promise<Approval> {
    this.assertServing();
    const before = this.opts.approvals.get(approvalId);
    const live = this.phases.get(before.phaseId);
    if (!live) {
      throw new SandboxdError("SBX_ERR_PHASE_NOT_RUNNING", `phase ${before.phaseId} of approval ${approvalId} is no longer running`);
    }
    const a = await this.opts.approvals.decide(approvalId, decision, note);
    const cmd = live.rec.redact(a.argv ? quoteArgv(a.argv) : (a.command ?? ""));
    await live.rec.record({ type: `approval.${decision}`, approval: a.id, argv: a.argv, command: a.command, note: note ?? null }, [
      actionLine(
        timestamp(this.opts.clock.now()),
        "APPROVAL",
        decision === "approve" ? "APPROVE" : "DENY",
        cmd,
        `${a.id} by operator${note ? `: ${note}` : ""}`,
      ),
    ]);
    this.opts.log.info({ phase: a.phaseId, approval: a.id, decision }, "approval decided");
    return a;
  }

  /** Flow control for a streaming client of this phase. */
  flow(id: string): { pause(): void; resume(): void } {
    const ch = this.phases.get(id)?.channel;
    return { pause: () => ch?.pause(), resume: () => ch?.resume() };
  }

  /* --------------------------------- logs -------------------------------- */

  async logs(id: string, follow: boolean): Promise<{ stream: NodeJS.ReadableStream } | { file: string }> {
    const live = this.phases.get(id);
    if (live?.record.containerId && live.record.state === "running") {
      return { stream: await this.opts.runtime.logs(live.record.containerId, { follow }) };
    }
    await this.get(id); // 404 for an unknown id
    return { file: this.store.containerLogPath(id) };
  }

  /* --------------------------------- stop -------------------------------- */

  async stop(id: string, why = "stopped by operator"): Promise<PhaseView> {
    const live = this.phases.get(id);
    if (!live) {
      const view = await this.get(id);
      throw new SandboxdError("SBX_ERR_PHASE_NOT_RUNNING", `phase ${id} is already ${view.state}`, {
        hint: "nothing to stop; `sandboxd ps` lists running phases",
      });
    }
    if (live.record.state === "stopping") {
      throw new SandboxdError("SBX_ERR_PHASE_NOT_RUNNING", `phase ${id} is already stopping`);
    }
    await this.finish(live, "stopped", why);
    return this.view(live.record);
  }

  /** Stop the container, keep its logs, close the record. */
  private async finish(live: LivePhase, state: "stopped" | "failed", why: string): Promise<void> {
    const { record } = live;
    record.state = "stopping";
    const running = live.channel?.runningExecs ?? 0;
    await live.channel?.close({ shutdownShim: true }).catch(() => undefined);
    await live.tunnels?.close().catch(() => undefined);
    live.watch?.stop();
    live.watch = null;
    live.stray?.close();
    if (record.containerId) {
      await this.saveContainerLogs(record).catch((e: Error) =>
        this.opts.log.warn({ phase: record.id, err: e.message }, "could not keep container logs"),
      );
      await this.opts.runtime.stopAndRemove(record.containerId, 2);
    }
    await this.store.removeRunDir(record.id).catch(() => undefined);
    await this.opts.approvals.expirePhase(record.id).catch(() => undefined);
    record.state = state;
    record.stoppedAt = timestamp(this.opts.clock.now());
    record.endReason = why;
    await this.store.save(record);
    const ts = timestamp(this.opts.clock.now());
    await live.rec
      .record({ type: state === "stopped" ? "phase.complete" : "phase.failed", name: record.name, reason: why, runningCommandsEnded: running }, [
        actionLine(ts, "PHASE", "STOP", `${record.name} (${record.id})`, why),
        state === "stopped"
          ? `[${ts}] PHASE_COMPLETE: Phase ${record.name} (${record.id}) — ${why}${running ? `; ${running} running command(s) ended` : ""}`
          : `[${ts}] PHASE_FAILED: Phase ${record.name} (${record.id}) — ${why}`,
      ])
      .catch((e: Error) => this.opts.log.error({ phase: record.id, err: e.message }, "could not record the end of the phase"));
    await this.buildLogs.release(record.buildLog, record.id).catch(() => undefined);
    this.phases.delete(record.id);
    this.opts.log.info({ phase: record.id, state, why }, "phase ended");
    this.opts.logSecrets?.remove(record.id);
  }

  private async saveContainerLogs(record: PhaseRecord): Promise<void> {
    if (!record.containerId) return;
    const stream = await this.opts.runtime.logs(record.containerId, { follow: false });
    await pipeline(stream, createWriteStream(this.store.containerLogPath(record.id), { flags: "a", mode: 0o600 }));
  }

  /* ------------------------------ reconcile ------------------------------ */

  /**
   * After a restart: re-adopt running phases whose shim reconnects, clean up
   * everything else this instance created. Says which in the report and log.
   */
  async reconcile(): Promise<ReconcileReport> {
    const report: ReconcileReport = { readopted: [], reaped: [], lost: [] };
    const containers = await this.opts.runtime.list({ [LABELS.instance]: this.opts.instance });
    const { records, broken } = await this.store.loadAll();
    for (const b of broken) this.opts.log.warn({ phase: b.id, err: b.error }, "unreadable phase record skipped");
    const byId = new Map(records.map((r) => [r.id, r]));
    const seen = new Set<string>();

    await Promise.all(
      containers.map(async (c) => {
        const id = c.labels[LABELS.phase] ?? "";
        seen.add(id);
        const record = byId.get(id);
        const alive = record && (record.state === "running" || record.state === "starting") && c.running;
        if (record && alive) {
          const live = await this.revive({ ...record, containerId: c.id });
          this.phases.set(id, live);
          try {
            if (live.record.state === "failed") throw new Error(live.record.endReason ?? "phase policy unreadable");
            const token = await this.store.token(id);
            live.channel = new ShimChannel(this.store.controlSocket(id), token, id, this.opts.log, { uid: record.uid, gid: record.gid });
            await live.channel.listen();
            await this.openTunnels(live, token);
            await live.channel.waitReady(this.connectTimeoutMs);
            await this.confineNetwork(live, { readopt: true });
            live.record.state = "running";
            await this.store.save(live.record);
            await live.rec.record({ type: "phase.readopt", name: record.name }, [
              actionLine(timestamp(this.opts.clock.now()), "PHASE", "READOPT", `${record.name} (${id})`, "daemon restarted; shim reconnected"),
            ]);
            report.readopted.push(id);
            return;
          } catch (err) {
            await this.finish(live, "failed", `daemon restarted and the phase could not be re-adopted: ${(err as Error).message}`);
            report.reaped.push({ id, reason: "shim did not reconnect" });
            return;
          }
        }
        // A container with no live record: keep what can be kept, then remove it.
        if (record) {
          const live = await this.revive({ ...record, containerId: c.id });
          const why = c.running ? `record says ${record.state}` : `container had ${c.state}`;
          await this.finish(live, record.state === "stopped" ? "stopped" : "failed", `reaped after daemon restart (${why})`);
          report.reaped.push({ id, reason: why });
        } else {
          await this.opts.runtime.stopAndRemove(c.id, 0);
          report.reaped.push({ id: id || c.name, reason: "no phase record" });
        }
      }),
    );

    for (const r of records) {
      if ((r.state === "running" || r.state === "starting" || r.state === "stopping") && !seen.has(r.id)) {
        const live = await this.revive({ ...r, containerId: null });
        await this.finish(live, "failed", "container vanished while the daemon was down");
        report.lost.push(r.id);
      }
    }
    if (report.readopted.length + report.reaped.length + report.lost.length > 0) {
      this.opts.log.info(report, "reconciled phases after restart");
    }
    return report;
  }

  /**
   * A phase's in-memory state rebuilt from its record after a restart. A phase
   * whose own policy can no longer be read is not re-adopted with a wider one:
   * revive throws and the caller ends the phase.
   */
  private async revive(record: PhaseRecord): Promise<LivePhase> {
    const { vars, text } = await readDotenv(record.project, record.uid).catch(() => ({ vars: {}, text: "" }));
    const log = await this.reopenAudit(record);
    const services = resolveServices(record.mode, vars, this.opts.serviceOverrides, this.opts.policy().network);
    const live: LivePhase = {
      record,
      channel: null,
      rec: this.recorder(record, log, text, vars),
      phasePolicy: null,
      dotenv: { ...vars, ...services.env },
      services,
      tunnels: null,
      stray: null,
      watch: null,
    };
    if (record.policyFile) {
      try {
        live.phasePolicy = await loadPolicy(record.policyFile);
      } catch (err) {
        // Keep the phase closed to commands: record why, let the caller reap it.
        live.record.state = "failed";
        live.record.endReason = `phase policy ${record.policyFile} unreadable after restart: ${(err as Error).message}`;
      }
      if (live.phasePolicy) live.services = resolveServices(record.mode, vars, this.opts.serviceOverrides, this.policyFor(live.phasePolicy).network);
    }
    return live;
  }

  /**
   * After a restart, a phase's log may have become unusable (removed and
   * replaced by something unsafe); then the record goes to the state dir,
   * so reconciling never fails for want of a log.
   */
  private async reopenAudit(record: PhaseRecord): Promise<BuildLog> {
    try {
      return await this.buildLogs.acquire(record.buildLog, record.id, 0o644);
    } catch (err) {
      const fallback = this.store.buildLogPath(record.id);
      this.opts.log.warn({ phase: record.id, path: record.buildLog, err: (err as Error).message, fallback }, "build log unusable; writing to the state dir");
      record.buildLog = fallback;
      return this.buildLogs.acquire(fallback, record.id);
    }
  }

  /* ------------------------------- shutdown ------------------------------ */

  /** SIGTERM: refuse new work, stop every phase, leave nothing running. */
  async shutdown(): Promise<void> {
    this.shuttingDown = true;
    await Promise.all(
      [...this.phases.values()].map((live) =>
        this.finish(live, "stopped", "daemon shut down").catch((e: Error) =>
          this.opts.log.error({ phase: live.record.id, err: e.message }, "stopping phase at shutdown failed"),
        ),
      ),
    );
  }

  private assertServing(): void {
    if (this.shuttingDown) throw new SandboxdError("SBX_ERR_SHUTTING_DOWN", "the daemon is shutting down");
    // Fail closed: nothing is done that cannot be recorded.
    const failed = this.opts.journal.failed;
    if (failed) throw failed;
  }

  private async running(id: string): Promise<LivePhase> {
    const live = this.phases.get(id);
    if (live && live.record.state === "running") return live;
    const view = await this.get(id);
    throw new SandboxdError("SBX_ERR_PHASE_NOT_RUNNING", `phase ${id} is ${view.state}, not running`);
  }
}

export const BUILD_LOG_NAME = "build_audit.log";

function notFound(id: string): SandboxdError {
  return new SandboxdError("SBX_ERR_PHASE_NOT_FOUND", `no phase with id ${id}`);
}


function policyError(verdict: Verdict, cmd: string, rec: PhaseRecorder, approvalId?: string): SandboxdError {
  const details = { rule: verdict.ruleId, clause: verdict.clause, decision: verdict.decision, ...(approvalId ? { approvalId } : {}) };
  const reason = rec.redact(verdict.reason);
  if (verdict.decision === "forbid") {
    const code = verdict.ruleId === PARSE_RULE_ID ? "SBX_ERR_COMMAND_PARSE" : "SBX_ERR_POLICY_DENIED";
    return new SandboxdError(code, `policy denied \`${cmd}\` (rule ${verdict.ruleId}, ${verdict.clause}): ${reason}`, {
      details,
    });
  }
  return new SandboxdError(
    "SBX_ERR_POLICY_NEEDS_APPROVAL",
    `policy requires approval for \`${cmd}\` (rule ${verdict.ruleId}, ${verdict.clause}): ${reason}`,
    {
      hint: approvalId
        ? `approval ${approvalId} is pending: a human can run \`sandboxd approvals approve ${approvalId}\`, then run the same command again (it may run once)`
        : "run a whitelisted command instead",
      details,
    },
  );
}

/**
 * The project's .env, read without trusting the project: the agent could have
 * replaced it with a symlink to a file only root may read, and the daemon
 * (root) must not pass that file's contents to the agent's commands.
 */
async function readDotenv(project: string, ownerUid: number): Promise<{ vars: Record<string, string>; text: string }> {
  let fh;
  try {
    fh = await openFile(path.join(project, ".env"), fsc.O_RDONLY | fsc.O_NOFOLLOW | fsc.O_NONBLOCK);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === "ENOENT") return { vars: {}, text: "" };
    if (code === "ELOOP") throw new SandboxdError("SBX_ERR_VALIDATION", `${project}/.env is a symbolic link; sandboxd reads only a regular .env file`, {
      hint: "replace the link with the file itself",
    });
    throw err;
  }
  try {
    const st = await fh.stat();
    if (!st.isFile() || (st.uid !== ownerUid && st.uid !== 0) || st.size > 1024 * 1024) {
      throw new SandboxdError("SBX_ERR_VALIDATION", `${project}/.env must be a regular file under 1 MiB owned by the project's owner`, {
        hint: "fix the file's type, owner or size",
      });
    }
    const text = await fh.readFile("utf8");
    return { vars: dotenv.parse(text), text };
  } finally {
    await fh.close();
  }
}

async function resolveProject(project: string): Promise<string> {
  let real: string;
  try {
    real = await realpath(project);
  } catch {
    throw new SandboxdError("SBX_ERR_PROJECT_NOT_FOUND", `project path ${project} does not exist`);
  }
  const s = await stat(real);
  if (!s.isDirectory()) {
    throw new SandboxdError("SBX_ERR_PROJECT_NOT_DIR", `project path ${project} is not a directory`);
  }
  if (s.uid === 0) {
    // Commands run as the project's owner. As uid 0 they would keep the shim's
    // capabilities (root keeps its bounding set across execve) and could read
    // the shim's secret; so root-owned projects are refused outright.
    throw new SandboxdError("SBX_ERR_PROJECT_ROOT_OWNED", `project ${real} is owned by root; its commands would run as root`);
  }
  return real;
}
